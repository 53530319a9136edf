"""`masked_sdpa`: SDPA with its mask given by descriptors instead of a tensor. A recognised mask
construction in a compiled graph (burstc.passes.masks) becomes a call to it; an attention the backend
then converts reads the descriptors, one it leaves alone runs this, which materialises the very mask
the model built and calls SDPA (exact either way)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from burstc.runtime.mask_mods import BoundMaskMod
from burstc.runtime.modified_sdpa import modified_sdpa
from burstc.schedule.masks import AttentionMask


def masked_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding: Optional[torch.Tensor] = None, document_ids: Optional[torch.Tensor] = None,
                is_causal: bool = False, window_left: Optional[int] = None, window_right: Optional[int] = None,
                scale: Optional[float] = None, enable_gqa: bool = False, fill: Optional[float] = None,
                mask_mod: str = "", mask_buffers: tuple = (), proof: str = "", proof_buffers: tuple = (),
                sinks: Optional[torch.Tensor] = None, softcap: Optional[float] = None) -> torch.Tensor:
    """F.scaled_dot_product_attention(query, key, value, attn_mask=M) with M the conjunction of causal,
    window [i - window_left, i + window_right], key_padding [B, N], same document_ids [B, N] and a
    registered FlexAttention mask_mod (burstc.runtime.mask_mods) with its captured tensors;
    fill: None for a boolean M, else the additive form where(M, 0, fill) (HF's eager path: finfo.min).
    proof: the registered mask code the descriptors were recognised from, with its leaves proof_buffers:
    run here (a site left unconverted), M is that code itself, exact whatever the descriptors say.
    sinks, softcap: the score modifiers of burstc.runtime.modified_sdpa, or None."""
    n = query.shape[2]
    positions = torch.arange(n, device=query.device)
    window = None if window_left is None and window_right is None else (window_left, window_right)
    if proof:  # the model's own code, whatever the descriptors say
        mask = AttentionMask(mask_mod=BoundMaskMod(proof, list(proof_buffers))).evaluate(positions, positions)
    else:
        mask = AttentionMask(causal=is_causal, window=window, key_padding=key_padding, document_ids=document_ids,
                             mask_mod=BoundMaskMod(mask_mod, list(mask_buffers)) if mask_mod else None
                             ).evaluate(positions, positions, query.shape[1])
    if fill is not None:
        mask = torch.where(mask, torch.zeros((), dtype=query.dtype, device=query.device),
                           torch.full((), fill, dtype=query.dtype, device=query.device))
    if sinks is not None or softcap is not None:
        return modified_sdpa(query, key, value, attn_mask=mask, scale=scale, enable_gqa=enable_gqa, sinks=sinks,
                             softcap=softcap)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)


def chunk_ids(offset: torch.Tensor, n: int, c: int, size: int) -> torch.Tensor:
    """[B, n] document ids of fixed-length chunks offset per row: (i + c - offset[b]) // size (Llama 4's
    chunked attention, whose chunks start after each row's left padding)."""
    positions = torch.arange(n, device=offset.device, dtype=torch.int64)
    return torch.div(positions[None, :] + c - offset.to(torch.int64)[:, None], size, rounding_mode="floor")


def additive_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor,
                       scale: Optional[float] = None, enable_gqa: bool = False,
                       sinks: Optional[torch.Tensor] = None, softcap: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale + attn_mask) v in plain ops, the softmax in float32, as hand-written eager
    attention computes it. Where every key of a row carries finfo.min the row averages all values; the
    fused SDPA kernels differ from this there in the backward, so a site the backend leaves alone for
    that reason runs this. sinks, softcap: the score modifiers of burstc.runtime.modified_sdpa, or None."""
    if sinks is not None or softcap is not None:  # the same formula with the modifiers
        return modified_sdpa(query, key, value, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa, sinks=sinks,
                             softcap=softcap)
    if enable_gqa and key.shape[1] != query.shape[1]:
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scale = 1.0 / query.shape[-1] ** 0.5 if scale is None else scale
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale + attn_mask
    # at least float32 (as eager does for half precision), never less than the input: a float64 mask's
    # finfo.min would become -inf in float32 and a fully hidden row NaN instead of the average
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    return torch.matmul(weights, value)
