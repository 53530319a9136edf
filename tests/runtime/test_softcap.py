"""Soft-capped scores under the ring (Gemma 2: cap * tanh(S / cap), then the mask): outputs and q, k, v
gradients against the formula written out on the whole sequence in float64; the kernels that cannot cap
say so."""
import pytest
import torch

from burstc.runtime.attention import burst_attention
from burstc.runtime.validate import BurstInputError


def _gemma2_formula(q, k, v, cap, visible):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.tanh((q @ k.transpose(2, 3)) * q.shape[-1] ** -0.5 / cap) * cap
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("world_size,layout,backward,window", [(3, "zigzag", "query_ring", None),
                                                              (2, "contiguous", "kv_ring", 6)])
def test_softcap_through_the_ring_is_exact(world_size, layout, backward, window):
    g = torch.Generator().manual_seed(world_size)
    q, k, v = (torch.randn(2, h, 29, 8, generator=g, dtype=torch.float64).mul(3).requires_grad_()
               for h in (4, 2, 2))  # scaled up so that the cap bends the scores
    dout = torch.randn(2, 4, 29, 8, generator=g, dtype=torch.float64)
    got = burst_attention(q, k, v, causal=True, window=None if window is None else (window, None), enable_gqa=True,
                          virtual_world_size=world_size, layout=layout, backward=backward, softcap=2.0)
    i = torch.arange(29)
    visible = (i[None, :] <= i[:, None]) & ((i[None, :] >= i[:, None] - window) if window else True)
    want = _gemma2_formula(q, k, v, 2.0, visible)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_kernels_without_a_softcap_refuse_it():
    q = torch.randn(1, 2, 8, 8)
    with pytest.raises(BurstInputError, match="does not compute soft-capped scores"):
        burst_attention(q, q, q, virtual_world_size=2, kernel="cpu", softcap=30.0)
    with pytest.raises(BurstInputError, match="positive"):
        burst_attention(q, q, q, virtual_world_size=2, softcap=-1.0)
