"""nodes: new nodes for Dynamo-level graphs, with the example values the later passes read (computed on
the fake tensors Dynamo recorded)."""
from __future__ import annotations

import contextlib

import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import _pytree as pytree


def new_node(graph: fx.Graph, op: str, target, args, kwargs, like: fx.Node) -> fx.Node:
    """A node with like's source location (stack_trace, nn_module_stack) and a fresh example_value."""
    node = graph.create_node(op, target, args, kwargs)
    for key in ("stack_trace", "nn_module_stack"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    node.meta["example_value"] = fake_run(node)
    return node


def fake_run(node: fx.Node):
    """The node's example_value, computed from its inputs' example values under their fake mode."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["example_value"])
    modes = [a.fake_mode for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, FakeTensor)]
    # Not detect_fake_mode(): at backend time the tracing context holds another fake mode than
    # the one that made Dynamo's example values, and the two cannot be mixed.
    with modes[0] if modes else contextlib.nullcontext():
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)
