"""plan: per attention site, decide whether it converts exactly and with what ring (layout, backward
scheme and schedule over the nodes by the cost model, sizes as sympy expressions when the sequence
length is dynamic); sites that cannot convert get the reason. The graph is not changed."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Optional

import sympy
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from burstc.config import BurstConfig
from burstc.passes.find_attention import AttentionSite
from burstc.runtime.attention import group_members
from burstc.schedule import cost, predict
from burstc.schedule.layout import chunk_count
from burstc.schedule.masks import window_is_bounded
from burstc.schedule.topology import topology_for

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class SitePlan:
    site: AttentionSite
    reason: Optional[str] = None  # why the site stays plain SDPA; None: it converts
    causal: bool = False
    scale: Optional[float] = None
    enable_gqa: bool = False
    layout: str = "zigzag"
    backward: str = "auto"  # the requested scheme; auto: each call picks the cheaper on its plan
    seq_len: object = None  # int or sympy expression
    cost: dict = field(default_factory=dict)  # cost.describe() of the per-rank shape
    schedule: str = "auto"  # what the op is asked for: the option, or auto where the option cannot run here
    node_size: int = 0  # the group's ranks per node, for reports (0: one node); the op gets the option
    # the schedule the cost model picks at the compile-time size, every schedule's Prediction, and a
    # note when the requested schedule cannot run at this site
    predicted: Optional[str] = None
    predictions: dict = field(default_factory=dict)
    schedule_note: Optional[str] = None

    @property
    def converts(self) -> bool:
        return self.reason is None


def _expr(size) -> object:
    """int, or the sympy expression of a SymInt."""
    return size.node.expr if isinstance(size, torch.SymInt) else int(size)


def _specialized(value):
    """A constant argument, or the current value of a symbolic scalar (dynamic=True turns module
    float attributes into SymFloats) with a guard installed on it, so a later different value
    recompiles instead of being ignored. None when the value is a tensor or unknown."""
    if isinstance(value, fx.Node):
        value = value.meta.get("example_value")
    if isinstance(value, torch.SymFloat):
        return float(value)
    if isinstance(value, torch.SymBool):
        return bool(value)
    return value if isinstance(value, (bool, int, float)) or value is None else None


def _is_zero(value) -> bool:
    value = _specialized(value)
    return isinstance(value, (int, float)) and value == 0


def plan_site(site: AttentionSite, cfg: BurstConfig, world_size: int) -> SitePlan:
    leave = lambda why: SitePlan(site, reason=why)  # noqa: E731
    if any(site.matches(entry) for entry in cfg.exclude):
        return leave("excluded by the 'exclude' option")
    q, k, v = site.tensor("query"), site.tensor("key"), site.tensor("value")
    if q is None or k is None or v is None:
        return leave("Dynamo recorded no example values for q/k/v")
    if not _is_zero(site.dropout_p):
        return leave(f"dropout_p={site.dropout_p} (training-mode dropout cannot be reproduced across the ring)")
    for name, value in (("is_causal", site.is_causal), ("enable_gqa", site.enable_gqa)):
        if not isinstance(value, bool):
            return leave(f"{name} is computed at run time ({value}), not a constant")
    scale = _specialized(site.scale)
    if site.scale is not None and not isinstance(scale, (int, float)):
        return leave(f"scale is computed at run time ({site.scale}), not a constant")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return leave(f"tensors are not 4-D [batch, heads, seq, dim] (q is {q.dim()}-D)")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        return leave(f"dtype {q.dtype}/{k.dtype}/{v.dtype} is not one floating dtype burst supports")
    if not statically_known_true(q.shape[2] == k.shape[2]):
        return leave("query and key lengths may differ (cross-attention or a KV cache), not one sharded sequence")
    if not statically_known_true(v.shape[3] == q.shape[3]):
        return leave("value head dim differs from the query's")
    if site.node.meta.get("burst_leave"):
        return leave(site.node.meta["burst_leave"])
    if site.attn_mask is not None:
        why = _dense_mask_problem(site.attn_mask, q)
        if why:
            return leave(why)
    if not all(_broadcasts(t.shape[0], q.shape[0], k.shape[0], v.shape[0]) for t in (q, k, v)):
        return leave(f"batch sizes {q.shape[0]}/{k.shape[0]}/{v.shape[0]} of q/k/v do not broadcast")
    # head counts and head dim specialise (int() guards on them): kernels and costs depend on them
    heads_q, heads_kv, head_dim = int(q.shape[1]), int(k.shape[1]), int(q.shape[3])
    if int(v.shape[1]) != heads_kv:
        return leave(f"k has {heads_kv} heads and v {int(v.shape[1])}")
    # SDPA broadcasts one key/value head over every query head (grouped-query attention with one group)
    # and one query head over the key/value heads (the rewrite expands the query: a local view)
    enable_gqa = site.enable_gqa or heads_kv == 1
    heads_q = max(heads_q, heads_kv) if heads_q == 1 else heads_q
    if heads_q % heads_kv or (heads_q != heads_kv and not enable_gqa):
        return leave(f"{heads_q} query heads over {heads_kv} key/value heads without enable_gqa")
    seq_len = _expr(q.shape[2])
    chunks = chunk_count(cfg.layout, world_size)
    local_rows = sympy.ceiling(sympy.sympify(seq_len) / chunks) * chunks / world_size
    shape = cost.AttentionShape(batch=_expr(q.shape[0]), heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim,
                                local_rows=local_rows, world_size=world_size, dtype=q.dtype)
    plan = SitePlan(site, causal=site.is_causal, scale=None if scale is None else float(scale),
                    enable_gqa=enable_gqa, layout=cfg.layout, backward=cfg.backward,  # auto: each call decides
                    seq_len=seq_len, cost=cost.describe(shape))
    return _with_schedule(plan, cfg, shape, q.shape[2], world_size)


def _with_schedule(plan: SitePlan, cfg: BurstConfig, shape: cost.AttentionShape, seq_size, world_size: int) -> SitePlan:
    """The site's schedule: the option where it can run here (else auto, noted), and the cost
    model's pick and predictions at the compile-time sequence length (the runtime picks per call,
    the same way, at the actual length)."""
    topology = topology_for(world_size, cfg.node_size, cfg.links(), members=group_members(cfg.group, world_size))
    plan.node_size = topology.node_size if topology.nodes > 1 else 0
    plan.schedule = cfg.schedule
    hint = _hint(seq_size)
    if world_size == 1 or hint is None:
        return plan
    chunks = chunk_count(plan.layout, world_size)
    concrete = replace(shape, batch=_hint(plan.site.tensor("query").shape[0]) or 1,
                       local_rows=-(-hint // chunks) * chunks // world_size)
    choose = functools.partial(predict.choose_schedule, concrete, topology, causal=plan.causal, scheme=cfg.backward,
                               flops_per_s=cfg.tflops * 1e12,
                               per_head_mask=bool(plan.site.mask_mod) or plan.site.attn_mask is not None)
    try:
        plan.predicted, plan.predictions = choose(cfg.schedule)
    except ValueError as e:  # only an explicit schedule can fail: auto always has the flat ring
        plan.schedule, plan.schedule_note = "auto", f"schedule {cfg.schedule!r} cannot run here ({e}); auto instead"
        plan.predicted, plan.predictions = choose("auto")
    return plan


def _hint(size) -> Optional[int]:
    """The example value of a size (its hint when symbolic), without installing a guard."""
    if isinstance(size, torch.SymInt):
        return size.node.hint
    return int(size)


def _broadcasts(size, *sizes) -> bool:
    """Whether a batch size is 1 or equal to the largest of sizes (SDPA's batch broadcasting)."""
    return statically_known_true(size == 1) or all(statically_known_true(size >= s) for s in sizes)


def _dense_mask_problem(mask, q: torch.Tensor) -> Optional[str]:
    """Why a materialised attn_mask cannot travel with its query rows (None if it can). The masks
    pass has made it 4-D with N rows (burstc.passes.masks)."""
    m = mask.meta.get("example_value") if isinstance(mask, fx.Node) else None
    if not isinstance(m, torch.Tensor):
        return f"its attn_mask is not a tensor Dynamo recorded ({mask!r})"
    if m.dtype != torch.bool and m.dtype != q.dtype:
        return f"its attn_mask is {m.dtype}, neither bool nor the query's {q.dtype}"
    if m.dim() != 4 or not all(statically_known_true(a == b) for a, b in zip(m.shape[2:], (q.shape[2], q.shape[2]))):
        return f"its attn_mask {tuple(m.shape)} is not [B|1, H|1, N, N] over the sequence"
    if not (statically_known_true(m.shape[0] == 1) or statically_known_true(m.shape[0] == q.shape[0])) or \
            not (statically_known_true(m.shape[1] == 1) or statically_known_true(m.shape[1] == q.shape[1])):
        return f"its attn_mask {tuple(m.shape)} does not broadcast over batch and heads"
    return None


def resolved_layout(cfg: BurstConfig, sites: list[AttentionSite]) -> str:
    """cfg.layout, with 'auto' made concrete for these sites: zigzag where some site's work needs its
    balance (causal or masked attention over the whole sequence), else contiguous: every site is then a
    bounded sliding window (a halo exchange to the neighbours, however it reaches both ways) or plain
    full attention (every pair of chunks alike, in any layout)."""
    if cfg.layout != "auto":
        return cfg.layout
    return "contiguous" if sites and all(map(_balanced_in_any_layout, sites)) else "zigzag"


def _balanced_in_any_layout(site: AttentionSite) -> bool:
    """A bounded window, or attention with no causal part and no mask at all."""
    if window_is_bounded(site.window_left, site.window_right, site.is_causal is True):
        return True
    masks = (site.attn_mask, site.key_padding, site.document_ids, site.window_left, site.window_right)
    return site.is_causal is False and all(m is None for m in masks) and not site.mask_mod and not site.proof


def plan_sites(sites: list[AttentionSite], cfg: BurstConfig, world_size: int) -> list[SitePlan]:
    cfg = replace(cfg, layout=resolved_layout(cfg, sites))
    return [plan_site(s, cfg, world_size) for s in sites]
