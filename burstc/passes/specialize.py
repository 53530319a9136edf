"""specialize: a Dynamo graph with symbolic sizes -> a copy for the concrete sizes of one call (every
SymInt-valued node folded to its value, example values recomputed), so that passes that need static
shapes (the shard pass) can run under `dynamic=True`. The graph's inputs are unchanged."""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from burstc.passes.shard import copy_graph

_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)


def symbol_values(gm: fx.GraphModule, args) -> dict:
    """{sympy symbol: concrete value} read off the placeholders' example values and the call's args."""
    values = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, actual in zip(placeholders, args):
        example = node.meta.get("example_value")
        if isinstance(example, _SYMBOLIC):
            values[example.node.expr] = actual
        elif isinstance(example, torch.Tensor) and isinstance(actual, torch.Tensor):
            for size, real in zip(example.shape, actual.shape):
                if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                    values[size.node.expr] = int(real)
    return values


def _concrete(value, values):
    expr = value.node.expr.xreplace(values)
    kind = {torch.SymInt: int, torch.SymFloat: float, torch.SymBool: bool}[type(value)]
    return kind(expr)


def scalar_inputs(gm: fx.GraphModule) -> list[int]:
    """Positions of the inputs that the graph reads with `.item()` (under dynamic=True Dynamo passes a
    module's float attributes, e.g. an eps, as 0-d tensors): their values are part of a specialization."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [i for i, n in enumerate(placeholders) if any(u.op == "call_method" and u.target == "item" for u in n.users)]


def specialize(gm: fx.GraphModule, args) -> fx.GraphModule:
    """A copy of gm for these concrete args: SymInt/SymFloat/SymBool nodes (and `.item()` of inputs)
    become constants."""
    out = copy_graph(gm)
    graph = out.graph
    values = symbol_values(gm, args)
    inputs = dict(zip((n for n in graph.nodes if n.op == "placeholder"), args))
    for node in list(graph.nodes):
        example = node.meta.get("example_value")
        if not isinstance(example, _SYMBOLIC):
            continue
        if node.op == "placeholder":
            constant = inputs[node]
        elif node.op == "call_method" and node.target == "item" and node.args[0] in inputs:
            constant = inputs[node.args[0]].item()
        else:
            constant = _concrete(example, values)
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda n: constant if n is node else n)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda n: constant if n is node else n)
        if node.op != "placeholder":  # the graph's inputs stay as they are
            graph.erase_node(node)
    out.recompile()
    _refresh_example_values(out, args)
    return out


def _refresh_example_values(gm: fx.GraphModule, args) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with torch.enable_grad():
        FakeTensorProp(gm, mode).propagate(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    for node in gm.graph.nodes:
        if "val" in node.meta:
            node.meta["example_value"] = node.meta.pop("val")


def has_symbolic_inputs(example_inputs) -> bool:
    return any(isinstance(a, _SYMBOLIC) or (isinstance(a, torch.Tensor) and any(
        isinstance(s, torch.SymInt) for s in a.shape)) for a in example_inputs)


def per_shape(compile_for: Callable[[fx.GraphModule, list], Callable], gm: fx.GraphModule) -> Callable:
    """A callable that compiles `compile_for(specialize(gm, args), args)` once per distinct input shapes
    and runs it."""
    compiled: dict[tuple, Callable] = {}
    scalars = scalar_inputs(gm)

    def run(*args):
        key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a if isinstance(a, (int, float, bool))
                    else None for a in args) + tuple(args[i].item() for i in scalars)
        if key not in compiled:
            compiled[key] = compile_for(specialize(gm, args), list(args))
        return compiled[key](*args)

    return run
