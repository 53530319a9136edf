"""recognize_masks(gm) -> gm: an SDPA call whose attn_mask is built in the graph from index comparisons,
a [B, N] padding mask and document ids becomes `masked_sdpa` with those descriptors (so no N x N mask is
built when the site converts); any other 4-D-able mask is put in the [B|1, H|1, N, N] row form the ring
shards by query rows. Exactly or not at all: a construction not proven equal to its descriptors stays
a materialised mask; what happened is recorded in gm.meta["burst_masks"].

What is recognised (an abstract interpretation of the mask's backward slice; no values are read):

  keep(b, q, kv) = lo <= kv - q <= hi  &  padding[b, kv]  &  docs[b, q] == docs[b, kv]

- index terms: `arange(n) + c` placed on the batch (dim 0), query (dim 2) or key (dim 3) axis by a
  None/slice getitem, with n proven equal to the query / key length;
- bounds: `le/lt/ge/gt` between a key term and a query term, in indices or in gathered position ids;
- padding: `A[b, kv]` of a [B, N] bool tensor; documents: `D[b, q] == D[b, kv]` with D HF's
  `cumsum(diff(P, prepend=P[:, :1] - 1) != 1)` of position ids P (a restart = a new document);
- chunks (Llama 4's chunked attention): `(kv - L[b]) // c == (q - L[b]) // c` of a [B] integer tensor L,
  which become document ids `(arange(N) - L[:, None]) // c` (burstc.runtime.masked_sdpa.chunk_ids);
- glue: `and_`, `new_ones((), bool)` (True), no-op `.to(device)`, `.expand`; HF's eager additive form
  `where(M, 0, finfo.min | -inf)`.

Bounds stated on position ids carry over to indices only inside one document, where positions step by
exactly one: they are accepted only with the same-document atom of the same P (or P a known arange).
This is how HF transformers' masking_utils builds causal, sliding-window, padding and packed-sequence
masks for the sdpa and eager implementations.
"""
from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
import torch.fx as fx
from torch._dynamo.utils import counters
from torch.fx.experimental.symbolic_shapes import statically_known_true

from burstc.passes.dead_code import remove_dead_code
from burstc.passes.find_attention import SDPA_TARGETS, source_line
from burstc.passes.mask_code import extract_mask_code
from burstc.passes.nodes import new_node
from burstc.runtime.mask_mods import register
from burstc.runtime.masked_sdpa import additive_attention, chunk_ids, masked_sdpa


log = logging.getLogger("burstc.passes")


class NotRecognised(Exception):
    """The mask's construction is not one the descriptors express (the reason is the message)."""


class _AveragingRows(NotRecognised):
    """A finite-fill mask that can hide a whole row: exact only as the eager formula (the message says why)."""


_AVERAGING_ROWS = ("an additive finfo.min mask that can hide a whole row (key padding, or a window without the "
                   "diagonal): such a row averages every value under SDPA (finite fill), which the ring cannot "
                   "reproduce; use attn_implementation='sdpa' (a boolean mask) to convert it")


@dataclass(frozen=True)
class MaskDescriptor:
    """A recognised mask: keys in [q - left, q + right] (None: unbounded), padding / document nodes."""

    left: Optional[int]
    right: Optional[int]
    padding: Optional[fx.Node]  # [B, N] bool
    document_ids: Optional[fx.Node]  # [B, N] int
    fill: Optional[float]  # None: boolean mask; else the additive mask's hidden value
    # what the descriptors stand for: the boolean predicate node and its position indices (node -> (axis,
    # offset)), from which the model's own mask code is extracted for the first-call proof
    predicate: Optional[fx.Node] = field(default=None, compare=False)
    axes: dict = field(default_factory=dict, compare=False)
    # fixed-length chunks (Llama 4): (offset [B] node, c, size), keep iff (i + c - offset[b]) // size agree;
    # they become document ids (chunk_ids)
    chunks: Optional[tuple] = None


# -- abstract values ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Index:  # arange(n) + c, on mask axis 'b' / 'q' / 'kv' (None: still 1-D)
    axis: Optional[str]
    n: Any
    c: int = 0


@dataclass(frozen=True)
class _PositionIds:  # a [B|1, N] integer tensor used as positions; arange_c: known to be arange(N) + c
    root: fx.Node
    arange_c: Optional[int]


@dataclass(frozen=True)
class _DocumentIds:  # HF's packed-sequence ids of position ids P
    positions: _PositionIds
    node: fx.Node


@dataclass(frozen=True)
class _Term:  # coordinate[b, axis] + c; coordinate 'index' or a _PositionIds
    coord: Any
    axis: str
    c: int = 0


@dataclass(frozen=True)
class _DocumentAt:
    docs: _DocumentIds
    axis: str


@dataclass(frozen=True)
class _PaddingAt:
    node: fx.Node


@dataclass(frozen=True)
class _PerBatch:  # v[b] of a [B] integer tensor v (Llama 4's left-padding counts)
    node: fx.Node


@dataclass(frozen=True)
class _Chunk:  # (index[axis] + c - offset[b]) // size, or before the division (size None)
    axis: str
    c: int
    offset: fx.Node
    size: Optional[int] = None


@dataclass
class _Predicate:  # a conjunction: lo <= kv - q <= hi (in coord), padding and document atoms
    lo: float = -math.inf
    hi: float = math.inf
    coord: Any = None
    paddings: list = field(default_factory=list)
    documents: list = field(default_factory=list)
    chunks: list = field(default_factory=list)  # (offset node, c, size): same (index + c - offset[b]) // size

    def conjoin(self, other: "_Predicate") -> "_Predicate":
        if self.coord is not None and other.coord is not None and self.coord != other.coord:
            raise NotRecognised("bounds stated in different coordinates")
        return _Predicate(max(self.lo, other.lo), min(self.hi, other.hi), self.coord or other.coord,
                          self.paddings + other.paddings, self.documents + other.documents,
                          self.chunks + other.chunks)


def _value(n):
    return n.meta.get("example_value", n.meta.get("val")) if isinstance(n, fx.Node) else None


def _calls(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _method(n, name: str) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_method" and n.target == name


def _axis_of(index) -> Optional[str]:
    """[:, None, None, None] -> 'b', [None, None, :, None] -> 'q', [None, None, None, :] -> 'kv'."""
    if not isinstance(index, (tuple, list)) or len(index) != 4:
        return None
    full = [isinstance(i, slice) and (i.start, i.stop, i.step) == (None, None, None) for i in index]
    if sum(full) != 1 or sum(full) + sum(i is None for i in index) != 4:
        return None
    return {0: "b", 2: "q", 3: "kv"}.get(full.index(True))


def _provably(a, b) -> bool:
    a = _value(a) if isinstance(a, fx.Node) else a
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - unknown means no
        return False


def _as_predicate(x):
    if isinstance(x, _PaddingAt):
        return _Predicate(paddings=[x.node])
    return x


class _Interpreter:
    def __init__(self, q_len, kv_len):
        self.q_len, self.kv_len, self.memo = q_len, kv_len, {}

    def eval(self, n):
        if not isinstance(n, fx.Node):
            return n
        if n not in self.memo:
            self.memo[n] = self._eval(n)
        return self.memo[n]

    def _eval(self, n):  # noqa: C901 - one case per recognised op
        if _method(n, "to") and len(n.args) == 2 and not n.kwargs:  # .to(device): HF's and_masks glue
            a, b = _value(n.args[0]), _value(n)
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype:
                return self.eval(n.args[0])
        if _calls(n, torch.arange):
            if len(n.args) != 1 or set(n.kwargs) - {"device"}:
                raise NotRecognised(f"arange form {n.format_node()}")
            return _Index(None, n.args[0])
        if _calls(n, operator.add, operator.sub):
            a, b = self.eval(n.args[0]), n.args[1]
            if isinstance(b, int) and not isinstance(b, bool) and isinstance(a, (_Index, _Term)):
                c = a.c + (b if n.target is operator.add else -b)
                return _Index(a.axis, a.n, c) if isinstance(a, _Index) else _Term(a.coord, a.axis, c)
            b = self.eval(b)
            if n.target is operator.sub and isinstance(a, _Index) and a.axis in ("q", "kv") and \
                    isinstance(b, _PerBatch):
                return _Chunk(a.axis, a.c, b.node)
            return _opaque(n)
        if _calls(n, operator.floordiv):
            a, size = self.eval(n.args[0]), n.args[1]
            if isinstance(a, _Chunk) and a.size is None and isinstance(size, int) and not isinstance(size, bool) \
                    and size > 0:
                return _Chunk(a.axis, a.c, a.offset, size)
            return _opaque(n)
        if _calls(n, operator.getitem):
            return self._getitem(n)
        if _method(n, "new_ones"):  # and_masks' seed: True
            if len(n.args) == 2 and tuple(n.args[1]) == () and n.kwargs.get("dtype") is torch.bool:
                return _Predicate()
            raise NotRecognised("new_ones form")
        if _calls(n, operator.le, operator.lt, operator.ge, operator.gt):
            return self._compare(n)
        if _calls(n, operator.eq):
            a, b = self.eval(n.args[0]), self.eval(n.args[1])
            if isinstance(a, _DocumentAt) and isinstance(b, _DocumentAt) and a.docs == b.docs and \
                    {a.axis, b.axis} == {"q", "kv"}:
                return _Predicate(documents=[a.docs])
            if isinstance(a, _Chunk) and isinstance(b, _Chunk) and a.size is not None and \
                    (a.c, a.offset, a.size) == (b.c, b.offset, b.size) and {a.axis, b.axis} == {"q", "kv"}:
                return _Predicate(chunks=[(a.offset, a.c, a.size)])  # the same chunk: chunk ids as documents
            raise NotRecognised(f"eq of {a!r} and {b!r}")
        if _calls(n, operator.and_, torch.logical_and, torch.bitwise_and):
            a, b = _as_predicate(self.eval(n.args[0])), _as_predicate(self.eval(n.args[1]))
            if not (isinstance(a, _Predicate) and isinstance(b, _Predicate)):
                raise NotRecognised(f"and of {a!r} and {b!r}")
            return a.conjoin(b)
        if _method(n, "expand"):
            a = _as_predicate(self.eval(n.args[0]))
            return a if isinstance(a, (_Predicate, _PositionIds)) else _opaque(n)
        if _method(n, "unsqueeze"):
            a = self.eval(n.args[0])
            if isinstance(a, _Index) and a.axis is None and n.args[1] == 0 and _provably(a.n, self.q_len):
                return _PositionIds(n, a.c)  # model-made position ids: arange(N) + c
            return _opaque(n)
        if _method(n, "cumsum"):
            return self._document_ids(n)
        return _opaque(n)

    def _getitem(self, n):
        base, index = n.args
        if isinstance(index, (tuple, list)) and not any(isinstance(i, fx.Node) for i in index):
            b, axis = self.eval(base), _axis_of(index)
            if isinstance(b, _Index) and b.axis is None and axis is not None:
                want = {"b": None, "q": self.q_len, "kv": self.kv_len}[axis]
                if want is not None and not _provably(b.n, want):
                    raise NotRecognised(f"{axis} index of length {b.n}, not {want}")
                return _Index(axis, b.n, b.c)
            return _opaque(n)
        if isinstance(index, fx.Node):  # v[batch index] of a [B] integer tensor
            b, v = self.eval(index), _value(base)
            if isinstance(b, _Index) and b.axis == "b" and b.c == 0 and isinstance(v, torch.Tensor) and \
                    v.dim() == 1 and not v.dtype.is_floating_point and v.dtype != torch.bool and _provably(b.n, v.shape[0]):
                return _PerBatch(base)
            raise NotRecognised(f"index {n.format_node()}")
        if not (isinstance(index, (tuple, list)) and len(index) == 2):
            raise NotRecognised(f"index {n.format_node()}")
        batch, where = self.eval(index[0]), self.eval(index[1])
        if not (isinstance(batch, _Index) and batch.axis == "b" and batch.c == 0
                and isinstance(where, _Index) and where.axis in ("q", "kv") and where.c == 0):
            raise NotRecognised(f"gather with index {index}")
        v = _value(base)
        length = self.q_len if where.axis == "q" else self.kv_len
        if not (isinstance(v, torch.Tensor) and v.dim() == 2 and _provably(batch.n, v.shape[0])
                and _provably(v.shape[1], length)):
            # the descriptors hold the whole [B, N] tensor: a batch index over fewer rows (a mask built
            # for batch 1 and broadcast) or a tensor longer than the sequence would be read differently
            raise NotRecognised(f"gather from {base.name} of shape {getattr(v, 'shape', None)} with a batch index "
                                f"of {batch.n} rows over {length} positions")
        b = self.eval(base)
        if isinstance(b, _PositionIds):
            return _Term(b, where.axis)
        if isinstance(b, _DocumentIds):
            return _DocumentAt(b, where.axis)
        if v.dtype == torch.bool and where.axis == "kv":
            return _PaddingAt(base)
        if not v.dtype.is_floating_point and v.dtype != torch.bool:
            return _Term(_PositionIds(base, None), where.axis)
        raise NotRecognised(f"gather from {base.name}")

    def _document_ids(self, n):
        # cumsum(diff(P, prepend=P[:, :1] - 1, dim=-1) != 1, -1)
        ne = n.args[0]
        if n.args[1:] not in ((-1,), (1,)) or not _calls(ne, operator.ne) or ne.args[1] != 1:
            return _opaque(n)
        diff = ne.args[0]
        if not _calls(diff, torch.diff) or diff.kwargs.get("dim", -1) not in (-1, 1) or \
                diff.kwargs.get("n", 1) != 1 or diff.kwargs.get("append") is not None or len(diff.args) != 1:
            return _opaque(n)
        positions, prepend = diff.args[0], diff.kwargs.get("prepend")
        first = prepend.args[0] if _calls(prepend, operator.sub) and prepend.args[1] == 1 else None
        if not (_calls(first, operator.getitem) and first.args[0] is positions
                and tuple(first.args[1]) == (slice(None), slice(None, 1))):
            raise NotRecognised("a diff whose prepend is not P[:, :1] - 1")
        p = self.eval(positions)
        return _DocumentIds(p if isinstance(p, _PositionIds) else _PositionIds(positions, None), n)

    def _compare(self, n):
        def term(x):
            if isinstance(x, _Index) and x.axis in ("q", "kv"):
                return _Term("index", x.axis, x.c)
            if isinstance(x, _Term):
                return x
            raise NotRecognised(f"comparison of {x!r}")
        a, b = term(self.eval(n.args[0])), term(self.eval(n.args[1]))
        if a.coord != b.coord or {a.axis, b.axis} != {"q", "kv"}:
            raise NotRecognised("a comparison that is not between a query and a key coordinate")
        op = n.target
        if a.axis == "q":  # put the key on the left
            a, b = b, a
            op = {operator.le: operator.ge, operator.lt: operator.gt, operator.ge: operator.le,
                  operator.gt: operator.lt}[op]
        k = b.c - a.c  # kv + a.c  op  q + b.c   <=>   kv - q  op  k
        p = _Predicate(coord=a.coord)
        if op is operator.le:
            p.hi = k
        elif op is operator.lt:
            p.hi = k - 1
        elif op is operator.ge:
            p.lo = k
        else:
            p.lo = k + 1
        return p


def _opaque(n):
    return ("opaque", n)


def _root(p: _PositionIds) -> fx.Node:
    n = p.root
    while _method(n, "expand"):
        n = n.args[0]
    return n


def recognise(mask: fx.Node, q_len, kv_len, sinks: bool = False) -> MaskDescriptor:
    """The descriptors of a mask node, or NotRecognised with the reason. sinks: the site has attention
    sinks, so a row a finite fill hides whole gives 0 in eager too (burstc.runtime.sinks)."""
    fill, node = None, mask
    if _calls(node, torch.where):
        cond, zero, hidden = node.args
        zero_ok = (_calls(zero, torch.zeros) and tuple(zero.args[0]) == ()) or (
            isinstance(zero, (int, float)) and zero == 0)
        v = _value(node)
        if not zero_ok or not isinstance(hidden, float) or not isinstance(v, torch.Tensor) or \
                hidden not in (torch.finfo(v.dtype).min, -math.inf):
            raise NotRecognised("an additive mask other than where(M, 0, finfo.min | -inf)")
        fill, node = hidden, cond
    v = _value(node)
    if not (isinstance(v, torch.Tensor) and v.dtype == torch.bool and v.dim() == 4 and v.shape[1] == 1):
        raise NotRecognised("the mask is not a bool [B, 1, Nq, Nk] tensor built in the graph")
    interpreter = _Interpreter(q_len, kv_len)
    p = _as_predicate(interpreter.eval(node))
    if not isinstance(p, _Predicate):
        raise NotRecognised(f"the mask comes from {p[1].name if isinstance(p, tuple) else p!r}")
    if len(p.paddings) > 1 or len(set(p.documents)) > 1 or len(set(p.chunks)) > 1:
        raise NotRecognised("several padding, document or chunk atoms")
    if p.documents and p.chunks:
        raise NotRecognised("documents and chunks in one mask")
    docs = p.documents[0] if p.documents else None
    if isinstance(p.coord, _PositionIds):  # bounds on position ids
        arange = p.coord.arange_c is not None
        same = docs is not None and _root(docs.positions) == _root(p.coord)
        if not (arange or same):
            raise NotRecognised("bounds on position ids without a same-document atom of the same ids")
    if docs is not None and docs.positions.arange_c is not None:
        docs = None  # arange positions: one document per row, the atom is always true
    keeps_diagonal = p.lo <= 0 <= p.hi  # documents keep it too: a token shares its own document
    if fill is not None and fill != -math.inf and (p.paddings or not keeps_diagonal) and not sinks:
        # a finite fill: a query whose keys are all hidden attends uniformly to all keys (SDPA on the
        # additive mask); the descriptors would give it 0. Keep the mask: exact through its rows.
        raise _AveragingRows(_AVERAGING_ROWS)
    left = None if p.lo == -math.inf else int(-p.lo)
    right = None if p.hi == math.inf else int(p.hi)
    axes = {n: (v.axis, v.c) for n, v in interpreter.memo.items() if isinstance(v, _Index) and v.axis in ("q", "kv")}
    return MaskDescriptor(left, right, p.paddings[0] if p.paddings else None, docs.node if docs else None, fill,
                          predicate=node, axes=axes, chunks=p.chunks[0] if p.chunks else None)


def _finite_fill(mask: fx.Node) -> bool:
    """Whether mask is HF's eager additive form where(M, 0, fill) with a finite fill (finfo.min)."""
    fill = mask.args[2] if _calls(mask, torch.where) and len(mask.args) == 3 else None
    return isinstance(fill, float) and math.isfinite(fill)


def recognize_masks(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite the masked SDPA calls of gm in place (see the module docstring)."""
    record = {"recognised": [], "materialised": [], "flex": []}
    proofs = {}  # predicate node -> (registered name of the model's mask code, its leaves), or None
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is _FLEX:
            _flex_site(gm, node, record)
            continue
        if not (node.op == "call_function" and node.target in SDPA_TARGETS):
            continue
        args = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
                        node.args), **node.kwargs)
        mask = args.get("attn_mask")
        q, k = _value(args["query"]), _value(args["key"])
        if not isinstance(mask, fx.Node) or not isinstance(q, torch.Tensor) or q.dim() != 4:
            continue
        where = source_line(node) or node.name
        try:
            found = recognise(mask, q.shape[2], k.shape[2], sinks=args.get("sinks") is not None)
        except NotRecognised as e:
            # with sinks a row whose keys a finite fill hides gives its weight to the sink, not to an average
            # of the values: exp(finfo.min - sink) is 0, as -inf gives (burstc.runtime.sinks)
            averaging = args.get("sinks") is None
            if averaging and _finite_fill(mask) and not isinstance(e, _AveragingRows):
                # nothing says which rows it hides: one hidden whole would average every value under SDPA
                e = _AveragingRows(f"{_AVERAGING_ROWS} (the construction is not recognised: {e})")
            record["materialised"].append((where, str(e)))
            if averaging and isinstance(e, _AveragingRows):
                _as_additive_attention(gm, node, args)
                continue
            _rows_form(gm, node, mask, q)
            continue
        if args.get("dropout_p", 0.0) not in (0, 0.0) or args.get("is_causal", False) is not False:
            record["materialised"].append((where, "dropout or is_causal beside the mask"))
            continue
        if found.predicate not in proofs:
            code = extract_mask_code(gm, found.predicate, found.axes)
            proofs[found.predicate] = (register(code.fn), code.leaves) if code else None
        if proofs[found.predicate] is None:
            record["materialised"].append((where, "its mask code cannot be evaluated on sampled positions, so the "
                                                  "descriptors could not be proven on the first call"))
            _rows_form(gm, node, mask, q)
            continue
        proof, proof_buffers = proofs[found.predicate]
        if found.chunks is not None:  # chunks are documents of fixed length, offset per row
            offset, c, size = found.chunks
            with gm.graph.inserting_before(node):
                found = replace(found, document_ids=new_node(gm.graph, "call_function", chunk_ids,
                                                             (offset, int(k.shape[2]), c, size), {}, node))
        causal = found.right is not None and found.right <= 0
        kwargs = dict(key_padding=found.padding, document_ids=found.document_ids, is_causal=causal,
                      window_left=found.left, window_right=None if causal and found.right == 0 else found.right,
                      scale=args.get("scale"), enable_gqa=args.get("enable_gqa", False), fill=found.fill,
                      proof=proof, proof_buffers=tuple(proof_buffers))
        kwargs.update(_modifiers(args))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(masked_sdpa, (args["query"], args["key"], args["value"]), kwargs)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        record["recognised"].append((where, _describe(found, kwargs["is_causal"])))
    counters["burst"]["masks_recognised"] += len(record["recognised"])
    counters["burst"]["masks_materialised"] += len(record["materialised"])
    if record["recognised"] or record["materialised"]:
        remove_dead_code(gm)
        gm.graph.lint()
        gm.recompile()
    gm.meta["burst_masks"] = record
    return gm


_FLEX = torch.ops.higher_order.flex_attention


def _flex_site(gm: fx.GraphModule, node: fx.Node, record: dict) -> None:
    """flex_attention(q, k, v, block_mask=...) with a mask_mod and no score_mod becomes masked_sdpa with
    the mask_mod registered by name (its captured tensors as arguments); anything else stays flex."""
    where = source_line(node) or node.name
    q, k, v, score_mod, block_mask, scale, options, score_buffers, mask_buffers = node.args[:9]
    qv, kv = _value(q), _value(k)

    def leave(why):
        record["flex"].append((where, f"left as flex_attention: {why}"))
        counters["burst"]["flex_left"] += 1
        log.warning("burst: flex_attention %s left as it is: %s (at %s)", node.name, why, where)

    if not _is_identity(gm, score_mod) or score_buffers:
        return leave("it has a score_mod")
    mask_mod = block_mask[-1] if isinstance(block_mask, (tuple, list)) else None
    if not (isinstance(mask_mod, fx.Node) and mask_mod.op == "get_attr"):
        return leave("no mask_mod in its block mask")
    n = qv.shape[2]
    if not (_provably(block_mask[0], n) and _provably(block_mask[1], n) and _provably(kv.shape[2], n)):
        return leave("query and key lengths differ from the block mask's")
    if any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
        return leave("its logsumexp is used")
    name = register(getattr(gm, mask_mod.target))
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(masked_sdpa, (q, k, v), dict(
            scale=scale, enable_gqa=qv.shape[1] != kv.shape[1], mask_mod=name, mask_buffers=tuple(mask_buffers)))
    new.meta.update(node.meta)
    new.meta["example_value"] = _value(node)[0]
    for user in list(node.users):
        user.replace_all_uses_with(new)
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    record["recognised"].append((where, f"flex_attention mask_mod {name}"))


def _is_identity(gm: fx.GraphModule, score_mod) -> bool:
    """Whether a traced score_mod returns its score unchanged."""
    if not (isinstance(score_mod, fx.Node) and score_mod.op == "get_attr"):
        return False
    graph = getattr(gm, score_mod.target).graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    result = output.args[0]
    result = result[0] if isinstance(result, (tuple, list)) and len(result) == 1 else result
    return bool(placeholders) and result is placeholders[0]


def _as_additive_attention(gm: fx.GraphModule, node: fx.Node, args: dict) -> None:
    """Run the site as the eager formula it came from (exact where SDPA's fused backward is not), and
    mark it to be left alone with the reason."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(additive_attention, (args["query"], args["key"], args["value"], args["attn_mask"]),
                                     {"scale": args.get("scale"), "enable_gqa": args.get("enable_gqa", False),
                                      **_modifiers(args)})
    new.meta.update(node.meta)
    new.meta["burst_leave"] = _AVERAGING_ROWS
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _modifiers(args: dict) -> dict:
    """The score modifiers of a modified_sdpa call (sinks, softcap) that a rewritten call keeps."""
    return {name: args[name] for name in ("sinks", "softcap") if args.get(name) is not None}


def _describe(found: MaskDescriptor, causal: bool) -> str:
    parts = ["causal"] if causal else []
    if found.left is not None or (found.right is not None and not causal):
        parts.append(f"window=({found.left}, {found.right})")
    if found.padding is not None:
        parts.append("key padding")
    if found.document_ids is not None:
        parts.append("documents")
    return " & ".join(parts) or "all visible"


def _rows_form(gm: fx.GraphModule, node: fx.Node, mask: fx.Node, q: torch.Tensor) -> None:
    """Give a materialised mask the [B|1, H|1, N, N] form the ring shards by query rows (a broadcast
    view: nothing is copied)."""
    m = _value(mask)
    n = q.shape[2]
    if not isinstance(m, torch.Tensor) or m.dim() > 4 or not isinstance(n, int):
        return
    shape = [1] * (4 - m.dim()) + list(m.shape)
    if m.dim() == 4 and _provably(shape[2], n) and _provably(shape[3], n):
        return
    if not all(_provably(s, 1) or _provably(s, n) for s in shape[2:]):
        return
    with gm.graph.inserting_before(node):
        view, fake = mask, m
        for _ in range(4 - m.dim()):
            view, fake = gm.graph.call_method("unsqueeze", (view, 0)), fake.unsqueeze(0)
            view.meta["example_value"] = fake
        view = gm.graph.call_method("expand", (view, -1, -1, n, n))
        view.meta["example_value"] = fake.expand(-1, -1, n, n)
    node.replace_input_with(mask, view)
