"""shard: sequence mode. Every tensor of the graph becomes sequence-sharded (this rank's tokens, in the
attention layout's order) or replicated, and boundary ops are inserted where the two meet, so that each
rank runs the token-wise work of the whole model on its own tokens and only attention and reductions
talk across ranks. Exact in forward and backward (see burstc/runtime/sequence_ops.py for the adjoints).

Two sweeps over the graph:
1. backward from the attention sites: which tensors *want* to be sharded, through token-wise ops back to
   the graph inputs, stopping where a tensor has a user that needs it whole (so input ids are sharded
   before the embedding, and labels stay whole until they meet the sharded logits);
2. forward in graph order: each op's placement follows from its inputs and its want; replicated tensors
   entering sharded ops take this rank's positions (`burst::seq_shard`), replicated tensors that need
   gradients entering sharded ops get them summed over the ranks (`grad_sum`, one bucket for all
   parameters), sharded tensors reaching an op that mixes tokens are gathered (`burst::seq_gather`,
   logged with the source line and bytes), reductions over the sequence become a local reduction and an
   all-reduce, and sharded graph outputs are gathered (or left local with outputs="local").

The result is checked by running the rewritten graph on fake tensors of the local shapes; anything the
pass cannot do exactly raises ShardingError, and the backend then keeps the graph attention-parallel.
"""
from __future__ import annotations

import logging
import math
import operator
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from burstc.config import BurstConfig
from burstc.passes.find_attention import find_attention_sites, rebind, source_line
from burstc.passes.plan import SitePlan, plan_sites
from burstc.passes.shard_rules import (RESIZED, DimMap, Factory, LocalGroups, LocalRows, SeqDim, WindowMap, arg,
                                       factory_source, is_tensor, mutated_input, op_name, reduced_dims, rule_for,
                                       fixed_bins, sequence_slice, set_local_size, shape, tensor_index, tensor_inputs,
                                       value)
from burstc.passes.windows import fuse_windows
from burstc.runtime import halo, sequence_ops, sequence_rows  # noqa: F401 (registers burst::seq_gather_rows)
from burstc.runtime.fsdp import FsdpScales
from burstc.schedule.layout import chunk_count, local_length

log = logging.getLogger("burstc.passes")
GATHER_WARN_BYTES = 1 << 30
_logged: set[tuple[str, str]] = set()
history: deque = deque(maxlen=16)  # the ShardingPlans of the graphs compiled last in this process (newest last)


class ShardingError(Exception):
    """The graph cannot be partitioned exactly; the message says why."""


@dataclass
class Boundary:
    """One inserted boundary op, for the sharding table."""

    kind: str  # shard, gather, grad_sum, reduce, output_gather
    tensor: str
    spec: str
    bytes_per_rank: int
    reason: str = ""
    source: str = ""


@dataclass(frozen=True)
class TensorPlacement:
    """One tensor of the graph: its global shape and where it lives."""

    name: str
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    placement: str  # "seq@d ..." or "replicated"


@dataclass
class ShardingPlan:
    """What the pass decided: the placement of every tensor and every boundary it inserted."""

    seq_len: int
    layout: str
    world_size: int
    rank: int
    local_len: int
    tensors: list[TensorPlacement] = field(default_factory=list)
    boundaries: list[Boundary] = field(default_factory=list)
    # graph outputs left sharded (outputs='lazy' or 'local'): position in the output tuple -> its SeqDim
    sharded_outputs: dict[int, SeqDim] = field(default_factory=dict)

    @property
    def sharded(self) -> list[str]:
        return [t.name for t in self.tensors if t.placement != "replicated"]

    def activation_bytes(self) -> tuple[int, int]:
        """(bytes of every tensor of the graph on this rank, the same without sharding): a rough view of
        the activation memory the partition saves."""
        full = sum(t.nbytes for t in self.tensors)
        local = sum(t.nbytes * (self.local_len / self.seq_len if t.placement != "replicated" else 1)
                    for t in self.tensors)
        return int(local), full

    def table(self) -> str:
        local, full = self.activation_bytes()
        lines = [f"sequence mode: {self.seq_len} tokens, layout {self.layout}, {self.world_size} ranks; rank "
                 f"{self.rank} holds {self.local_len} tokens",
                 f"{len(self.sharded)} of {len(self.tensors)} tensors sharded; all tensors of the graph together: "
                 f"{local / 2**20:.1f} MiB on this rank against {full / 2**20:.1f} MiB unsharded", "",
                 "| tensor | op | global shape | placement |", "|---|---|---|---|"]
        lines += [f"| {t.name} | {t.op} | {list(t.shape)} {str(t.dtype).removeprefix('torch.')} | {t.placement} |"
                  for t in self.tensors]
        return "\n".join(lines + [""] + self.boundary_table())

    def boundary_table(self) -> list[str]:
        """Markdown lines: every inserted boundary with its bytes and why."""
        return (["| boundary | tensor | placement | bytes per rank | why | where |", "|---|---|---|---|---|---|"]
                + [f"| {b.kind} | {b.tensor} | {b.spec} | {b.bytes_per_rank} | {b.reason} | {b.source} |"
                   for b in self.boundaries])


def _nbytes(node: fx.Node) -> int:
    v = value(node)
    return v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0


def storages(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """The storage (its address; the example values keep it alive) of every tensor node's example value:
    Dynamo computes them on fake tensors, op by op, so a view shares its base's storage (and an in-place
    op's result its target's), as in eager."""
    found = {}
    for node in gm.graph.nodes:
        v = value(node)
        if isinstance(v, torch.Tensor) and not v.is_sparse:
            try:
                found[node] = v.untyped_storage()._cdata
            except (NotImplementedError, RuntimeError):
                pass
    return found


def _computed_from(gm: fx.GraphModule, roots: set[fx.Node], *, values_only: bool = False,
                   alias: Optional[dict[fx.Node, int]] = None) -> set[fx.Node]:
    """roots and every node computed from any of them; a tensor written in place from them (x.copy_(y),
    x[i] = y) counts with every view of its storage. values_only: a factory (x.new_zeros(size),
    torch.empty_like(x)) does not read x's values, so it is not computed from x."""
    found = set(roots)
    alias = storages(gm) if alias is None else alias
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        inputs = node.all_input_nodes
        if values_only and factory_source(node) is not None:
            inputs = [a for a in inputs if a is not factory_source(node)]
        if any(a in found for a in inputs):
            found.add(node)
            target = mutated_input(node)
            if alias.get(target) is not None:
                found |= {n for n, st in alias.items() if st == alias[target]}
    return found


def requires_grad(gm: fx.GraphModule, example_inputs) -> set[fx.Node]:
    """The nodes whose value may require a gradient: inputs that do, and everything computed from them
    (an over-approximation is safe: summing the gradient of a value that gets none does nothing)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    roots = {n for n, x in zip(placeholders, example_inputs) if isinstance(x, torch.Tensor) and x.requires_grad}
    roots |= {n for n in placeholders if isinstance(value(n), torch.Tensor) and value(n).requires_grad}
    return _computed_from(gm, roots)


def input_dependent(gm: fx.GraphModule, alias: Optional[dict[fx.Node, int]] = None) -> set[fx.Node]:
    """The nodes whose value depends on a graph input: only these can differ across ranks (a constant
    built inside the graph is the same everywhere and needs no replica check). alias: storages(gm)."""
    return _computed_from(gm, {n for n in gm.graph.nodes if n.op == "placeholder"}, values_only=True, alias=alias)


def _same_value(new: fx.Node, old: fx.Node) -> None:
    """A boundary node is the same logical tensor as its input (sharded or not): the rules read global
    shapes from example values, so it gets the input's, and its stack trace."""
    new.meta.update({k: v for k, v in old.meta.items() if k in ("example_value", "stack_trace", "nn_module_stack")})


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule over a copy of gm's graph (node metadata shared), for a pass that may fail midway."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, graph)


def _sized_like(src: torch.Tensor, size: tuple[int, ...], like: str, *args, **kwargs) -> torch.Tensor:
    """`torch.<like>(src, ...)` (zeros_like and kin) with the given size: src, placed otherwise than the
    result (a shard of a replicated result, or the other way round), lends only its dtype and device."""
    return getattr(torch, like)(src.new_empty(size), *args, **kwargs)


class _Sharder:
    def __init__(self, gm: fx.GraphModule, plans: list[SitePlan], seq_len: int, layout: str, world_size: int,
                 rank: int, group_name: str, outputs: str, needs_grad: set[fx.Node],
                 arriving: Optional[dict[fx.Node, SeqDim]] = None, fsdp: Optional[dict[fx.Node, FsdpScales]] = None,
                 checks: str = "once"):
        self.gm, self.graph, self.needs_grad = gm, gm.graph, needs_grad
        self.fsdp = {a: scales for a, scales in (fsdp or {}).items() if a in needs_grad}  # FSDP2 reduces these
        self.arriving = arriving or {}  # graph inputs that arrive as this rank's shards (SequenceShard)
        self.storage = storages(gm)
        self.from_inputs = input_dependent(gm, self.storage)
        self.seq_len, self.layout, self.world_size, self.rank = seq_len, layout, world_size, rank
        self.group_name, self.outputs, self.checks = group_name, outputs, checks
        self.local_len = local_length(seq_len, layout, world_size, rank)
        self.sites = {p.site.node: p for p in plans if p.converts}
        self.want: dict[fx.Node, SeqDim] = {}
        self.place: dict[fx.Node, Optional[SeqDim]] = {}  # or, inside a proven private region, LocalRows/LocalGroups
        self.private: dict[fx.Node, "_Private"] = {}  # the nodes of accepted private regions (and their exits)
        self.entered: dict[tuple, fx.Node] = {}
        self.grad_sums: list[tuple[fx.Node, fx.Node, fx.Node]] = []  # (consumer, replicated input, anchor)
        # in-place writes: a boundary must read a tensor after the writes its consumer sees (never the
        # uninitialised or stale memory before them), and may not cut a view from what is written later
        self.order = {n: i for i, n in enumerate(self.graph.nodes)}
        self.writes: dict[int, list[fx.Node]] = {}
        for node in self.graph.nodes:
            target = mutated_input(node)
            if self.storage.get(target) is not None:
                self.writes.setdefault(self.storage[target], []).append(node)
        self.plan = ShardingPlan(seq_len, layout, world_size, rank, self.local_len)

    # -- rules ------------------------------------------------------------------------------------
    def rule(self, node: fx.Node):
        if node in self.sites:
            rebind(self.sites[node].site)  # its inputs may have been replaced by boundaries meanwhile
            return _AttentionRule(self.sites[node].site)
        try:
            return rule_for(node, self.seq_len)
        except (TypeError, ValueError, IndexError, KeyError):
            return None

    def _is_seq_reduction(self, node: fx.Node, spec: SeqDim) -> bool:
        name = op_name(node)
        if name in ("sum", "mean") and node.args and node.args[0] is not None:
            dims = reduced_dims(node)
            return dims is not None and spec.dim in dims and not (set(node.kwargs) - {"dim", "keepdim"})
        return name == "cross_entropy"

    def accepts(self, user: fx.Node, node: fx.Node, spec: SeqDim) -> bool:
        """Whether `user` can take `node` sharded as `spec` without a gather."""
        if user.op == "output":
            return True
        if self._is_seq_reduction(user, spec) and user.args[0] is node:
            return True
        if self._short_run(user, node, spec) is not None:
            return True  # it gathers only the run's rows (_gather_slice)
        rule = self.rule(user)
        if rule is None:
            return False
        if isinstance(rule, Factory) or isinstance(rule, DimMap) and node not in rule.maps:
            return True  # it reads only node's dtype and device (a factory's source, type_as's other tensor)
        if user in self.want:
            need = rule.inputs_for(self.want[user])
            return need is not None and need.get(node) == spec
        return rule.output_for(node, spec) is not None

    # -- sweep 1: wants, from attention back to the inputs ----------------------------------------
    def propagate_wants(self) -> None:
        proposals: dict[fx.Node, set[SeqDim]] = {}
        for site in self.sites.values():
            for t in _AttentionRule(site.site).inputs:
                proposals.setdefault(t, set()).add(SeqDim(2))
        for node in reversed(list(self.graph.nodes)):
            wanted = proposals.get(node)
            if not wanted or len(wanted) > 1 or not is_tensor(node):
                continue
            spec = next(iter(wanted))
            if not all(self.accepts(u, node, spec) for u in node.users):
                continue
            if any(self.rule(w) is None for w in self.writes.get(self.storage.get(node), ())):
                continue  # written in place by an op without a rule: it has to stay replicated
            self.want[node] = spec
            rule = self.rule(node)
            if rule is None or node.op == "placeholder":
                continue
            need = rule.inputs_for(spec)
            for a, s in (need or {}).items():
                if s is not None:
                    proposals.setdefault(a, set()).add(s)
        self.want.update(self.arriving)  # an input that arrives sharded is wanted as it is

    # -- sweep 2: placements and boundaries -------------------------------------------------------
    def run(self) -> ShardingPlan:
        self.propagate_wants()
        for node in list(self.graph.nodes):
            if node in self.arriving:
                self.place[node] = self.arriving[node]  # it is this rank's shard already
            elif node.op in ("placeholder", "get_attr"):
                self.place[node] = None  # an input stays replicated; wanted sharded, its users see a shard
                if node in self.want and node.users and not self.writes.get(self.storage.get(node)):
                    self._shard_source(node, self.want[node])
            elif node.op == "output":
                self._outputs(node)
            elif node.op in ("call_function", "call_method"):
                self._visit(node)
        self._bucket_grad_sums()
        for node in self.graph.nodes:  # example values are still the global ones here
            if is_tensor(node) and isinstance(value(node), torch.Tensor):
                spec = self.place.get(node)
                self.plan.tensors.append(TensorPlacement(node.name, op_name(node), shape(node), value(node).dtype,
                                                         _nbytes(node), str(spec) if spec else "replicated"))
        self.graph.lint()
        self.gm.recompile()
        return self.plan

    def _shard_source(self, node: fx.Node, spec: SeqDim) -> None:
        """A graph input wanted sharded: shard it once, after the graph inputs, for all its users."""
        users = list(node.users)
        entered = self._enter(node, spec)
        for u in users:
            u.replace_input_with(node, entered)
        self.entered[(node, spec, self._after(node))] = entered
        self.place[entered] = spec

    def _visit(self, node: fx.Node) -> None:
        if node in self.private:
            return self._visit_private(node)
        inputs = tensor_inputs(node)
        sharded = [(a, self.place[a]) for a in inputs if self.place.get(a)]
        if any(not isinstance(spec, SeqDim) for _, spec in sharded):
            raise ShardingError(f"{node.name} ({op_name(node)}) reads a rank-private tensor outside its region")
        if sharded and self._is_seq_reduction(node, sharded[0][1]) and node.args[0] is sharded[0][0]:
            return self._reduce(node, sharded)
        if sharded and op_name(node) == "histc" and fixed_bins(node):
            return self._count(node)
        if self._sorts_slots(node, sharded):
            region = _PrivateRegion(self, node).analyse()
            if isinstance(region, str):
                self.place[node] = None
                return self._gather_inputs(node, sharded, f"{op_name(node)} orders tokens of all ranks: its result "
                                           f"cannot stay this rank's ({region})")
            self._adopt(region)
            return self._visit_private(node)
        rule = self.rule(node)
        if isinstance(rule, Factory):
            return self._factory(node, rule)
        if rule is None:
            self.place[node] = None
            if sharded:
                self._refuse_inplace(node, None)
                self._gather_inputs(node, sharded, f"{op_name(node)} is not token-wise (or not known to burst)")
            return
        target = mutated_input(node)
        out = None
        if node in self.sites:  # the rewrite makes every converting site a local (sharded) attention
            out = SeqDim(2)
        elif target is not None:  # written in place: the target keeps its placement, the other inputs follow
            out = self.place.get(target)
        else:
            for a, s in sharded:
                out = rule.output_for(a, s)
                if out is not None:
                    break
            if out is None and node in self.want and not sharded:
                wanted = rule.inputs_for(self.want[node])
                if wanted and any(s is not None for s in wanted.values()):  # some input can enter sharded
                    out = self.want[node]
        need = rule.inputs_for(out) if out is not None else None
        if target is not None and out is not None and (need is None or need.get(target, out) != out):
            raise ShardingError(f"in-place {op_name(node)} on the sharded {target.name} at "
                                f"{source_line(node) or node.name} has no sharded form")
        if need is None:
            self.place[node] = None
            if sharded and target is None and self._gather_slice(node, sharded):
                return
            if sharded:
                self._gather_inputs(node, sharded, f"{op_name(node)} writes the replicated {target.name}"
                                    if target is not None else f"{op_name(node)} mixes tokens along the sequence")
            return
        if op_name(node) in RESIZED and not set_local_size(node, out, self._global(out), self.local_size(out)):
            self.place[node] = None
            if sharded:
                self._gather_inputs(node, sharded, f"{op_name(node)}'s size argument is not a literal")
            return
        for a in inputs:
            if a in need:  # an input the rule leaves out (type_as's other tensor) only lends metadata
                self._fix_edge(node, a, need[a], read_globally=a in getattr(rule, "read_globally", ()))
        self.place[node] = out
        if isinstance(rule, WindowMap) and out.dim == rule.window_dim:
            self._halo(node)

    # -- private regions: a local sort of this rank's slots (an MoE dispatch) ------------------------
    def _sorts_slots(self, node: fx.Node, sharded) -> bool:
        """Whether node sorts a 1-D sharded tensor along its sequence (the flattened expert ids of a
        dispatch): each rank can sort its own slots instead, if the region after it proves exact."""
        if op_name(node) not in ("sort", "argsort") or len(sharded) != 1 or sharded[0][0] is not node.args[0]:
            return False
        dim = arg(node, 1, "dim", -1)
        return len(shape(node.args[0])) == 1 and dim in (0, -1)

    def _adopt(self, region: "_PrivateRegion") -> None:
        self.private.update(region.nodes)
        self.want.update(region.wants)
        exits = [f"{n.name} ({op_name(n)})" for n, p in region.nodes.items()
                 if not isinstance(p.placement, (LocalRows, LocalGroups)) and p.how != "arange"]
        self._record("private", region.seed, self.place[region.seed.args[0]], 0,
                     f"{op_name(region.seed)} of this rank's slots: {len(region.nodes) - len(exits)} rank-private "
                     f"tensors, back to sharded/replicated at {', '.join(exits)}", source_line(region.seed))
        counters["burst"]["seq_private_regions"] += 1

    def _visit_private(self, node: fx.Node) -> None:
        """A node of an accepted private region: placed as the region proved, after checking that its
        inputs from outside are placed as the proof assumed."""
        entry = self.private[node]
        for a, assumed in entry.outside.items():
            if self.place.get(a) != assumed:
                raise ShardingError(f"{node.name}: {a.name} is {self.place.get(a) or 'replicated'}, its private "
                                    f"region assumed {assumed or 'replicated'}")
            if assumed is None and a in self.needs_grad:  # shared by every rank's rows: gradients summed
                self.grad_sums.append((node, a, self._anchor(a, node)))
        if entry.how == "reduce":
            return self._reduce(node, [(node.args[0], self.place[node.args[0]])])
        if entry.how == "count":
            return self._count(node)
        if entry.how == "arange":
            self._local_arange(node)
        spec = entry.placement
        if isinstance(spec, LocalRows) and op_name(node) in RESIZED and \
                not set_local_size(node, spec.rows(), self._global(spec), self.local_size(spec)):
            raise ShardingError(f"{node.name} ({op_name(node)}): its size argument is not a literal")
        self.place[node] = spec

    def _local_arange(self, node: fx.Node) -> None:
        """buf[perm] = arange(n): n counts this rank's slots, not all ranks'."""
        buf, perm, full = node.args
        with self.graph.inserting_before(node):
            mine = self.graph.call_function(torch.arange, (self.local_size(self.place[perm]),), dict(full.kwargs))
        _same_value(mine, full)
        node.args = (buf, perm, mine)

    def _count(self, node: fx.Node) -> None:
        """torch.histc of a sharded or rank-private tensor: each element lies on one rank, so the global
        histogram is the sum over the ranks of the local ones (local histc + all-reduce)."""
        with self.graph.inserting_after(node):
            total = self.graph.call_function(torch.ops.burst.all_reduce.default, (node, self.group_name))
        node.replace_all_uses_with(total, delete_user_cb=lambda u: u is not total)
        _same_value(total, node)
        self.place[node] = self.place[total] = None
        self._record("reduce", node, None, 0, "histc of this rank's elements: local histc + all-reduce")

    def _halo(self, node: fx.Node) -> None:
        """A window op along the sequence runs on this rank's shard, its window's edge rows exchanged with
        the ranks that hold them (burstc.runtime.halo)."""
        if node.target is halo.sequence_shift:
            shift, wrap = node.args[2], node.args[4]
            before, after, node.target = max(shift, 0), max(-shift, 0), halo.sharded_sequence_shift
        else:
            (before, after), wrap = node.args[3:5], False
            node.target = halo.sharded_window_conv1d
        node.args = (*node.args, self.seq_len, self.layout, self.group_name)
        rows = sum(map(len, halo.halo_plan(self.seq_len, self.layout, self.world_size, self.rank, before, after,
                                           wrap).send.values()))
        row_bytes = _nbytes(node) // self.seq_len
        self._record("halo", node, self.place[node], rows * row_bytes,
                     f"{op_name(node)} reads {before} rows before and {after} after each token")
        counters["burst"]["seq_halos"] += 1

    def _refuse_inplace(self, node: fx.Node, out: Optional[SeqDim]) -> None:
        """An in-place op must mutate the tensor later users read: its target may not be swapped for a
        shard or a gathered copy, so it has to be placed exactly like the op's result."""
        target = mutated_input(node)
        if target is not None and self.place.get(target) != out:
            raise ShardingError(f"in-place {op_name(node)} on {target.name} at {source_line(node) or node.name} "
                                "mixes sharded and replicated data")

    def _factory(self, node: fx.Node, rule: Factory) -> None:
        """x.new_zeros(size), torch.zeros_like(x) and kin: sharded where wanted, else replicated (see
        Factory); a *_like whose source is placed otherwise gets the size it must have from a new_empty."""
        out = self.want.get(node) or self._written_placement(node, rule)
        if out is not None and not rule.fits(out, self._global(out)):
            out = None
        if rule.like:
            if self.place.get(rule.src) != out:
                size = list(shape(node))
                if out is not None:
                    size[out.dim] = self.local_size(out)
                node.target, node.args = _sized_like, (rule.src, tuple(size), op_name(node), *node.args[1:])
        elif out is not None and not set_local_size(node, out, self._global(out), self.local_size(out)):
            out = None
        self.place[node] = out

    def _written_placement(self, node: fx.Node, rule: Factory) -> Optional[SeqDim]:
        """The placement the first in-place write into a factory's result gives it, from the writer's sharded
        inputs placed by now (DeepSeek-V3's `zeros_like(scores).scatter_(1, group_idx, 1)`)."""
        writes = self.writes.get(self.storage.get(node), ())
        writer = self.rule(writes[0]) if writes and mutated_input(writes[0]) is node else None
        if writer is None or isinstance(writer, Factory):
            return None
        for a in tensor_inputs(writes[0]):
            spec = self.place.get(a)
            out = writer.output_for(a, spec) if a is not node and isinstance(spec, SeqDim) else None
            if out is not None and rule.fits(out, self._global(out)):
                return out
        return None

    def _anchor(self, a: fx.Node, consumer: fx.Node) -> fx.Node:
        """Where a boundary that reads `a` for `consumer` goes: after `a` (after the graph inputs), or after
        the last in-place write into a's storage between the two, whose result is what consumer reads.
        A consumer that views `a` may not take a boundary when the storage is written after it and the view
        is used from then on: its copy would not see that write (nor carry a write through it to `a`)."""
        key = self.storage.get(a)
        writes = self.writes.get(key, ()) if key is not None else ()
        if not writes or a not in self.order or consumer not in self.order:
            return self._after(a)
        here, there = self.order[a], self.order[consumer]
        later = [w for w in writes if self.order[w] > there]
        if later and self.storage.get(consumer) == key and self._used_from(consumer, key, self.order[later[0]]):
            raise ShardingError(f"{consumer.name} ({op_name(consumer)}) views {a.name}, which is written in place "
                                f"later (at {source_line(later[0]) or later[0].name}), across a boundary")
        before = [w for w in writes if here < self.order[w] < there]
        return before[-1] if before else self._after(a)

    def _used_from(self, view: fx.Node, key: int, when: int) -> bool:
        """Whether `view` or a view of it (the same storage) is used at or after graph position `when`."""
        stack, seen = [view], {view}
        while stack:
            for user in stack.pop().users:
                if user in seen:
                    continue
                seen.add(user)
                if self.order.get(user, len(self.order)) >= when:
                    return True
                if self.storage.get(user) == key:
                    stack.append(user)
        return False

    def _global(self, spec: SeqDim) -> int:
        return spec.outer * self.seq_len * spec.inner

    def local_size(self, spec: SeqDim) -> int:
        return spec.outer * self.local_len * spec.inner

    def _fix_edge(self, consumer: fx.Node, a: fx.Node, need: Optional[SeqDim], read_globally: bool = False) -> None:
        """read_globally: consumer reads a at global positions (a mask's descriptors, the model's own mask
        code): a sharded a is gathered for it."""
        have = self.place.get(a)
        if need == have:
            if need is None and a in self.needs_grad:
                self.grad_sums.append((consumer, a, self._anchor(a, consumer)))
            return
        if need is None and read_globally:
            consumer.replace_input_with(a, self._gather(a, have, f"{consumer.name} reads it at global positions",
                                                        consumer))
            return
        if need is None:
            raise ShardingError(f"{consumer.name} ({op_name(consumer)}) would combine the sharded {a.name} "
                                "with a dim that is not the sequence")
        source = a
        if have is not None:
            source = self._gather(a, have, f"{consumer.name} needs it sharded as {need}", consumer)
        anchor = self._anchor(source, consumer)
        key = (source, need, anchor)
        if key not in self.entered:
            self.entered[key] = self._enter(source, need, anchor)
            self.place[self.entered[key]] = need
        consumer.replace_input_with(a, self.entered[key])

    # -- boundary builders ------------------------------------------------------------------------
    def _spec_args(self, spec: SeqDim) -> tuple:
        return (spec.dim, spec.outer, spec.inner, self.seq_len, self.layout, self.group_name)

    def _after(self, node: fx.Node) -> fx.Node:
        """Where to insert a node computed from `node`: after it, or after the last graph input."""
        return [n for n in self.graph.nodes if n.op == "placeholder"][-1] if node.op == "placeholder" else node

    def _enter(self, node: fx.Node, spec: SeqDim, anchor: Optional[fx.Node] = None) -> fx.Node:
        """Replicated -> this rank's positions; an `arange` over the sequence becomes the positions. A value
        computed from the graph's inputs is checked to be the same on every rank as it enters."""
        check = node.name if node in self.from_inputs else ""
        if op_name(node) == "arange" and spec == SeqDim(0) and self._is_plain_arange(node):
            # positions are taken at run time by the op, never traced in as constants: a graph holding this
            # rank's positions would be handed to other ranks by Inductor's caches (keyed without the rank)
            check, why = "", "arange over the sequence: this rank's positions"
        else:
            why = "replicated value meets sharded work"
        with self.graph.inserting_after(anchor or self._after(node)):
            new = self.graph.call_function(torch.ops.burst.seq_shard.default,
                                           (node, *self._spec_args(spec), check, self.checks == "always"))
        self._record("shard", node, spec, 0, why)
        _same_value(new, node)
        return new

    def _is_plain_arange(self, node: fx.Node, length: Optional[int] = None) -> bool:
        """node is arange(start, start + length) (length: the sequence's by default)."""
        ends = [a for a in node.args if not isinstance(a, fx.Node)]
        if len(ends) != len(node.args) or not 1 <= len(ends) <= 2 or node.kwargs.get("step", 1) != 1:
            return False
        start = ends[0] if len(ends) == 2 else 0
        return ends[-1] - start == (self.seq_len if length is None else length)

    def _gather(self, a: fx.Node, spec: SeqDim, reason: str, consumer: fx.Node) -> fx.Node:
        if not isinstance(spec, SeqDim):  # its rows are no rank's positions: a gather would be silently wrong
            raise ShardingError(f"the rank-private {a.name} would be gathered for {consumer.name}")
        anchor = self._anchor(a, consumer)
        key = ("gathered", a, anchor)
        if key not in self.entered:
            with self.graph.inserting_after(anchor):
                g = self.graph.call_function(torch.ops.burst.seq_gather.default, (a, *self._spec_args(spec)))
            self.entered[key] = g
            _same_value(g, a)
            self.place[g] = None
            self._count_gather(a, spec, _nbytes(a), reason, consumer)  # example values are still the global ones
        return self.entered[key]

    def _count_gather(self, a: fx.Node, spec: SeqDim, nbytes: int, reason: str, consumer: fx.Node,
                      level: int = logging.WARNING) -> None:
        """A gather of a for consumer: its boundary, the counter, and one log line per source line and reason."""
        src = source_line(consumer)
        self._record("gather", a, spec, nbytes, reason, src)
        counters["burst"]["seq_gathers"] += 1
        if (src, reason) not in _logged:
            _logged.add((src, reason))
            log.log(level, "burst: sequence mode gathers %s (%d bytes per rank) before %s: %s%s", a.name, nbytes,
                    consumer.name, reason, f" (at {src})" if src else "")

    def _short_run(self, node: fx.Node, src: fx.Node, spec) -> Optional[tuple[int, int, tuple]]:
        """node = src[index] taking a run of at most half the tokens of src sharded as spec: (start, stop, the
        rest of the index); None for any other node."""
        if node.target is not operator.getitem or node.args[0] is not src or not isinstance(spec, SeqDim) \
                or (spec.outer, spec.inner) != (1, 1):
            return None
        cut = sequence_slice(shape(src), node.args[1], spec.dim, self.seq_len)
        return cut if cut is not None and 2 * (cut[1] - cut[0]) <= self.seq_len else None

    def _gather_slice(self, node: fx.Node, sharded) -> bool:
        """x[..., a:b, ...] taking a run of at most half the tokens of a sharded x (HF's sliding-window cache
        keeps the last window - 1 keys so): the run's rows alone are gathered (burst::seq_gather_rows), and the
        rest of the index applies to them. False (nothing done) for any other node, and for longer runs, which
        share x's one full gather with its other slices (`x[:, 1:] - x[:, :-1]`)."""
        if len(sharded) != 1:
            return False
        src, spec = sharded[0]
        cut = self._short_run(node, src, spec)
        if cut is None:
            return False
        start, stop, index = cut
        with self.graph.inserting_after(self._anchor(src, node)):
            rows = self.graph.call_function(torch.ops.burst.seq_gather_rows.default,
                                            (src, spec.dim, self.seq_len, self.layout, self.group_name, start, stop))
        rows.meta.update({k: v for k, v in src.meta.items() if k in ("stack_trace", "nn_module_stack")})
        rows.meta["example_value"] = value(src).narrow(spec.dim, start, stop - start)
        node.args = (rows, index)
        self.place[rows] = None
        self._count_gather(src, spec, _nbytes(rows), f"a slice of the sequence ({start}:{stop}): only its rows are "
                           "gathered", node, logging.INFO)
        return True

    def _gather_inputs(self, node: fx.Node, sharded, reason: str) -> None:
        for a, spec in sharded:
            node.replace_input_with(a, self._gather(a, spec, reason, node))

    def _record(self, kind, node, spec, nbytes, reason, src="") -> None:
        self.plan.boundaries.append(Boundary(kind, node.name, str(spec) if spec else "", nbytes, reason, src))

    def _reduce(self, node: fx.Node, sharded) -> None:
        """A reduction over the sharded sequence: local reduction + all-reduce (means over the global count)."""
        src, spec = sharded[0]
        name = op_name(node)
        if name == "cross_entropy":
            self._cross_entropy(node, src, spec)
        else:
            full = list(shape(src))
            full[spec.dim] = self._global(spec)
            count = math.prod(full[d] for d in reduced_dims(node))
            with self.graph.inserting_before(node):
                new = self.graph.call_function(sequence_ops.sharded_sum, (
                    src, self.group_name, arg(node, 1, "dim"), arg(node, 2, "keepdim", False),
                    float(count) if name == "mean" else 1.0))
            self._replace(node, new)
        self._record("reduce", src, spec, 0, f"{name} over the sequence: local {name} + all-reduce")
        self.place[node] = None

    def _cross_entropy(self, node: fx.Node, logits: fx.Node, spec: SeqDim) -> None:
        names = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction",
                 "label_smoothing")
        bound = dict(zip(names, node.args))
        bound.update(node.kwargs)
        reduction = bound.get("reduction", "mean")
        weight, smoothing = bound.get("weight"), bound.get("label_smoothing", 0.0)
        if bound.get("size_average") is not None or bound.get("reduce") is not None:
            raise ShardingError("cross_entropy with the deprecated size_average/reduce arguments")
        if reduction not in ("mean", "sum") or (weight is not None and smoothing):
            raise ShardingError(f"cross_entropy(reduction={reduction!r}, weight and label_smoothing together)")
        if spec.dim == 1:
            raise ShardingError("cross_entropy over a class dim that carries the sequence")
        if isinstance(weight, fx.Node) and weight in self.needs_grad:
            raise ShardingError("cross_entropy with class weights that require a gradient")
        target = bound["target"]
        tspec = SeqDim(spec.dim if spec.dim == 0 else spec.dim - 1, spec.outer, spec.inner)
        self._fix_edge(node, target, tspec)
        target = node.args[1] if len(node.args) > 1 else node.kwargs["target"]
        with self.graph.inserting_before(node):
            new = self.graph.call_function(sequence_ops.sharded_cross_entropy, (logits, target, self.group_name), {
                "weight": weight,
                "ignore_index": bound.get("ignore_index", -100), "reduction": reduction,
                "label_smoothing": smoothing})
        self._replace(node, new)

    def _replace(self, old: fx.Node, new: fx.Node) -> None:
        new.meta.update(old.meta)
        old.replace_all_uses_with(new)
        self.graph.erase_node(old)
        self.place[new] = None

    def _outputs(self, node: fx.Node) -> None:
        def fix(a, position=None):
            spec = self.place.get(a) if isinstance(a, fx.Node) else None
            if spec is None:
                return a
            if not isinstance(spec, SeqDim):
                raise ShardingError(f"the graph output {a.name} is rank-private ({spec})")
            full = _nbytes(a)
            if self.outputs in ("lazy", "local") and position is not None:
                self.plan.sharded_outputs[position] = spec
                self._record("output", a, spec, 0, "left sharded: gathered only if read (outputs='lazy')"
                             if self.outputs == "lazy" else "left local (outputs='local')")
                return a
            if full > GATHER_WARN_BYTES:
                log.warning("burst: sequence mode gathers the %.1f GiB output %s on every rank; compile with "
                            "options={'outputs': 'local'} to keep this rank's rows (burstc.shard_positions "
                            "relates them to tokens)", full / 2**30, a.name)
            with self.graph.inserting_before(node):
                g = self.graph.call_function(torch.ops.burst.seq_gather.default, (a, *self._spec_args(spec)))
            self._record("output_gather", a, spec, full, "graph output")
            return g

        results = node.args[0]
        if isinstance(results, (tuple, list)):
            node.args = (type(results)(fix(a, i) for i, a in enumerate(results)),) + tuple(node.args[1:])
        else:
            node.args = fx.node.map_arg(node.args, fix)

    def _leave_to_fsdp(self, inputs: list[fx.Node]) -> dict[tuple, fx.Node]:
        """FSDP2-managed parameters: no sum here, FSDP's reduction makes it (burstc.runtime.fsdp). Their uses
        by sharded work get the partial gradient's scale (returned as the views for those edges), every other
        use the scale of a gradient computed whole on every rank."""
        views = {}
        for a in dict.fromkeys(a for a in inputs if a in self.fsdp):
            with self.graph.inserting_after(self._after(a)):
                views[(a, self._after(a))] = self._grad_scale(a, self.fsdp[a].partial)
        for a, scales in self.fsdp.items():
            sharded_work = {c for c, x, _ in self.grad_sums if x is a} | set(views.values())
            others = [u for u in a.users if u not in sharded_work]
            if others and scales.whole != 1.0:
                with self.graph.inserting_after(self._after(a)):
                    whole = self._grad_scale(a, scales.whole)
                for u in others:
                    u.replace_input_with(a, whole)
        if self.fsdp:
            self._record("grad_sum", next(iter(self.fsdp)), None, 0, f"{len(self.fsdp)} FSDP2-managed parameters: "
                         "left to FSDP's reduction over the ranks (no all-reduce here)")
            counters["burst"]["seq_fsdp_params"] += len(self.fsdp)
        return views

    def _grad_scale(self, a: fx.Node, factor: float) -> fx.Node:
        """a, whose gradient is multiplied by factor (a itself for a factor of 1)."""
        if factor == 1.0:
            return a
        node = self.graph.call_function(sequence_ops.grad_scale, (a, factor))
        _same_value(node, a)
        return node

    def _bucket_grad_sums(self) -> None:
        """Parameters (graph inputs) needing a gradient sum go into one bucket after the last input;
        replicated intermediates (and inputs written in place) get their own, right after they are
        computed (after the writes their consumer sees)."""
        inputs = [a for _, a, _ in self.grad_sums if a.op in ("placeholder", "get_attr")
                  and not self.writes.get(self.storage.get(a))]
        views: dict[tuple, fx.Node] = self._leave_to_fsdp(inputs)
        bucket = [a for a in dict.fromkeys(inputs) if a not in self.fsdp]
        if bucket:
            last = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
            with self.graph.inserting_after(last):
                call = self.graph.call_function(sequence_ops.grad_sum, (self.group_name, *bucket))
            anchor = call
            for i, a in enumerate(bucket):
                with self.graph.inserting_after(anchor):
                    views[(a, self._after(a))] = anchor = self.graph.call_function(operator.getitem, (call, i))
                    _same_value(anchor, a)
            self._record("grad_sum", call, None, 0, f"{len(bucket)} replicated inputs: gradients summed over "
                                                     "the ranks in one all-reduce")
            counters["burst"]["seq_grad_sum_inputs"] += len(bucket)
        for consumer, a, after in self.grad_sums:
            if (a, after) not in views:
                with self.graph.inserting_after(after):
                    call = self.graph.call_function(sequence_ops.grad_sum, (self.group_name, a))
                with self.graph.inserting_after(call):
                    views[(a, after)] = self.graph.call_function(operator.getitem, (call, 0))
                    _same_value(views[(a, after)], a)
                self._record("grad_sum", a, None, 0, "replicated value with a gradient meets sharded work")
            consumer.replace_input_with(a, views[(a, after)])


class _AttentionRule:
    """A converted attention site: q, k, v, the output and a materialised mask's query rows are sharded
    along dim 2 ([B, H, N, d] / [B|1, H|1, N, N]); mask descriptors ([B, N] key padding, document ids)
    stay replicated: they are read at global key positions. Sink logits stay replicated too; every rank's
    rows use them, so their gradient is summed over the ranks."""

    def __init__(self, site):
        self.inputs = [site.query, site.key, site.value] + ([site.attn_mask] if site.attn_mask is not None else [])
        self.read_globally = [t for t in (site.key_padding, site.document_ids, *site.mask_buffers, *site.proof_buffers)
                              if isinstance(t, fx.Node)]
        self.replicated = [site.sinks] if isinstance(site.sinks, fx.Node) else []

    def inputs_for(self, out: SeqDim):
        if out != SeqDim(2):
            return None
        return {**{a: None for a in self.read_globally + self.replicated}, **{a: SeqDim(2) for a in self.inputs}}

    def output_for(self, a, spec: SeqDim):
        return SeqDim(2) if spec == SeqDim(2) else None


@dataclass
class _Private:
    """A node of a private region: its placement (LocalRows, LocalGroups; a SeqDim or None where the
    region ends sharded or replicated), how it is rewritten, and the placements it assumed for its inputs
    from outside the region (checked when it is visited)."""

    placement: object
    how: str = ""  # '', 'reduce' (local + all-reduce), 'count' (histc + all-reduce), 'arange' (made local)
    outside: dict = field(default_factory=dict)


_UNKNOWN = "not known to be replicated"
_ROW_EXITS = ("sum", "mean")
_ADD_AT = {"index_add", "index_add_", "scatter_add", "scatter_add_"}
_GROUPED_MM = {"grouped_mm_fallback", "_grouped_mm", "grouped_mm"}
_KEEPS_VALUES = {"view", "reshape", "flatten", "unsqueeze", "squeeze", "expand", "expand_as", "contiguous", "clone",
                 "detach", "to", "long", "int", "float", "double"}
_INDICES_OF = {"topk", "sort", "argsort", "max", "min", "argmax", "argmin", "cummax", "cummin"}


class _PrivateRegion:
    """The forward closure of a sort of this rank's slots (sort/argsort along the sequence of a 1-D sharded
    tensor: the flattened expert ids of an MoE dispatch), as a proof that sorting each rank's own slots
    instead of all of them is exact. Every node reading a rank-private tensor must be row-wise work on
    rows of one order (the token-wise rules, rows standing for tokens; replicated weights shared by all
    rows), a lookup (`x[perm // k]`: sharded rows picked by this rank's slot numbers; `W[ids]`), a grouped
    matmul over the sort's own group offsets (histc of its ascending values, cumsum), or an exit: rows
    put back in slot order by the inverse permutation (`inv[perm] = arange(n)`, `rows[inv]`), added into
    a sharded tensor at their tokens (index_add/scatter_add), summed or averaged over (all-reduced), or
    counted (histc, all-reduced). Each row then holds the value its slot has in the whole-sequence program,
    so every exit is that program's value on this rank. Anything else refuses the region with a reason."""

    def __init__(self, sharder: _Sharder, seed: fx.Node):
        self.s, self.seed = sharder, seed
        self.nodes: dict[fx.Node, _Private] = {}
        self.wants: dict[fx.Node, SeqDim] = {}  # factories the exits add into: made sharded

    def analyse(self):
        """self, or why the region is refused."""
        spec = self.s.place[self.seed.args[0]]
        self.nodes[self.seed] = _Private(self._sort_output(0 if op_name(self.seed) == "sort" else 1, spec))
        for node in list(self.s.graph.nodes)[self.s.order[self.seed] + 1:]:
            if not any(self._private(a) for a in node.all_input_nodes):
                continue
            if node.op == "output":
                return f"the graph output would be rank-private rows ({', '.join(a.name for a in node.all_input_nodes if self._private(a))})"
            found = self._step(node)
            if isinstance(found, str):
                return f"{node.name} ({op_name(node)}) {found}"
            self.nodes[node] = found
        return self

    def _private(self, a: fx.Node):
        """a's rank-private placement, or None."""
        entry = self.nodes.get(a)
        return entry.placement if entry is not None and isinstance(entry.placement, (LocalRows, LocalGroups)) else None

    def _sort_output(self, which: int, spec: SeqDim) -> LocalRows:
        """The seed's values (0) or indices (1): rows in the seed's order; the indices are slot numbers."""
        if which == 1:
            return LocalRows(0, spec, self.seed.name, "slots", spec)
        descending = arg(self.seed, 2, "descending", False)
        return LocalRows(0, spec, self.seed.name, "" if descending else "sorted")

    def _outside(self, a: fx.Node, want: Optional[SeqDim] = None):
        """The placement a node from outside the region has or will have: None (replicated), a SeqDim, or
        _UNKNOWN. A factory not placed yet takes `want` (any placement of a constant is exact)."""
        if a in self.s.place:
            return self.s.place[a]
        if want is not None and isinstance(self.s.rule(a), Factory):
            self.wants[a] = want
            return want
        return None if self._replicated_ahead(a) else _UNKNOWN

    def _replicated_ahead(self, a: fx.Node) -> bool:
        """a, not placed yet, will be replicated: nothing wants it sharded and all its inputs are replicated."""
        if a in self.s.place:
            return self.s.place[a] is None
        if a in self.s.want or a in self.nodes or self.s.writes.get(self.s.storage.get(a)):
            return False  # wanted sharded, or written in place (a factory then follows its writer)
        return all(self._replicated_ahead(b) for b in a.all_input_nodes)

    def _step(self, node: fx.Node):
        """node's _Private, or why it refuses the region."""
        name, src = op_name(node), node.args[0] if node.args else None
        if node.target is operator.getitem and src is self.seed:
            return _Private(self._sort_output(node.args[1], self.s.place[self.seed.args[0]]))
        if node.target is operator.getitem and tensor_index(node.args[1]) is not None:
            return self._lookup(src, tensor_index(node.args[1]))
        if name == "index_select" and arg(node, 1, "dim") in (0, -len(shape(src))):
            return self._lookup(src, arg(node, 2, "index"))
        if node.target is operator.setitem:
            return self._inverse(node)
        if name in _ADD_AT:
            return self._add_at(node)
        if name == "histc":
            return self._histc(node)
        counts = self._private(src) if isinstance(src, fx.Node) else None
        if name == "cumsum" and isinstance(counts, LocalGroups) and counts.kind == "counts" and arg(node, 1, "dim") in (0, -1):
            return _Private(LocalGroups(counts.order, "offsets"))
        if name in _GROUPED_MM:
            return self._grouped_mm(node)
        if any(isinstance(self._private(a), LocalGroups) for a in node.all_input_nodes):
            return "reads rank-private group counts"
        rows = self._private(src) if isinstance(src, fx.Node) else None
        if name in _ROW_EXITS and rows is not None and rows.dim in (reduced_dims(node) or ()) \
                and not set(node.kwargs) - {"dim", "keepdim"}:
            return _Private(None, "reduce")
        return self._rowwise(node)

    def _rowwise(self, node: fx.Node):
        """A token-wise op (shard_rules), applied to rows of one order and replicated operands."""
        rule = self.s.rule(node)
        rows = {a: self._private(a) for a in tensor_inputs(node) if self._private(a)}
        if rule is None:
            return "is not known to work row by row"
        if isinstance(rule, Factory):
            made = rows.get(rule.src)
            return _Private(replace(made, index="")) if rule.like and made else "is a factory sized by private rows"
        first = next(iter(rows.values()))
        out = None
        for a, r in rows.items():
            o = rule.output_for(a, r.rows())
            if (r.order, r.outer, r.inner) != (first.order, first.outer, first.inner) or o is None or out not in (None, o):
                return "combines rows of different orders, or mixes rows"
            out = o
        need = rule.inputs_for(out)
        target = mutated_input(node)
        if need is None or (out.outer, out.inner) != (first.outer, first.inner) or target is not None and target not in rows:
            return "has no row-wise form here (it regroups rows, or writes a tensor from outside)"
        outside = {}
        for a in tensor_inputs(node):
            if a in rows and need.get(a) != rows[a].rows():
                return f"reads {a.name} along another dim than its rows"
            if a in rows or a not in need:
                continue
            placed = self._outside(a)
            if need[a] is not None or placed is not None:
                return f"meets {a.name}, which is {placed or 'aligned to sequence positions'}"
            outside[a] = None
        index, of = self._index_after(node, first)
        return _Private(LocalRows(out.dim, first.space, first.order, index, of), outside=outside)

    def _index_after(self, node: fx.Node, rows: LocalRows) -> tuple[str, Any]:
        """What the values of node's result index: kept by views and conversions (slot and row numbers
        only in integer dtypes), slot numbers of a merged dim divided down to the outer slots (perm // k)."""
        v = value(node)
        name, dtype = op_name(node), (v[0] if isinstance(v, (tuple, list)) else v).dtype
        whole = not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
        if name in _KEEPS_VALUES and (rows.index == "sorted" or whole):
            return rows.index, rows.of
        k = node.args[1] if len(node.args) > 1 else None
        if name == "floordiv" and rows.index == "slots" and self._private(node.args[0]) is rows and \
                isinstance(k, int) and k > 0 and rows.of.inner % k == 0:
            return "slots", replace(rows.of, inner=rows.of.inner // k)
        return "", None

    def _lookup(self, table: fx.Node, ids: fx.Node):
        """table[ids] along dim 0 with 1-D ids."""
        rows, picked = self._private(ids), self._private(table)
        if not isinstance(rows, LocalRows) or len(shape(ids)) != 1:
            return f"picks rank-private rows by {ids.name}, which is not this rank's index"
        if picked is None:
            placed = self._outside(table)
            if placed is None:  # W[expert_ids]: a replicated table row per private row
                return _Private(LocalRows(0, rows.space, rows.order), outside={table: None})
            if isinstance(placed, SeqDim) and placed.dim == 0 and rows.index == "slots" and \
                    (placed.outer, placed.inner) == (rows.of.outer, rows.of.inner):  # x[perm // k]
                return _Private(LocalRows(0, rows.space, rows.order), outside={table: placed})
            return f"picks rows of {table.name} ({placed}) by {ids.name}, which does not number them"
        if picked.dim == 0 and rows.index == "rows" and rows.of == picked.order and rows.order == "" and \
                (picked.outer, picked.inner) == (rows.outer, rows.inner):  # back in slot order: sharded again
            return _Private(SeqDim(0, rows.outer, rows.inner))
        return f"reorders rank-private rows by {ids.name}, which is not the inverse of their order"

    def _inverse(self, node: fx.Node):
        """inv[perm] = arange(n): the inverse permutation of the seed's order, in slot order."""
        buf, perm, full = node.args
        made, rows = self._private(buf), self._private(perm)
        store = self.s.writes.get(self.s.storage.get(buf), [])
        if not (isinstance(made, LocalRows) and isinstance(rows, LocalRows) and rows.index == "slots" and rows.order
                and (rows.of.outer, rows.of.inner) == (rows.outer, rows.inner) and len(shape(perm)) == 1):
            return "writes rank-private rows other than an inverse permutation (inv[perm] = arange(n))"
        if not (isinstance(full, fx.Node) and op_name(full) == "arange" and len(full.args) == 1
                and self.s._is_plain_arange(full, self.s._global(rows))):
            return f"writes {getattr(full, 'name', full)}, not arange over the slots"
        if store != [node] or min(buf.users, key=self.s.order.get) is not node:
            return f"{buf.name} is read or written elsewhere around the inverse permutation"
        self.nodes[buf].placement = LocalRows(0, rows.space, "", "rows", rows.order)
        return _Private(None, "arange")

    def _add_at(self, node: fx.Node):
        """target.index_add_(0, slots, rows) / scatter_add_: rows added at the tokens they came from."""
        target, dim, ids, rows = node.args[0], arg(node, 1, "dim"), arg(node, 2, "index"), node.args[3] \
            if len(node.args) > 3 else node.kwargs.get("source", node.kwargs.get("src"))
        at, added = self._private(ids), self._private(rows) if isinstance(rows, fx.Node) else None
        scatter = op_name(node).startswith("scatter")
        if self._private(target) or dim not in (0, -len(shape(target))) or not (
                isinstance(at, LocalRows) and at.index == "slots" and isinstance(added, LocalRows)
                and (at.order, at.dim, added.dim) == (added.order, 0, 0)
                and (shape(ids) == shape(rows) if scatter else len(shape(ids)) == 1)):
            return "does not add rank-private rows at the slots they came from"
        want = SeqDim(0, at.of.outer, at.of.inner)
        placed = self._outside(target, want)
        if placed != want:
            return f"adds into {target.name}, which is {placed or 'replicated'}, not sharded as {want}"
        return _Private(want, outside={target: want})

    def _histc(self, node: fx.Node):
        """The seed's ascending values counted per group feed a grouped matmul (rank-private counts); any
        other histogram of private rows is a global count (local + all-reduce)."""
        rows = self._private(node.args[0])
        if not isinstance(rows, LocalRows) or not fixed_bins(node):
            return "counts rank-private counts, or bins read from the data's range (min == max)"
        if rows.index == "sorted":
            if not (arg(node, 2, "min", 0) <= 0 and _nonnegative(self.seed.args[0])):
                return "counts sorted values it cannot bound from below"
            return _Private(LocalGroups(rows.order, "counts"))
        return _Private(None, "count")

    def _grouped_mm(self, node: fx.Node):
        """grouped_mm(rows, weights, offs): each row times its group's weight, the groups being the sort's."""
        x, weight, offs = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "offs")
        rows, groups = self._private(x), self._private(offs) if isinstance(offs, fx.Node) else None
        if not (isinstance(rows, LocalRows) and rows.dim == 0 and isinstance(groups, LocalGroups)
                and groups == LocalGroups(rows.order, "offsets")) or set(tensor_inputs(node)) - {x, weight, offs}:
            return "groups rows by offsets that are not their own sort's"
        if self._outside(weight) is not None:
            return f"multiplies by {weight.name}, which is not replicated"
        return _Private(replace(rows, index=""), outside={weight: None})


def _nonnegative(node: fx.Node) -> bool:
    """node's values are indices (of topk/sort/argsort/max/...), through views and conversions."""
    while op_name(node) in _KEEPS_VALUES:
        node = node.args[0]
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        return op_name(node.args[0]) in _INDICES_OF and node.args[1] == 1
    return op_name(node) in ("argsort", "argmax", "argmin")


def _local_attention(query, key, value, *args, **kwargs):
    """The shape of a converted site's result on this rank's shards (its mask rows span all keys, which
    SDPA itself would reject on local shapes; the ring op takes them)."""
    return query.new_empty(*query.shape[:-1], value.shape[-1])


def _fake_like(mode, x: torch.Tensor) -> torch.Tensor:
    """mode's fake of x. A view, or a fake of another mode (Dynamo's, for an input that arrives sharded),
    becomes a fresh fake with x's metadata: mode.from_tensor replays how a view was made from its base,
    which fails for views of one buffer (FSDP2's unsharded parameters)."""
    from torch._subclasses.fake_tensor import FakeTensor

    if not isinstance(x, FakeTensor) and not x._is_view():
        return mode.from_tensor(x)
    with mode:
        fake = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    return fake.requires_grad_(x.requires_grad) if x.is_floating_point() or x.is_complex() else fake


def _check_local_shapes(gm: fx.GraphModule, example_inputs, place: dict, local_size, sites=()) -> None:
    """Run the rewritten graph on fake tensors: every op must accept the local shapes, and every sharded
    tensor must have its local size on its sequence dim. `sites` (converting attention nodes) run as
    the ring op will."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [_fake_like(mode, x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    targets = {node: node.target for node in sites}
    try:
        for node in sites:
            node.target = _local_attention
        FakeTensorProp(gm, mode).propagate(*fakes)
    except Exception as e:  # noqa: BLE001 - any failure means the local program is not valid
        raise ShardingError(f"the sharded graph does not run on local shapes: {type(e).__name__}: {e}") from e
    finally:
        for node, target in targets.items():
            node.target = target
    for node in gm.graph.nodes:
        spec = place.get(node)
        val = node.meta.get("val")
        if isinstance(spec, (SeqDim, LocalRows)) and isinstance(val, torch.Tensor) and \
                int(val.shape[spec.dim]) != local_size(spec):
            raise ShardingError(f"{node.name} has {val.shape[spec.dim]} rows on its sequence dim, expected "
                                f"{local_size(spec)}")


def shard_graph(gm: fx.GraphModule, example_inputs, plans: list[SitePlan], *, layout: str, world_size: int,
                rank: int, group_name: str, outputs: str = "gathered", check_shapes: bool = True,
                arriving: Optional[dict[fx.Node, SeqDim]] = None, arriving_len: Optional[int] = None,
                fsdp: Optional[dict[fx.Node, FsdpScales]] = None, checks: str = "once") -> ShardingPlan:
    """Partition gm (in place) along the sequence of its converting attention sites (and of its inputs that
    arrive as shards: `arriving`, over a sequence of arriving_len tokens); raises ShardingError (gm then
    unusable: pass a copy) when that cannot be done exactly. outputs: the option (what sharded outputs
    become). check_shapes=False skips the fake-tensor run of the result (it needs the process group:
    `explain` plans without one). example_inputs hold the local shards of arriving inputs. fsdp: inputs whose
    gradient FSDP2 reduces over the ranks, with the scales burst applies instead of its own sum."""
    converting = [p for p in plans if p.converts]
    lengths = {p.seq_len for p in converting} | ({arriving_len} if arriving else set())
    if len(lengths) != 1:
        raise ShardingError(f"the attention sites have sequence lengths {sorted(map(str, lengths))}; sequence "
                            "mode shards one sequence per graph")
    seq_len = lengths.pop()
    if not isinstance(seq_len, int):
        raise ShardingError(f"the sequence length is symbolic ({seq_len}); sequence mode needs static shapes "
                            "(compile with dynamic=False, or mark the batch dynamic but not the sequence)")
    if seq_len < chunk_count(layout, world_size):
        raise ShardingError(f"{seq_len} tokens are fewer than the {chunk_count(layout, world_size)} chunks of "
                            f"the {layout} layout on {world_size} ranks")
    sharder = _Sharder(gm, converting, seq_len, layout, world_size, rank, group_name, outputs,
                       requires_grad(gm, example_inputs), arriving, fsdp, checks)
    plan = sharder.run()
    unsharded = [p.site.name for p in converting if sharder.place.get(p.site.node) != SeqDim(2)]
    if unsharded:  # the rewrite makes them local attention: it must get this rank's shards
        raise ShardingError(f"attention {', '.join(unsharded)} is not sharded along the sequence")
    if not check_shapes:
        return plan
    _check_local_shapes(gm, example_inputs, sharder.place, sharder.local_size, [p.site.node for p in converting])
    for p in converting:  # the rewrite reads the sites' inputs: some are now boundary ops
        rebind(p.site)
    for node in gm.graph.nodes:  # later passes read example values: give them the local ones
        if "val" in node.meta and "example_value" in node.meta:
            node.meta["example_value"] = node.meta["val"]
    history.append(plan)
    counters["burst"]["seq_graphs"] += 1
    counters["burst"]["seq_sharded_tensors"] += len(plan.sharded)
    return plan


def shard_copy(gm: fx.GraphModule, example_inputs, cfg: BurstConfig, *, world_size: int, rank: int,
               group_name: str, check_shapes: bool = True, arriving: Optional[dict[str, SeqDim]] = None,
               arriving_len: Optional[int] = None, layout: Optional[str] = None,
               fsdp: Optional[dict[int, FsdpScales]] = None) -> tuple[fx.GraphModule, list[SitePlan], ShardingPlan]:
    """(a sharded copy of gm, the site plans of that copy, the ShardingPlan); gm itself is left as it was,
    so a ShardingError leaves the caller free to compile gm attention-parallel. arriving: placeholder
    name -> SeqDim of the inputs that arrive sharded; layout: theirs, when no attention says it; fsdp:
    input position -> scales of the FSDP2-managed parameters (burstc.runtime.fsdp)."""
    work = copy_graph(gm)
    fuse_windows(work)
    plans = plan_sites(find_attention_sites(work), cfg, world_size)
    layout = plans[0].layout if plans else layout or cfg.layout  # plan_sites made an 'auto' layout concrete
    by_name = {n.name: n for n in work.graph.find_nodes(op="placeholder")}
    sharding = shard_graph(work, example_inputs, plans, layout=layout, world_size=world_size, rank=rank,
                           group_name=group_name, outputs=cfg.outputs, check_shapes=check_shapes,
                           arriving={by_name[name]: spec for name, spec in (arriving or {}).items()},
                           arriving_len=arriving_len,
                           fsdp={p: scales for i, p in enumerate(by_name.values()) if (scales := (fsdp or {}).get(i))},
                           checks=cfg.checks)
    return work, plans, sharding
