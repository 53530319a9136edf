"""explain: what `backend="burst"` would do to a model on G ranks, without running anything distributed.

    python -m burstc explain module.path:factory --world-size 8 --seq-len 32768

`factory(seq_len)` returns `(model, example_args)`. The model is traced by Dynamo on fake inputs (no
compute, any length), the pass pipeline plans for G ranks (a number: no process group is created), and the
report lists every attention site: converted or left (and why), its plan, the work and bytes of each rank
(min / median / max) and an estimate of each rank's attention working memory against one device's; `--full`
adds each site's steps x ranks table and every pair's work items (G^2 lines per site).
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from burstc.config import BurstConfig
from burstc.debug.render import plan_report, site_ring
from burstc.passes.canonicalize import canonicalize_result
from burstc.passes.find_attention import find_attention_sites
from burstc.passes.higher_order import attention_in_bodies, describe, graphs
from burstc.passes.pipeline import front_passes
from burstc.passes.plan import SitePlan, plan_sites
from burstc.passes.shard import ShardingError, ShardingPlan, shard_copy
from burstc.schedule.cost import AttentionShape
from burstc.schedule.layout import local_padded_length


def load_factory(spec: str) -> Callable:
    """'package.module:function' -> the function."""
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"expected module.path:factory, got {spec!r}")
    return getattr(importlib.import_module(module), name)


def trace_plans(model, args, cfg: BurstConfig, world_size: int, shardings: Optional[list] = None,
                unrecognised: Optional[list] = None) -> list[SitePlan]:
    """Run Dynamo on fake copies of args and the burst passes with G simulated ranks; in sequence mode
    the ShardingPlan of rank 0 of each graph is appended to `shardings` (or the reason it has none);
    attention left before planning (softmax canonicalize could not rewrite, attention inside a higher-order
    op's body) goes to `unrecognised` as (location, reason). The passes are the backend's own
    (burstc.passes.pipeline.front_passes)."""
    captured: list[SitePlan] = []

    def capture(gm, example_inputs):
        gm = front_passes(gm, example_inputs, selective=cfg.inner == "inductor")
        if unrecognised is not None:
            for graph in graphs(gm):
                unrecognised.extend((s.location, s.reason) for s in getattr(canonicalize_result(graph), "skipped", []))
            unrecognised.extend((describe(node), why) for node, why in attention_in_bodies(gm))
        plans = plan_sites(find_attention_sites(gm), cfg, world_size)
        captured.extend(plans)
        if shardings is not None and cfg.sequence_mode(world_size) and any(p.converts for p in plans):
            try:
                shardings.append(shard_copy(gm, example_inputs, cfg, world_size=world_size, rank=0, group_name="",
                                            check_shapes=False)[2])
            except ShardingError as e:
                shardings.append(f"stays attention-parallel: {e}")
        return gm.forward

    torch._dynamo.reset()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        torch.compile(model, backend=capture)(*fake_args)
    torch._dynamo.reset()
    return captured


def attention_memory(shape: AttentionShape, rows: int, ring: bool) -> int:
    """Bytes of one attention's working set on a rank holding `rows` rows: q, k, v, out (input dtype),
    the fp32 running state (out + lse), and for a ring two K/V receive buffers."""
    e, a, b, d = shape.itemsize, shape.acc_itemsize, shape.batch, shape.head_dim
    tensors = b * rows * d * e * (2 * shape.heads_q + 2 * shape.heads_kv)
    state = b * rows * shape.heads_q * (d + 1) * a
    buffers = 2 * b * rows * 2 * shape.heads_kv * d * e if ring else 0
    return tensors + state + buffers


def sharding_summary(plan: ShardingPlan) -> list[str]:
    """The sequence-mode part of the report: what is sharded, every boundary, the memory estimate."""
    local, full = plan.activation_bytes()
    lines = [f"## sequence mode (rank 0 of {plan.world_size}: {plan.local_len} of {plan.seq_len} tokens)",
             f"{len(plan.sharded)} of {len(plan.tensors)} tensors sharded; every tensor of the graph together "
             f"(an upper bound on activation memory): {local / 2**20:.1f} MiB per rank against {full / 2**20:.1f} MiB "
             f"on one device ({local / max(full, 1):.2f}x)", ""]
    return lines + plan.boundary_table() + [""]


def explain(model, args, *, world_size: int, seq_len: int, cfg: BurstConfig, full: bool = False) -> str:
    """The report; full adds each site's steps x ranks table and every pair's work items (G^2 lines)."""
    shardings: list = []
    unrecognised: list = []
    plans = trace_plans(model, args, cfg, world_size, shardings, unrecognised)
    mode = "sequence" if cfg.sequence_mode(world_size) else "attention-parallel"
    layout = plans[0].layout if plans else cfg.layout
    nodes = next((f" in {world_size // p.node_size} nodes of {p.node_size}" for p in plans if p.node_size), "")
    lines = [f"burst explain: {len(plans)} attention site(s), G={world_size} ranks{nodes}, N={seq_len}, "
             f"layout {layout}, {mode} mode", ""]
    for sharding in shardings:
        lines += sharding_summary(sharding) if isinstance(sharding, ShardingPlan) else [f"graph {sharding}", ""]
    for plan in plans:
        site = plan.site
        where = f" ({site.source})" if site.source else ""
        if not plan.converts:
            lines += [f"## site {site.name}: left as plain SDPA{where}", f"reason: {plan.reason}", ""]
            continue
        q, k = site.tensor("query"), site.tensor("key")
        n = int(q.shape[2])
        ring, ring_shape = site_ring(plan, world_size, n, int(q.shape[0]))
        rows = local_padded_length(n, plan.layout, world_size)
        shape = AttentionShape(int(q.shape[0]), int(q.shape[1]), int(k.shape[1]), int(q.shape[3]), rows,
                               world_size, q.dtype)
        single = AttentionShape(int(q.shape[0]), int(q.shape[1]), int(k.shape[1]), int(q.shape[3]), n, 1, q.dtype)
        mine, alone = attention_memory(shape, rows, world_size > 1), attention_memory(single, n, False)
        notes = [f"source: {site.source or '(no stack trace)'}",
                 f"attention working memory per rank ~{mine / 2**20:.1f} MiB vs {alone / 2**20:.1f} MiB on one "
                 f"device ({mine / alone:.2f}x)"]
        if plan.schedule_note:
            notes.append(plan.schedule_note)
        lines.append(plan_report(ring, ring_shape, title=f"site {site.name}: converted", scale=plan.scale,
                                 scheme=plan.backward, notes=notes, predictions=plan.predictions, full=full))
    for where, why in unrecognised:
        lines += [f"## attention at {where}: left as it is (runs whole on every rank)", f"reason: {why}", ""]
    left = [p for p in plans if not p.converts]
    lines.append(f"summary: {len(plans) - len(left)} converted, {len(left)} left as SDPA"
                 + (f", {len(unrecognised)} softmax attention not converted" if unrecognised else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m burstc explain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("factory", help="module.path:factory, factory(seq_len) -> (model, example_args)")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--layout", default=None, help="contiguous, zigzag (default) or striped")
    p.add_argument("--backward", default=None, help="auto (default), query_ring or kv_ring")
    p.add_argument("--parallel", default=None, help="auto (default: sequence), sequence or attention")
    p.add_argument("--schedule", default=None, help="auto (default), ring, double_ring or ulysses_ring")
    p.add_argument("--node-size", type=int, default=None, help="ranks per node (default: one node)")
    p.add_argument("--full", action="store_true",
                   help="also each site's steps x ranks table and every pair's work items (G^2 lines per site)")
    a = p.parse_args(argv)
    options = {k: v for k, v in (("layout", a.layout), ("backward", a.backward), ("parallel", a.parallel),
                                 ("schedule", a.schedule), ("node_size", a.node_size)) if v}
    cfg = BurstConfig.from_options(options)
    model, args = load_factory(a.factory)(a.seq_len)
    print(explain(model, args, world_size=a.world_size, seq_len=a.seq_len, cfg=cfg, full=a.full))
    return 0

