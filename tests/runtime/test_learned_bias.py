"""A learned additive attn_mask (T5's relative-position bias, a trainable ALiBi) under the ring: its gradient
dS = P * (dP - D) is added at each item's (query row, key position) and summed over the dims it broadcasts;
outputs and the gradients of q, k, v and the bias against autograd through the formula on the whole
sequence, in float64."""
import pytest
import torch

from burstc.runtime.attention import burst_attention


def _formula(q, k, v, bias, causal):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + bias
    if causal:
        n = q.shape[2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("world_size,layout,bias_shape,causal", [
    (3, "zigzag", (1, 4, 25, 25), False),   # per head, broadcast over the batch (T5)
    (2, "contiguous", (2, 1, 25, 25), True),  # per batch row, broadcast over heads
    (4, "striped", (2, 4, 25, 25), False),
])
def test_a_learned_bias_gets_its_gradient_through_the_ring(world_size, layout, bias_shape, causal):
    g = torch.Generator().manual_seed(world_size)
    q, k, v = (torch.randn(2, 4, 25, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    bias = torch.randn(*bias_shape, generator=g, dtype=torch.float64).requires_grad_()
    dout = torch.randn(2, 4, 25, 8, generator=g, dtype=torch.float64)
    got = burst_attention(q, k, v, attn_mask=bias, causal=causal, virtual_world_size=world_size, layout=layout)
    want = _formula(q, k, v, bias, causal)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got_grads = torch.autograd.grad(got, (q, k, v, bias), dout)
    for a, b in zip(got_grads, torch.autograd.grad(want, (q, k, v, bias), dout)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_a_bias_that_needs_no_gradient_keeps_the_fast_kernel(caplog):
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    bias = torch.randn(1, 2, 16, 16)
    with caplog.at_level("WARNING", logger="burstc.runtime"):
        burst_attention(q, q, q, attn_mask=bias, virtual_world_size=2).sum().backward()
    assert "reference kernel computes" not in caplog.text
