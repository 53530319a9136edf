"""attention_scores: the chain from Q·Kᵀ up to the softmax, walked upwards from the softmax input: the Q·Kᵀ
spellings (matmul, einsum, baddbmm), the transpose of K, scalar scales (constant or symbolic) and at most one
mask op (masked_fill, where, one or more additive masks: T5 adds its position bias, then its padding mask),
each accepted only where SDPA computes the same."""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from burstc.passes.attention_spellings import (
    ADD_FNS, DIV_FNS, MATMUL_FNS, MUL_FNS, Skip, TRANSPOSE_FNS, TRANSPOSE_METHODS, arg_of,
    constant_of, dtype_of, einsum_form, einsum_parts, example_value, is_call, is_einsum,
    is_noop_cast, is_number, is_reshape, is_scale, rank_of, same_shape, same_sizes, shape_of,
)


@dataclass(frozen=True)
class Scale:
    """A product of multipliers: a float times symbolic scalar nodes (SymFloat graph inputs, e.g.
    a module's float attribute under dynamic=True)."""
    const: float = 1.0
    symbols: tuple = ()

    def times(self, other: Scale) -> Scale:
        return Scale(self.const * other.const, self.symbols + other.symbols)

    def known_positive(self) -> bool:
        return not self.symbols and self.const > 0


@dataclass
class QK:
    """Q·Kᵀ as found: q, and either k ([.., Tk, D]) or kt ([.., D, Tk])."""
    q: fx.Node
    k: fx.Node | None
    kt: fx.Node | None
    factor: Scale
    spelling: str
    nodes: list[fx.Node]


@dataclass(frozen=True)
class Scores:
    """The chain from Q·Kᵀ up to the softmax, collected walking upwards."""
    nodes: tuple = ()             # chain nodes, softmax side first
    factors: tuple = ()           # _Scales met so far (they act after what lies above)
    mask_op: str | None = None    # "masked_fill" | "add" | "where"
    mask: fx.Node | None = None
    more_masks: tuple = ()        # further additive masks below the first: SDPA gets their sum
    finite_fill: bool = False     # the masked value is a huge finite negative, not -inf
    softcap: Scale | None = None  # cap of a soft-capped chain cap * tanh(...); factors then count below tanh
    qk: QK | None = None


def walk_scores(node: fx.Node, acc: Scores) -> Scores:
    """Walk up from the softmax input through casts, scales and one mask to the Q·Kᵀ product."""
    if is_noop_cast(node):
        return walk_scores(node.args[0], dataclasses.replace(acc, nodes=acc.nodes + (node,)))
    scaled = scale_operand(node)
    if scaled is not None:
        src, c = scaled
        return walk_scores(src, dataclasses.replace(acc, nodes=acc.nodes + (node,), factors=acc.factors + (c,)))
    for operands, op in ((masked_fill_operands, "masked_fill"), (where_operands, "where")):
        found = operands(node)
        if found is not None:
            src, bool_mask, finite = found
            check_mask_position(acc, "masked_fill")  # both hide entries with a constant
            return walk_scores(src, dataclasses.replace(
                acc, nodes=acc.nodes + (node,), mask_op=op, mask=bool_mask, finite_fill=finite))
    if is_call(node, ADD_FNS, ("add",)):
        return walk_additive_mask(node, acc)
    if is_call(node, (torch.tanh,), ("tanh",)) and len(node.args) == 1 and not node.kwargs:
        return walk_softcap(node, acc)
    qk = match_qk(node)
    if qk is None:
        if is_call(node, (torch.tanh,), ("tanh",)) or is_call(node, MUL_FNS, ("mul",)) and any(
                is_call(a, (torch.tanh,), ("tanh",)) for a in node.args):
            raise Skip("the scores are soft-capped with tanh (cap * tanh(S / cap)), which SDPA cannot express")
        raise Skip(f"the softmax input does not come from a Q·Kᵀ product (stops at {node.name})")
    return dataclasses.replace(acc, qk=qk)


def walk_softcap(node: fx.Node, acc: Scores) -> Scores:
    """cap * tanh(S / cap) (Gemma 2): the positive constant factors met between tanh and the softmax are the
    cap; the walk goes on below tanh with fresh factors (what multiplies Q·Kᵀ inside). A mask must lie
    outside: tanh(-inf) is -1, which hides nothing."""
    if acc.softcap is not None:
        raise Skip("more than one tanh on the scores")
    cap = functools.reduce(Scale.times, acc.factors, Scale())
    if not cap.known_positive() or not acc.factors:
        raise Skip("tanh on the scores without a positive constant cap outside it (cap * tanh(S / cap))")
    return walk_scores(node.args[0], dataclasses.replace(acc, nodes=acc.nodes + (node,), factors=(), softcap=cap))


def walk_additive_mask(node: fx.Node, acc: Scores) -> Scores:
    """scores + mask (either order): the branch that reaches Q·Kᵀ is the scores."""
    if node.kwargs or len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        raise Skip(f"{node.name}: only `scores + mask` of two tensors is an additive mask")
    check_mask_position(acc, "add")
    errors = []
    for scores, mask in (node.args, reversed(node.args)):
        if not same_shape(scores, node) or dtype_of(mask) != dtype_of(node) or dtype_of(scores) != dtype_of(node):
            errors.append(f"{node.name}: the mask changes the scores' shape or dtype")
            continue
        masks = dict(mask=mask) if acc.mask_op is None else dict(more_masks=acc.more_masks + (mask,))
        try:
            return walk_scores(scores, dataclasses.replace(acc, nodes=acc.nodes + (node,), mask_op="add", **masks))
        except Skip as e:
            errors.append(str(e))
    raise Skip(errors[0])


def check_mask_position(acc: Scores, op: str) -> None:
    if acc.mask_op is not None and not (acc.mask_op == op == "add"):  # additive masks sum: (S + a) + b = S + (a + b)
        raise Skip("more than one mask on the scores")
    if acc.softcap is not None:
        raise Skip("a mask inside the soft-cap's tanh (tanh(-inf) = -1 hides nothing)")
    if op == "add" and acc.factors:
        raise Skip("a scale is applied after the additive mask")
    if op == "masked_fill" and not all(c.known_positive() for c in acc.factors):
        raise Skip("a scale not known to be positive is applied after masked_fill(-inf)")


def match_qk(node: fx.Node) -> QK | None:
    if is_call(node, MATMUL_FNS, ("matmul",)) and len(node.args) == 2 \
            and all(isinstance(a, fx.Node) for a in node.args):
        return QK(node.args[0], None, node.args[1], Scale(), "matmul", [node])
    if is_einsum(node):
        return match_einsum_qk(node)
    if is_reshape(node) and is_call(node.args[0], (torch.baddbmm,), ("baddbmm",)):
        return match_baddbmm(node)
    return None


def match_einsum_qk(node: fx.Node) -> QK | None:
    equation, a, b = einsum_parts(node)
    form = einsum_form(equation)
    if form == "abt":
        return QK(a, b, None, Scale(), "einsum", [node])
    if form == "ab":
        return QK(a, None, b, Scale(), "einsum", [node])
    return None


def match_baddbmm(view: fx.Node) -> QK:
    """baddbmm(empty, q.reshape(B*H, Tq, D), kt.reshape(B*H, D, Tk), beta=0, alpha=c).view(B, H, Tq, Tk)."""
    bmm = view.args[0]
    beta, alpha = constant_of(bmm.kwargs.get("beta", 1)), constant_of(bmm.kwargs.get("alpha", 1))
    if len(bmm.users) != 1 or len(bmm.args) != 3 or set(bmm.kwargs) - {"beta", "alpha"}:
        raise Skip(f"{bmm.name}: unsupported baddbmm call")
    if beta != 0:
        raise Skip(f"{bmm.name}: baddbmm with beta != 0 (a bias) is not converted")
    if not is_scale(alpha):
        raise Skip(f"{bmm.name}: baddbmm alpha is not a compile-time constant")
    q, kt = batch_unflattened(bmm.args[1]), batch_unflattened(bmm.args[2])
    if q is None or kt is None or rank_of(view) != 4:
        raise Skip(f"{bmm.name}: baddbmm operands are not reshaped 4-D tensors")
    batch_ok = same_sizes(shape_of(view)[:2] * 2, shape_of(q)[:2] + shape_of(kt)[:2])
    if not batch_ok or not same_sizes(shape_of(view)[2:], shape_of(bmm)[1:]):
        raise Skip(f"{bmm.name}: the baddbmm batch is not the query's [B, H]")
    nodes = [view, bmm, bmm.args[1], bmm.args[2]]
    if is_call(bmm.args[0], (torch.empty, torch.zeros), ()):
        nodes.append(bmm.args[0])
    return QK(q, None, kt, Scale(alpha), "baddbmm", nodes)


def batch_unflattened(node: fx.Node) -> fx.Node | None:
    """x.reshape(B*H, R, C) of a 4-D x [B, H, R, C]: returns x."""
    if not is_reshape(node) or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    if rank_of(src) == 4 and rank_of(node) == 3 and same_sizes(shape_of(src)[2:], shape_of(node)[1:]):
        return src
    return None


def qk_operands(qk: QK):
    """Peel scales and the transpose of K. Returns q, k, kt (k None: transpose needed), factor, nodes."""
    q, q_factor, nodes = peel_scales(qk.q)
    factor = qk.factor.times(q_factor)
    if qk.k is not None:
        k, k_factor, k_nodes = peel_scales(qk.k)
        return q, k, None, factor.times(k_factor), nodes + k_nodes
    kt, kt_factor, kt_nodes = peel_scales(qk.kt)
    factor = factor.times(kt_factor)
    untransposed = untranspose(kt)
    if untransposed is None:
        return q, None, kt, factor, nodes + kt_nodes
    k, k_factor, k_nodes = peel_scales(untransposed)
    return q, k, None, factor.times(k_factor), nodes + kt_nodes + [kt] + k_nodes


def peel_scales(node: fx.Node) -> tuple[fx.Node, Scale, list[fx.Node]]:
    factor, nodes = Scale(), []
    while (scaled := scale_operand(node)) is not None:
        nodes.append(node)
        node, c = scaled
        factor = factor.times(c)
    return node, factor, nodes


def untranspose(node: fx.Node) -> fx.Node | None:
    """x for node = x with its last two dims swapped (4-D), else None."""
    if rank_of(node) != 4 or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if is_call(node, TRANSPOSE_FNS, TRANSPOSE_METHODS):
        dims = (arg_of(node, 1, "dim0"), arg_of(node, 2, "dim1"))
        if all(isinstance(d, int) for d in dims) and sorted(d % 4 for d in dims) == [2, 3]:
            return node.args[0]
    if is_call(node, (torch.permute,), ("permute",)):
        dims = node.args[1:] or node.kwargs.get("dims", ())
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        if all(isinstance(d, int) for d in dims) and [d % 4 for d in dims] == [0, 1, 3, 2]:
            return node.args[0]
    return None


def scale_operand(node: fx.Node) -> tuple[fx.Node, Scale] | None:
    """(x, multiplier) for a tensor x times or over a scalar (constant or symbolic); else None."""
    if node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if is_call(node, MUL_FNS, ("mul",)):
        if rank_of(a) is not None and as_scale(b) is not None:
            return a, as_scale(b)
        if rank_of(b) is not None and as_scale(a) is not None:
            return b, as_scale(a)
    if is_call(node, DIV_FNS, ("div", "true_divide")) and rank_of(a) is not None and is_scale(constant_of(b)):
        return a, Scale(1.0 / constant_of(b))
    return None


def as_scale(x) -> Scale | None:
    """A finite nonzero compile-time number, or a symbolic scalar node, as a multiplier. (Only
    multipliers may be symbolic: 1 / s in Python raises where the eager x / s gives inf.)"""
    c = constant_of(x)
    if is_scale(c):
        return Scale(c)
    if isinstance(x, fx.Node) and isinstance(example_value(x), (torch.SymFloat, torch.SymInt)):
        return Scale(symbols=(x,))
    return None


# A masked value this negative makes exp(value - row max) exactly 0 wherever the row keeps one key
# (finfo.min, -1e9, ...): such a fill is exact as a causal mask, whose rows always keep the diagonal.
HIDING_FILL = -1e9


def fill_kind(node: fx.Node, value) -> bool:
    """False for -inf, True for a huge finite negative constant; raises Skip otherwise."""
    value = constant_of(value) if isinstance(value, fx.Node) else value
    if is_number(value) and value == -math.inf:
        return False
    if is_number(value) and value <= HIDING_FILL:
        return True
    raise Skip(f"{node.name}: masks with {value!r}, neither -inf nor a value <= {HIDING_FILL:g} such as finfo.min")


def masked_fill_operands(node: fx.Node) -> tuple[fx.Node, fx.Node, bool] | None:
    """(x, mask, finite fill?) for x.masked_fill(mask, -inf | finfo.min | -1e9); raises Skip for other
    masked_fill values."""
    if not is_call(node, (torch.masked_fill,), ("masked_fill",)):
        return None
    x, mask, value = node.args[0], arg_of(node, 1, "mask"), arg_of(node, 2, "value")
    finite = fill_kind(node, value)
    if not isinstance(mask, fx.Node) or not same_shape(x, node):
        raise Skip(f"{node.name}: the mask broadcasts the scores to a larger shape")
    return x, mask, finite


def where_operands(node: fx.Node) -> tuple[fx.Node, fx.Node, bool] | None:
    """(x, keep, finite fill?) for torch.where(keep, x, fill) with a constant fill (-inf or finite <= -1e9)."""
    if not is_call(node, (torch.where,), ()) or len(node.args) != 3 or node.kwargs:
        return None
    keep, x, value = node.args
    if not isinstance(keep, fx.Node) or not isinstance(x, fx.Node) or dtype_of(keep) != torch.bool:
        return None
    finite = fill_kind(node, value)
    if not same_shape(x, node):
        raise Skip(f"{node.name}: the mask broadcasts the scores to a larger shape")
    return x, keep, finite
