"""shifts: a next-token loss written with shifted slices, `cross_entropy(L[:, :-k] (flattened), T[:, k:]
(flattened))`, becomes `cross_entropy(L (flattened), T[:, k:] padded with k ignore_index at the end
(flattened))`: the same (logit row, target) pairs plus k ignored ones per row, so the same sum and the same
count of kept targets, exactly. The logits are then read whole, which sequence mode keeps sharded, instead
of sliced along the sequence (a slice mixes tokens: it would gather them).

Matched spellings (the slice on any one dim before the classes, with every other dim whole; `.contiguous()`
and a flattening view or reshape optional): nanoGPT's `F.cross_entropy(logits[:, :-1].reshape(-1, V),
y[:, 1:].reshape(-1))`, HF's older `logits[..., :-1, :].contiguous().view(-1, V)` with
`labels[..., 1:].contiguous().view(-1)` through `nn.CrossEntropyLoss`, and the flat `logits.view(-1, V)[:-1]`
with `y.view(-1)[1:]`. Anything else is left as it is.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._dynamo.utils import counters

from burstc.passes.find_attention import source_line
from burstc.passes.nodes import new_node

log = logging.getLogger("burstc.passes")
_FLATTEN = ("view", "reshape")
_CE_ARGS = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")


@dataclass
class _Shifted:
    """One side of the loss: `base` sliced on `dim` (k rows off the end, or off the start)."""

    base: fx.Node
    sliced: fx.Node
    dim: int
    start: int  # rows dropped at the start
    stop: int  # rows dropped at the end


def unshift_losses(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite every matched shifted next-token loss of gm (in place); returns gm."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is F.cross_entropy:
            changed |= _rewrite(gm.graph, node)
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def _rewrite(graph: fx.Graph, node: fx.Node) -> bool:
    bound = dict(zip(_CE_ARGS, node.args), **node.kwargs)
    if bound.get("size_average") is not None or bound.get("reduce") is not None:
        return False
    ignore, reduction = bound.get("ignore_index", -100), bound.get("reduction", "mean")
    if reduction not in ("mean", "sum") or not isinstance(ignore, int):
        return False
    logits, target = _shifted(bound["input"], classes=True), _shifted(bound["target"], classes=False)
    if logits is None or target is None or not _paired(logits, target):
        return False
    k = target.start
    lv, tv = _value(logits.base), _value(target.base)
    with graph.inserting_before(node):
        whole = logits.base if lv.dim() == 2 else new_node(graph, "call_method", "reshape",
                                                            (logits.base, -1, lv.shape[-1]), {}, node)
        pad = (0, 0) * (tv.dim() - 1 - target.dim) + (0, k)
        padded = new_node(graph, "call_function", F.pad, (target.sliced, pad), {"value": ignore}, node)
        flat = padded if tv.dim() == 1 else new_node(graph, "call_method", "reshape", (padded, -1), {}, node)
    args = list(node.args)
    args[0] = whole
    if len(args) > 1:
        args[1] = flat
    kwargs = dict(node.kwargs)
    if "target" in kwargs:
        kwargs["target"] = flat
    old_inputs = [bound["input"], bound["target"]]
    node.args, node.kwargs = tuple(args), kwargs
    for old in old_inputs:  # the slices (and their views) nobody reads any more: a slice left would be gathered
        _erase_unused(graph, old)
    counters["burst"]["shifts_unshifted"] += 1
    log.info("burst: the shifted loss %s reads the logits whole, with its targets shifted by %d and padded with "
             "ignore_index%s", node.name, k, f" (at {source_line(node)})" if source_line(node) else "")
    return True


def _erase_unused(graph: fx.Graph, node: fx.Node) -> None:
    """node and, in turn, the inputs it alone used, while they are views or slices nobody reads."""
    while node.op in ("call_method", "call_function") and not node.users and (
            node.target in (*_FLATTEN, "contiguous") or node.target is operator.getitem):
        source = node.args[0]
        graph.erase_node(node)
        node = source


def _value(node) -> Optional[torch.Tensor]:
    v = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _shifted(node, classes: bool) -> Optional[_Shifted]:
    """node as [flatten(] [contiguous(] base[slice on one dim] [)] [)], the flatten keeping the class dim
    last (classes) or making one dim; None when it is not that."""
    v = _value(node)
    if v is None:
        return None
    if node.op == "call_method" and node.target in _FLATTEN:
        sizes = [a for a in node.args[1:]]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = list(sizes[0])
        if len(sizes) != (2 if classes else 1) or (classes and v.shape[-1] != _value(node.args[0]).shape[-1]):
            return None
        node = node.args[0]
    if node.op == "call_method" and node.target == "contiguous" and len(node.args) == 1:
        node = node.args[0]
    if not (node.op == "call_function" and node.target is operator.getitem):
        return None
    base, index = node.args
    bv = _value(base)
    if bv is None or bv.dim() < (2 if classes else 1):
        return None
    slices = _slices(index, bv.dim())
    if slices is None:
        return None
    cut = [(d, s) for d, s in enumerate(slices) if s != slice(None)]
    if len(cut) != 1 or (classes and cut[0][0] == bv.dim() - 1):
        return None
    dim, s = cut[0]
    n = bv.shape[dim]
    if s.step not in (None, 1) or not all(isinstance(e, int) or e is None for e in (s.start, s.stop)):
        return None
    start, stop, _ = s.indices(int(n))
    return _Shifted(base, node, dim, start, int(n) - stop)


def _slices(index, ndim: int) -> Optional[list[slice]]:
    """The index as one slice per dim (Ellipsis expanded), or None if it holds anything but slices."""
    index = index if isinstance(index, tuple) else (index,)
    if sum(i is Ellipsis for i in index) > 1 or not all(isinstance(i, slice) or i is Ellipsis for i in index):
        return None
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (ndim - len(index) + 1) + index[at + 1:]
    if len(index) > ndim:
        return None
    return list(index) + [slice(None)] * (ndim - len(index))


def _paired(logits: _Shifted, target: _Shifted) -> bool:
    """logits[..., :-k, ...] against target[..., k:, ...] on the same dim of tensors of the same leading
    shape: position i of the logits meets the target at i + k."""
    lv, tv = _value(logits.base), _value(target.base)
    k = target.start
    return (tuple(lv.shape[:-1]) == tuple(tv.shape) and logits.dim == target.dim and k > 0
            and logits.start == 0 and logits.stop == k and target.stop == 0)
