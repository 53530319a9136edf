"""attention_masks: what a mask on the scores is for SDPA: none, additive, boolean, or provably causal
(a strictly upper / lower triangle proven from tril/triu of ones, complements, casts, corner slices, or a
buffer's values), so the causal kind drops the mask computation."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from burstc.passes.attention_scores import Scores
from burstc.passes.attention_spellings import (
    CAST_METHODS, ONES_FNS, Skip, arg_of, dtype_of, is_call, is_dtype_cast, is_number, rank_of,
    same_sizes, shape_of,
)


def classify_mask(scores: Scores, x: fx.Node, ctx):
    """-> (kind, attn_mask node (several additive masks: a tuple of nodes, to be summed), negate it?, mask nodes
    that become dead if causal). ctx.real_tensor(node) gives the value of a buffer or input when it is known
    (the canonicalize pass's context)."""
    if scores.mask_op is None:
        return "none", None, False, []
    m = scores.mask
    if any((rank_of(mask) or 0) < 2 for mask in (m, *scores.more_masks)):
        raise Skip("the mask has fewer than 2 dims (SDPA rejects such an attn_mask)")
    if scores.mask_op == "add":
        return "additive", (m, *scores.more_masks) if scores.more_masks else m, False, []
    if dtype_of(m) != torch.bool:
        raise Skip("masked_fill with a non-boolean mask")
    seen: list[fx.Node] = []
    hides_upper = scores.mask_op == "masked_fill"  # masked_fill hides where True; where keeps where True
    if same_sizes(shape_of(m)[-2:], shape_of(x)[-2:]) and is_triangle(m, ctx, seen, upper=hides_upper):
        return "causal", None, False, seen
    if scores.finite_fill:
        raise Skip("a finite masked value (finfo.min, -1e9) under a mask that is not provably causal: a row it "
                    "hides entirely averages its values in eager, which SDPA does not reproduce")
    if scores.mask_op == "where":
        return "bool", m, False, []
    negated = is_call(m, (operator.invert, torch.logical_not, torch.bitwise_not), ("logical_not", "bitwise_not"))
    if negated and dtype_of(m.args[0]) == torch.bool:
        return "bool", m.args[0], False, [m]
    return "bool", m, True, []


def is_strict_upper(node, ctx, seen: list) -> bool:
    """Every last-two-dims matrix of node is 1 strictly above the diagonal and 0 elsewhere."""
    return is_triangle(node, ctx, seen, upper=True)


def is_triangle(node, ctx, seen: list, upper: bool) -> bool:
    """upper: 1 strictly above the diagonal, else 0; not upper: 1 on and below it, else 0.
    seen collects the nodes of the proof (they die with the mask)."""
    if not isinstance(node, fx.Node):
        return False
    if is_value_preserving(node):
        seen.append(node)
        return is_triangle(node.args[0], ctx, seen, upper)
    if is_complement(node):
        seen.append(node)
        return is_triangle(node.args[0], ctx, seen, not upper)
    if is_call(node, (torch.triu,) if upper else (torch.tril,), ("triu",) if upper else ("tril",)):
        seen.append(node)
        return arg_of(node, 1, "diagonal", 0) == (1 if upper else 0) and is_ones(node.args[0])
    value = ctx.real_tensor(node)
    return value is not None and tensor_is_triangle(value, upper)


def tensor_is_triangle(t: torch.Tensor, upper: bool) -> bool:
    if t.dim() < 2:
        return False
    rows, cols = t.shape[-2:]
    ones = torch.ones(rows, cols, dtype=torch.bool, device=t.device)
    want = ones.triu(1) if upper else ones.tril()
    t = t.detach()
    return bool(((t == 1) == want).all()) and bool(((t == 0) == ~want).all())


def is_value_preserving(node: fx.Node) -> bool:
    """Keeps 0/1 values and each last-two-dims matrix: casts, views, top-left corner slices."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if is_call(node, (), CAST_METHODS) and is_dtype_cast(node):
        return True
    if is_call(node, (torch.unsqueeze,), ("view", "reshape", "expand", "unsqueeze")):
        src = node.args[0]
        return min(rank_of(src) or 0, rank_of(node) or 0) >= 2 and same_sizes(shape_of(src)[-2:], shape_of(node)[-2:])
    return node.target is operator.getitem and is_corner_slice(node)


def is_corner_slice(node: fx.Node) -> bool:
    """x[..., :a, :b]: slices starting at 0 on the last two dims, anything leading-only before."""
    index = node.args[1]
    if not isinstance(index, tuple) or len(index) < 2 or (rank_of(node) or 0) < 2:
        return False
    *lead, row, col = index
    corner = all(isinstance(s, slice) and s.start in (None, 0) and s.step in (None, 1) for s in (row, col))
    if not corner:
        return False
    if lead[:1] == [Ellipsis]:
        return len(lead) == 1
    lead_ok = all(s == slice(None) or s is None or isinstance(s, int) for s in lead)
    consumed = sum(1 for s in index if s is not None)
    return lead_ok and consumed == rank_of(node.args[0])


def is_complement(node: fx.Node) -> bool:
    """~x (bool x), logical_not(x), x == 0, x == False."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if is_call(node, (torch.logical_not,), ("logical_not",)):
        return True
    if is_call(node, (operator.invert, torch.bitwise_not), ("bitwise_not",)):
        return dtype_of(node.args[0]) == torch.bool
    if is_call(node, (operator.eq, torch.eq), ("eq",)) and len(node.args) == 2:
        return node.args[1] is False or (is_number(node.args[1]) and node.args[1] == 0)
    return False


def is_ones(node) -> bool:
    return is_call(node, ONES_FNS, ("new_ones",))
