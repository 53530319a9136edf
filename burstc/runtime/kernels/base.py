"""The local-kernel interface: what one rank computes for one ring step, independent of the ring.

A ring step hands a kernel a list of `WorkItem`s: rectangles of (local query rows x visiting key
rows), each fully visible, top-left causal, or masked. Every mask a layout produces (contiguous,
zigzag, striped, uneven tails) is decomposed into full and causal rectangles by the plan; a
structured mask (windows, padding, documents, mask_mod, attn_mask) adds masked rectangles, for which
the ring driver hands the kernel the item's mask: the evaluated tile `mask` [B|1, H_q|1, q_len, k_len],
bool (True = attend) or floating (an additive bias, -inf = hidden), or, to a kernel whose
`takes_position_masks` is True and for a mask of windows, causality, documents and key padding only,
a `tile_mask.PositionMask` (the item's positions, window, document ids and valid keys: O(q_len + k_len)).
Every kernel accepts both; one that reads no descriptors materialises it (`tile_mask.as_tile`). A query
row whose keys are all hidden in an item contributes nothing; a row that never sees a visible key gets
out = 0 and lse = -inf, and zero gradients (what single-device SDPA gives).

Forward: `forward_init` makes the running state of this rank's queries, `forward_step` folds one
item into it (the cross-rank online-softmax merge happens here), `forward_finalize` turns it into
the output (input dtype) and the natural-log log-sum-exp (float32, float64 for float64 inputs).

Backward: `backward_step` adds one item's exact gradients into the caller's accumulators, given the
*global* lse and D = rowsum(dO * O) of the query rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, Union

import torch

from burstc.runtime.kernels.tile_mask import PositionMask
from burstc.schedule.masks import visible
from burstc.schedule.work import WorkItem  # noqa: F401  (part of the kernel interface)


@dataclass
class QueryBundle:
    """Everything the backward of one query chunk needs, wherever it is computed.

    q, dout: [B, H_q, L, d] in the input dtype; lse, delta: [B, H_q, L] in the accumulation dtype.
    `out` is the chunk's forward output when it is at hand (KV ring), else None (query ring: only
    delta travels)."""

    q: torch.Tensor
    dout: torch.Tensor
    lse: torch.Tensor
    delta: torch.Tensor
    out: Optional[torch.Tensor] = None
    cache: dict = None  # per-bundle scratch a kernel may fill (e.g. a derived tensor reused by items)

    def __post_init__(self):
        if self.cache is None:
            self.cache = {}


class GradSum:
    """A gradient sum over [B, H, L, d] rows in the accumulation dtype. Its first contribution that
    covers every row is adopted instead of added to zeros, which saves a buffer and a pass per ring
    step (the CPU kernels return fresh gradient tensors). Kernels that add in place take `rows()`.
    Wrapping an existing tensor (`GradSum.wrap`) makes every contribution add into it."""

    def __init__(self, shape, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self._tensor: Optional[torch.Tensor] = None

    @classmethod
    def wrap(cls, tensor: torch.Tensor) -> "GradSum":
        acc = cls(tensor.shape, tensor.dtype, tensor.device)
        acc._tensor = tensor
        return acc

    def add_(self, start: int, stop: int, value: torch.Tensor) -> None:
        """Add value (rows [start, stop); the caller hands over ownership) into the sum."""
        adoptable = (self._tensor is None and start == 0 and stop == self.shape[2] and value.dtype == self.dtype
                     and tuple(value.shape) == self.shape and value.is_contiguous())
        if adoptable:
            self._tensor = value
        else:
            self.rows(start, stop).add_(value)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """A view of rows [start, stop) to add into in place (materialises zeros first if needed)."""
        return self.tensor()[:, :, start:stop]

    def tensor(self) -> torch.Tensor:
        if self._tensor is None:
            self._tensor = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return self._tensor


def as_grad_sum(acc) -> GradSum:
    """Kernels accept a GradSum or a plain tensor to add into."""
    return acc if isinstance(acc, GradSum) else GradSum.wrap(acc)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class LocalKernel(Protocol):
    """A local attention back-end. Implementations: cpu.py, reference.py (and codegen's Triton)."""

    name: str

    def supports(self, q: torch.Tensor) -> Optional[str]:
        """None if this kernel can run on tensors like q, else the reason it cannot."""

    def forward_init(self, q: torch.Tensor) -> Any:
        """The running state for query rows of q ([B, H_q, L, d]) before any key was seen."""

    def forward_step(self, state: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     item: WorkItem, scale: float, mask: Union[torch.Tensor, PositionMask, None] = None) -> None:
        """Fold attention of q[:, :, item.q rows] on k/v[:, :, item.k rows] into state, in place
        (mask: the item's tile or PositionMask when item.masked, else None)."""

    def forward_finalize(self, state: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(out [B, H_q, L, d] in q's dtype, lse [B, H_q, L] in the accumulation dtype).
        Rows that saw no key get out = 0 and lse = -inf."""

    def backward_step(self, bundle: QueryBundle, k: torch.Tensor, v: torch.Tensor, item: WorkItem,
                      scale: float, dq, dk, dv, mask: Union[torch.Tensor, PositionMask, None] = None) -> None:
        """Add the item's gradients into dq ([B, H_q, L_q, d]) and dk, dv ([B, H_kv, L_k, d]) at the
        item's rows: GradSum accumulators (or plain tensors) in the accumulation dtype (mask: as in
        forward_step)."""


def visible_rows(mask: torch.Tensor) -> torch.Tensor:
    """[B|1, H|1, Lq] bool: rows of a mask tile with at least one visible key."""
    return visible(mask).any(dim=-1)


def finite_lse(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (rows that saw no key: every score is -inf) replaced by 0, so exp(s - lse) is 0
    there instead of NaN."""
    return torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)
