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
