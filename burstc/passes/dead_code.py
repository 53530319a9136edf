"""dead_code: remove_dead_code(gm) -> gm without the nodes nothing reads, where a node that mutates a
tensor (an in-place method such as `out.add_(x)`, an `out=`/`inplace=True` call, a mutable op, a
setitem) or is functorch bookkeeping (vmap nesting levels) is never dead even when its result is unused.

FX's own `eliminate_dead_code` treats every `call_method` as pure, so on a Dynamo graph it deletes
`out.add_(routed)` (Llama 4's MoE adds its experts into the shared expert's output that way) and the
model silently loses the update. Every pass that removes nodes asks `mutates` first; what a node writes
is the shard pass's `mutated_input`, one definition for both.
"""
from __future__ import annotations

import torch.fx as fx

from burstc.passes.shard_rules import mutated_input


def _called_for_its_effect(node: fx.Node) -> bool:
    """Dynamo's functorch bookkeeping (vmap's `_vmap_increment_nesting` / `_vmap_decrement_nesting` around
    a vmapped mask): results nobody reads, calls that matter."""
    module = getattr(node.target, "__module__", None) or ""
    return node.op == "call_function" and module.startswith(("torch._functorch", "torch._C._functorch"))


def mutates(node: fx.Node) -> bool:
    """Whether running the node changes state another node can see."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op not in ("call_function", "call_method"):
        return node.op == "call_module"
    if _called_for_its_effect(node) or (node.op == "call_function" and node.is_impure()):
        return True
    return mutated_input(node) is not None or node.kwargs.get("out") is not None


def remove_dead_code(gm: fx.GraphModule) -> fx.GraphModule:
    """Erase the nodes whose results nobody reads and that mutate nothing (users first)."""
    gm.graph.eliminate_dead_code(is_impure_node=mutates)
    return gm
