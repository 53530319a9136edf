"""Attention sinks: a learned logit per head that joins every row's softmax as one extra column and is
then dropped (GPT-OSS), so a row may give part of its weight to nothing.

With lse the log-sum-exp of a row's real scores and s its head's sink logit, the row's weights are
exp(S - logaddexp(lse, s)) instead of exp(S - lse): the sink-free output scaled by
exp(lse - logaddexp(lse, s)) = sigmoid(lse - s). So the ring computes attention without the sink and
`apply_sinks` folds it in once, from the global lse: exact, and its gradient reaches q, k and v through
lse (the ring's backward takes the lse gradient as D - dlse) and the sinks through autograd. A row that
sees no key (lse = -inf) gets 0, as the softmax with a sink gives it.

In a graph such an attention is `modified_sdpa(..., sinks=)` (burstc.runtime.modified_sdpa): the backend
converts it to the ring and `apply_sinks`; a site left alone runs it as eager math.
"""
from __future__ import annotations

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
