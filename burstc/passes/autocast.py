"""autocast: each SDPA call that autocast ran in lower precision gets autocast's casts written into the
graph, exactly where eager autocast makes them, so the site has one dtype and converts.

Dynamo records every node's output on fake tensors under the autocast state the call runs with (around
the compiled call, or entered inside it). SDPA with a bf16/fp16 output from fp32 or mixed-dtype inputs is
only ever autocast's doing: eager SDPA without it rejects mixed dtypes and keeps fp32 in fp32. Autocast
casts SDPA's floating arguments (q, k, v, a floating attn_mask; never fp64) to its dtype, which is the
output's; the pass writes those `.to(dtype)` calls. Burst's own ops are in none of autocast's lists, so
nothing casts them again, and the ring accumulates in fp32 as it does for any bf16/fp16 input.
"""
from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from burstc.passes.find_attention import SDPA_TARGETS, source_line
from burstc.passes.nodes import new_node

log = logging.getLogger("burstc.passes")
_LOWER = (torch.bfloat16, torch.float16)
_CAST_ARGS = ("query", "key", "value", "attn_mask")


def spell_out_autocast(gm: fx.GraphModule) -> fx.GraphModule:
    """Write autocast's casts of every SDPA call of gm's graph (in place); returns gm."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in SDPA_TARGETS:
            changed |= _spell_out(gm.graph, node)
    if changed:
        gm.recompile()
    return gm


def _spell_out(graph: fx.Graph, node: fx.Node) -> bool:
    out = node.meta.get("example_value")
    if not isinstance(out, torch.Tensor) or out.dtype not in _LOWER:
        return False
    slots = [(i, a) for i, a in enumerate(node.args[:4])] + [(k, a) for k, a in node.kwargs.items()
                                                              if k == "attn_mask"]
    casts = [(slot, a) for slot, a in slots if _cast_by_autocast(a, out.dtype)]
    if not casts:
        return False
    args, kwargs = list(node.args), dict(node.kwargs)
    with graph.inserting_before(node):
        for slot, a in casts:
            cast = new_node(graph, "call_method", "to", (a, out.dtype), {}, node)
            if isinstance(slot, int):
                args[slot] = cast
            else:
                kwargs[slot] = cast
    node.args, node.kwargs = tuple(args), kwargs
    counters["burst"]["autocast_sites"] += 1
    log.info("burst: attention %s runs under autocast: %s cast to %s as eager autocast casts them%s", node.name,
             ", ".join(a.name for _, a in casts), out.dtype, f" (at {source_line(node)})" if source_line(node) else "")
    return True


def _cast_by_autocast(a, dtype: torch.dtype) -> bool:
    """Whether autocast casts this SDPA argument to dtype: a floating tensor other than fp64 of another dtype."""
    v = a.meta.get("example_value") if isinstance(a, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype not in (dtype, torch.float64)
