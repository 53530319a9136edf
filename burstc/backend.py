"""The torch.compile backend "burst": the pass pipeline over Dynamo's graph, then the inner compiler.

    inline checkpoint regions -> canonicalize (hand-written attention -> SDPA), autocast's casts, masks and
    shifted losses, in the graph and every higher-order op's body
    -> find_attention -> plan -> [shard] -> rewrite -> inner compiler

In sequence mode (the default on more than one rank) the shard pass partitions the whole graph along the
sequence; where it cannot do so exactly, the graph keeps attention-parallel mode and the reason is logged.

Registered as the `torch_dynamo_backends` entry point `burst`, so `torch.compile(model,
backend="burst")` needs no import; `burstc.backend.burst_backend` is the same callable.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.fx as fx
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass

from burstc.codegen import sources_for_sites
from burstc.config import BurstConfig
from burstc.debug.dump import CompilationDump
from burstc.debug.dump import log as dump_log
from burstc.passes.find_attention import find_attention_sites
from burstc.passes.pipeline import front_passes
from burstc.passes.plan import plan_sites
from burstc.passes.rewrite import report_attention_in_bodies, report_unconverted_softmax, rewrite_sites
from burstc.passes.selective_checkpoint import SelectivePolicies, has_selective_regions
from burstc.passes.shard import ShardingError, shard_copy
from burstc.passes.specialize import per_shape
from burstc.runtime.fsdp import fsdp_scales
from burstc.runtime.graph_boundary import GraphBoundary, arriving_shards
from burstc.runtime.sequence_shard import ShardSpec

log = logging.getLogger("burstc.backend")
_graph_ids = itertools.count()

# A Python side effect inside an activation-checkpoint region (transformers >= 5.25 routes layers through the
# hub `kernels` package, which sets a context variable there) makes Dynamo refuse to trace the region: a graph
# break, after which torch.utils.checkpoint runs it eagerly, its attention unseen by burst (neither converted
# nor counted). In a compiled graph such a side effect runs once, at trace time, whatever the recompute does,
# and burst compiles checkpoint regions into its graphs (passes/higher_order.py): so Dynamo may trace them.
# Loading the backend (torch.compile(backend="burst") does) sets this for the process.
if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True


def _world(cfg: BurstConfig) -> tuple[int, str]:
    """(world size of the ring's group, the group's name for the op; '' is the default group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, ""
    return dist.get_world_size(cfg.group), (cfg.group.group_name if cfg.group is not None else "")


def inner_compile(gm: fx.GraphModule, example_inputs, inner: str, mode=None, rank_key: str = "") -> Callable:
    """The inner compiler over the rewritten graph. rank_key names this rank in the group: it is part of
    Inductor's cache keys, so a compiled graph never serves another rank."""
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    patches = torch._inductor.list_mode_options(mode) if mode else {}
    # Inductor's peak-memory reordering depends on buffer sizes and moves extern kernels past each other:
    # ranks with uneven shards then run their collectives in different orders (burstc.runtime.ordering)
    patches["reorder_for_peak_memory"] = False
    if torch._inductor.config.post_grad_custom_post_pass is None:  # never replace a user's pass
        patches["post_grad_custom_post_pass"] = OpsVersion(rank_key)
    if has_selective_regions(gm):
        if torch._inductor.config.joint_custom_pre_pass is None:
            patches["joint_custom_pre_pass"] = SelectivePolicies()
        else:
            log.warning("burst: Inductor's joint_custom_pre_pass is taken, so the selective checkpoint policies "
                        "of this graph are not asked: their regions recompute every op")
    return compile_fx(gm, example_inputs, config_patches=patches)


class OpsVersion(CustomGraphPass):
    """A post-grad pass that changes nothing: its uuid is the schemas of burstc's ops and the rank, so
    Inductor's caches (FX graph, AOTAutograd) never hand this version of burstc a graph compiled against
    another version's ops (a backward graph calling an op whose arguments changed fails at run time), nor
    one rank's graph to another (a value traced in on one rank would be wrong on the other)."""

    def __init__(self, rank_key: str = ""):
        self.rank_key = rank_key

    def __call__(self, graph: fx.Graph) -> None:
        return None

    def uuid(self) -> str:
        schemas = sorted(str(s) for s in torch._C._jit_get_all_schemas() if s.name.startswith("burst::"))
        return hashlib.sha256("\n".join([self.rank_key, *schemas]).encode()).hexdigest()


def _dump_dir(cfg: BurstConfig):
    """The dump_dir option, else a `burst/` folder beside Inductor's under TORCH_COMPILE_DEBUG=1."""
    if cfg.dump_dir or os.environ.get("TORCH_COMPILE_DEBUG") != "1":
        return cfg.dump_dir
    return os.path.join(torch._dynamo.utils.get_debug_dir(), "burst")


def _dump_wanted(cfg: BurstConfig) -> bool:
    """Dumps cost a little per compile: only when asked for (dump_dir, TORCH_COMPILE_DEBUG,
    TORCH_TRACE, DEBUG logs)."""
    return bool(_dump_dir(cfg) or os.environ.get("TORCH_TRACE") or dump_log.isEnabledFor(logging.DEBUG))


def burst_backend(gm: fx.GraphModule, example_inputs, **kwargs) -> Callable:
    """torch.compile backend: rewrite attention into burst attention, compile the rest."""
    cfg = BurstConfig.from_options(kwargs.get("options"))
    counters["burst"]["graphs"] += 1
    world_size, group_name = _world(cfg)
    graph_id = f"g{next(_graph_ids)}"
    rank = dist.get_rank(cfg.group) if dist.is_available() and dist.is_initialized() else 0
    dump = CompilationDump(graph_id, rank, world_size, _dump_dir(cfg)) if _dump_wanted(cfg) else None
    if dump:
        dump.add_graph("dynamo", gm)
    gm = front_passes(gm, example_inputs, selective=cfg.inner == "inductor")
    unconverted = report_unconverted_softmax(gm) + report_attention_in_bodies(gm)
    if dump:
        dump.add_graph("canonicalize", gm)
        if unconverted:
            dump.add_text("unconverted.md", "# attention left as it is (runs whole on every rank)\n\n"
                          + "\n".join(f"- {where}: {why}" for where, why in unconverted) + "\n")
    plans = plan_sites(find_attention_sites(gm), cfg, world_size)
    target = _Target(cfg, world_size, rank, group_name, graph_id, kwargs.get("mode"), len(unconverted))
    if cfg.sequence_mode(world_size) and any(p.converts and not isinstance(p.seq_len, int) for p in plans):
        # the shard pass needs static sizes: compile a sequence-parallel graph per distinct input shape
        log.info("burst: graph %s has a dynamic sequence length: sequence mode compiles it once per length",
                 graph_id)
        return per_shape(lambda static_gm, args: target.compile(static_gm, args, None), gm)
    return target.compile(gm, example_inputs, dump, plans)


@dataclass(frozen=True)
class _Target:
    """Where and how a graph is compiled: the config, the ring's group and this rank."""

    cfg: BurstConfig
    world_size: int
    rank: int
    group_name: str
    graph_id: str
    mode: Optional[str]
    left_unplanned: int = 0  # attention left before planning: unconverted softmax, bodies of higher-order ops

    def compile(self, gm, example_inputs, dump, plans=None) -> Callable:
        """shard (in sequence mode) -> rewrite -> the inner compiler, for a canonicalized graph; a sharded
        graph the inner compiler rejects falls back to attention-parallel mode. Inputs that arrive as
        SequenceShards are taken as they are where the graph is partitioned alike, else gathered."""
        cfg = self.cfg
        plans = plans if plans is not None else plan_sites(find_attention_sites(gm), cfg, self.world_size)
        arriving = arriving_shards(gm)
        if cfg.sequence_mode(self.world_size):
            takes = self._takes(arriving, plans)
            if any(p.converts for p in plans) or takes:
                boundary = GraphBoundary(gm, example_inputs, takes, set(arriving) - set(takes))
                sharded, sharded_plans, sharding = _sequence_parallel(gm, boundary, plans, self)
                if sharding is not None:
                    if dump:
                        dump.add_graph("shard", sharded)
                        dump.add_text("sharding.md", sharding.table())
                    try:
                        compiled = self._finish(sharded, boundary.example_inputs, dump, sharded_plans, "sequence")
                    except Exception as e:  # noqa: BLE001 - exact fallback, logged
                        counters["burst"]["seq_fallbacks"] += 1
                        log.warning("burst: graph %s stays attention-parallel: the %s compiler failed on the "
                                    "sharded graph (%s: %s); this is a burstc bug, please report it",
                                    self.graph_id, cfg.inner, type(e).__name__, e)
                    else:
                        return boundary.wrap(compiled, self._lazy_outputs(sharding))
        boundary = GraphBoundary(gm, example_inputs, {}, set(arriving))
        return boundary.wrap(self._finish(gm, boundary.example_inputs, dump, plans, "attention-parallel"), {})

    def _takes(self, arriving: dict[int, ShardSpec], plans) -> dict[int, ShardSpec]:
        """The arriving shards this graph takes as they are: split over this group like its own sequence
        (the length and layout of its converting attention, else of the first shard)."""
        converting = [p for p in plans if p.converts]
        if converting:
            length, layout = converting[0].seq_len, converting[0].layout
        elif arriving:
            first = next(iter(arriving.values()))
            length, layout = first.seq_len, first.layout
        else:
            return {}
        return {i: spec for i, spec in arriving.items()
                if (spec.seq_len, spec.layout, spec.group_name) == (length, layout, self.group_name)}

    def _lazy_outputs(self, sharding) -> dict[int, ShardSpec]:
        """The sharded outputs that leave as SequenceShards (outputs='lazy'; 'local' leaves plain shards)."""
        if self.cfg.outputs != "lazy":
            return {}
        return {i: ShardSpec(d.dim, d.outer, d.inner, sharding.seq_len, sharding.layout, self.group_name)
                for i, d in sharding.sharded_outputs.items()}

    def _finish(self, gm, example_inputs, dump, plans, mode: str) -> Callable:
        gm = rewrite_sites(gm, plans, self.cfg, self.group_name, self.graph_id, local=mode == "sequence")
        if dump:
            dump.add_graph("rewrite", gm)
            dump.add_plans(plans, sources_for_sites(plans))
            dump.write()
        log.info("burst: graph %s: %d attention site(s) converted, %d left, world size %d, %s mode", self.graph_id,
                 sum(p.converts for p in plans), sum(not p.converts for p in plans) + self.left_unplanned,
                 self.world_size, mode)
        return inner_compile(gm, example_inputs, self.cfg.inner, self.mode,
                             rank_key=f"rank {self.rank} of {self.world_size} in group '{self.group_name}'")


def _sequence_parallel(gm, boundary: GraphBoundary, plans, target: _Target):
    """(graph, plans, ShardingPlan) partitioned along the sequence, or the graph unchanged with sharding None
    (attention-parallel mode) and the reason logged when the shard pass cannot do it exactly."""
    graph_id = target.graph_id
    try:
        work, work_plans, sharding = shard_copy(
            gm, boundary.example_inputs, target.cfg, world_size=target.world_size, rank=target.rank,
            group_name=target.group_name, arriving=boundary.arriving_dims(), arriving_len=boundary.seq_len,
            layout=boundary.layout, fsdp=fsdp_scales(boundary.example_inputs, target.cfg.group))
    except Exception as e:  # noqa: BLE001 - a graph eager accepts must still compile: fall back, exactly
        counters["burst"]["seq_fallbacks"] += 1
        why = str(e) if isinstance(e, ShardingError) else (
            f"the shard pass failed ({type(e).__name__}: {e}); this is a burstc bug, please report it with "
            "the graph dump (options={'dump_dir': ...})")
        log.warning("burst: graph %s stays attention-parallel (every rank runs the whole sequence outside "
                    "attention): %s", graph_id, why)
        return gm, plans, None
    log.info("burst: graph %s is sequence-parallel: %d tensors sharded, %d boundaries\n%s", graph_id,
             len(sharding.sharded), len(sharding.boundaries), sharding.table())
    return work, work_plans, sharding


def convert(model, *, fullgraph: bool = False, dynamic=None, **options):
    """`torch.compile(model, backend="burst", options=options)`: every attention of the model becomes
    burst attention over the default process group (or options['group'])."""
    BurstConfig.from_options(options)  # fail early on a bad option
    return torch.compile(model, backend=burst_backend, fullgraph=fullgraph, dynamic=dynamic,
                         options=options or None)
