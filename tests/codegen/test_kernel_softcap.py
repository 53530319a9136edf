"""The Triton kernels' soft-capped scores (SOFTCAP: S' = cap * tanh(S / cap) before any mask, Gemma 2) under
TRITON_INTERPRET, against the formula written out in float64 torch.

Set up like test_kernel_masks.py: random inputs, GQA (4 query heads on 2 key/value heads), q_len != k_len,
lengths that are not multiples of the interpreter's tiles, the capped item at row/key offsets after an
unmasked item or into a fresh state. The inputs are scaled so that |S| reaches several times the cap (the
tanh bends the scores). Mask classes: none, causal, a positions window and an additive bias (which joins the
scores after the cap)."""
import math
import zlib

import pytest
import torch

import burstc
from burstc.runtime import attention
from burstc.runtime.kernels.base import WorkItem
from burstc.runtime.kernels.reference import ReferenceKernel
from burstc.runtime.kernels.tile_mask import PositionMask
from burstc.runtime.kernels.triton import TritonKernel, _MaskArgs
from burstc.schedule.masks import AttentionMask
from tests.codegen.test_kernel_masks import (B, H, H_KV, K_LEN, MASKED, Q_LEN, UNMASKED, assert_close, global_bias,
                                             reference)
from tests.codegen.test_kernel_position_masks import run, segments

pytestmark = pytest.mark.usefixtures("interpret")

CAUSAL = WorkItem(3, Q_LEN, 20, K_LEN, True)  # top-left causal 37 x 45 rectangle at offsets (3, 20)
TOL = {torch.float32: 1e-5, torch.float16: 1e-3}  # of the largest reference value
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def item_bias(item):
    """[B, H, q_len, k_len] float64 additive bias of an unmasked item: 0, -inf above a causal item's diagonal."""
    visible = torch.ones(item.q_len, item.k_len, dtype=torch.bool)
    if item.causal:
        visible = visible.tril()
    return torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, -math.inf).expand(B, H, -1, -1)


def capped_item(mask_class, generator, dtype):
    """(item, mask handed to the kernel, the same as a float64 additive bias) of a mask class."""
    if mask_class == "none":
        return MASKED, None, item_bias(MASKED)
    if mask_class == "causal":
        return CAUSAL, None, item_bias(CAUSAL)
    if mask_class == "window":  # rows from q = 77 on see no key: dead rows when the state is fresh
        mask, q_pos, k_pos = AttentionMask(causal=True, window=(12, None)), segments((60, 97)), segments((20, 65))
        visible = mask.evaluate(q_pos, k_pos)
        bias = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, -math.inf)
        return MASKED, PositionMask.of(mask, q_pos, k_pos), bias.expand(B, H, -1, -1)
    values = 4 * torch.randn(B, H, MASKED.q_len, MASKED.k_len, generator=generator, dtype=torch.float64)
    mask = values.masked_fill(torch.rand(values.shape, generator=generator) < 0.3, -math.inf).to(dtype)
    return MASKED, mask, mask.double()


CASES = [  # (mask class, dtype, state before the capped item, head dim, cap)
    ("none", torch.float32, "fresh", 32, 5.0),
    ("none", torch.float16, "after_unmasked", 16, 50.0),
    ("causal", torch.float32, "after_unmasked", 16, 50.0),
    ("causal", torch.float16, "fresh", 32, 5.0),
    ("window", torch.float32, "fresh", 16, 5.0),
    ("window", torch.float16, "after_unmasked", 32, 5.0),
    ("bias", torch.float32, "after_unmasked", 32, 5.0),
]


@pytest.mark.parametrize("mask_class,dtype,before,head_dim,cap", CASES)
def test_softcapped_forward_and_backward(mask_class, dtype, before, head_dim, cap):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((mask_class, dtype, before, head_dim, cap)).encode()))
    magnitude = math.sqrt(2 * cap)  # S = scale q.k has a standard deviation of about 2 * cap
    q = (magnitude * torch.randn(B, H, Q_LEN, head_dim, generator=gen, dtype=torch.float64)).to(dtype)
    k, v = ((magnitude * torch.randn(B, H_KV, K_LEN, head_dim, generator=gen, dtype=torch.float64)).to(dtype)
            for _ in range(2))
    dout = torch.randn(B, H, Q_LEN, head_dim, generator=gen, dtype=torch.float64).to(dtype)
    scale = head_dim ** -0.5
    item, mask, bias = capped_item(mask_class, gen, dtype)
    before_items = [(UNMASKED, None)] if before == "after_unmasked" else []
    out_ref, lse_ref, dq_ref, dk_ref, dv_ref = reference(
        q, k, v, dout, global_bias(before_items + [(item, bias)]), scale, cap)
    raw = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(H // H_KV, 1)) * scale
    assert raw.abs().max() > 4 * cap  # the cap matters
    grads = dict(lse=lse_ref.float(), delta=(out_ref * dout.double()).sum(-1).float(),
                 dq=torch.randn(q.shape, generator=gen), dk=torch.randn(k.shape, generator=gen),
                 dv=torch.randn(k.shape, generator=gen))

    dead = lse_ref == -math.inf
    out, lse, dq, dk, dv = run(TritonKernel(softcap=cap), q, k, v, dout, before_items + [(item, mask)], scale,
                                 grads)
    assert_close(out, out_ref, TOL[dtype] * out_ref.abs().max().item(), "out")
    assert_close(lse, lse_ref, TOL[dtype] * lse_ref[~dead].abs().max().item(), "lse")
    assert torch.all(out[dead] == 0) and torch.all(lse[dead] == -math.inf)
    for name, got, want in (("dq", dq, dq_ref), ("dk", dk, dk_ref), ("dv", dv, dv_ref)):
        assert_close(got, want, GRAD_TOL[dtype] * want.abs().max().item(), name)
    assert torch.all(dq[dead] == 0)  # rows that saw nothing get exactly nothing


def test_uncapped_kernel_is_the_one_without_softcap():
    """softcap=None is the SOFTCAP=False variant (the cap argument None, a constexpr): the kernels of before,
    which test_kernels.py, test_kernel_masks.py and test_kernel_position_masks.py check; results bit-identical."""
    gen = torch.Generator().manual_seed(7)
    q, k, v, dout = (torch.randn(B, h, length, 16, generator=gen) for h, length in
                     ((H, Q_LEN), (H_KV, K_LEN), (H_KV, K_LEN), (H, Q_LEN)))
    spec = TritonKernel(softcap=None)._spec("forward_step", q, k, False, _MaskArgs())
    assert spec == TritonKernel()._spec("forward_step", q, k, False, _MaskArgs()) and not spec.softcap
    assert spec.constexprs()["SOFTCAP"] is False
    grads = dict(lse=torch.zeros(B, H, Q_LEN), delta=torch.zeros(B, H, Q_LEN), dq=torch.zeros(q.shape),
                 dk=torch.zeros(k.shape), dv=torch.zeros(k.shape))
    items = [(UNMASKED, None), (CAUSAL, None)]
    for a, b in zip(run(TritonKernel(), q, k, v, dout, items, 0.25, grads),
                    run(TritonKernel(softcap=None), q, k, v, dout, items, 0.25, grads)):
        assert torch.equal(a, b)


def test_softcap_kernel_choice():
    """kernel='triton' soft-caps on the triton kernel; 'auto' on CPU keeps the reference kernel; the cpu kernel
    refuses naming the fix; a learned bias's gradient stays on the reference kernel."""
    q = torch.randn(1, 2, 8, 16)
    chosen = attention._choose_kernel("triton", q, 5.0, False)
    assert isinstance(chosen, TritonKernel) and chosen.softcap == 5.0
    chosen = attention._choose_kernel("auto", q, 5.0, False)
    assert isinstance(chosen, ReferenceKernel) and chosen.softcap == 5.0
    with pytest.raises(ValueError, match="kernel='cpu' does not compute soft-capped scores: use kernel='triton'"):
        attention._choose_kernel("cpu", q, 5.0, False)
    with pytest.raises(ValueError, match="does not compute a learned attn_mask's gradient"):
        attention._choose_kernel("triton", q, 5.0, True)
    with pytest.raises(ValueError, match="positive"):
        TritonKernel(softcap=0.0)


@pytest.mark.parametrize("world, layout, backward", [(2, "contiguous", "kv_ring"), (3, "zigzag", "query_ring")])
def test_softcapped_ring_runs_on_the_triton_kernel(world, layout, backward):
    """burst_attention(kernel='triton', softcap=) through a virtual ring, causal with a window, GQA: the
    Gemma 2 formula on the whole sequence in float64, forward and gradients."""
    from tests.runtime.reference import dense_mask, max_errors

    gen = torch.Generator().manual_seed(world)
    n, cap = 45, 5.0
    q, k, v = (3 * torch.randn(1, h, n, 16, generator=gen) for h in (4, 2, 2))
    dout = torch.randn(1, 4, n, 16, generator=gen)
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    out = burstc.burst_attention(qq, kk, vv, causal=True, window=(9, None), enable_gqa=True, virtual_world_size=world,
                                 layout=layout, backward=backward, kernel="triton", softcap=cap)
    got = (out,) + torch.autograd.grad(out, (qq, kk, vv), dout)

    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    scores = cap * torch.tanh((q64 @ k64.repeat_interleave(2, 1).transpose(-1, -2)) * 16 ** -0.5 / cap)
    scores = scores.masked_fill(~dense_mask(1, n, causal=True, window=(9, None)), -math.inf)
    want = torch.softmax(scores, -1) @ v64.repeat_interleave(2, 1)
    want = (want.detach(),) + torch.autograd.grad(want, (q64, k64, v64), dout.double())
    assert max_errors(got, want)[1] <= 1e-5
