"""Running forward state as (normalised output, lse), merged block by block in log-sum-exp form.

For a block result (o_b, lse_b) of some query rows: lse' = logaddexp(lse, lse_b) and
out' = exp(lse - lse') * out + exp(lse_b - lse') * o_b, all in the accumulation dtype. Shared by the
back-ends whose local kernel returns a normalised block output with its lse (cpu, reference).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from burstc.runtime.kernels.base import accumulation_dtype, finite_lse


@dataclass
class LseState:
    out: torch.Tensor  # [B, H_q, L, d], accumulation dtype
    lse: torch.Tensor  # [B, H_q, L], accumulation dtype, -inf where no key was seen yet
    dtype: torch.dtype  # the input dtype the output is returned in
    touched: torch.Tensor  # [L] bool: rows that have been written at least once


def init_state(q: torch.Tensor) -> LseState:
    acc = accumulation_dtype(q.dtype)
    b, h, n, d = q.shape
    return LseState(out=q.new_zeros((b, h, n, d), dtype=acc),
                    lse=q.new_full((b, h, n), float("-inf"), dtype=acc),
                    dtype=q.dtype, touched=torch.zeros(n, dtype=torch.bool))


def merge_block(state: LseState, start: int, stop: int, o_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Fold a normalised block result for rows [start, stop) into the state, in place. o_b is
    consumed (scaled in place): callers pass the kernel's fresh result."""
    out, lse = state.out[:, :, start:stop], state.lse[:, :, start:stop]
    o_b = o_b.to(out.dtype)
    lse_b = lse_b.to(lse.dtype)
    if not bool(state.touched[start:stop].any()):
        out.copy_(o_b)  # first block of these rows: nothing to merge with
        lse.copy_(lse_b)
    else:
        new_lse = torch.logaddexp(lse, lse_b)
        # rows that have seen no visible key yet (both -inf) keep out = 0, lse = -inf
        base = finite_lse(new_lse)
        out.mul_(torch.exp(lse - base).unsqueeze(-1))
        out.add_(o_b.mul_(torch.exp(lse_b - base).unsqueeze(-1)))
        lse.copy_(new_lse)
    state.touched[start:stop] = True


def finalize(state: LseState) -> tuple[torch.Tensor, torch.Tensor]:
    return state.out.to(state.dtype), state.lse
