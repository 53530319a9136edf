"""Independent reference: single-device SDPA in float64 on the full tensors, forward and grads."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def random_qkv(batch, heads_q, heads_kv, seq_len, head_dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(batch, h, seq_len, head_dim, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return make(heads_q), make(heads_kv), make(heads_kv), make(heads_q)  # q, k, v, dout


def sdpa_with_grads(q, k, v, dout, causal, scale=None):
    qq, kk, vv = (x.detach().to(torch.float64).requires_grad_() for x in (q, k, v))
    out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    grads = torch.autograd.grad(out, (qq, kk, vv), dout.to(torch.float64))
    return (out.detach(),) + grads


def max_errors(got, want):
    """(max abs error, max abs error / max abs reference) over paired tensors."""
    abs_err = max((a.double() - b.double()).abs().max().item() for a, b in zip(got, want))
    rel_err = max(((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
                  for a, b in zip(got, want))
    return abs_err, rel_err


def dense_mask(batch, seq_len, *, causal=False, window=None, key_padding=None, document_ids=None, mask_mod=None):
    """The materialised [B, 1, N, N] bool mask (True = attend) a burst mask description stands for."""
    i, j = torch.arange(seq_len).view(-1, 1), torch.arange(seq_len).view(1, -1)
    m = torch.ones(batch, 1, seq_len, seq_len, dtype=torch.bool)
    if causal:
        m = m & (j <= i)
    if window is not None:
        left, right = window
        if left is not None:
            m = m & (j >= i - left)
        if right is not None:
            m = m & (j <= i + right)
    if key_padding is not None:
        m = m & key_padding.bool()[:, None, None, :]
    if document_ids is not None:
        m = m & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    if mask_mod is not None:
        m = m & mask_mod(torch.arange(batch).view(-1, 1, 1, 1), torch.zeros(1, 1, 1, 1, dtype=torch.long),
                         i.view(1, 1, -1, 1), j.view(1, 1, 1, -1))
    return m


def sdpa_masked_with_grads(q, k, v, dout, attn_mask):
    """Single-device SDPA in float64 with a materialised mask (bool or additive), forward and grads."""
    qq, kk, vv = (x.detach().to(torch.float64).requires_grad_() for x in (q, k, v))
    mask = attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(torch.float64)
    out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    grads = torch.autograd.grad(out, (qq, kk, vv), dout.to(torch.float64))
    return (out.detach(),) + grads


def run_burst(q, k, v, dout, **kwargs):
    """burst_attention on fresh leaves of q, k, v: ((out, dq, dk, dv), the call's CommStats)."""
    import burstc

    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    with burstc.comm_stats() as stats:
        out = burstc.burst_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1], **kwargs)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    return (out.detach(),) + grads, stats
