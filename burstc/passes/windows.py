"""windows: token mixing over a bounded window, however it is spelled, becomes one node whose meaning is
stated on the whole sequence, so that sequence mode can run it on shards with a halo exchange
(burstc.runtime.halo) instead of gathering the sequence. Each rewrite computes the same values as the
nodes it replaces; anything not proven to match is left as it is (and gathered, as before).

- `F.pad(x, (.., a, -a, ..))` (constant mode; one dim padded, the same number of rows cut at the other end,
  a token shift such as RWKV's `nn.ZeroPad2d((0, 0, 1, -1))`) -> `sequence_shift(x, dim, a, value)`;
- `torch.roll(x, k, dim)` and `x.roll(k, dim)` -> `sequence_shift(x, dim, k, wrap=True)`;
- `conv1d` with stride 1 over the last dim whose output has the input's length: its own padding, an
  `F.pad` of the last dim before it (constant mode) and a slice `[..., s:s + N]` of its output after it
  (Mamba's causal `conv1d(x)[..., :N]`) fold into `window_conv1d(x, w, b, before, after, dilation, groups)`.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._dynamo.utils import counters

from burstc.passes.shard_rules import arg, shape
from burstc.runtime.halo import sequence_shift, window_conv1d

_PADS = (torch._C._nn.pad, F.pad)
_CONVS = (torch.conv1d, F.conv1d)


def fuse_windows(gm: fx.GraphModule) -> int:
    """Rewrite every matched window op of gm in place; returns how many."""
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_method" and node.target == "roll":
            fused += _roll(gm.graph, node)
        if node.op != "call_function":
            continue
        if node.target in _PADS:
            fused += _shift(gm.graph, node)
        elif node.target is torch.roll:
            fused += _roll(gm.graph, node)
        elif node.target in _CONVS:
            fused += _conv(gm.graph, node)
    if fused:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        counters["burst"]["windows_fused"] += fused
    return fused


def _replace(graph: fx.Graph, old: fx.Node, target, args: tuple, at: fx.Node) -> None:
    """old's uses go to target(*args), inserted before `at` with old's metadata (the same value)."""
    with graph.inserting_before(at):
        new = graph.call_function(target, args)
    new.meta.update(old.meta)
    old.replace_all_uses_with(new)


def _pad_of(node: fx.Node) -> Optional[tuple[fx.Node, int, int, int, float]]:
    """(x, dim, rows added in front, rows added behind, value) of a constant-mode F.pad of one dim."""
    x, pads = arg(node, 0, "input"), arg(node, 1, "pad")
    mode, value = arg(node, 2, "mode", "constant"), arg(node, 3, "value", None)
    sx = shape(x)
    if (sx is None or mode != "constant" or not isinstance(pads, (tuple, list)) or len(pads) % 2
            or not all(isinstance(p, int) for p in pads) or len(pads) > 2 * len(sx)
            or not (value is None or isinstance(value, (int, float)))):
        return None
    padded = [i for i in range(0, len(pads), 2) if pads[i] or pads[i + 1]]
    if len(padded) != 1:
        return None
    i = padded[0]
    return x, len(sx) - 1 - i // 2, pads[i], pads[i + 1], float(value or 0.0)


def _shift(graph: fx.Graph, node: fx.Node) -> int:
    found = _pad_of(node)
    if found is None:
        return 0
    x, dim, front, behind, value = found
    if front + behind != 0 or abs(front) > shape(x)[dim]:
        return 0
    _replace(graph, node, sequence_shift, (x, dim, front, value, False), node)
    return 1


def _roll(graph: fx.Graph, node: fx.Node) -> int:
    x, shifts, dims = arg(node, 0, "input"), arg(node, 1, "shifts"), arg(node, 2, "dims", None)
    shifts = shifts[0] if isinstance(shifts, (tuple, list)) and len(shifts) == 1 else shifts
    dims = dims[0] if isinstance(dims, (tuple, list)) and len(dims) == 1 else dims
    sx = shape(x)
    if sx is None or not isinstance(shifts, int) or not isinstance(dims, int) or not -len(sx) <= dims < len(sx):
        return 0
    _replace(graph, node, sequence_shift, (x, dims % len(sx), shifts, 0.0, True), node)
    return 1


def _single(value) -> Optional[int]:
    """An int conv argument given as n or (n,)."""
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _conv(graph: fx.Graph, node: fx.Node) -> int:
    x, weight, bias = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
    stride, padding = _single(arg(node, 3, "stride", 1)), arg(node, 4, "padding", 0)
    dilation, groups = _single(arg(node, 5, "dilation", 1)), arg(node, 6, "groups", 1)
    sx, sw = shape(x), shape(weight)
    if sx is None or sw is None or len(sx) not in (2, 3) or len(sw) != 3 or stride != 1 or dilation is None \
            or not isinstance(groups, int) or (isinstance(bias, fx.Node) and shape(bias) is None):
        return 0
    reach = dilation * (sw[2] - 1)  # rows one output row reads beyond its first
    if padding == "valid":
        front = behind = 0
    elif padding == "same":
        front, behind = reach // 2, reach - reach // 2
    elif _single(padding) is not None:
        front = behind = _single(padding)
    else:
        return 0
    fill = 0.0
    if isinstance(x, fx.Node) and x.op == "call_function" and x.target in _PADS and _pad_of(x) is not None:
        source, dim, pad_front, pad_behind, value = _pad_of(x)
        if dim == len(sx) - 1 and pad_front >= 0 and pad_behind >= 0 and (value == 0.0 or front == behind == 0):
            x, front, behind, fill = source, front + pad_front, behind + pad_behind, value
    length = shape(x)[-1]
    last = node
    if length + front + behind - reach != length:  # the output is longer: a slice must cut it back
        users = list(node.users)
        start = _slice_of_last_dim(users[0], length) if len(users) == 1 else None
        if start is None:
            return 0
        last, front = users[0], front - start
        behind = reach - front
    if front < 0 or behind < 0 or shape(last) is None or shape(last)[-1] != length:
        return 0
    _replace(graph, last, window_conv1d, (x, weight, bias, front, behind, dilation, groups, fill), node)
    return 1


def _slice_of_last_dim(node: fx.Node, length: int) -> Optional[int]:
    """s where node is `y[..., s:s + length]` (every other dim whole), else None."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    src, index = node.args
    index = index if isinstance(index, tuple) else (index,)
    ndim = len(shape(src))
    if index and index[0] is Ellipsis:
        index = (slice(None),) * (ndim - len(index) + 1) + tuple(index[1:])
    if len(index) != ndim or any(i != slice(None) for i in index[:-1]):
        return None
    last = index[-1]
    if not isinstance(last, slice) or last.step not in (None, 1):
        return None
    start = last.start or 0
    if not isinstance(start, int) or start < 0 or not isinstance(last.stop, (int, type(None))):
        return None
    size = shape(src)[-1]
    stop = size if last.stop is None else last.stop + size if last.stop < 0 else min(last.stop, size)
    return start if stop - start == length else None
