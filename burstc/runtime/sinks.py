"""Attention sinks: a learned logit per head that joins every row's softmax as one extra column and is
then dropped (GPT-OSS), so a row may give part of its weight to nothing.

With lse the log-sum-exp of a row's real scores and s its head's sink logit, the row's weights are
exp(S - logaddexp(lse, s)) instead of exp(S - lse): the sink-free output scaled by
exp(lse - logaddexp(lse, s)) = sigmoid(lse - s). So the ring computes attention without the sink and
`apply_sinks` folds it in once, from the global lse: exact, and its gradient reaches q, k and v through
lse (the ring's backward takes the lse gradient as D - dlse) and the sinks through autograd. A row that
sees no key (lse = -inf) gets 0, as the softmax with a sink gives it.

`sdpa_with_sinks` is the graph's canonical form of such an attention (F.scaled_dot_product_attention's
arguments plus `sinks=`): the backend converts it to the ring and `apply_sinks`; a site left alone runs
it as eager math.
"""
from __future__ import annotations

from typing import Optional

import torch

from burstc.runtime.mask_args import AVERAGING_BIAS


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """out [B, H, L, d] of attention without sinks, lse [B, H, L] its natural-log log-sum-exp, sinks one
    logit per head (any shape of H elements): the output with the sinks in the softmax, in out's dtype."""
    heads = out.shape[1]
    if sinks.numel() != heads:
        raise ValueError(f"{sinks.numel()} sink logits for {heads} query heads: give one per query head")
    gate = torch.sigmoid(lse - sinks.reshape(1, heads, 1).to(lse.dtype))
    return (out * gate.unsqueeze(-1).to(out.dtype)).to(out.dtype)


def sink_site_mask(attn_mask: torch.Tensor) -> torch.Tensor:
    """A sink site's materialised mask for the ring: an additive bias at or below AVERAGING_BIAS (finfo.min
    fills) becomes -inf. Exact with a sink: exp(bias - sink) is 0 either way, so a row whose every key
    carries it gives 0 in eager as under the ring, instead of the average plain SDPA would give."""
    if attn_mask.dtype == torch.bool:
        return attn_mask
    return attn_mask.masked_fill(attn_mask <= AVERAGING_BIAS, float("-inf"))


def sdpa_with_sinks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0, is_causal: bool = False,
                    scale: Optional[float] = None, enable_gqa: bool = False, *,
                    sinks: torch.Tensor) -> torch.Tensor:
    """F.scaled_dot_product_attention's result with one sink logit per query head in every row's softmax
    (eager math: the scores, the sink column, the softmax in at least float32, the column dropped)."""
    if dropout_p:
        raise ValueError("attention with sinks and dropout_p > 0 is not supported: pass dropout_p=0.0")
    heads, n_q, n_k = query.shape[1], query.shape[-2], key.shape[-2]
    if enable_gqa and key.shape[1] != heads:
        group = heads // key.shape[1]
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scale = 1.0 / query.shape[-1] ** 0.5 if scale is None else scale
    dtype = torch.promote_types(query.dtype, torch.float32)
    scores = torch.matmul(query.to(dtype), key.to(dtype).transpose(-1, -2)) * scale
    if is_causal:
        hidden = torch.ones(n_q, n_k, dtype=torch.bool, device=query.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else scores + attn_mask.to(dtype)
    column = sinks.reshape(1, heads, 1, 1).to(dtype).expand(*scores.shape[:-1], 1)
    weights = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]
    return torch.matmul(weights.to(value.dtype), value)
