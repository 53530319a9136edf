"""Input checks of burst_attention: local checks, then one small metadata exchange so that every rank
raises the same error, naming the fix, before any ring transfer starts (never a hang, never a silent
wrong result)."""
from __future__ import annotations

import math

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist

from burstc.runtime import stats
from burstc.schedule import layout as layouts
from burstc.schedule.cost import BACKWARD_SCHEMES
from burstc.schedule.plan import SCHEDULE_CHOICES

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class BurstInputError(ValueError):
    """Inputs burst_attention cannot compute exactly; the message says how to fix the call."""


@dataclass(frozen=True)
class CallMeta:
    """What every rank's call must agree on, plus its local sequence length."""

    batch: int
    heads_q: int
    heads_kv: int
    head_dim: int
    local_len: int
    dtype: torch.dtype
    causal: bool
    layout: str
    backward: str
    scale: float
    needs_grad: bool
    checksum: tuple[float, float] = (0.0, 0.0)  # (fingerprint, magnitude) of replicated inputs
    mask_code: int = 0  # digest of the mask arguments (MaskArgs.code)
    schedule: str = "auto"
    node_size: int = 0  # ranks per node (0: not given)
    cost_code: int = 0  # digest of the link figures and throughput the schedule choice uses
    softcap: Optional[float] = None  # scores soft-capped as softcap * tanh(S / softcap)

    AGREED = ("batch", "heads_q", "heads_kv", "head_dim", "dtype", "causal", "layout", "backward",
              "scale", "needs_grad", "mask_code", "schedule", "node_size",
              "cost_code", "softcap")

    def encode(self) -> list[int]:
        floats = torch.tensor([self.scale, *self.checksum, self.softcap or 0.0],
                              dtype=torch.float64).view(torch.int64).tolist()
        return [self.batch, self.heads_q, self.heads_kv, self.head_dim, self.local_len,
                _DTYPES.index(self.dtype), int(self.causal), layouts.LAYOUTS.index(self.layout),
                BACKWARD_SCHEMES.index(self.backward), int(self.needs_grad), *floats[:3], self.mask_code,
                SCHEDULE_CHOICES.index(self.schedule), self.node_size, self.cost_code, floats[3]]

    @classmethod
    def decode(cls, v: list[int]) -> "CallMeta":
        scale, fingerprint, magnitude, softcap = torch.tensor(v[10:13] + v[17:18], dtype=torch.int64).view(
            torch.float64).tolist()
        return cls(v[0], v[1], v[2], v[3], v[4], _DTYPES[v[5]], bool(v[6]), layouts.LAYOUTS[v[7]],
                   BACKWARD_SCHEMES[v[8]], scale, bool(v[9]), (fingerprint, magnitude), v[13],
                   SCHEDULE_CHOICES[v[14]], v[15], v[16], softcap or None)


def replicated_checksum(*tensors: torch.Tensor, dim: int = 2) -> tuple[float, float]:
    """An order-sensitive fingerprint of full-sequence inputs (one pass over each tensor; `dim` is the
    sequence) and its magnitude, so ranks can check they hold the same sequence up to summation-order
    rounding."""
    rows = sum(t.sum(dim=tuple(d for d in range(t.dim()) if d != dim), dtype=torch.float64)
               for t in tensors)  # [N] per-position sums: one pass over each tensor
    position = torch.arange(rows.numel(), dtype=torch.float64, device=rows.device) * 0.7071
    terms = rows * torch.cos(position)
    total, magnitude = float(terms.sum()), float(terms.abs().sum())
    if math.isfinite(total) and math.isfinite(magnitude):
        return total, magnitude
    # NaN or inf somewhere: NaN compares false with everything, so it must count, not poison (second pass)
    rows, codes = 0, 0
    for t in tensors:
        other = tuple(d for d in range(t.dim()) if d != dim)
        rows = rows + torch.where(torch.isfinite(t), t, 0).sum(dim=other, dtype=torch.float64)
        codes = codes + (torch.isnan(t) * 3 + (t == float("inf")) * 5 + (t == float("-inf")) * 7).sum(
            dim=other, dtype=torch.float64)
    terms = rows * torch.cos(position) + codes * torch.sin(position)
    return float(terms.sum()), float(terms.abs().sum())


def local_problem(q, k, v, *, enable_gqa: bool, layout: str, backward: str, dropout_p,
                  schedule: str = "auto") -> Optional[str]:
    """Why this rank's call cannot run (None if it can)."""
    if dropout_p:
        return ("dropout_p > 0 is not supported (the ring would need one dropout mask across ranks); "
                "use dropout_p=0.0, e.g. evaluate the model in eval() mode")
    if layout not in layouts.LAYOUTS:
        return f"unknown layout {layout!r}: choose one of {', '.join(layouts.LAYOUTS)}"
    if schedule not in SCHEDULE_CHOICES:
        return f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULE_CHOICES)}"
    if backward not in BACKWARD_SCHEMES:
        return f"unknown backward scheme {backward!r}: choose one of {', '.join(BACKWARD_SCHEMES)}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            return f"{name} must be a 4-D tensor [batch, heads, seq, head_dim], got {getattr(t, 'shape', type(t))}"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        return f"q, k, v must share one floating dtype of {[str(d) for d in _DTYPES]}, got {q.dtype}, {k.dtype}, {v.dtype}"
    if not (q.device == k.device == v.device):
        return f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"
    if k.shape != v.shape:
        return f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        return f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim"
    if q.shape[2] != k.shape[2]:
        return (f"q holds {q.shape[2]} tokens but k holds {k.shape[2]}: burst attention is self-attention over "
                "one sharded sequence, so q, k, v must be shards of the same tokens")
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv:
        return f"query heads ({hq}) must be a multiple of key/value heads ({hkv})"
    if hq != hkv and not enable_gqa:
        return f"q has {hq} heads and k/v {hkv}: pass enable_gqa=True for grouped-query attention"
    return None


_agreed: dict[tuple, list[CallMeta]] = {}  # (site key, group, this rank's call) -> every rank's CallMeta


def agreed_before(site_key: str, meta: CallMeta, group) -> Optional[list[CallMeta]]:
    """Every rank's CallMeta from an earlier agreement of this compiled site with this rank's call as it is
    now (shapes, options, mask digest), or None. The site key names the compiled graph, the site and the
    global sequence length, all alike on every rank, so every rank finds it or none does."""
    return _agreed.get((site_key, id(group), replace(meta, checksum=(0.0, 0.0))))


def remember_agreement(site_key: str, meta: CallMeta, group, metas: list[CallMeta]) -> None:
    if len(_agreed) > 4096:  # many shapes (dynamic lengths): forget, and agree again
        _agreed.clear()
    _agreed[(site_key, id(group), replace(meta, checksum=(0.0, 0.0)))] = metas


def agree_across_ranks(meta: Optional[CallMeta], problem: Optional[str], group, rank: int,
                       world_size: int, device: torch.device, full_sequence: bool = False) -> list[CallMeta]:
    """Exchange every rank's CallMeta (or its problem) and raise the same error on every rank if any
    rank has a problem, the ranks disagree, or a local length is not the layout's share (with
    full_sequence: not the same full length everywhere)."""
    width = 1 + 18  # the problem flag, then CallMeta.encode()'s 18 numbers
    mine = torch.zeros(width, dtype=torch.int64)
    if problem is None:
        mine[1:] = torch.tensor(meta.encode(), dtype=torch.int64)
    else:
        mine[0] = 1
    comm_device = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    mine = mine.to(comm_device)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine, group=group)
    stats.count_collective("agreement")
    rows = [g.cpu().tolist() for g in gathered]
    failing = [r for r, row in enumerate(rows) if row[0]]
    if failing:
        problems = [None] * world_size
        dist.all_gather_object(problems, problem, group=group)
        lines = "; ".join(f"rank {r}: {problems[r]}" for r in failing)
        raise BurstInputError(f"burst_attention rejected its inputs on {len(failing)} rank(s): {lines}")
    metas = [CallMeta.decode(row[1:]) for row in rows]
    for field in CallMeta.AGREED:
        values = [getattr(m, field) for m in metas]
        if len(set(values)) > 1:
            hint = (" (some ranks build an autograd graph and others do not: run every rank under the "
                    "same grad mode with the same requires_grad)") if field == "needs_grad" else ""
            if field == "mask_code":
                hint = (" (the mask arguments differ: key_padding_mask, document_ids/cu_seqlens and window "
                        "must be the same global tensors/values on every rank)")
            if field in ("node_size", "cost_code"):
                hint = (" (set BURST_NODE_SIZE, BURST_INTRA_GBS, BURST_INTER_GBS, BURST_*_LATENCY_US and "
                        "BURST_TFLOPS, or the options, the same on every rank)")
            raise BurstInputError(f"burst_attention: ranks disagree on {field}: "
                                  f"{dict(enumerate(values))}; every rank must call it with the same "
                                  f"shapes (except the sequence), dtype and options{hint}")
    actual = [m.local_len for m in metas]
    if full_sequence:
        if len(set(actual)) > 1:
            raise BurstInputError(f"burst attention over replicated inputs: ranks hold sequences of lengths "
                                  f"{actual}; every rank must pass the same full-sequence tensors")
        fingerprints = [m.checksum[0] for m in metas]
        tolerance = 1e-6 * max(max(m.checksum[1] for m in metas), 1e-30)
        if max(fingerprints) - min(fingerprints) > tolerance:
            raise BurstInputError(
                "burst attention over replicated inputs: the ranks' q/k/v differ (fingerprints "
                f"{dict(enumerate(fingerprints))}). A model compiled with backend='burst' must see the same "
                "inputs and weights on every rank (seed every rank alike, broadcast the batch), or pass a "
                "group of one rank per model replica.")
        return metas
    seq_len = sum(actual)
    layout = metas[0].layout
    expected = [layouts.local_length(seq_len, layout, world_size, r) for r in range(world_size)]
    if actual != expected:
        raise BurstInputError(
            f"burst_attention: local sequence lengths {actual} are not the {layout!r} layout's shards of "
            f"the {seq_len}-token sequence over {world_size} ranks (expected {expected}); shard inputs with "
            f"burstc.shard_sequence(x, dim=2, layout={layout!r}, world_size={world_size}, rank=rank)")
    return metas
