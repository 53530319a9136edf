"""higher_order: the bodies of higher-order ops. `graphs(gm)` is gm and every body below it, so each pass
visits them all by one mechanism (as Inductor's `_recursive_pre_grad_passes` does); `inline_checkpoints`
makes activation-checkpointed regions part of the graph that calls them, tagged for AOTAutograd's
partitioner as `tag_activation_checkpoint` itself tags them, so the region's tokens are sharded like the
rest of the graph and the backward still recomputes it.

Why inlining is exact: under AOTAutograd, `tag_activation_checkpoint(body, *args)` runs its body op by op
and tags every op it traces with `recompute=PREFER_RECOMPUTE` and the region's `ac_graph_id`; those two
node fields are copied by FX onto everything traced from a node that carries them. A body inlined with the
same two fields therefore reaches the partitioner as the same tagged joint graph. Burst's own ops are
ordered effects (burstc.runtime.ordering), which the partitioner never recomputes: the ring runs once per
step and its output and log-sum-exp are saved, as torchtitan's default policy saves SDPA's.

A region with a user's selective policy (`context_fn`) is inlined too, its nodes marked with the region, and
Inductor asks the policy about each of its ops in the joint graph (burstc.passes.selective_checkpoint);
with another inner compiler it stays a higher-order op. Attention inside a body that stays (that region,
torch.cond, ...) is reported as a site left (`attention_in_bodies`).
"""
from __future__ import annotations

import itertools
import operator
from typing import Iterator, Optional

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from burstc.passes import selective_checkpoint
from burstc.passes.find_attention import is_attention, source_line

CHECKPOINT = torch.ops.higher_order.tag_activation_checkpoint
_region_ids = itertools.count(1 << 20)  # far from the ids torch's own regions take (they count from 0)


def bodies(gm: fx.GraphModule) -> Iterator[tuple[str, fx.GraphModule]]:
    """(attribute name, GraphModule) of each body a node of gm reads (get_attr), once each, in graph order."""
    seen = set()
    for node in gm.graph.find_nodes(op="get_attr"):
        body = getattr(gm, node.target, None)
        if isinstance(body, fx.GraphModule) and node.target not in seen:
            seen.add(node.target)
            yield node.target, body


def graphs(gm: fx.GraphModule) -> Iterator[fx.GraphModule]:
    """gm, then every body below it, depth first (the bodies of a body after it)."""
    yield gm
    for _, body in bodies(gm):
        yield from graphs(body)


def is_selective(body: fx.GraphModule) -> bool:
    """Whether a checkpoint body carries a user's selective-checkpointing context_fn."""
    return "_checkpoint_context_fn" in body.meta


def inline_checkpoints(gm: fx.GraphModule, selective: bool = True) -> fx.GraphModule:
    """Replace every `tag_activation_checkpoint` call of gm (and of the bodies it inlines) by its body's
    nodes, tagged as the op tags them; returns gm, changed in place. selective: regions with a user's
    context_fn too, their policy applied by burstc.passes.selective_checkpoint; else they stay."""
    changed = False
    for node in list(gm.graph.find_nodes(op="call_function", target=CHECKPOINT)):
        body = getattr(gm, node.args[0].target)
        if is_selective(body) and not selective:
            continue
        inline_checkpoints(body, selective)
        policy = selective_checkpoint.register(body.meta["_checkpoint_context_fn"]) if is_selective(body) else None
        _inline(gm, node, body, next(_region_ids), policy)
        changed = True
    if changed:
        _drop_unused_bodies(gm)
        gm.graph.lint()
        gm.recompile()
    return gm


def _inline(gm: fx.GraphModule, call: fx.Node, body: fx.GraphModule, region: int, policy: Optional[int]) -> None:
    """Copy body's nodes before call with operands bound to call's, tag them (policy: the selective
    region's id), and rewire call's users."""
    graph = gm.graph
    placeholders = body.graph.find_nodes(op="placeholder")
    operands = call.args[1:]
    if len(operands) != len(placeholders):
        raise AssertionError(f"{call.name}: {len(operands)} operands for {len(placeholders)} body inputs")
    env: dict[fx.Node, fx.Node] = dict(zip(placeholders, operands))
    result = None
    with graph.inserting_before(call):
        for node in body.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                result = fx.node.map_arg(node.args[0], lambda n: env[n])
                continue
            if node.op == "get_attr":
                env[node] = graph.get_attr(_adopt(gm, body, node.target))
                env[node].meta.update(node.meta)
                continue
            copy = graph.node_copy(node, lambda n: env[n])
            copy.meta = dict(node.meta)
            copy.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
            copy.meta["ac_graph_id"] = region
            if policy is not None:
                copy.meta["custom"] = {**copy.meta.get("custom", {}), selective_checkpoint.REGION_KEY: policy}
            env[node] = copy
    for user in list(call.users):
        if user.op == "call_function" and user.target is operator.getitem and isinstance(result, (tuple, list)):
            user.replace_all_uses_with(result[user.args[1]])
            graph.erase_node(user)
        else:
            user.replace_input_with(call, result)
    graph.erase_node(call)


def _adopt(gm: fx.GraphModule, body: fx.GraphModule, target: str) -> str:
    """Give gm the attribute body.<target> under a free name; returns that name."""
    obj = body
    for part in target.split("."):
        obj = getattr(obj, part)
    name = target.replace(".", "_")
    free = name
    for i in itertools.count(1):
        if not hasattr(gm, free):
            break
        if getattr(gm, free) is obj:
            return free
        free = f"{name}_{i}"
    if isinstance(obj, torch.nn.Module):
        gm.add_module(free, obj)
    elif isinstance(obj, torch.nn.Parameter):
        gm.register_parameter(free, obj)
    else:
        setattr(gm, free, obj)
    return free


def _drop_unused_bodies(gm: fx.GraphModule) -> None:
    """Erase get_attr nodes nobody uses any more (the inlined bodies) and the submodules they named."""
    for node in list(gm.graph.find_nodes(op="get_attr")):
        if not node.users and isinstance(getattr(gm, node.target, None), fx.GraphModule):
            target = node.target
            gm.graph.erase_node(node)
            if not gm.graph.find_nodes(op="get_attr", target=target):
                delattr(gm, target)


def attention_in_bodies(gm: fx.GraphModule) -> list[tuple[fx.Node, str]]:
    """Each attention left inside a higher-order op's body, with why it stays: (node, reason)."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
            continue
        for arg in node.args:
            body = getattr(gm, arg.target, None) if isinstance(arg, fx.Node) and arg.op == "get_attr" else None
            if not isinstance(body, fx.GraphModule):
                continue
            why = (f"inside a selective activation-checkpoint region ({node.name}, a context_fn): its policy "
                   "decides per op while AOTAutograd traces, so burst keeps the region whole"
                   if node.target is CHECKPOINT else
                   f"inside the body of torch.ops.higher_order.{node.target.__name__} ({node.name}): burst "
                   "converts attention in the graph itself and in plain checkpoint regions")
            for inner in graphs(body):
                found += [(n, why) for n in inner.graph.nodes if is_attention(n)]
    return found


def describe(node: fx.Node) -> str:
    """Where an attention node is, for reports: its source line, else its name."""
    return source_line(node) or node.name
