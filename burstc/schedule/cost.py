"""Communication cost model: bytes each rank sends per attention call, per scheme (sympy expressions,
so sizes may be symbolic), and the choice of backward scheme.

Every hop moves one rank's padded shard of L rows. A ring of G ranks makes G - 1 hops of each
travelling payload, and the trailing accumulators (partial gradients of the travelling chunk) also
make G - 1 hops: a chunk's owner keeps its own step-0 partial and receives the sum of the others.

  forward          K, V                      2 * H_kv * d * e
  query ring       Q, dO (e), D, lse (a);    H_q * (2 * d * e + 2 * a)   + H_q * d * a   (dQ)
  KV ring          K, V (e)                  2 * H_kv * d * e            + 2 * H_kv * d * a  (dK, dV)

per row and hop, times B * L * (G - 1); e is the input element size and a the accumulation element
size (4, or 8 for float64). That is the dense bound: a plan that trims rows and stops chunks nobody
later needs (masks, padded tails, contiguous causal) sends `plan.rows_sent` rows instead, which
`plan_backward_bytes` and `choose_backward(..., plan=)` use.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Union

import sympy
import torch

Size = Union[int, sympy.Expr]
QUERY_RING, KV_RING = "query_ring", "kv_ring"
BACKWARD_SCHEMES = ("auto", QUERY_RING, KV_RING)


@dataclass(frozen=True)
class AttentionShape:
    """Per-rank shape of one attention call: B, H_q, H_kv, d, padded local rows L, world size G."""

    batch: Size
    heads_q: int
    heads_kv: int
    head_dim: int
    local_rows: Size
    world_size: int
    dtype: torch.dtype

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def acc_itemsize(self) -> int:
        return 8 if self.dtype == torch.float64 else 4


def _hop_rows(s: AttentionShape) -> Size:
    return s.batch * s.local_rows * (s.world_size - 1)


def forward_bytes(s: AttentionShape) -> Size:
    """Bytes one rank sends in the forward ring."""
    return _hop_rows(s) * 2 * s.heads_kv * s.head_dim * s.itemsize


def backward_row_bytes(s: AttentionShape, scheme: str) -> tuple[int, int]:
    """(payload, accumulator) bytes per row and hop of the backward ring of `scheme`, one batch row."""
    e, a, d = s.itemsize, s.acc_itemsize, s.head_dim
    if scheme == QUERY_RING:
        return s.heads_q * (2 * d * e + 2 * a), s.heads_q * d * a
    if scheme == KV_RING:
        return 2 * s.heads_kv * d * e, 2 * s.heads_kv * d * a
    raise ValueError(f"unknown backward scheme {scheme!r}: choose one of {', '.join(BACKWARD_SCHEMES)}")


def backward_bytes_per_row(s: AttentionShape, scheme: str) -> int:
    """Bytes one hop of the backward ring of `scheme` moves per local row (payload + accumulator)."""
    return sum(backward_row_bytes(s, scheme))


def plan_backward_bytes(s: AttentionShape, plan, scheme: str) -> Size:
    """Bytes all ranks send in the backward of `scheme` under `plan` (trimmed rows, stopped chunks)."""
    from burstc.schedule.plan import KV, QUERY  # plan imports nothing from here; keep cost importable alone
    role = QUERY if scheme == QUERY_RING else KV
    payload, acc = backward_row_bytes(s, scheme)
    return s.batch * (payload * plan.rows_sent(role) + acc * plan.rows_sent(role, accumulators=True))


def backward_bytes(s: AttentionShape, scheme: str) -> Size:
    """Bytes one rank sends in the backward ring of `scheme`."""
    return _hop_rows(s) * backward_bytes_per_row(s, scheme)


def choose_backward(s: AttentionShape, requested: str = "auto", plan=None) -> str:
    """The requested scheme, or for 'auto' the one that sends fewer bytes (query ring on ties).
    Without a plan both costs share the factor B * L * (G - 1), so the choice never depends on the
    sequence length; with one, the plan's trimmed rows count (a short window: the KV halo)."""
    if requested != "auto":
        backward_bytes_per_row(s, requested)  # validates the name
        return requested
    if plan is not None:
        q, kv = (plan_backward_bytes(s, plan, k) for k in (QUERY_RING, KV_RING))
    else:
        q, kv = (backward_bytes_per_row(s, k) for k in (QUERY_RING, KV_RING))
    return QUERY_RING if q <= kv else KV_RING


def backward_for_plan(s: AttentionShape, plan, requested: str) -> str:
    """The scheme a call on `plan` runs: the KV ring for a materialised mask held as its queries' rows (they
    stay with their queries), else `requested`, with 'auto' deciding on the plan's bytes when it has a mask."""
    if plan.mask is not None and plan.mask.dense_rows is not None:
        return KV_RING
    return choose_backward(replace(s, local_rows=plan.local_len), requested, plan if plan.mask is not None else None)


def describe(s: AttentionShape) -> dict:
    """The numbers behind a plan: bytes per scheme and the choice (for dumps and tables)."""
    return {
        "forward_bytes": forward_bytes(s),
        "backward_bytes": {k: backward_bytes(s, k) for k in (QUERY_RING, KV_RING)},
        "backward_auto": choose_backward(s),
    }
