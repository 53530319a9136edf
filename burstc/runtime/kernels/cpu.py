"""CPU back-end: ATen's flash-attention CPU kernel per work item, merged in log-sum-exp form.

Forward calls `_scaled_dot_product_flash_attention_for_cpu` (returns the block's output and lse);
backward calls its backward with the *global* lse, which yields the item's exact dK, dV and its
share of dQ. That backward derives D = rowsum(dO * O) from an output tensor; where only D travels
(query ring) we hand it `carrier = dO * D / rowsum(dO * dO)`, whose rowsum(dO * carrier) is D
(rows with dO = 0 have D = 0 and carrier 0). Half-precision inputs run that backward in float32 so
the carrier is not rounded.
"""
from __future__ import annotations

from typing import Optional

import torch

from burstc.runtime.kernels import lse_state
from burstc.runtime.kernels.base import QueryBundle, WorkItem, as_grad_sum, finite_lse, visible_rows
from burstc.runtime.kernels.tile_mask import as_tile

aten = torch.ops.aten
_SUPPORTED = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _delta_carrier(bundle: QueryBundle, dtype: torch.dtype) -> torch.Tensor:
    """A tensor O' with rowsum(dO * O') == D, cached on the bundle."""
    key = ("carrier", dtype)
    if key not in bundle.cache:
        if bundle.out is not None:
            bundle.cache[key] = bundle.out.to(dtype)
        else:
            do = bundle.dout.to(dtype)
            norm = (do * do).sum(dim=-1, keepdim=True)
            factor = torch.where(norm > 0, bundle.delta.to(dtype).unsqueeze(-1) / norm, torch.zeros_like(norm))
            bundle.cache[key] = do * factor
    return bundle.cache[key]


class CpuKernel:
    name = "cpu"

    def supports(self, q: torch.Tensor) -> Optional[str]:
        if q.device.type != "cpu":
            return f"the cpu kernel runs on CPU tensors, got {q.device}: use kernel='auto'"
        if q.dtype not in _SUPPORTED:
            return f"the cpu kernel supports {', '.join(map(str, _SUPPORTED))}, got {q.dtype}"
        return None

    def forward_init(self, q):
        return lse_state.init_state(q)

    def forward_step(self, state, q, k, v, item: WorkItem, scale: float, mask=None) -> None:
        mask = as_tile(mask)
        o_b, lse_b = aten._scaled_dot_product_flash_attention_for_cpu(
            q[:, :, item.q_start:item.q_stop], k[:, :, item.k_start:item.k_stop],
            v[:, :, item.k_start:item.k_stop], 0.0, item.causal, attn_mask=_additive(mask, q.dtype),
            scale=scale)[:2]
        if mask is not None:  # rows with no visible key: ATen reports lse 0, the merge needs -inf
            seen = visible_rows(mask).expand(lse_b.shape)
            lse_b = lse_b.masked_fill(~seen, float("-inf"))
            o_b = o_b.masked_fill(~seen.unsqueeze(-1), 0.0)
        lse_state.merge_block(state, item.q_start, item.q_stop, o_b, lse_b)

    def forward_finalize(self, state):
        return lse_state.finalize(state)

    def backward_step(self, bundle: QueryBundle, k, v, item: WorkItem, scale: float, dq, dk, dv, mask=None) -> None:
        mask = as_tile(mask)
        dtype = bundle.q.dtype
        compute = dtype if dtype in (torch.float32, torch.float64) or bundle.out is not None else torch.float32
        rows, cols = slice(item.q_start, item.q_stop), slice(item.k_start, item.k_stop)
        carrier = _delta_carrier(bundle, compute)[:, :, rows]
        lse = bundle.lse[:, :, rows].to(torch.float64 if compute == torch.float64 else torch.float32)
        if mask is not None:
            lse = finite_lse(lse)
        g_q, g_k, g_v = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            bundle.dout[:, :, rows].to(compute), bundle.q[:, :, rows].to(compute),
            k[:, :, cols].to(compute), v[:, :, cols].to(compute), carrier, lse,
            0.0, item.causal, attn_mask=_additive(mask, compute), scale=scale)
        as_grad_sum(dq).add_(item.q_start, item.q_stop, g_q)
        as_grad_sum(dk).add_(item.k_start, item.k_stop, g_k)
        as_grad_sum(dv).add_(item.k_start, item.k_stop, g_v)


def _additive(mask, dtype: torch.dtype):
    """ATen's CPU flash kernel takes an additive mask of the query's dtype."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))
    return mask.to(dtype)
