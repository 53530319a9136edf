"""shard_rules: how the sequence dim of a tensor maps through one op of a Dynamo graph, for the
sequence-mode sharding pass. A rule says, for an op that is token-wise (every output token depends only
on the same token of its inputs), which dim of each input carries the sequence when a given dim of the
output does, and the other way round. Ops without a rule mix tokens (or are not known to us): the pass
gathers their sharded inputs first, which is always exact.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.fx as fx

from burstc.runtime.halo import sequence_shift, window_conv1d


@dataclass(frozen=True)
class SeqDim:
    """A tensor sharded along the sequence: dim `dim` has the global size `outer * seq_len * inner`,
    the sequence being the middle factor (outer, inner > 1 when a view merged it with its neighbours,
    e.g. the batch in `logits.view(-1, vocab)`)."""

    dim: int
    outer: int = 1
    inner: int = 1

    def __str__(self) -> str:
        merged = "" if self.outer == self.inner == 1 else f" (outer {self.outer}, inner {self.inner})"
        return f"seq@{self.dim}{merged}"


@dataclass(frozen=True)
class LocalRows:
    """A rank-private tensor: dim `dim` holds rows that are this rank's slots (the rows of a sharded
    tensor placed as `space`) in the order a local sort made (`order`: that sort node's name; '' for
    the slots' own order), not sequence positions. No global tensor has these values (each rank sorted
    its own slots), so such a tensor is never gathered: it stays inside one proven region of local work
    that ends sharded again (burstc.passes.shard). `index` says what the values of an integer tensor
    are: 'slots' (slot numbers of `space` along dim `of`), 'rows' (row numbers in the order `of`),
    'sorted' (the ascending values of the sort `order` itself), or '' (data)."""

    dim: int
    space: SeqDim
    order: str
    index: str = ""
    of: Any = None

    @property
    def outer(self) -> int:
        return self.space.outer

    @property
    def inner(self) -> int:
        return self.space.inner

    def rows(self) -> SeqDim:
        """The row dim as a SeqDim, for the token-wise rules (rows are independent like tokens)."""
        return SeqDim(self.dim, self.space.outer, self.space.inner)

    def __str__(self) -> str:
        order = f"sorted by {self.order}" if self.order else "in slot order"
        index = f", {self.index} index" if self.index else ""
        return f"local rows@{self.dim} ({order}{index}; rank-private)"


@dataclass(frozen=True)
class LocalGroups:
    """A rank-private [groups] tensor: the counts ('counts') or their running sum ('offsets') of this
    rank's rows of the sort `order` per group (histc of its ascending values): what a grouped matmul
    over those rows needs, never a global value."""

    order: str
    kind: str

    def __str__(self) -> str:
        return f"local group {self.kind} of {self.order} (rank-private)"


# ---- what a node is -------------------------------------------------------------------------------

def op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def value(node: Any):
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def shape(node: Any) -> Optional[tuple[int, ...]]:
    """The static shape of a tensor node (of one element for a tuple of equal tensors); None if not a
    tensor or the shape is symbolic."""
    v = value(node)
    if isinstance(v, (tuple, list)) and v and all(isinstance(t, torch.Tensor) for t in v):
        v = v[0]
    if not isinstance(v, torch.Tensor):
        return None
    try:
        return tuple(int(s) for s in v.shape)
    except TypeError:
        return None


def is_tensor(node: Any) -> bool:
    return shape(node) is not None


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The distinct tensor-valued nodes among the node's arguments, in order."""
    seen: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: seen.append(a) if is_tensor(a) and a not in seen else None)
    return seen


def arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


_IN_PLACE_OPERATORS = (operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                       operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul, operator.iand,
                       operator.ior, operator.ixor, operator.ilshift, operator.irshift)


def mutated_input(node: fx.Node) -> Optional[fx.Node]:
    """The tensor node an op writes in place (x.copy_(y), x[i] = y, x += y, F.relu(x, inplace=True),
    out=x, a mutable aten op), or None."""
    if node.op not in ("call_function", "call_method"):
        return None
    target = None
    if isinstance(node.kwargs.get("out"), fx.Node):
        target = node.kwargs["out"]
    elif node.kwargs.get("inplace") is True or node.target in _IN_PLACE_OPERATORS:
        target = arg(node, 0, "input")
    elif isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable:
        written = [i for i, a in enumerate(node.target._schema.arguments)
                   if a.alias_info is not None and a.alias_info.is_write]
        target = node.args[written[0]] if written and written[0] < len(node.args) else node.args[0]
    elif node.op == "call_method" or getattr(node.target, "__module__", None) != "_operator":
        name = op_name(node)
        if name.endswith("_") and not name.startswith("_") and name != "requires_grad_":
            target = node.args[0] if node.args else None
    return target if isinstance(target, fx.Node) else None


# ---- rules ----------------------------------------------------------------------------------------

class DimMap:
    """For each tensor input, the output dims that are that input's dims unchanged: {out_dim: in_dim}.
    Sharding passes through such a pair with its outer/inner factors as they are."""

    def __init__(self, maps: dict[fx.Node, dict[int, int]]):
        self.maps = maps

    def inputs_for(self, out: SeqDim) -> dict[fx.Node, Optional[SeqDim]]:
        return {a: (replace(out, dim=m[out.dim]) if out.dim in m else None) for a, m in self.maps.items()}

    def output_for(self, a: fx.Node, spec: SeqDim) -> Optional[SeqDim]:
        for out_dim, in_dim in self.maps.get(a, {}).items():
            if in_dim == spec.dim:
                return replace(spec, dim=out_dim)
        return None


class WindowMap(DimMap):
    """A window op (burstc.runtime.halo: a token shift, a roll, a causal conv): token-wise along every dim
    but `window_dim`, along which each output row reads a bounded window of input rows. Sharded there, it
    runs on shards with a halo exchange; a sequence merged with other dims by a view has no such form."""

    def __init__(self, maps: dict[fx.Node, dict[int, int]], window_dim: int):
        super().__init__(maps)
        self.window_dim = window_dim

    def _merged(self, spec: SeqDim) -> bool:
        return spec.dim == self.window_dim and (spec.outer, spec.inner) != (1, 1)

    def inputs_for(self, out: SeqDim):
        return None if self._merged(out) else super().inputs_for(out)

    def output_for(self, a: fx.Node, spec: SeqDim) -> Optional[SeqDim]:
        out = super().output_for(a, spec)
        return None if out is None or self._merged(out) else out


def _window(node: fx.Node, out_shape) -> Optional[WindowMap]:
    n = len(out_shape)
    if node.target is sequence_shift:
        return WindowMap({node.args[0]: {d: d for d in range(n)}}, node.args[1])
    x, weight, bias = node.args[:3]
    maps = {x: {0: 0, n - 1: n - 1} if n == 3 else {n - 1: n - 1}, weight: {}}
    return WindowMap({**maps, **({bias: {}} if isinstance(bias, fx.Node) else {})}, n - 1)


class ViewMap:
    """view/reshape/flatten/unflatten: the sequence factor keeps its place in row-major element order,
    so its dim (and outer/inner factors) follow from the two shapes and the sequence length."""

    def __init__(self, src: fx.Node, in_shape, out_shape, seq_len: int):
        self.src, self.in_shape, self.out_shape, self.seq_len = src, in_shape, out_shape, seq_len

    def _move(self, spec: SeqDim, from_shape, to_shape) -> Optional[SeqDim]:
        stride = spec.inner * math.prod(from_shape[spec.dim + 1:])  # elements between consecutive tokens
        for j in range(len(to_shape)):
            below = math.prod(to_shape[j + 1:])
            span = below * to_shape[j]
            if stride % below == 0 and span % (stride * self.seq_len) == 0:
                return SeqDim(j, outer=span // (stride * self.seq_len), inner=stride // below)
        return None

    def inputs_for(self, out: SeqDim) -> Optional[dict[fx.Node, Optional[SeqDim]]]:
        spec = self._move(out, self.out_shape, self.in_shape)
        return None if spec is None else {self.src: spec}

    def output_for(self, a: fx.Node, spec: SeqDim) -> Optional[SeqDim]:
        return self._move(spec, self.in_shape, self.out_shape) if a is self.src else None


def _broadcast(out_shape, inputs: list[fx.Node], skip_out=()) -> DimMap:
    """Elementwise with broadcasting: inputs align to the output from the right; a broadcast (size-1 or
    missing) dim carries no sequence."""
    maps = {}
    n = len(out_shape)
    for a in inputs:
        s = shape(a)
        m = {}
        for d in range(n):
            i = d - (n - len(s))
            if i >= 0 and s[i] == out_shape[d] and d not in skip_out:
                m[d] = i
        maps[a] = m
    return DimMap(maps)


def _batch_dims(in_shape, out_shape) -> dict[int, int]:
    """{out dim: in dim} for the batch dims (all but the last two) of a matmul operand, aligned to the
    output's from the right; a broadcast (size-1 or missing) batch dim carries no sequence."""
    batch_in, batch_out = in_shape[:-2], out_shape[:-2]
    offset = len(batch_out) - len(batch_in)
    return {d: d - offset for d in range(offset, len(batch_out)) if batch_in[d - offset] == batch_out[d]}


def _same_order(src: fx.Node, out_shape) -> DimMap:
    """Output dims are the input's dims in the same order, less size-1 dims added or removed
    (unsqueeze, squeeze)."""
    kept = [i for i, s in enumerate(shape(src)) if s != 1]
    outs = [o for o, s in enumerate(out_shape) if s != 1]
    return DimMap({src: dict(zip(outs, kept)) if len(kept) == len(outs) else {}})


POINTWISE = {
    "add", "sub", "mul", "truediv", "div", "floordiv", "neg", "pos", "pow", "rsqrt", "sqrt", "exp", "exp2",
    "log", "log1p", "log2", "tanh", "sigmoid", "silu", "gelu", "relu", "relu6", "leaky_relu", "elu", "selu",
    "mish", "softplus", "hardtanh", "hardswish", "hardsigmoid", "cos", "sin", "abs", "erf", "sign", "square",
    "reciprocal", "clamp", "clip", "maximum", "minimum", "where", "masked_fill", "float", "half", "bfloat16",
    "double", "to", "type", "contiguous", "clone", "detach", "eq", "ne", "lt", "le", "gt", "ge", "logical_not",
    "logical_and", "logical_or", "bitwise_not", "and_", "or_", "invert", "mod", "remainder", "lerp", "addcmul",
    "dropout", "dropout1d", "dropout2d", "alpha_dropout", "nan_to_num", "int", "long",
    "bool", "sub_", "add_", "mul_", "div_", "masked_fill_", "clamp_", "copy_", "requires_grad_",
    "iadd", "isub", "imul", "itruediv",  # x += y: in place, the target keeps its placement
}
SOFTMAX = {"softmax", "log_softmax"}
REDUCE = {"mean", "sum", "amax", "amin", "var", "std", "logsumexp", "norm", "prod", "any", "all"}
SAME_ORDER = {"unsqueeze", "squeeze"}
VIEWS = {"view", "reshape", "flatten", "unflatten"}


ALONG_DIM = {"topk": (2, -1), "sort": (1, -1), "argsort": (1, -1), "cumsum": (1, None), "cumprod": (1, None),
             "cummax": (1, None), "cummin": (1, None), "logcumsumexp": (1, None)}  # name: (dim position, default)
MAX_MIN = {"max", "min", "argmax", "argmin"}
SCATTERS = {"scatter", "scatter_", "scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_"}


def _all_but(dim: int, n: int) -> dict[int, int]:
    return {d: d for d in range(n) if d != dim}


def _along(src: fx.Node, dim, out_shape) -> Optional[DimMap]:
    """An op that works along one dim of src (topk, sort, cumsum, ...): each output row of the other dims
    reads only the same row of src, so those dims keep their placement; the dim itself has none."""
    if not isinstance(dim, int) or len(shape(src)) != len(out_shape):
        return None
    return DimMap({src: _all_but(_dim(dim, len(out_shape)), len(out_shape))})


def _max_min(node: fx.Node, src: fx.Node, out_shape, inputs) -> Optional[DimMap]:
    """max/min(x, dim[, keepdim]) and argmax/argmin along a dim: a reduction over that dim; max/min(x, y):
    elementwise; over everything: not ours (it would need an all-reduce of the maximum)."""
    dim = arg(node, 1, "dim")
    if isinstance(dim, fx.Node):
        return _broadcast(out_shape, inputs)
    if not isinstance(dim, int):
        return None
    n = len(shape(src))
    dim = _dim(dim, n)
    keep = [d for d in range(n) if d != dim]
    return DimMap({src: ({d: d for d in keep} if arg(node, 2, "keepdim", False) else dict(enumerate(keep)))})


def _aligned(a: fx.Node, out_shape, dim: int) -> bool:
    """a has the output's size on every dim but `dim` (gather/scatter read row for row there)."""
    s = shape(a)
    return s is not None and len(s) == len(out_shape) and all(s[d] == out_shape[d] for d in _all_but(dim, len(s)))


def _gather_along(node: fx.Node, src: fx.Node, out_shape) -> Optional[DimMap]:
    """torch.gather(x, dim, index): out[..i..] = x[..index[..i..]..] along dim, row for row elsewhere."""
    dim, index = arg(node, 1, "dim"), arg(node, 2, "index")
    if not isinstance(dim, int) or not is_tensor(index):
        return None
    dim = _dim(dim, len(out_shape))
    if not (_aligned(src, out_shape, dim) and shape(index) == out_shape):
        return None
    return DimMap({src: _all_but(dim, len(out_shape)), index: {d: d for d in range(len(out_shape))}})


def _scatter_along(node: fx.Node, src: fx.Node, out_shape) -> Optional[DimMap]:
    """x.scatter(dim, index, src|value) and kin: writes along dim, row for row elsewhere (index and src
    must span the rows of x, else rows of x are left out and the dims do not align)."""
    dim = arg(node, 1, "dim")
    others = [a for a in tensor_inputs(node) if a is not src]
    if not isinstance(dim, int) or not all(_aligned(a, out_shape, _dim(dim, len(out_shape))) for a in others):
        return None
    return DimMap({a: _all_but(_dim(dim, len(out_shape)), len(out_shape)) for a in [src, *others]})


def _one_hot(node: fx.Node, src: fx.Node, out_shape) -> Optional[DimMap]:
    """F.one_hot(ids, num_classes): one more dim per token; num_classes=-1 (read from the data's
    maximum, which differs per rank) has no sharded form."""
    classes = arg(node, 1, "num_classes", -1)
    if not isinstance(classes, int) or classes <= 0:
        return None
    return DimMap({src: {d: d for d in range(len(out_shape) - 1)}})


class TableLookup(DimMap):
    """table[ids] with one tensor index (an embedding by indexing: W[expert_ids]): each output row is the
    table row its id names, so the output follows the ids; the table is read at any row, so a sharded
    table is gathered first (`read_globally`)."""

    def __init__(self, table: fx.Node, ids: fx.Node):
        super().__init__({ids: {d: d for d in range(len(shape(ids)))}, table: {}})
        self.read_globally = [table]


def fixed_bins(node: fx.Node) -> bool:
    """torch.histc with literal bounds min < max: its bins do not depend on the data (min == max takes
    them from the data's range, which differs per rank)."""
    low, high = arg(node, 2, "min", 0), arg(node, 3, "max", 0)
    return all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in (low, high)) and low < high


def tensor_index(index) -> Optional[fx.Node]:
    """The index tensor of x[idx] / x[(idx,)] (one tensor index on dim 0, nothing else), or None."""
    parts = index if isinstance(index, tuple) else (index,)
    return parts[0] if len(parts) == 1 and is_tensor(parts[0]) else None


def reduced_dims(node: fx.Node) -> Optional[tuple[int, ...]]:
    """The dims a reduction op reduces over (all of them when no dim is given); None if unknown."""
    src = node.args[0]
    ndim = len(shape(src))
    dims = arg(node, 1, "dim")
    if dims is None:
        return tuple(range(ndim))
    if isinstance(dims, int):
        dims = (dims,)
    if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims):
        return None
    return tuple(sorted(_dim(d, ndim) for d in dims))


def _index_map(in_shape, index, out_shape) -> Optional[dict[int, int]]:
    """{out dim: in dim} for the dims a basic index (ints, slices, None, Ellipsis) keeps whole; None for
    tensor (advanced) indices."""
    index = index if isinstance(index, tuple) else (index,)
    used = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded: list = []
    for i in index:
        expanded.extend([slice(None)] * (len(in_shape) - used) if i is Ellipsis else [i])
    expanded.extend([slice(None)] * (len(in_shape) - sum(1 for i in expanded if i is not None)))
    m, in_d, out_d = {}, 0, 0
    for i in expanded:
        if isinstance(i, bool):  # x[True] adds a dim like None, x[False] empties it: not ours to map
            return None
        if i is None:
            out_d += 1
        elif isinstance(i, int):
            in_d += 1
        elif isinstance(i, slice):
            if in_d < len(in_shape) and out_shape[out_d] == in_shape[in_d] and i.step in (None, 1):
                m[out_d] = in_d
            out_d += 1
            in_d += 1
        else:  # tensor indices: not token-wise for us
            return None
    return m


def _basic_index(ndim: int, index) -> Optional[list]:
    """A basic index (ints, slices with constant bounds, None, Ellipsis) as one entry per input dim or None,
    in order, with Ellipsis expanded and the missing trailing dims made whole; None for anything else."""
    index = index if isinstance(index, tuple) else (index,)
    for i in index:
        if isinstance(i, bool) or not (i is None or i is Ellipsis or isinstance(i, int) or isinstance(i, slice)
                                       and all(b is None or isinstance(b, int) for b in (i.start, i.stop, i.step))):
            return None
    used = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded: list = []
    for i in index:
        expanded.extend([slice(None)] * (ndim - used) if i is Ellipsis else [i])
    return expanded + [slice(None)] * (ndim - sum(1 for i in expanded if i is not None))


def sequence_slice(in_shape, index, dim: int, seq_len: int) -> Optional[tuple[int, int, tuple]]:
    """For x[index] with x's dim `dim` the whole sequence: when the index is basic and takes a contiguous run
    of tokens [start, stop) on that dim, not all of them (a slice of step 1), (start, stop, the index with that
    entry made whole, to apply to those rows alone); None otherwise."""
    expanded = _basic_index(len(in_shape), index)
    if expanded is None or in_shape[dim] != seq_len:
        return None
    in_d = 0
    for k, i in enumerate(expanded):
        if i is None:
            continue
        if in_d == dim:
            if not isinstance(i, slice) or i.step not in (None, 1):
                return None
            start, stop, _ = i.indices(seq_len)
            if stop <= start or stop - start == seq_len:
                return None
            return start, stop, tuple(expanded[:k]) + (slice(None),) + tuple(expanded[k + 1:])
        in_d += 1
    return None


def _getitem(node: fx.Node, out_shape) -> Optional[DimMap]:
    src, index = node.args
    if isinstance(value(src), (tuple, list)):  # an element of a split/unbind: same dims as the tuple
        return DimMap({src: {d: d for d in range(len(out_shape))}})
    ids = tensor_index(index)
    if ids is not None and ids is not src and value(ids).dtype not in (torch.bool, torch.uint8):
        return TableLookup(src, ids)
    m = _index_map(shape(src), index, out_shape)
    return None if m is None else DimMap({src: m})


class SetItem:
    """`x[index] = y` (operator.setitem) with a basic index. It writes x in place, so x keeps its placement
    (the pass never puts a boundary on it); a sharded x needs the index to keep its sequence dim whole,
    and y, aligned to x[index] from the right, then carries the sequence on the matching dim, or
    broadcasts over it (the same values for every token: replicated)."""

    def __init__(self, x: fx.Node, y: Optional[fx.Node], to_view: dict[int, int], y_dims: dict[int, int]):
        self.x, self.y = x, y
        self.to_view = to_view  # {x dim: dim of x[index]} for the dims the index keeps whole
        self.y_dims = y_dims  # {dim of x[index]: y dim} where y is not broadcast

    def inputs_for(self, out: SeqDim) -> Optional[dict[fx.Node, Optional[SeqDim]]]:
        if out.dim not in self.to_view:
            return None  # the write picks some of the tokens: no sharded form
        need: dict[fx.Node, Optional[SeqDim]] = {self.x: out}
        if self.y is not None:
            v = self.to_view[out.dim]
            need[self.y] = replace(out, dim=self.y_dims[v]) if v in self.y_dims else None
        return need

    def output_for(self, a: fx.Node, spec: SeqDim) -> Optional[SeqDim]:
        if a is self.x:
            return spec if spec.dim in self.to_view else None
        if a is self.y:
            for x_dim, v in self.to_view.items():
                if self.y_dims.get(v) == spec.dim:
                    return replace(spec, dim=x_dim)
        return None


def _setitem(node: fx.Node) -> Optional[SetItem]:
    x, index, y = node.args
    in_shape = shape(x)
    parts = index if isinstance(index, tuple) else (index,)
    if in_shape is None or any(isinstance(p, fx.Node) or isinstance(p, slice) and any(
            isinstance(b, fx.Node) for b in (p.start, p.stop, p.step)) for p in parts):
        return None  # tensor or symbolic indices
    out_shape = tuple(torch.empty(in_shape, device="meta")[index].shape)
    m = _index_map(in_shape, index, out_shape)
    if m is None:
        return None
    y_dims: dict[int, int] = {}
    if is_tensor(y):
        sy = shape(y)
        if len(sy) > len(out_shape):
            return None
        off = len(out_shape) - len(sy)
        y_dims = {v: v - off for v in range(off, len(out_shape)) if sy[v - off] == out_shape[v]}
    elif isinstance(y, fx.Node) and isinstance(value(y), torch.Tensor):
        return None  # a tensor of unknown (symbolic) shape
    return SetItem(x, y if is_tensor(y) else None, {i: o for o, i in m.items()}, y_dims)


NEW_FACTORIES = {"new_empty", "new_zeros", "new_ones", "new_full"}  # x.new_zeros(size): x lends dtype, device
LIKE_FACTORIES = {"empty_like", "zeros_like", "ones_like", "full_like"}  # torch.zeros_like(x): and x's shape


class Factory:
    """A tensor made from a size and a constant (x.new_zeros(size), torch.zeros_like(x); uninitialised for
    new_empty/empty_like): the source x lends its dtype and device (and for *_like its shape), never its
    values, and every row of the result is alike. So any placement is exact once the local size is right:
    the pass shards it where it is wanted (the dim has the sequence's global size; the size argument, or
    the shape *_like takes from x, becomes local) and keeps it replicated otherwise, whatever x's
    placement; x needs no boundary (a shard lends the same dtype and device)."""

    def __init__(self, src: fx.Node, out_shape, like: bool):
        self.src, self.out_shape, self.like = src, out_shape, like

    def fits(self, out: SeqDim, global_size: int) -> bool:
        return 0 <= out.dim < len(self.out_shape) and self.out_shape[out.dim] == global_size

    def inputs_for(self, out: SeqDim) -> dict[fx.Node, Optional[SeqDim]]:
        return {}  # the source is not read

    def output_for(self, a: fx.Node, spec: SeqDim) -> Optional[SeqDim]:
        return None  # the result's placement does not follow its source's


def factory_source(node: fx.Node) -> Optional[fx.Node]:
    """The tensor a factory-like op takes only metadata from (x of x.new_zeros(...), torch.zeros_like(x))."""
    name = op_name(node)
    if node.op == "call_method" and name in NEW_FACTORIES or node.op == "call_function" and name in LIKE_FACTORIES:
        src = arg(node, 0, "input")
        return src if isinstance(src, fx.Node) else None
    return None


def rule_for(node: fx.Node, seq_len: int) -> Optional[Any]:
    """The DimMap or ViewMap of a token-wise op, or None when the op is unknown or mixes tokens."""
    if node.op not in ("call_function", "call_method"):
        return None
    if node.op == "call_function" and node.target is operator.setitem:
        return _setitem(node)
    out_shape = shape(node)
    if out_shape is None:
        return None
    name = op_name(node)
    inputs = tensor_inputs(node)
    if not inputs:
        return None
    if node.target in (sequence_shift, window_conv1d):
        return _window(node, out_shape)
    src = node.args[0] if node.args else None
    source = factory_source(node)
    if source is not None and is_tensor(source):
        like = name in LIKE_FACTORIES
        return Factory(source, out_shape, like) if not like or shape(source) == out_shape else None
    if name in ("type_as", "to") and len(inputs) > 1:  # the other tensor only lends its dtype and device
        return _broadcast(out_shape, [src])
    if name in POINTWISE:
        return _broadcast(out_shape, [src] if "dropout" in name else inputs)
    if name in SOFTMAX:
        return _broadcast(out_shape, [src], skip_out={_dim(arg(node, 1, "dim"), len(out_shape))})
    if name in ALONG_DIM:
        position, default = ALONG_DIM[name]
        return _along(src, arg(node, position, "dim", default), out_shape)
    if name in MAX_MIN:
        return _max_min(node, src, out_shape, inputs)
    if name == "gather":
        return _gather_along(node, src, out_shape)
    if name in SCATTERS:
        return _scatter_along(node, src, out_shape)
    if name == "one_hot":
        return _one_hot(node, src, out_shape)
    if name in REDUCE:
        dims = reduced_dims(node)
        if dims is None:
            return None
        keep = [d for d in range(len(shape(src))) if d not in dims]
        keepdim = arg(node, 2, "keepdim", False)
        return DimMap({src: ({d: d for d in keep} if keepdim else {o: d for o, d in enumerate(keep)})})
    if name == "linear":
        return DimMap({a: ({d: d for d in range(len(out_shape) - 1)} if a is src else {}) for a in inputs})
    if name in ("matmul", "bmm", "__matmul__"):
        a, b = node.args[:2]
        sa, sb, n = shape(a), shape(b), len(out_shape)
        if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
            return None
        ma, mb = _batch_dims(sa, out_shape), _batch_dims(sb, out_shape)
        ma[n - 2] = len(sa) - 2
        mb[n - 1] = len(sb) - 1
        return DimMap({a: ma, b: mb} if a is not b else {a: ma})
    if name == "embedding":
        ids = arg(node, 0, "input")
        return DimMap({a: ({d: d for d in range(len(shape(ids)))} if a is ids else {}) for a in inputs})
    if name in ("layer_norm", "rms_norm"):
        normalized = arg(node, 1, "normalized_shape")
        count = len(normalized) if isinstance(normalized, (tuple, list)) else 1
        return DimMap({a: ({d: d for d in range(len(out_shape) - count)} if a is src else {}) for a in inputs})
    if name in ("transpose", "swapaxes"):
        d0, d1 = (_dim(d, len(out_shape)) for d in node.args[1:3])
        perm = list(range(len(out_shape)))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return DimMap({src: dict(enumerate(perm))})
    if name == "t":
        return DimMap({src: {0: 1, 1: 0} if len(out_shape) == 2 else {0: 0}})
    if name == "permute":
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        return DimMap({src: {o: _dim(i, len(out_shape)) for o, i in enumerate(dims)}})
    if name in SAME_ORDER:
        return _same_order(src, out_shape)
    if name in ("expand", "expand_as"):
        return _broadcast(out_shape, [src])
    if name in VIEWS:
        return ViewMap(src, shape(src), out_shape, seq_len)
    if name == "getitem":
        return _getitem(node, out_shape) if node.args[0] in inputs else None
    if name in ("split", "chunk", "tensor_split", "unbind", "split_with_sizes"):
        dim = _dim(arg(node, 2, "dim", 0) if name != "unbind" else arg(node, 1, "dim", 0), len(shape(src)))
        if name == "unbind":
            return DimMap({src: {o: (o if o < dim else o + 1) for o in range(len(out_shape))}})
        return DimMap({src: {d: d for d in range(len(out_shape)) if d != dim}})
    if name in ("cat", "concat", "concatenate", "stack"):
        tensors = arg(node, 0, "tensors")
        dim = _dim(arg(node, 1, "dim", 0), len(out_shape))
        maps = {}
        real = [t for t in tensors if shape(t) != (0,)]
        for t in tensors:
            if shape(t) == (0,):  # torch.cat's legacy empty operand (an empty KV cache): contributes nothing
                maps[t] = {}
            elif len(real) == 1 and name != "stack":  # the only real operand: the output is that tensor
                maps[t] = {d: d for d in range(len(out_shape))}
            elif name == "stack":
                maps[t] = {o: (o if o < dim else o - 1) for o in range(len(out_shape)) if o != dim}
            else:
                maps[t] = {d: d for d in range(len(out_shape)) if d != dim}
        return DimMap(maps)
    if name == "pad":
        pads = arg(node, 1, "pad")
        padded = {len(out_shape) - 1 - i // 2 for i, p in enumerate(pads) if p != 0}
        return DimMap({src: {d: d for d in range(len(out_shape)) if d not in padded}})
    return None


# ---- local sizes ----------------------------------------------------------------------------------

def set_local_size(node: fx.Node, out: SeqDim, global_size: int, local_size: int) -> bool:
    """Rewrite the literal size of the sharded dim in a view/reshape/expand/unflatten/factory call to
    the local size; False when that size is not a literal we can rewrite (-1 needs no rewrite)."""
    name = op_name(node)
    first = 1 if node.op == "call_method" or name == "reshape" else 0
    if name == "unflatten":
        first, index = 2, out.dim - _dim(node.args[1], len(shape(node.args[0])))
        unflattened = node.args[2] if len(node.args) > 2 else node.kwargs.get("sizes", ())
        if not 0 <= index < len(unflattened):
            return True  # the sequence is not the dim it unflattens: no size of it to rewrite
    else:
        index = out.dim
    packed = (len(node.args) == first + 1 or name in ("full", "new_full")) and len(node.args) > first and \
        isinstance(node.args[first], (tuple, list, torch.Size))
    if "size" in node.kwargs:
        sizes = list(node.kwargs["size"])
    elif packed:
        sizes = list(node.args[first])
    else:
        sizes = list(node.args[first:])
    if not 0 <= index < len(sizes) or sizes[index] not in (-1, global_size):
        return False
    if sizes[index] == -1:
        return True
    sizes[index] = local_size
    if "size" in node.kwargs:
        node.kwargs = {**node.kwargs, "size": tuple(sizes)}
    elif packed:
        node.args = (*node.args[:first], tuple(sizes), *node.args[first + 1:])
    else:
        node.args = (*node.args[:first], *sizes)
    return True


FACTORIES = {"ones", "zeros", "full", "empty", "new_ones", "new_zeros", "new_full", "new_empty"}
RESIZED = {"view", "reshape", "expand", "unflatten"} | FACTORIES  # ops whose size arguments name the sequence
