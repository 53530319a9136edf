"""Reference back-end: plain torch math (materialises the score block), any device, float64 too.

It is the yardstick of the other back-ends: straightforward formulas, GQA by repeating K/V heads
for the compute only (never for communication)."""
from __future__ import annotations

from typing import Optional

import torch

from burstc.runtime.kernels import lse_state
from burstc.runtime.kernels.base import QueryBundle, WorkItem, accumulation_dtype, as_grad_sum, finite_lse
from burstc.runtime.kernels.tile_mask import as_tile
from burstc.runtime.modified_sdpa import softcapped


def _expand_heads(x: torch.Tensor, heads_q: int) -> torch.Tensor:
    group = heads_q // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _reduce_heads(dx: torch.Tensor, heads_kv: int) -> torch.Tensor:
    b, h, n, d = dx.shape
    return dx if h == heads_kv else dx.view(b, heads_kv, h // heads_kv, n, d).sum(dim=2)


def _masked(s: torch.Tensor, item: WorkItem, mask=None) -> torch.Tensor:
    """Scores with the item's causal cut and mask applied (-inf where hidden, or the additive bias)."""
    mask = as_tile(mask)
    if item.causal:
        visible = torch.ones(item.q_len, item.k_len, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~visible, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(s.dtype)
    return s


class ReferenceKernel:
    """softcap: the scores are soft-capped as softcap * tanh(S / softcap) before any mask (Gemma 2)."""

    name = "reference"

    def __init__(self, softcap: Optional[float] = None):
        self.softcap = softcap

    def supports(self, q: torch.Tensor) -> Optional[str]:
        return None

    def forward_init(self, q):
        return lse_state.init_state(q)

    def forward_step(self, state, q, k, v, item: WorkItem, scale: float, mask=None) -> None:
        acc = accumulation_dtype(q.dtype)
        h = q.shape[1]
        qs = q[:, :, item.q_start:item.q_stop].to(acc)
        ks = _expand_heads(k[:, :, item.k_start:item.k_stop], h).to(acc)
        vs = _expand_heads(v[:, :, item.k_start:item.k_stop], h).to(acc)
        s = _masked(softcapped(torch.matmul(qs, ks.transpose(-1, -2)) * scale, self.softcap), item, mask)
        lse_b = torch.logsumexp(s, dim=-1)
        o_b = torch.matmul(torch.exp(s - finite_lse(lse_b).unsqueeze(-1)), vs)
        lse_state.merge_block(state, item.q_start, item.q_stop, o_b, lse_b)

    def forward_finalize(self, state):
        return lse_state.finalize(state)

    def backward_step(self, bundle: QueryBundle, k, v, item: WorkItem, scale: float, dq, dk, dv, mask=None,
                      score_grads: Optional[list] = None) -> None:
        """score_grads: a list to append the item's dS = P * (dP - D) to ([B, H_q, q_len, k_len]: the gradient
        of the scores where an additive mask joins them, i.e. of a learned bias)."""
        dq, dk, dv = as_grad_sum(dq), as_grad_sum(dk), as_grad_sum(dv)
        acc = dq.dtype
        h, h_kv = bundle.q.shape[1], k.shape[1]
        rows, cols = slice(item.q_start, item.q_stop), slice(item.k_start, item.k_stop)
        q = bundle.q[:, :, rows].to(acc)
        do = bundle.dout[:, :, rows].to(acc)
        lse = finite_lse(bundle.lse[:, :, rows].to(acc)).unsqueeze(-1)
        delta = bundle.delta[:, :, rows].to(acc).unsqueeze(-1)
        ks = _expand_heads(k[:, :, cols], h).to(acc)
        vs = _expand_heads(v[:, :, cols], h).to(acc)
        raw = torch.matmul(q, ks.transpose(-1, -2)) * scale
        p = torch.exp(_masked(softcapped(raw, self.softcap), item, mask) - lse)
        dp = torch.matmul(do, vs.transpose(-1, -2))
        ds = p * (dp - delta)
        if score_grads is not None:
            score_grads.append(ds)
        ds = ds * scale
        if self.softcap is not None:  # d(c tanh(S / c)) / dS = 1 - tanh(S / c)^2
            ds = ds * (1 - torch.tanh(raw / self.softcap) ** 2)
        dq.add_(item.q_start, item.q_stop, torch.matmul(ds, ks))
        dk.add_(item.k_start, item.k_stop, _reduce_heads(torch.matmul(ds.transpose(-1, -2), q), h_kv).contiguous())
        dv.add_(item.k_start, item.k_stop, _reduce_heads(torch.matmul(p.transpose(-1, -2), do), h_kv).contiguous())
