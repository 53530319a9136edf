"""`modified_sdpa`: F.scaled_dot_product_attention with the score modifiers current models add, the graph's
canonical form of such an attention (canonicalize emits it); a site the backend leaves alone runs it as
eager math.

- sinks: one logit per query head that joins every row's softmax as an extra column and is dropped after
  it (GPT-OSS; burstc.runtime.sinks folds it in after the ring);
- softcap: the scores soft-capped as softcap * tanh(S / softcap) before any mask (Gemma 2).
"""
from __future__ import annotations

from typing import Optional

import torch


def softcapped(scores: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """softcap * tanh(scores / softcap), or scores unchanged without a cap."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def modified_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0, is_causal: bool = False,
                  scale: Optional[float] = None, enable_gqa: bool = False, *,
                  sinks: Optional[torch.Tensor] = None, softcap: Optional[float] = None) -> torch.Tensor:
    """SDPA's result with the modifiers in the softmax (eager math: the scores in at least float32, the
    cap, the mask, the sink column, the softmax, the column dropped)."""
    if dropout_p:
        raise ValueError("attention with sinks or a soft-cap and dropout_p > 0 is not supported: pass dropout_p=0.0")
    heads, n_q, n_k = query.shape[1], query.shape[-2], key.shape[-2]
    if enable_gqa and key.shape[1] != heads:
        group = heads // key.shape[1]
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scale = 1.0 / query.shape[-1] ** 0.5 if scale is None else scale
    dtype = torch.promote_types(query.dtype, torch.float32)
    scores = softcapped(torch.matmul(query.to(dtype), key.to(dtype).transpose(-1, -2)) * scale, softcap)
    if is_causal:
        hidden = torch.ones(n_q, n_k, dtype=torch.bool, device=query.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else scores + attn_mask.to(dtype)
    if sinks is not None:
        column = sinks.reshape(1, heads, 1, 1).to(dtype).expand(*scores.shape[:-1], 1)
        weights = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]
    else:
        weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights.to(value.dtype), value)
