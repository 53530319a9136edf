"""mask_code: extract_mask_code(gm, predicate, axes) -> MaskCode | None: the model's own mask construction
as a function of positions, `fn(b, h, q_idx, kv_idx, *leaves)` (FlexAttention's mask_mod convention), so
the runtime can evaluate the very code the model wrote on a few sampled tiles and prove that the
recognised descriptors say the same (burstc.runtime.mask_proof). The graph is not changed.

The function is the whole backward slice of the boolean predicate: the nodes that place an index on the
query / key axis (`arange(n)[None, None, :, None] + c`) become `q_idx + c` / `kv_idx + c`; the graph's
inputs it reads (the tokenizer's mask, position ids) are its leaves, passed in as tensors, and what is
computed from them without positions (a left-padding count, document ids) is recomputed inside, so
the leaves are replicated inputs sequence mode never has to gather (a value computed from a symbolic
size, under dynamic=True, is a leaf itself); an `.expand` of a position-dependent value to the full
[B, 1, N, N] is dropped (broadcasting does it). The function is tried on a few positions at compile
time; a construction that cannot be evaluated on a few positions (a reshape to N, a non-tensor leaf)
has no MaskCode, and its mask is materialised instead.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from burstc.passes.shard_rules import value


@dataclass(frozen=True)
class MaskCode:
    """The model's mask as fn(b, h, q_idx, kv_idx, *leaves); leaves are nodes of the compiled graph."""

    fn: fx.GraphModule
    leaves: tuple[fx.Node, ...]


def extract_mask_code(gm: fx.GraphModule, predicate: fx.Node, axes: dict[fx.Node, tuple[str, int]]
                      ) -> Optional[MaskCode]:
    """axes: the nodes holding a position index on the 'q' or 'kv' axis, with their offset c (index + c)."""
    dependent: set[fx.Node] = set()
    for node in gm.graph.nodes:  # topological: a node depends on a position if an input does
        if node in axes or any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    if predicate not in dependent:
        return None
    wanted, stack = set(), [predicate]
    while stack:  # the part of the slice that depends on positions
        n = stack.pop()
        if n in wanted or n not in dependent:
            continue
        wanted.add(n)
        if n not in axes:
            stack.extend(n.all_input_nodes)

    graph = fx.Graph()
    _b, _h, q_idx, kv_idx = (graph.placeholder(name) for name in ("b", "h", "q_idx", "kv_idx"))
    leaves: dict[fx.Node, fx.Node] = {}
    env: dict[fx.Node, fx.Node] = {}

    sized: dict[fx.Node, bool] = {}

    def reads_a_size(a: fx.Node) -> bool:  # a symbolic size among its inputs (dynamic=True)
        if a not in sized:
            sized[a] = (a.op == "placeholder" and not isinstance(value(a), torch.Tensor)) or any(
                reads_a_size(i) for i in a.all_input_nodes)
        return sized[a]

    def arg(a: fx.Node) -> fx.Node:
        if a in env:
            return env[a]
        if a.op in ("call_function", "call_method") and not reads_a_size(a):  # recomputed from the inputs
            env[a] = graph.node_copy(a, arg)
            return env[a]
        if a not in leaves:
            if not isinstance(value(a), torch.Tensor):
                raise _NotEvaluable(f"{a.name} is not a tensor")
            leaves[a] = graph.placeholder(f"leaf_{len(leaves)}")
        return leaves[a]

    try:
        for node in gm.graph.nodes:
            if node not in wanted:
                continue
            if node in axes:
                axis, c = axes[node]
                env[node] = graph.call_function(operator.add, (q_idx if axis == "q" else kv_idx, c))
            elif node.op == "call_method" and node.target == "expand":
                env[node] = arg(node.args[0])
            elif node.op in ("call_function", "call_method"):
                env[node] = graph.node_copy(node, arg)
            else:
                raise _NotEvaluable(f"{node.op} {node.name}")
    except _NotEvaluable:
        return None
    graph.output(env[predicate])
    code = MaskCode(fx.GraphModule(torch.nn.Module(), graph), tuple(leaves))
    return code if _evaluates(code) else None


class _NotEvaluable(Exception):
    pass


def _evaluates(code: MaskCode) -> bool:
    """Whether the function runs on a few sampled positions: tried on zeros shaped like the compile's
    example values (the graph inputs the mask code reads: a tokenizer mask, position ids)."""
    values = [value(n) for n in code.leaves]
    device = values[0].device if values else torch.device("cpu")

    def zeros_like(v):
        return torch.zeros([s if isinstance(s, int) else s.node.hint for s in v.shape], dtype=v.dtype, device=v.device)
    try:
        index = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
        q = torch.arange(3, device=device).view(1, 1, -1, 1)
        kv = torch.arange(5, device=device).view(1, 1, 1, -1)
        out = code.fn(index, index, q, kv, *(zeros_like(v) for v in values))
        return isinstance(out, torch.Tensor) and out.dtype == torch.bool and out.dim() <= 4 and \
            tuple(out.shape[-2:]) in ((3, 5), (3, 1), (1, 5), (1, 1))
    except Exception:  # noqa: BLE001 - anything the sampled evaluation cannot run: no proof, materialise
        return False
