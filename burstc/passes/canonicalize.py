"""canonicalize_attention(gm, example_inputs=None) -> gm: each hand-written attention in a Dynamo FX graph becomes one torch._C._nn.scaled_dot_product_attention call, exactly or not at all; what happened is recorded in gm.meta["burst_canonicalize"].

API
---
``canonicalize_attention(gm, example_inputs=None)`` rewrites ``gm`` in place, recompiles it when it
changed, and returns it (the uniform GraphModule -> GraphModule contract of every burstc pass).
What it did is a :class:`CanonicalizeResult` stored in ``gm.meta["burst_canonicalize"]`` (read it
with :func:`canonicalize_result`):

* ``converted``: one :class:`CanonicalizedSite` per rewrite: the new SDPA node's name, the spelling
  matched, the mask kind, the scale, the GQA group count, the nodes removed and the ``stack_trace``
  of the softmax (``.location`` gives ``file:line`` of the user's source line).
* ``skipped``: one :class:`SkippedSite` per softmax that feeds a ``P @ V`` product but was left as
  it is, with the reason. The backend reports each as an attention site left (a warning with the
  source line, ``sites_left``, ``explain`` and the dumps).

It also counts into ``torch._dynamo.utils.counters["burst"]`` (``"canonicalized"`` and
``"canonicalize_skipped"``), the project's convention for "what the passes did".

The graph is the one a torch.compile backend receives (Dynamo level, before AOTAutograd). Shapes and
dtypes are read from ``node.meta["example_value"]`` (fake tensors Dynamo attaches); a node without it
is never matched. ``example_inputs`` (real tensors, aligned with the placeholders) is only used to
read the *values* of mask buffers; without it a buffer mask is kept as an ``attn_mask``.

What is matched (4-D tensors [B, H, T, D] only)
------------------------------------------------
``P @ V`` where ``P = softmax(S, dim=last)``, followed only by dtype casts and no-op dropouts, and::

    S = (Q Kᵀ) [* c | / c]... [mask] [* c | / c]...        (any order allowed by the rules below)

* Q Kᵀ spellings: ``q @ kt``, ``torch.matmul``, ``q.matmul``; ``torch.einsum("bhqd,bhkd->bhqk")``
  (or ``"bhqd,bhdk->bhqk"``); ``torch.baddbmm(empty, q.reshape(B*H, T, D), kt.reshape(B*H, D, T),
  beta=0, alpha=c).view(B, H, T, T)``. ``kt`` may be ``k.transpose(-2, -1)`` (any spelling of the
  last two dims), ``k.permute(0, 1, 3, 2)``, or anything else (a transpose is then inserted).
  ``P @ V`` spellings: ``@``, ``torch.matmul``, ``.matmul``, ``torch.einsum("bhqk,bhkd->bhqd")``.
* Scale: products/quotients with scalars on the scores, on q or on k (``math.sqrt(d)`` is a
  Python float in the graph). SDPA gets ``scale=`` = the product of the multipliers, with ``/ c``
  counted as ``* (1 / c)``: ``x / c`` and ``x * (1 / c)`` differ by one float rounding, well inside
  float32 tolerance. The scale is always passed explicitly. Under ``dynamic=True`` Dynamo turns a
  module's float attribute (HF's ``self.scaling``) into a graph input read with ``.item()``; such a
  symbolic multiplier becomes a scale *node* (``scale=<SymFloat node>``, as Dynamo itself emits for
  HF's SDPA path), and one it already specialised (guarded) counts as its constant. Symbolic
  divisors are refused (``1 / s`` would raise where eager ``x / s`` gives inf).
* Softmax: ``F.softmax``, ``torch.softmax``, ``.softmax``, dim given as -1 or 3; ``dtype=`` equal
  to the input's, or float32 on a float16/bfloat16 input cast back before ``P @ V`` (the HF upcast:
  SDPA's kernels keep P in float32 internally, so only the rounding of P differs).
* Dropout between softmax and ``P @ V``: removed only when provably a no-op (``p == 0`` or
  ``training=False`` as constants, or a p Dynamo specialised to 0 under dynamic=True, which
  recompiles when p changes); otherwise the whole site stays.
* Masks (at most one per site):
  - ``S.masked_fill(M, -inf)`` with boolean M. M provably causal (strictly upper-triangular True,
    top-left aligned, last two dims exactly [Tq, Tk]) -> ``is_causal=True`` and the mask computation
    is dropped. Proof forms: ``bias[..., :T, :T] == 0`` of a buffer whose value is checked to be
    0/1 tril on every leading index (a placeholder with a real tensor in example_inputs, or a
    get_attr); ``torch.tril(torch.ones(...))`` / ``torch.triu(ones, diagonal=1)``, through
    ``.bool()``/``.to(dtype)``, ``~``/``logical_not``/``== 0``, top-left-corner slices and
    views that keep the last two dims. Any other boolean M -> ``attn_mask=~M`` (SDPA: True = keep).
  - ``S.masked_fill(M, v)`` / ``torch.where(K, S, v)`` with a constant ``v <= -1e9`` (``finfo.min``)
    under a provably causal M (K its complement) -> ``is_causal=True``: every row keeps its diagonal,
    so ``exp(v - max)`` is exactly 0. ``torch.where(K, S, -inf)`` with any boolean K -> ``attn_mask=K``.
  - ``S + A`` with a float A of S's dtype -> ``attn_mask=A`` (SDPA adds it after scaling, so no
    scale may follow the add). A scale after a masked_fill must be > 0 (it keeps -inf at -inf).
  - A mask that depends on the scores themselves stays as it is.
* GQA: K and V given as HF ``repeat_kv`` (``x[:, :, None].expand(B, Hkv, n, T, D).reshape(B, Hkv*n,
  T, D)``) or ``repeat_interleave(n, dim=1)`` with the same n are passed unrepeated with
  ``enable_gqa=True`` (the same head mapping, h -> h // n).

Every node between Q Kᵀ and ``P @ V`` must have exactly one user: a site whose attention weights or
intermediate scores are used elsewhere (returned, logged, in-place ``masked_fill_``) stays.

Deliberately not converted
--------------------------
3-D attention (``torch.bmm`` on [B*H, T, D]; reported as skipped; only the 4-D baddbmm form above
is lifted), masks with fewer than 2 dims (SDPA rejects them, eager broadcasts them), batch or
head dims in other positions (``einsum("bqhd,bkhd->bhqk")``), broadcasting between the batch/head
dims of Q, K, V, dropout with p > 0 in training (the RNG stream would differ), ``baddbmm`` with
``beta != 0`` (ALiBi-style biases), ``masked_fill`` / ``torch.where`` with a finite value above -1e9
(its exponential is not provably 0), a finite value (``finfo.min``, ``-1e9``) under a mask not
provably causal (a row it hides entirely averages its values), scales that are tensors, a symbolic scale after ``masked_fill`` (its sign is unknown), more than
one mask op, and ``softmax(dim=None)``. Causal masks that HF builds from position indices arrive
as an additive float mask and stay ``attn_mask`` (exact, but not recognised as causal).

Exactness notes
---------------
* Rows whose keys are all masked: eager softmax gives NaN there, SDPA gives 0 (checked on torch
  2.13 CPU). Every other value is the same function up to float rounding.
* A causal proof through a buffer uses the buffer's value at compile time: Dynamo does not guard
  tensor values, so a model that rewrites such a mask buffer after compiling must recompile.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.symbolic_shapes import is_concrete_float, is_concrete_int, statically_known_true

from burstc.passes.dead_code import mutates
from burstc.passes.nodes import new_node

__all__ = [
    "RESULT_KEY", "SDPA", "CanonicalizeResult", "CanonicalizedSite", "SkippedSite",
    "canonicalize_attention", "canonicalize_result",
]

log = logging.getLogger(__name__)

SDPA = torch._C._nn.scaled_dot_product_attention
RESULT_KEY = "burst_canonicalize"

_MATMUL_FNS = (operator.matmul, torch.matmul)
_SOFTMAX_FNS = (F.softmax, torch.softmax)
_MUL_FNS = (operator.mul, torch.mul)
_DIV_FNS = (operator.truediv, torch.div, torch.true_divide)
_ADD_FNS = (operator.add, torch.add)
_TRANSPOSE_FNS = (torch.transpose, torch.swapaxes, torch.swapdims)
_TRANSPOSE_METHODS = ("transpose", "swapaxes", "swapdims")
_CAST_METHODS = ("to", "type", "type_as", "float", "half", "bfloat16", "double", "bool")
_ONES_FNS = (torch.ones, torch.ones_like)


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CanonicalizedSite:
    """One attention rewritten into an SDPA call."""
    node: str                     # name of the new scaled_dot_product_attention node
    spelling: str                 # "matmul" | "einsum" | "baddbmm" (how Q·Kᵀ was written)
    mask: str                     # "none" | "causal" | "bool" | "additive"
    scale: float | str            # scale= passed to SDPA: a float, or the name of the node that
    #                               computes it at run time (a symbolic float under dynamic=True)
    gqa_groups: int               # query heads per K/V head given to SDPA (1: enable_gqa=False)
    replaced: tuple[str, ...]     # names of the nodes the rewrite removed
    stack_trace: str | None       # the softmax node's stack trace (user source)

    @property
    def location(self) -> str:
        return _last_frame(self.stack_trace)


@dataclass(frozen=True)
class SkippedSite:
    """A softmax feeding P @ V that was left as it is, and why."""
    softmax: str
    reason: str
    stack_trace: str | None

    @property
    def location(self) -> str:
        return _last_frame(self.stack_trace)


@dataclass
class CanonicalizeResult:
    converted: list[CanonicalizedSite] = dataclasses.field(default_factory=list)
    skipped: list[SkippedSite] = dataclasses.field(default_factory=list)


def canonicalize_result(gm: fx.GraphModule) -> CanonicalizeResult | None:
    """The record of the last canonicalize_attention run on gm (None if it never ran)."""
    return gm.meta.get(RESULT_KEY)


# ----------------------------------------------------------------------------------------------
# The pass
# ----------------------------------------------------------------------------------------------

class _NotAttention(Exception):
    """The softmax is not followed by a P @ V product: nothing to record."""


class _Skip(Exception):
    """Looks like attention but is not provably exact to rewrite; the message is the reason."""


def canonicalize_attention(gm: fx.GraphModule, example_inputs=None) -> fx.GraphModule:
    ctx = _Context(gm, example_inputs)
    result = CanonicalizeResult()
    erased: set[str] = set()
    for softmax in [n for n in gm.graph.nodes if _is_softmax(n)]:
        if softmax.name in erased:
            continue
        try:
            site = _match_site(softmax, ctx)
        except _NotAttention:
            continue
        except _Skip as skip:
            result.skipped.append(SkippedSite(softmax.name, str(skip), softmax.meta.get("stack_trace")))
            counters["burst"]["canonicalize_skipped"] += 1
            log.info("attention at %s left as is: %s", result.skipped[-1].location, skip)
            continue
        done = _rewrite(gm.graph, site)
        erased.update(done.replaced)
        result.converted.append(done)
        counters["burst"]["canonicalized"] += 1
        log.info("attention at %s -> %s (mask=%s, scale=%s, gqa=%d, via %s)", done.location, done.node,
                 done.mask, done.scale, done.gqa_groups, done.spelling)
    if result.converted:
        gm.graph.lint()
        gm.recompile()
    gm.meta[RESULT_KEY] = result
    return gm


class _Context:
    """The graph module and the real values of its placeholders."""

    def __init__(self, gm: fx.GraphModule, example_inputs):
        self.gm = gm
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        inputs = list(example_inputs) if example_inputs is not None else []
        self.inputs = dict(zip(placeholders, inputs)) if len(inputs) == len(placeholders) else {}

    def real_tensor(self, node: fx.Node) -> torch.Tensor | None:
        """The concrete value of a placeholder or get_attr node, if known."""
        value = None
        if node.op == "placeholder":
            value = self.inputs.get(node)
        elif node.op == "get_attr":
            value = self.gm
            for part in node.target.split("."):
                value = getattr(value, part, None)
        if not isinstance(value, torch.Tensor) or isinstance(value, FakeTensor) or value.is_meta:
            return None
        return value


# ----------------------------------------------------------------------------------------------
# Matching one site
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Scale:
    """A product of multipliers: a float times symbolic scalar nodes (SymFloat graph inputs, e.g.
    a module's float attribute under dynamic=True)."""
    const: float = 1.0
    symbols: tuple = ()

    def times(self, other: _Scale) -> _Scale:
        return _Scale(self.const * other.const, self.symbols + other.symbols)

    def known_positive(self) -> bool:
        return not self.symbols and self.const > 0


@dataclass
class _QK:
    """Q·Kᵀ as found: q, and either k ([.., Tk, D]) or kt ([.., D, Tk])."""
    q: fx.Node
    k: fx.Node | None
    kt: fx.Node | None
    factor: _Scale
    spelling: str
    nodes: list[fx.Node]


@dataclass(frozen=True)
class _Scores:
    """The chain from Q·Kᵀ up to the softmax, collected walking upwards."""
    nodes: tuple = ()             # chain nodes, softmax side first
    factors: tuple = ()           # _Scales met so far (they act after what lies above)
    mask_op: str | None = None    # "masked_fill" | "add" | "where"
    mask: fx.Node | None = None
    finite_fill: bool = False     # the masked value is a huge finite negative, not -inf
    qk: _QK | None = None


@dataclass
class _Site:
    softmax: fx.Node
    pv: fx.Node
    q: fx.Node
    k: fx.Node | None             # None: insert kt.transpose(-2, -1)
    kt: fx.Node | None
    v: fx.Node
    scale: _Scale
    mask_kind: str
    mask: fx.Node | None          # the attn_mask input (negated first when negate_mask)
    negate_mask: bool
    gqa_groups: int
    spelling: str
    owned: list[fx.Node]          # nodes the site consumes; erased if dead after the rewrite


def _match_site(softmax: fx.Node, ctx: _Context) -> _Site:
    pv, v, prob_nodes = _match_probabilities(softmax)
    x, dtype = _softmax_input(softmax)
    scores = _walk_scores(x, _Scores())
    qk = scores.qk
    # Single users from Q·Kᵀ to P also mean V and the mask cannot be computed from the scores:
    # such a path would leave the chain through a second user.
    qk_node = qk.nodes[0]
    shared = [n.name for n in (*scores.nodes, qk_node) if len(n.users) != 1]
    if shared:
        raise _Skip(f"intermediate scores are also used elsewhere ({', '.join(shared)})")
    q, k, kt, factor, lookthrough = _qk_operands(qk)
    k, v_heads, groups, repeat_nodes = _ungroup_kv(k, v)
    k_or_kt = k if k is not None else kt
    _check_shapes(x, q, k_or_kt, k is None, v_heads, groups)
    _check_dtypes(x, q, k_or_kt, v_heads, prob_nodes[-1], pv, dtype)
    mask_kind, mask, negate, mask_nodes = _classify_mask(scores, x, ctx)
    owned = [pv, *prob_nodes, *scores.nodes, *qk.nodes, *lookthrough, *repeat_nodes, *mask_nodes]
    owned += [a for n in owned for a in n.all_input_nodes if _is_call(a, (), ("item",))]
    scale = functools.reduce(_Scale.times, scores.factors, factor)
    return _Site(
        softmax=softmax, pv=pv, q=q, k=k, kt=kt, v=v_heads, scale=scale, mask_kind=mask_kind,
        mask=mask, negate_mask=negate, gqa_groups=groups, spelling=qk.spelling, owned=owned,
    )


def _match_probabilities(softmax: fx.Node) -> tuple[fx.Node, fx.Node, list[fx.Node]]:
    """softmax -> [casts, dropouts] -> P @ V. Returns (pv node, v, the P chain)."""
    node, nodes = softmax, [softmax]
    while True:
        pv = next((u for u in node.users if _pv_value(u, node) is not None), None)
        if pv is not None:
            break
        following = [u for u in node.users if u.args and u.args[0] is node and _is_prob_passthrough(u)]
        if len(following) != 1:
            _report_unknown_path(node)
            raise _NotAttention
        node = following[0]
        nodes.append(node)
    shared = [n.name for n in nodes if len(n.users) != 1]
    if shared:
        raise _Skip(f"the attention weights are also used elsewhere ({', '.join(shared)})")
    for n in nodes:
        if _is_dropout(n) and not _dropout_is_noop(n):
            raise _Skip(f"dropout {n.name} is not provably a no-op (p > 0 in training)")
    return pv, _pv_value(pv, node), nodes


def _report_unknown_path(probs: fx.Node, hops: int = 4) -> None:
    """A softmax whose weights reach a P @ V product through ops the matcher does not know is attention
    left alone: raise _Skip naming those ops (never let it pass unseen). Attention sinks (GPT-OSS: the
    softmax runs over one extra column per head, sliced off before P @ V) get their own reason."""
    frontier, path = [probs], []
    for _ in range(hops):
        users = [u for n in frontier for u in n.users if u.args and u.args[0] is n]
        for u in users:
            if _pv_value(u, u.args[0]) is not None:
                names = [_op_label(n) for n in path]
                if any(_drops_last_columns(n) for n in path):
                    raise _Skip("the softmax also covers extra columns that are dropped before P @ V (attention "
                                "sinks, as in GPT-OSS), which burst does not convert yet")
                raise _Skip(f"the attention weights pass through {', '.join(names)} before P @ V, which burst does "
                            "not know to be exact to rewrite")
        if not users:
            return
        path += users
        frontier = users


def _op_label(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _drops_last_columns(node: fx.Node) -> bool:
    """x[..., :-k] (k > 0): a slice of the last dim dropping its last columns."""
    if node.target is not operator.getitem or not isinstance(node.args[1], tuple) or not node.args[1]:
        return False
    last = node.args[1][-1]
    return (isinstance(last, slice) and last.start in (None, 0) and isinstance(last.stop, int) and last.stop < 0
            and last.step in (None, 1))


def _softmax_input(node: fx.Node) -> tuple[fx.Node, torch.dtype | None]:
    x = node.args[0]
    dtype_pos = 3 if node.target is F.softmax else 2
    dim, dtype = _arg(node, 1, "dim"), _arg(node, dtype_pos, "dtype")
    if not isinstance(x, fx.Node) or _rank(x) != 4:
        raise _Skip("the softmax input is not a 4-D tensor")
    if not isinstance(dim, int) or dim % 4 != 3:
        raise _Skip(f"softmax over dim={dim!r}, not the last dim")
    return x, dtype


def _walk_scores(node: fx.Node, acc: _Scores) -> _Scores:
    """Walk up from the softmax input through casts, scales and one mask to the Q·Kᵀ product."""
    if _is_noop_cast(node):
        return _walk_scores(node.args[0], dataclasses.replace(acc, nodes=acc.nodes + (node,)))
    scaled = _scale_operand(node)
    if scaled is not None:
        src, c = scaled
        return _walk_scores(src, dataclasses.replace(acc, nodes=acc.nodes + (node,), factors=acc.factors + (c,)))
    for operands, op in ((_masked_fill_operands, "masked_fill"), (_where_operands, "where")):
        found = operands(node)
        if found is not None:
            src, bool_mask, finite = found
            _check_mask_position(acc, "masked_fill")  # both hide entries with a constant
            return _walk_scores(src, dataclasses.replace(
                acc, nodes=acc.nodes + (node,), mask_op=op, mask=bool_mask, finite_fill=finite))
    if _is_call(node, _ADD_FNS, ("add",)):
        return _walk_additive_mask(node, acc)
    qk = _match_qk(node)
    if qk is None:
        if _is_call(node, (torch.tanh,), ("tanh",)) or _is_call(node, _MUL_FNS, ("mul",)) and any(
                _is_call(a, (torch.tanh,), ("tanh",)) for a in node.args):
            raise _Skip("the scores are soft-capped with tanh (cap * tanh(S / cap)), which SDPA cannot express")
        raise _Skip(f"the softmax input does not come from a Q·Kᵀ product (stops at {node.name})")
    return dataclasses.replace(acc, qk=qk)


def _walk_additive_mask(node: fx.Node, acc: _Scores) -> _Scores:
    """scores + mask (either order): the branch that reaches Q·Kᵀ is the scores."""
    if node.kwargs or len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        raise _Skip(f"{node.name}: only `scores + mask` of two tensors is an additive mask")
    _check_mask_position(acc, "add")
    errors = []
    for scores, mask in (node.args, reversed(node.args)):
        if not _same_shape(scores, node) or _dtype(mask) != _dtype(node) or _dtype(scores) != _dtype(node):
            errors.append(f"{node.name}: the mask changes the scores' shape or dtype")
            continue
        try:
            return _walk_scores(scores, dataclasses.replace(
                acc, nodes=acc.nodes + (node,), mask_op="add", mask=mask))
        except _Skip as e:
            errors.append(str(e))
    raise _Skip(errors[0])


def _check_mask_position(acc: _Scores, op: str) -> None:
    if acc.mask_op is not None:
        raise _Skip("more than one mask on the scores")
    if op == "add" and acc.factors:
        raise _Skip("a scale is applied after the additive mask")
    if op == "masked_fill" and not all(c.known_positive() for c in acc.factors):
        raise _Skip("a scale not known to be positive is applied after masked_fill(-inf)")


def _match_qk(node: fx.Node) -> _QK | None:
    if _is_call(node, _MATMUL_FNS, ("matmul",)) and len(node.args) == 2 \
            and all(isinstance(a, fx.Node) for a in node.args):
        return _QK(node.args[0], None, node.args[1], _Scale(), "matmul", [node])
    if _is_einsum(node):
        return _match_einsum_qk(node)
    if _is_reshape(node) and _is_call(node.args[0], (torch.baddbmm,), ("baddbmm",)):
        return _match_baddbmm(node)
    return None


def _match_einsum_qk(node: fx.Node) -> _QK | None:
    equation, a, b = _einsum_parts(node)
    form = _einsum_form(equation)
    if form == "abt":
        return _QK(a, b, None, _Scale(), "einsum", [node])
    if form == "ab":
        return _QK(a, None, b, _Scale(), "einsum", [node])
    return None


def _match_baddbmm(view: fx.Node) -> _QK:
    """baddbmm(empty, q.reshape(B*H, Tq, D), kt.reshape(B*H, D, Tk), beta=0, alpha=c).view(B, H, Tq, Tk)."""
    bmm = view.args[0]
    beta, alpha = _constant(bmm.kwargs.get("beta", 1)), _constant(bmm.kwargs.get("alpha", 1))
    if len(bmm.users) != 1 or len(bmm.args) != 3 or set(bmm.kwargs) - {"beta", "alpha"}:
        raise _Skip(f"{bmm.name}: unsupported baddbmm call")
    if beta != 0:
        raise _Skip(f"{bmm.name}: baddbmm with beta != 0 (a bias) is not converted")
    if not _is_scale(alpha):
        raise _Skip(f"{bmm.name}: baddbmm alpha is not a compile-time constant")
    q, kt = _batch_unflattened(bmm.args[1]), _batch_unflattened(bmm.args[2])
    if q is None or kt is None or _rank(view) != 4:
        raise _Skip(f"{bmm.name}: baddbmm operands are not reshaped 4-D tensors")
    batch_ok = _same_dims(_shape(view)[:2] * 2, _shape(q)[:2] + _shape(kt)[:2])
    if not batch_ok or not _same_dims(_shape(view)[2:], _shape(bmm)[1:]):
        raise _Skip(f"{bmm.name}: the baddbmm batch is not the query's [B, H]")
    nodes = [view, bmm, bmm.args[1], bmm.args[2]]
    if _is_call(bmm.args[0], (torch.empty, torch.zeros), ()):
        nodes.append(bmm.args[0])
    return _QK(q, None, kt, _Scale(alpha), "baddbmm", nodes)


def _batch_unflattened(node: fx.Node) -> fx.Node | None:
    """x.reshape(B*H, R, C) of a 4-D x [B, H, R, C]: returns x."""
    if not _is_reshape(node) or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    if _rank(src) == 4 and _rank(node) == 3 and _same_dims(_shape(src)[2:], _shape(node)[1:]):
        return src
    return None


def _qk_operands(qk: _QK):
    """Peel scales and the transpose of K. Returns q, k, kt (k None: transpose needed), factor, nodes."""
    q, q_factor, nodes = _peel_scales(qk.q)
    factor = qk.factor.times(q_factor)
    if qk.k is not None:
        k, k_factor, k_nodes = _peel_scales(qk.k)
        return q, k, None, factor.times(k_factor), nodes + k_nodes
    kt, kt_factor, kt_nodes = _peel_scales(qk.kt)
    factor = factor.times(kt_factor)
    untransposed = _untranspose(kt)
    if untransposed is None:
        return q, None, kt, factor, nodes + kt_nodes
    k, k_factor, k_nodes = _peel_scales(untransposed)
    return q, k, None, factor.times(k_factor), nodes + kt_nodes + [kt] + k_nodes


def _peel_scales(node: fx.Node) -> tuple[fx.Node, _Scale, list[fx.Node]]:
    factor, nodes = _Scale(), []
    while (scaled := _scale_operand(node)) is not None:
        nodes.append(node)
        node, c = scaled
        factor = factor.times(c)
    return node, factor, nodes


def _untranspose(node: fx.Node) -> fx.Node | None:
    """x for node = x with its last two dims swapped (4-D), else None."""
    if _rank(node) != 4 or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if _is_call(node, _TRANSPOSE_FNS, _TRANSPOSE_METHODS):
        dims = (_arg(node, 1, "dim0"), _arg(node, 2, "dim1"))
        if all(isinstance(d, int) for d in dims) and sorted(d % 4 for d in dims) == [2, 3]:
            return node.args[0]
    if _is_call(node, (torch.permute,), ("permute",)):
        dims = node.args[1:] or node.kwargs.get("dims", ())
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        if all(isinstance(d, int) for d in dims) and [d % 4 for d in dims] == [0, 1, 3, 2]:
            return node.args[0]
    return None


# ----------------------------------------------------------------------------------------------
# GQA, shapes, dtypes
# ----------------------------------------------------------------------------------------------

def _ungroup_kv(k: fx.Node | None, v: fx.Node):
    """K and V without a repeat over heads (same repeat count for both), that count, and the
    repeat nodes (erased if dead after the rewrite)."""
    if k is None:
        return k, v, 1, []
    k_base, k_groups, k_nodes = _unrepeat_heads(k)
    v_base, v_groups, v_nodes = _unrepeat_heads(v)
    if k_groups > 1 and k_groups == v_groups:
        return k_base, v_base, k_groups, k_nodes + v_nodes
    return k, v, 1, []


def _unrepeat_heads(node: fx.Node) -> tuple[fx.Node, int, list[fx.Node]]:
    """(x, n, repeat nodes) when node is x [B, Hkv, T, D] with every head repeated n times in a
    row (HF repeat_kv, or repeat_interleave(n, dim=1)), else (node, 1, [])."""
    if _is_call(node, (torch.repeat_interleave,), ("repeat_interleave",)):
        x, n, dim = node.args[0], _arg(node, 1, "repeats"), _arg(node, 2, "dim")
        if isinstance(x, fx.Node) and _rank(x) == 4 and isinstance(n, int) and n > 1 \
                and isinstance(dim, int) and dim % 4 == 1 and set(node.kwargs) <= {"repeats", "dim"}:
            return x, n, [node]
        return node, 1, []
    if not _is_reshape(node) or not _is_call(node.args[0], (), ("expand",)):
        return node, 1, []
    expanded = node.args[0]
    x = _unsqueezed_at_2(expanded.args[0])
    if x is None or _rank(x) != 4 or _rank(expanded) != 5 or _rank(node) != 4:
        return node, 1, []
    (b, h, t, d), e, out = _shape(x), _shape(expanded), _shape(node)
    n = e[2]
    if not isinstance(n, int) or n < 2:
        return node, 1, []
    if _same_dims(e, (b, h, n, t, d)) and _same_dims(out, (b, h * n, t, d)):
        return x, n, [node, expanded, expanded.args[0]]
    return node, 1, []


def _unsqueezed_at_2(node: fx.Node) -> fx.Node | None:
    """x for node = x[:, :, None] (or x.unsqueeze(2)) of a 4-D x."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    x = node.args[0]
    if _is_call(node, (torch.unsqueeze,), ("unsqueeze",)) and _arg(node, 1, "dim") in (2, -3):
        return x
    if node.target is operator.getitem and isinstance(node.args[1], tuple):
        index = node.args[1]
        full = slice(None, None, None)
        if index[:3] == (full, full, None) and all(i == full or i is Ellipsis for i in index[3:]):
            return x
    return None


def _check_shapes(x, q, k_or_kt, transposed: bool, v, groups: int) -> None:
    if not all(_rank(n) == 4 for n in (q, k_or_kt, v)):
        raise _Skip("q, k and v are not all 4-D")
    b, h, tq, d = _shape(q)
    bk, hk, dk, tk = _shape(k_or_kt) if transposed else _swap_last2(_shape(k_or_kt))
    bv, hv, tv, dv = _shape(v)
    same = [(b, bk), (b, bv), (hk, hv), (h, hk * groups), (d, dk), (tk, tv)]
    if not all(_same(a, c) for a, c in same):
        raise _Skip("q, k, v shapes broadcast against each other (SDPA needs equal batch and head dims)")
    if not _same_dims(_shape(x), (b, h, tq, tk)):
        raise _Skip("the scores are not [B, H, Tq, Tk]")


def _check_dtypes(x, q, k, v, probs, pv, softmax_dtype) -> None:
    dtypes = {_dtype(n) for n in (x, q, k, v, probs, pv)}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise _Skip(f"mixed or non-float dtypes along the site ({sorted(map(str, dtypes))})")
    dtype = _dtype(q)
    if softmax_dtype not in (None, dtype) and not (
            softmax_dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16)):
        raise _Skip(f"softmax dtype={softmax_dtype} on {dtype} scores")


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------

def _classify_mask(scores: _Scores, x: fx.Node, ctx: _Context):
    """-> (kind, attn_mask node, negate it?, mask nodes that become dead if causal)."""
    if scores.mask_op is None:
        return "none", None, False, []
    m = scores.mask
    if (_rank(m) or 0) < 2:
        raise _Skip("the mask has fewer than 2 dims (SDPA rejects such an attn_mask)")
    if scores.mask_op == "add":
        return "additive", m, False, []
    if _dtype(m) != torch.bool:
        raise _Skip("masked_fill with a non-boolean mask")
    seen: list[fx.Node] = []
    hides_upper = scores.mask_op == "masked_fill"  # masked_fill hides where True; where keeps where True
    if _same_dims(_shape(m)[-2:], _shape(x)[-2:]) and _is_triangle(m, ctx, seen, upper=hides_upper):
        return "causal", None, False, seen
    if scores.finite_fill:
        raise _Skip("a finite masked value (finfo.min, -1e9) under a mask that is not provably causal: a row it "
                    "hides entirely averages its values in eager, which SDPA does not reproduce")
    if scores.mask_op == "where":
        return "bool", m, False, []
    negated = _is_call(m, (operator.invert, torch.logical_not, torch.bitwise_not), ("logical_not", "bitwise_not"))
    if negated and _dtype(m.args[0]) == torch.bool:
        return "bool", m.args[0], False, [m]
    return "bool", m, True, []


def _is_strict_upper(node, ctx: _Context, seen: list) -> bool:
    """Every last-two-dims matrix of node is 1 strictly above the diagonal and 0 elsewhere."""
    return _is_triangle(node, ctx, seen, upper=True)


def _is_triangle(node, ctx: _Context, seen: list, upper: bool) -> bool:
    """upper: 1 strictly above the diagonal, else 0; not upper: 1 on and below it, else 0.
    seen collects the nodes of the proof (they die with the mask)."""
    if not isinstance(node, fx.Node):
        return False
    if _is_value_preserving(node):
        seen.append(node)
        return _is_triangle(node.args[0], ctx, seen, upper)
    if _is_complement(node):
        seen.append(node)
        return _is_triangle(node.args[0], ctx, seen, not upper)
    if _is_call(node, (torch.triu,) if upper else (torch.tril,), ("triu",) if upper else ("tril",)):
        seen.append(node)
        return _arg(node, 1, "diagonal", 0) == (1 if upper else 0) and _is_ones(node.args[0])
    value = ctx.real_tensor(node)
    return value is not None and _tensor_is_triangle(value, upper)


def _tensor_is_triangle(t: torch.Tensor, upper: bool) -> bool:
    if t.dim() < 2:
        return False
    rows, cols = t.shape[-2:]
    ones = torch.ones(rows, cols, dtype=torch.bool, device=t.device)
    want = ones.triu(1) if upper else ones.tril()
    t = t.detach()
    return bool(((t == 1) == want).all()) and bool(((t == 0) == ~want).all())


def _is_value_preserving(node: fx.Node) -> bool:
    """Keeps 0/1 values and each last-two-dims matrix: casts, views, top-left corner slices."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if _is_call(node, (), _CAST_METHODS) and _is_dtype_cast(node):
        return True
    if _is_call(node, (torch.unsqueeze,), ("view", "reshape", "expand", "unsqueeze")):
        src = node.args[0]
        return min(_rank(src) or 0, _rank(node) or 0) >= 2 and _same_dims(_shape(src)[-2:], _shape(node)[-2:])
    return node.target is operator.getitem and _is_corner_slice(node)


def _is_corner_slice(node: fx.Node) -> bool:
    """x[..., :a, :b]: slices starting at 0 on the last two dims, anything leading-only before."""
    index = node.args[1]
    if not isinstance(index, tuple) or len(index) < 2 or (_rank(node) or 0) < 2:
        return False
    *lead, row, col = index
    corner = all(isinstance(s, slice) and s.start in (None, 0) and s.step in (None, 1) for s in (row, col))
    if not corner:
        return False
    if lead[:1] == [Ellipsis]:
        return len(lead) == 1
    lead_ok = all(s == slice(None) or s is None or isinstance(s, int) for s in lead)
    consumed = sum(1 for s in index if s is not None)
    return lead_ok and consumed == _rank(node.args[0])


def _is_complement(node: fx.Node) -> bool:
    """~x (bool x), logical_not(x), x == 0, x == False."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if _is_call(node, (torch.logical_not,), ("logical_not",)):
        return True
    if _is_call(node, (operator.invert, torch.bitwise_not), ("bitwise_not",)):
        return _dtype(node.args[0]) == torch.bool
    if _is_call(node, (operator.eq, torch.eq), ("eq",)) and len(node.args) == 2:
        return node.args[1] is False or (_is_number(node.args[1]) and node.args[1] == 0)
    return False


def _is_ones(node) -> bool:
    return _is_call(node, _ONES_FNS, ("new_ones",))


# ----------------------------------------------------------------------------------------------
# Rewriting
# ----------------------------------------------------------------------------------------------

def _rewrite(graph: fx.Graph, site: _Site) -> CanonicalizedSite:
    with graph.inserting_before(site.pv):
        k = site.k
        if k is None:
            k = new_node(graph, "call_method", "transpose", (site.kt, -2, -1), {}, site.softmax)
        mask = site.mask
        if site.negate_mask:
            mask = new_node(graph, "call_function", torch.logical_not, (mask,), {}, site.softmax)
        scale = _scale_argument(graph, site.scale, site.softmax)
        kwargs = {"attn_mask": mask, "dropout_p": 0.0, "is_causal": site.mask_kind == "causal",
                  "scale": scale, "enable_gqa": site.gqa_groups > 1}
        sdpa = new_node(graph, "call_function", SDPA, (site.q, k, site.v), kwargs, site.softmax)
    site.pv.replace_all_uses_with(sdpa)
    replaced = _erase_dead(graph, [site.pv, *site.owned])
    return CanonicalizedSite(
        node=sdpa.name, spelling=site.spelling, mask=site.mask_kind,
        scale=scale.name if isinstance(scale, fx.Node) else scale,
        gqa_groups=site.gqa_groups, replaced=tuple(replaced),
        stack_trace=site.softmax.meta.get("stack_trace"),
    )


def _scale_argument(graph: fx.Graph, scale: _Scale, like: fx.Node) -> float | fx.Node:
    """SDPA's scale=: the float, or a node multiplying out the symbolic factors (as Dynamo itself
    passes scale=<SymFloat node> for HF's SDPA path under dynamic=True)."""
    if not scale.symbols:
        return float(scale.const)
    value = scale.symbols[0]
    for symbol in scale.symbols[1:]:
        value = new_node(graph, "call_function", operator.mul, (value, symbol), {}, like)
    if scale.const != 1.0:
        value = new_node(graph, "call_function", operator.mul, (value, scale.const), {}, like)
    return value


def _erase_dead(graph: fx.Graph, nodes: list[fx.Node]) -> list[str]:
    """Erase the given nodes that no longer have users, users first. Returns their names."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    erased = []
    for node in sorted(dict.fromkeys(nodes), key=position.__getitem__, reverse=True):
        if not node.users and node.op in ("call_function", "call_method") and not mutates(node):
            erased.append(node.name)
            graph.erase_node(node)
    return erased[::-1]


# ----------------------------------------------------------------------------------------------
# Small node helpers
# ----------------------------------------------------------------------------------------------

def _is_call(node, functions=(), methods=()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return any(node.target is f for f in functions)
    return node.op == "call_method" and node.target in methods


def _arg(node: fx.Node, position: int, name: str, default: Any = None) -> Any:
    """Argument by position (the tensor/self is position 0) or by keyword."""
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _is_softmax(node: fx.Node) -> bool:
    return _is_call(node, _SOFTMAX_FNS, ("softmax",))


def _is_einsum(node: fx.Node) -> bool:
    return _is_call(node, (torch.einsum,)) and isinstance(node.args[0], str)


def _einsum_parts(node: fx.Node):
    """(equation, a, b) of a two-operand einsum, operands given inline or as one list."""
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    if len(operands) != 2 or not all(isinstance(o, fx.Node) for o in operands):
        return "", None, None
    return node.args[0], operands[0], operands[1]


def _einsum_form(equation: str) -> str | None:
    """4-D batched matmul spellings: "ab" for abij,abjk->abik (x @ y), "abt" for abij,abkj->abik
    (x @ yᵀ); the batch letters lead in every operand. Anything else: None."""
    match = re.fullmatch(r"(\w{4}),(\w{4})->(\w{4})", equation.replace(" ", ""))
    if match is None:
        return None
    x, y, out = match.groups()
    distinct = all(len(set(t)) == 4 for t in (x, y, out)) and len(set(x + y + out)) == 5
    if not distinct or not x[:2] == y[:2] == out[:2] or out[2] != x[2]:
        return None
    if y[2] == x[3] and out[3] == y[3]:
        return "ab"
    if y[3] == x[3] and out[3] == y[2]:
        return "abt"
    return None


def _pv_value(node: fx.Node, probs: fx.Node) -> fx.Node | None:
    """v when node is probs @ v (matmul, bmm or einsum), else None. bmm is only matched so that
    3-D attention is reported with its reason; the 4-D check rejects it."""
    if _is_call(node, _MATMUL_FNS + (torch.bmm,), ("matmul", "bmm")) and len(node.args) == 2:
        p, v = node.args
        return v if p is probs and v is not probs and isinstance(v, fx.Node) else None
    if _is_einsum(node):
        equation, p, v = _einsum_parts(node)
        if p is probs and v is not probs and _einsum_form(equation) == "ab":
            return v
    return None


def _is_prob_passthrough(node: fx.Node) -> bool:
    return _is_dropout(node) or _is_dtype_cast(node)


def _is_dropout(node: fx.Node) -> bool:
    return _is_call(node, (F.dropout, torch.dropout))


def _dropout_is_noop(node: fx.Node) -> bool:
    p = _constant(_arg(node, 1, "p", 0.5))
    training = _arg(node, 2, "training" if node.target is F.dropout else "train", True)
    return p == 0 or training is False


def _is_dtype_cast(node: fx.Node) -> bool:
    """x.to(dtype), x.type_as(y), x.float() and friends: nothing but a dtype change."""
    if not _is_call(node, (), _CAST_METHODS) or not isinstance(node.args[0], fx.Node):
        return False
    if node.target in ("to", "type"):
        dtypes = list(node.args[1:]) + [v for k, v in node.kwargs.items() if k == "dtype"]
        return len(dtypes) == 1 and len(node.args) + len(node.kwargs) == 2 and isinstance(dtypes[0], torch.dtype)
    if node.target == "type_as":
        return len(node.args) == 2 and not node.kwargs
    return len(node.args) == 1 and not node.kwargs


def _is_noop_cast(node: fx.Node) -> bool:
    return _is_dtype_cast(node) and _dtype(node) == _dtype(node.args[0])


def _scale_operand(node: fx.Node) -> tuple[fx.Node, _Scale] | None:
    """(x, multiplier) for a tensor x times or over a scalar (constant or symbolic); else None."""
    if node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if _is_call(node, _MUL_FNS, ("mul",)):
        if _rank(a) is not None and _as_scale(b) is not None:
            return a, _as_scale(b)
        if _rank(b) is not None and _as_scale(a) is not None:
            return b, _as_scale(a)
    if _is_call(node, _DIV_FNS, ("div", "true_divide")) and _rank(a) is not None and _is_scale(_constant(b)):
        return a, _Scale(1.0 / _constant(b))
    return None


def _as_scale(x) -> _Scale | None:
    """A finite nonzero compile-time number, or a symbolic scalar node, as a multiplier. (Only
    multipliers may be symbolic: 1 / s in Python raises where the eager x / s gives inf.)"""
    c = _constant(x)
    if _is_scale(c):
        return _Scale(c)
    if isinstance(x, fx.Node) and isinstance(_value(x), (torch.SymFloat, torch.SymInt)):
        return _Scale(symbols=(x,))
    return None


# A masked value this negative makes exp(value - row max) exactly 0 wherever the row keeps one key
# (finfo.min, -1e9, ...): such a fill is exact as a causal mask, whose rows always keep the diagonal.
_HIDING_FILL = -1e9


def _fill_kind(node: fx.Node, value) -> bool:
    """False for -inf, True for a huge finite negative constant; raises _Skip otherwise."""
    value = _constant(value) if isinstance(value, fx.Node) else value
    if _is_number(value) and value == -math.inf:
        return False
    if _is_number(value) and value <= _HIDING_FILL:
        return True
    raise _Skip(f"{node.name}: masks with {value!r}, neither -inf nor a value <= {_HIDING_FILL:g} such as finfo.min")


def _masked_fill_operands(node: fx.Node) -> tuple[fx.Node, fx.Node, bool] | None:
    """(x, mask, finite fill?) for x.masked_fill(mask, -inf | finfo.min | -1e9); raises _Skip for other
    masked_fill values."""
    if not _is_call(node, (torch.masked_fill,), ("masked_fill",)):
        return None
    x, mask, value = node.args[0], _arg(node, 1, "mask"), _arg(node, 2, "value")
    finite = _fill_kind(node, value)
    if not isinstance(mask, fx.Node) or not _same_shape(x, node):
        raise _Skip(f"{node.name}: the mask broadcasts the scores to a larger shape")
    return x, mask, finite


def _where_operands(node: fx.Node) -> tuple[fx.Node, fx.Node, bool] | None:
    """(x, keep, finite fill?) for torch.where(keep, x, fill) with a constant fill (-inf or finite <= -1e9)."""
    if not _is_call(node, (torch.where,), ()) or len(node.args) != 3 or node.kwargs:
        return None
    keep, x, value = node.args
    if not isinstance(keep, fx.Node) or not isinstance(x, fx.Node) or _dtype(keep) != torch.bool:
        return None
    finite = _fill_kind(node, value)
    if not _same_shape(x, node):
        raise _Skip(f"{node.name}: the mask broadcasts the scores to a larger shape")
    return x, keep, finite


def _is_reshape(node) -> bool:
    return _is_call(node, (torch.reshape,), ("view", "reshape")) and isinstance(node.args[0], fx.Node)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _constant(x) -> float | None:
    """x as a float when its value is fixed at compile time: a literal, or a node whose SymInt /
    SymFloat Dynamo already specialised (module floats are graph inputs under dynamic=True, with
    a guard on their value)."""
    if isinstance(x, fx.Node):
        x = x.meta.get("example_value")
    if _is_number(x):
        return float(x)
    if isinstance(x, torch.SymInt) and is_concrete_int(x) or isinstance(x, torch.SymFloat) and is_concrete_float(x):
        return float(x)
    return None


def _is_scale(c: float | None) -> bool:
    return c is not None and math.isfinite(c) and c != 0


def _value(node: fx.Node):
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def _rank(node) -> int | None:
    value = _value(node)
    return value.dim() if isinstance(value, torch.Tensor) else None


def _shape(node) -> tuple:
    value = _value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def _dtype(node) -> torch.dtype | None:
    value = _value(node)
    return value.dtype if isinstance(value, torch.Tensor) else None


def _swap_last2(shape: tuple) -> tuple:
    return shape[:-2] + (shape[-1], shape[-2])


def _same(a, b) -> bool:
    """Sizes known equal without adding a guard (SymInts compare symbolically)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return statically_known_true(a == b)


def _same_dims(a, b) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    return _rank(a) is not None and _rank(b) is not None and _same_dims(_shape(a), _shape(b))


def _last_frame(stack_trace: str | None) -> str:
    """`file:line` of the innermost frame of a stack trace, or '?' ."""
    frames = re.findall(r'File "([^"]+)", line (\d+)', stack_trace or "")
    return f"{frames[-1][0]}:{frames[-1][1]}" if frames else "?"
