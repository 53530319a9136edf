"""canonicalize_attention(gm, example_inputs=None) -> gm: each hand-written attention in a Dynamo FX graph becomes one torch._C._nn.scaled_dot_product_attention call, exactly or not at all; what happened is recorded in gm.meta["burst_canonicalize"].

This module drives the match and the rewrite; the matcher's parts live by concern in
``attention_spellings`` (what a node is: the calls, constants, shapes), ``attention_scores`` (Q·Kᵀ, scales
and the mask op up to the softmax), ``attention_masks`` (the mask's kind, causal proofs) and
``attention_gqa`` (repeated K/V heads).

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
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensor

from burstc.passes.attention_gqa import ungroup_kv
from burstc.passes.attention_masks import classify_mask
from burstc.passes.attention_scores import Scale, Scores, qk_operands, walk_scores
from burstc.passes.attention_sinks import drops_sink_column, split_sink_column
from burstc.passes.attention_spellings import (
    NotAttention, Skip, arg_of, dropout_is_noop, dtype_of, is_call, is_dropout, is_prob_passthrough,
    is_softmax, last_frame, pv_value, rank_of, same_size, same_sizes, shape_of, swap_last2,
)
from burstc.passes.dead_code import mutates
from burstc.passes.nodes import new_node
from burstc.runtime.modified_sdpa import modified_sdpa

__all__ = [
    "RESULT_KEY", "SDPA", "CanonicalizeResult", "CanonicalizedSite", "SkippedSite",
    "canonicalize_attention", "canonicalize_result",
]

log = logging.getLogger(__name__)

SDPA = torch._C._nn.scaled_dot_product_attention
RESULT_KEY = "burst_canonicalize"


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
    sinks: str | None = None      # the sink logits' node (then the call is modified_sdpa), or None
    softcap: float | None = None  # the soft-cap (then the call is modified_sdpa), or None

    @property
    def location(self) -> str:
        return last_frame(self.stack_trace)


@dataclass(frozen=True)
class SkippedSite:
    """A softmax feeding P @ V that was left as it is, and why."""
    softmax: str
    reason: str
    stack_trace: str | None

    @property
    def location(self) -> str:
        return last_frame(self.stack_trace)


@dataclass
class CanonicalizeResult:
    converted: list[CanonicalizedSite] = dataclasses.field(default_factory=list)
    skipped: list[SkippedSite] = dataclasses.field(default_factory=list)


def canonicalize_result(gm: fx.GraphModule) -> CanonicalizeResult | None:
    """The record of the last canonicalize_attention run on gm (None if it never ran)."""
    return gm.meta.get(RESULT_KEY)


def canonicalize_attention(gm: fx.GraphModule, example_inputs=None) -> fx.GraphModule:
    ctx = _Context(gm, example_inputs)
    result = CanonicalizeResult()
    erased: set[str] = set()
    for softmax in [n for n in gm.graph.nodes if is_softmax(n)]:
        if softmax.name in erased:
            continue
        try:
            site = _match_site(softmax, ctx)
        except NotAttention:
            continue
        except Skip as skip:
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


@dataclass
class _Site:
    softmax: fx.Node
    pv: fx.Node
    q: fx.Node
    k: fx.Node | None             # None: insert kt.transpose(-2, -1)
    kt: fx.Node | None
    v: fx.Node
    scale: Scale
    mask_kind: str
    mask: fx.Node | None          # the attn_mask input (negated first when negate_mask)
    negate_mask: bool
    gqa_groups: int
    spelling: str
    owned: list[fx.Node]          # nodes the site consumes; erased if dead after the rewrite
    sinks: fx.Node | None = None  # [1, H, 1, 1] per-head sink logits (attention_sinks), or None
    softcap: float | None = None  # scores soft-capped as softcap * tanh(S / softcap), or None


def _match_site(softmax: fx.Node, ctx: _Context) -> _Site:
    pv, v, prob_nodes = _match_probabilities(softmax)
    x, dtype = _softmax_input(softmax)
    sinks, sink_nodes = None, []
    if any(drops_sink_column(n) for n in prob_nodes):
        x, sinks, sink_nodes = split_sink_column(x)
    scores = walk_scores(x, Scores())
    qk = scores.qk
    # Single users from Q·Kᵀ to P also mean V and the mask cannot be computed from the scores:
    # such a path would leave the chain through a second user.
    qk_node = qk.nodes[0]
    shared = [n.name for n in (*scores.nodes, qk_node) if len(n.users) != 1]
    if shared:
        raise Skip(f"intermediate scores are also used elsewhere ({', '.join(shared)})")
    q, k, kt, factor, lookthrough = qk_operands(qk)
    k, v_heads, groups, repeat_nodes = ungroup_kv(k, v)
    k_or_kt = k if k is not None else kt
    _check_shapes(x, q, k_or_kt, k is None, v_heads, groups)
    _check_dtypes(x, q, k_or_kt, v_heads, prob_nodes[-1], pv, dtype)
    mask_kind, mask, negate, mask_nodes = classify_mask(scores, x, ctx)
    owned = [pv, *prob_nodes, *sink_nodes, *scores.nodes, *qk.nodes, *lookthrough, *repeat_nodes, *mask_nodes]
    owned += [a for n in owned for a in n.all_input_nodes if is_call(a, (), ("item",))]
    scale = functools.reduce(Scale.times, scores.factors, factor)
    if scores.softcap is not None:  # cap * tanh(inner * QKᵀ) = cap * tanh(S / cap) with S = cap * inner * QKᵀ
        scale = scores.softcap.times(scale)
    return _Site(
        softmax=softmax, pv=pv, q=q, k=k, kt=kt, v=v_heads, scale=scale, mask_kind=mask_kind,
        mask=mask, negate_mask=negate, gqa_groups=groups, spelling=qk.spelling, owned=owned, sinks=sinks,
        softcap=scores.softcap.const if scores.softcap is not None else None,
    )


def _match_probabilities(softmax: fx.Node) -> tuple[fx.Node, fx.Node, list[fx.Node]]:
    """softmax -> [the sink column dropped] -> [casts, dropouts] -> P @ V. Returns (pv node, v, the P chain)."""
    node, nodes = softmax, [softmax]
    while True:
        pv = next((u for u in node.users if pv_value(u, node) is not None), None)
        if pv is not None:
            break
        following = [u for u in node.users if u.args and u.args[0] is node and (
            is_prob_passthrough(u) or node is softmax and drops_sink_column(u))]
        if len(following) != 1:
            _report_unknown_path(node)
            raise NotAttention
        node = following[0]
        nodes.append(node)
    shared = [n.name for n in nodes if len(n.users) != 1]
    if shared:
        raise Skip(f"the attention weights are also used elsewhere ({', '.join(shared)})")
    for n in nodes:
        if is_dropout(n) and not dropout_is_noop(n):
            raise Skip(f"dropout {n.name} is not provably a no-op (p > 0 in training)")
    return pv, pv_value(pv, node), nodes


def _report_unknown_path(probs: fx.Node, hops: int = 4) -> None:
    """A softmax whose weights reach a P @ V product through ops the matcher does not know is attention
    left alone: raise Skip naming those ops (never let it pass unseen). Attention sinks (GPT-OSS: the
    softmax runs over one extra column per head, sliced off before P @ V) get their own reason."""
    frontier, path = [probs], []
    for _ in range(hops):
        users = [u for n in frontier for u in n.users if u.args and u.args[0] is n]
        for u in users:
            if pv_value(u, u.args[0]) is not None:
                names = [_op_label(n) for n in path]
                if any(_drops_last_columns(n) for n in path):
                    raise Skip("the softmax also covers extra columns that are dropped before P @ V, not in the "
                                "form of attention sinks burst converts (one per-head logit column, dropped right "
                                "after the softmax)")
                raise Skip(f"the attention weights pass through {', '.join(names)} before P @ V, which burst does "
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
    dim, dtype = arg_of(node, 1, "dim"), arg_of(node, dtype_pos, "dtype")
    if not isinstance(x, fx.Node) or rank_of(x) != 4:
        raise Skip("the softmax input is not a 4-D tensor")
    if not isinstance(dim, int) or dim % 4 != 3:
        raise Skip(f"softmax over dim={dim!r}, not the last dim")
    return x, dtype


def _check_shapes(x, q, k_or_kt, transposed: bool, v, groups: int) -> None:
    if not all(rank_of(n) == 4 for n in (q, k_or_kt, v)):
        raise Skip("q, k and v are not all 4-D")
    b, h, tq, d = shape_of(q)
    bk, hk, dk, tk = shape_of(k_or_kt) if transposed else swap_last2(shape_of(k_or_kt))
    bv, hv, tv, dv = shape_of(v)
    same = [(b, bk), (b, bv), (hk, hv), (h, hk * groups), (d, dk), (tk, tv)]
    if not all(same_size(a, c) for a, c in same):
        raise Skip("q, k, v shapes broadcast against each other (SDPA needs equal batch and head dims)")
    if not same_sizes(shape_of(x), (b, h, tq, tk)):
        raise Skip("the scores are not [B, H, Tq, Tk]")


def _check_dtypes(x, q, k, v, probs, pv, softmax_dtype) -> None:
    dtypes = {dtype_of(n) for n in (x, q, k, v, probs, pv)}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise Skip(f"mixed or non-float dtypes along the site ({sorted(map(str, dtypes))})")
    dtype = dtype_of(q)
    if softmax_dtype not in (None, dtype) and not (
            softmax_dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16)):
        raise Skip(f"softmax dtype={softmax_dtype} on {dtype} scores")


# ----------------------------------------------------------------------------------------------
# Rewriting
# ----------------------------------------------------------------------------------------------

def _rewrite(graph: fx.Graph, site: _Site) -> CanonicalizedSite:
    with graph.inserting_before(site.pv):
        k = site.k
        if k is None:
            k = new_node(graph, "call_method", "transpose", (site.kt, -2, -1), {}, site.softmax)
        mask = site.mask
        if isinstance(mask, tuple):  # several additive masks: SDPA takes their sum
            mask = functools.reduce(
                lambda a, b: new_node(graph, "call_function", operator.add, (a, b), {}, site.softmax), mask)
        if site.negate_mask:
            mask = new_node(graph, "call_function", torch.logical_not, (mask,), {}, site.softmax)
        scale = _scale_argument(graph, site.scale, site.softmax)
        kwargs = {"attn_mask": mask, "dropout_p": 0.0, "is_causal": site.mask_kind == "causal",
                  "scale": scale, "enable_gqa": site.gqa_groups > 1}
        target = SDPA
        modifiers = {name: value for name, value in (("sinks", site.sinks), ("softcap", site.softcap))
                     if value is not None}
        if modifiers:
            target = modified_sdpa
            kwargs.update(modifiers)
        sdpa = new_node(graph, "call_function", target, (site.q, k, site.v), kwargs, site.softmax)
    site.pv.replace_all_uses_with(sdpa)
    replaced = _erase_dead(graph, [site.pv, *site.owned])
    return CanonicalizedSite(
        node=sdpa.name, spelling=site.spelling, mask=site.mask_kind,
        scale=scale.name if isinstance(scale, fx.Node) else scale,
        gqa_groups=site.gqa_groups, replaced=tuple(replaced),
        stack_trace=site.softmax.meta.get("stack_trace"), sinks=site.sinks.name if site.sinks is not None else None,
        softcap=site.softcap,
    )


def _scale_argument(graph: fx.Graph, scale: Scale, like: fx.Node) -> float | fx.Node:
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
