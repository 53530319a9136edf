"""selective_checkpoint: a selective activation-checkpoint region (a user's `context_fn`) inlined into the
graph keeps its policy. torch's checkpoint asks the policy about each aten op while AOTAutograd traces the
region; once inlined, the region's forward ops carry its id (node.meta["custom"], which FX copies onto
everything traced from them), and a joint-graph pass of Inductor's (`joint_custom_pre_pass`) asks the same
policy about each of them, in program order, and tags the node with its answer for the partitioner.

A policy only chooses what is saved and what is recomputed: any answer is exact. Where it cannot be asked
(an inner compiler without Inductor's joint passes, a context_fn whose forward context carries no
policy_fn), the region recomputes every op, as plain checkpointing does, and the reason is logged.
"""
from __future__ import annotations

import itertools
import logging
from typing import Callable, Optional

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.utils.checkpoint import SAC_IGNORED_OPS, CheckpointPolicy, SelectiveCheckpointContext

log = logging.getLogger("burstc.passes")
REGION_KEY = "burst_selective_region"
_context_fns: dict[int, Callable] = {}  # region id -> the user's context_fn
_ids = itertools.count()


def register(context_fn: Callable) -> int:
    """A new region id for a selective region's context_fn."""
    region = next(_ids)
    _context_fns[region] = context_fn
    return region


def region_of(node: fx.Node) -> Optional[int]:
    return (node.meta.get("custom") or {}).get(REGION_KEY)


def has_selective_regions(gm: fx.GraphModule) -> bool:
    return any(region_of(node) is not None for node in gm.graph.nodes)


def _policy_fn(region: int) -> Optional[Callable]:
    """The policy of the region's context_fn (torch's create_selective_checkpoint_contexts keeps it on its
    forward context), or None with the reason logged."""
    try:
        forward_context, _ = _context_fns[region]()
    except Exception as e:  # noqa: BLE001 - an exact fallback: recompute everything
        log.warning("burst: a selective checkpoint context_fn raised (%s: %s); its region recomputes every op",
                    type(e).__name__, e)
        return None
    policy = getattr(forward_context, "policy_fn", None)
    if policy is None:
        log.warning("burst: a selective checkpoint context_fn returned %s, which carries no policy_fn; its region "
                    "recomputes every op (use torch.utils.checkpoint.create_selective_checkpoint_contexts)",
                    type(forward_context).__name__)
    return policy


def _forward_nodes(graph: fx.Graph) -> list[fx.Node]:
    """The joint graph's nodes that do not depend on a tangent (the forward), in program order."""
    backward = set()
    for node in graph.nodes:
        if (node.op == "placeholder" and node.name.startswith("tangents")) or any(a in backward for a in node.all_input_nodes):
            backward.add(node)
    return [node for node in graph.nodes if node not in backward]


class SelectivePolicies(CustomGraphPass):
    """Inductor joint-graph pass: tag each forward op of an inlined selective region with its policy's answer.
    Not cacheable (uuid None): a policy is arbitrary user code."""

    def __call__(self, graph) -> None:
        graph = graph.graph if isinstance(graph, fx.GraphModule) else graph
        policies: dict[int, Optional[Callable]] = {}
        for node in _forward_nodes(graph):
            region = region_of(node)
            if region is None or node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload) \
                    or node.target in SAC_IGNORED_OPS:
                continue
            if region not in policies:
                policies[region] = _policy_fn(region)
            policy = policies[region]
            if policy is None:
                continue
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
            answer = policy(SelectiveCheckpointContext(is_recompute=False, op_output=node.meta.get("val")),
                            node.target, *args, **kwargs)
            if isinstance(answer, bool):
                answer = CheckpointPolicy.MUST_SAVE if answer else CheckpointPolicy.PREFER_RECOMPUTE
            node.meta["recompute"] = answer

    def uuid(self) -> None:
        return None
