"""Attention sinks in a hand-written attention (GPT-OSS): a per-head logit concatenated to the scores as
one last column, the softmax over both (optionally shifted by its row maximum), the column dropped
before P @ V. Matched exactly or not at all; the canonical form is burstc.runtime.modified_sdpa.modified_sdpa(sinks=).

    column = sinks.reshape(1, H, 1, 1).expand(B, H, Tq, 1)      # any spelling whose shapes prove it
    c = torch.cat([scores, column], dim=-1)
    c = c - c.max(dim=-1, keepdim=True).values                   # optional: softmax is shift-invariant,
    p = softmax(c, dim=-1)[..., :-1]                            # and the sink keeps every row finite
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from burstc.passes.attention_spellings import Skip, arg_of, is_call, same_sizes, shape_of


def drops_sink_column(node: fx.Node) -> bool:
    """p[..., :-1] (or with full slices before it): the softmax's last column dropped."""
    if node.target is not operator.getitem or not isinstance(node.args[1], tuple) or not node.args[1]:
        return False
    *lead, last = node.args[1]
    full = slice(None, None, None)
    return (last == slice(None, -1, None) or last == slice(0, -1, None)) and (
        lead == [Ellipsis] or lead == [full] * 3)


def split_sink_column(x: fx.Node) -> tuple[fx.Node, fx.Node, list[fx.Node]]:
    """The softmax input of a sink attention -> (the scores, the sinks as a [1, H, 1, 1] node, the nodes
    in between, which the rewrite owns). Raises Skip when the shapes do not prove a per-head column."""
    nodes = []
    shifted = _max_shift(x)
    if shifted is not None:
        nodes += [x, *shifted[1]]
        x = shifted[0]
    if not is_call(x, (torch.cat,)) or len(x.users) != (2 if shifted is not None else 1):
        raise Skip("the softmax drops a last column that is not concatenated to the scores (not an attention sink)")
    parts, dim = arg_of(x, 0, "tensors"), arg_of(x, 1, "dim", 0)
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or dim not in (-1, 3):
        raise Skip("the dropped softmax column is not one tensor concatenated after the scores on the last dim")
    scores, column = parts
    sinks = _per_head_column(column, shape_of(scores))
    return scores, sinks, [*nodes, x, column]


def _max_shift(x: fx.Node):
    """x = c - c.max(dim=-1, keepdim=True).values (or amax): (c, the max nodes), else None."""
    if not is_call(x, (operator.sub, torch.sub), ("sub",)) or len(x.args) != 2:
        return None
    c, m = x.args
    nodes = []
    if m.target is operator.getitem and m.args[1] == 0:  # torch.max(...) returns (values, indices)
        nodes.append(m)
        m = m.args[0]
    if not (is_call(m, (torch.max, torch.amax), ("max", "amax")) and m.args[0] is c
            and arg_of(m, 1, "dim") in (-1, 3) and arg_of(m, 2, "keepdim", False) is True):
        return None
    if len(m.users) != 1 or (nodes and len(nodes[0].users) != 1):
        return None
    return c, [*nodes, m]


def _per_head_column(column: fx.Node, scores_shape) -> fx.Node:
    """column = src.expand(B, H, Tq, 1) with src of shape [1, H, 1, 1]: every (b, h, i) reads src[0, h, 0, 0],
    which expand guarantees (it only repeats size-1 dims). Returns src."""
    if not (isinstance(column, fx.Node) and is_call(column, (), ("expand",))):
        raise Skip("the extra softmax column is not a per-head logit expanded over batch and queries")
    src = column.args[0]
    b, h, tq, _ = scores_shape
    if not (same_sizes(shape_of(column), (b, h, tq, 1)) and same_sizes(shape_of(src), (1, h, 1, 1))):
        raise Skip("the extra softmax column is not one logit per head ([1, H, 1, 1] expanded to [B, H, Tq, 1])")
    if len(column.users) != 1:
        raise Skip("the expanded sink column is also used elsewhere")
    return src
