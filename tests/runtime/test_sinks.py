"""Attention sinks under the ring (burstc.runtime.sinks): the sink joins each row's softmax once, from the
global log-sum-exp; outputs and the gradients of q, k, v and the sinks against GPT-OSS's eager formula
(scores, the sink column concatenated, softmax, the column dropped) on the whole sequence, in float64."""
import pytest
import torch

from burstc.runtime.attention import burst_attention
from burstc.runtime.modified_sdpa import modified_sdpa
from burstc.runtime.sinks import apply_sinks, sink_site_mask


def _gpt_oss_formula(q, k, v, sinks, visible):
    """GPT-OSS's eager attention with sinks over a boolean mask [N, N] (True = attend), GQA by repeat."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(2, 3)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~visible, float("-inf"))
    column = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], -1)
    combined = torch.cat([scores, column], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    return torch.softmax(combined, dim=-1)[..., :-1] @ v


def _inputs(seed, b=2, h=4, h_kv=2, n=37, d=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()  # noqa: E731
    return make(b, h, n, d), make(b, h_kv, n, d), make(b, h_kv, n, d), make(h), torch.randn(b, h, n, d, generator=g).to(dtype)


def _visible(n, causal, window):
    i = torch.arange(n)
    seen = torch.ones(n, n, dtype=torch.bool)
    if causal:
        seen &= i[None, :] <= i[:, None]
    if window is not None:
        seen &= i[None, :] >= i[:, None] - window
    return seen


@pytest.mark.parametrize("world_size,layout,backward", [(3, "zigzag", "query_ring"), (2, "contiguous", "kv_ring"),
                                                       (4, "striped", "kv_ring")])
@pytest.mark.parametrize("causal,window", [(True, None), (True, 5), (False, None)])
def test_sinks_through_the_ring_are_exact(world_size, layout, backward, causal, window):
    q, k, v, sinks, dout = _inputs(world_size * 10 + int(causal) + (window or 0))
    got = burst_attention(q, k, v, causal=causal, window=None if window is None else (window, None),
                          enable_gqa=True, virtual_world_size=world_size, layout=layout, backward=backward,
                          kernel="reference", sinks=sinks)
    want = _gpt_oss_formula(q, k, v, sinks, _visible(q.shape[2], causal, window))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (q, k, v, sinks), dout), torch.autograd.grad(want, (q, k, v, sinks), dout)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_rows_that_see_no_key_give_their_weight_to_the_sink():
    """Key padding hides every key of batch row 1's first tokens' window: those rows are 0 (all weight on
    the sink) and pass no gradient to q, k, v, yet the sinks' gradient is exact."""
    q, k, v, sinks, dout = _inputs(7, n=24)
    padding = torch.ones(2, 24, dtype=torch.bool)
    padding[1, :6] = False
    got = burst_attention(q, k, v, causal=True, enable_gqa=True, key_padding_mask=padding, virtual_world_size=2,
                          kernel="reference", sinks=sinks)
    visible = _visible(24, True, None) & padding[:, None, None, :]
    want = _gpt_oss_formula(q, k, v, sinks, visible)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert bool((got[1, :, :6] == 0).all())
    for a, b in zip(torch.autograd.grad(got, (q, k, v, sinks), dout), torch.autograd.grad(want, (q, k, v, sinks), dout)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backward", ["kv_ring", "query_ring"])
def test_float32_on_the_cpu_kernel(backward):
    """The CPU kernel derives D from the output it is handed: with an lse gradient it must get D - dlse alone."""
    q, k, v, sinks, dout = _inputs(3, dtype=torch.float32)
    got = burst_attention(q, k, v, causal=True, enable_gqa=True, virtual_world_size=3, kernel="cpu", sinks=sinks,
                          backward=backward)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    want = _gpt_oss_formula(*leaves, _visible(q.shape[2], True, None))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    got_grads = torch.autograd.grad(got, (q, k, v, sinks), dout)
    for a, b in zip(got_grads, torch.autograd.grad(want, leaves, dout.double())):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_the_canonical_form_is_the_eager_formula():
    """modified_sdpa (what a site left alone runs) against GPT-OSS's formula, with an additive mask."""
    q, k, v, sinks, _ = _inputs(11)
    visible = _visible(q.shape[2], True, 4)
    bias = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, float("-inf"))
    got = modified_sdpa(q, k, v, attn_mask=bias, enable_gqa=True, sinks=sinks)
    torch.testing.assert_close(got, _gpt_oss_formula(q, k, v, sinks, visible), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="one per query head"):
        apply_sinks(got, torch.zeros(got.shape[:-1], dtype=got.dtype), sinks[:3])


def test_a_finfo_min_mask_that_hides_whole_rows_is_exact_with_a_sink():
    """HF's eager additive mask (finfo.min where hidden) with rows hidden whole: eager gives those rows 0 (the
    sink takes all the weight), and so does the ring on sink_site_mask's -inf form."""
    q, k, v, sinks, dout = _inputs(5, n=20)
    visible = _visible(20, True, None).expand(2, 1, 20, 20).clone()
    visible[1, :, :4] = False  # four whole rows of batch row 1
    bias = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, torch.finfo(torch.float64).min)
    want = modified_sdpa(q, k, v, attn_mask=bias, enable_gqa=True, sinks=sinks)
    got = burst_attention(q, k, v, attn_mask=sink_site_mask(bias), enable_gqa=True, virtual_world_size=2,
                          kernel="reference", sinks=sinks)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert bool((want[1, :, :4] == 0).all())
    for a, b in zip(torch.autograd.grad(got, (q, k, v, sinks), dout), torch.autograd.grad(want, (q, k, v, sinks), dout)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
