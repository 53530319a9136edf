"""The Triton kernels' generic tile mask (MASK "bool" / "bias") under TRITON_INTERPRET, against float64 torch.

Random inputs, GQA (4 query heads on 2 key/value heads), q_len != k_len, lengths that are not multiples
of the interpreter's tiles (forward/dq 32 x 16, dkdv 16 x 32), masked items at row offsets after an
unmasked item or into a fresh state, masks with fully hidden rows and fully hidden tiles, broadcast and
non-contiguous masks. The reference evaluates everything as one global additive bias (-inf = hidden)
and gives rows that see no key out = 0, lse = -inf and zero gradients (single-device SDPA's answer)."""
import math
import zlib

import pytest
import torch

from burstc.runtime.kernels.base import QueryBundle, WorkItem
from burstc.runtime.kernels.triton import TritonKernel, _item_mask

pytestmark = pytest.mark.usefixtures("interpret")

KERNEL = TritonKernel()
ATOL = {torch.float32: 2e-5, torch.float16: 4e-3}
GRAD_TOL = {torch.float32: 2e-4, torch.float16: 2e-2}
B, H, H_KV = 2, 4, 2
Q_LEN, K_LEN = 40, 65  # the rank's query rows and the visiting keys
UNMASKED = WorkItem(0, Q_LEN, 0, 20, False)  # keys [0, 20) seen by every row
MASKED = WorkItem(3, Q_LEN, 20, K_LEN, False)  # a 37 x 45 masked rectangle at offsets (3, 20)


def random(*shape, dtype=torch.float32, generator=None):
    return torch.randn(*shape, dtype=torch.float64, generator=generator).to(dtype)


def hidden_pattern(lead, q_len, k_len, generator):
    """A boolean `hidden` [*lead, 37, 45]: random, plus fully hidden rows (2 and 11, and 7 in the first
    batch/head only) and fully hidden tiles of each kernel's tiling (forward/dq: 32 query rows x 16 keys;
    dkdv: 32 keys x 16 query rows) inside, before and after the visible tiles of a program."""
    hidden = torch.rand(*lead, q_len, k_len, generator=generator) < 0.5
    hidden[..., 0:32, 16:32] = True  # forward/dq rows 0..31: the middle key tile hidden
    hidden[..., 32:, :] = True  # forward/dq rows 32..36: the first and last key tiles hidden,
    hidden[..., 32:, 16:32] = False  # the middle one all visible
    hidden[..., 0:16, 32:] = True  # dkdv keys 32..44: the first (and, above, the last) query tile hidden
    hidden[..., [2, 11], :] = True
    hidden[(0,) * len(lead) + (7,)] = True
    return hidden


def make_mask(kind, layout, q_dtype, generator):
    """(mask handed to the kernel, the same as a float64 additive bias [B, H, q_len, k_len])."""
    lead = {"full": (B, H), "broadcast": (1, 1), "batch": (B, 1), "transposed": (B, H)}[layout]
    q_len, k_len = MASKED.q_len, MASKED.k_len
    hidden = hidden_pattern(lead, q_len, k_len, generator)
    if kind == "bool":
        mask = ~hidden
        bias = torch.zeros(hidden.shape, dtype=torch.float64).masked_fill(hidden, -math.inf)
    else:
        values = 2 * torch.randn(hidden.shape, dtype=torch.float64, generator=generator)
        bias = values.masked_fill(hidden, -math.inf)
        mask = bias.to(q_dtype)
        bias = mask.double()  # what the kernel sees (the bias rounded to q's dtype)
    if layout == "transposed":  # key-major storage: the mask's key stride is not 1
        mask = mask.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout in ("broadcast", "batch"):
        mask = mask.expand(B, H, q_len, k_len)  # stride-0 views
    return mask, bias.expand(B, H, q_len, k_len)


def global_bias(items_and_bias):
    """[B, H, Q_LEN, K_LEN] float64: -inf outside the items, 0 in unmasked items, the bias in masked ones."""
    total = torch.full((B, H, Q_LEN, K_LEN), -math.inf, dtype=torch.float64)
    for item, bias in items_and_bias:
        total[:, :, item.q_start:item.q_stop, item.k_start:item.k_stop] = 0.0 if bias is None else bias
    return total


def reference(q, k, v, dout, bias, scale, cap=None):
    """float64 (out, lse, dq, dk, dv) by autograd of softmax(S + bias) v, S = scale q k^T (cap: soft-capped,
    cap * tanh(S / cap)); rows that see nothing: out 0, lse -inf, no gradient."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ ke.transpose(-1, -2)) * scale
    s = (s if cap is None else cap * torch.tanh(s / cap)) + bias
    dead = (s == -math.inf).all(-1, keepdim=True)
    s = s.masked_fill(dead, 0.0)
    out = (torch.softmax(s, -1) * ~dead) @ ve
    lse = torch.logsumexp(s, -1).masked_fill(dead[..., 0], -math.inf)
    out.backward(dout.double())
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def assert_close(actual, expected, atol, what):
    assert not actual.isnan().any(), f"{what}: NaN"
    both_inf = (actual.double() == expected) & expected.isinf()
    error = torch.where(both_inf, 0.0, (actual.double() - expected).abs()).max().item()
    assert error <= atol, f"{what}: max error {error:.3g} > {atol:.3g}"


CASES = [  # (dtype, mask kind, mask layout, state before the masked item, head dim)
    (torch.float32, "bool", "full", "after_unmasked", 64),
    (torch.float32, "bool", "broadcast", "fresh", 64),
    (torch.float32, "bias", "full", "fresh", 64),
    (torch.float32, "bias", "transposed", "after_unmasked", 80),
    (torch.float32, "bool", "batch", "after_unmasked", 64),
    (torch.float16, "bool", "full", "fresh", 64),
    (torch.float16, "bias", "broadcast", "after_unmasked", 64),
    (torch.float16, "bias", "full", "fresh", 64),
]


@pytest.mark.parametrize("dtype,kind,layout,before,head_dim", CASES)
def test_masked_item_forward_and_backward(dtype, kind, layout, before, head_dim):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, kind, layout, before, head_dim)).encode()))
    q = random(B, H, Q_LEN, head_dim, dtype=dtype, generator=gen)
    k, v = (random(B, H_KV, K_LEN, head_dim, dtype=dtype, generator=gen) for _ in range(2))
    dout = random(B, H, Q_LEN, head_dim, dtype=dtype, generator=gen)
    scale = head_dim ** -0.5
    mask, bias = make_mask(kind, layout, dtype, gen)
    items = ([(UNMASKED, None)] if before == "after_unmasked" else []) + [(MASKED, mask)]
    out_ref, lse_ref, dq_ref, dk_ref, dv_ref = reference(
        q, k, v, dout, global_bias([(item, None if m is None else bias) for item, m in items]), scale)
    dead = lse_ref == -math.inf  # rows outside the item and rows the mask hides entirely, when fresh
    assert bool(dead.any()) == (before == "fresh") and (~dead).any()

    state = KERNEL.forward_init(q)
    for item, m in items:
        KERNEL.forward_step(state, q, k, v, item, scale, mask=m)
    assert not (state.m.isnan().any() or state.l.isnan().any() or state.acc.isnan().any())
    out, lse = KERNEL.forward_finalize(state)
    assert_close(out, out_ref, ATOL[dtype], "out")
    assert_close(lse, lse_ref, ATOL[dtype] if dtype == torch.float32 else 1e-4, "lse")
    assert torch.all(out[dead] == 0) and torch.all(lse[dead] == -math.inf)

    # backward with the global lse and D of the reference, into non-zero accumulators
    bundle = QueryBundle(q=q, dout=dout, lse=lse_ref.float(), delta=(out_ref * dout.double()).sum(-1).float())
    dq, dk, dv = random(*q.shape, generator=gen), random(*k.shape, generator=gen), random(*k.shape, generator=gen)
    dq0, dk0, dv0 = dq.clone(), dk.clone(), dv.clone()
    for item, m in items:
        KERNEL.backward_step(bundle, k, v, item, scale, dq, dk, dv, mask=m)
    assert_close(dq - dq0, dq_ref, GRAD_TOL[dtype], "dq")
    assert_close(dk - dk0, dk_ref, GRAD_TOL[dtype], "dk")
    assert_close(dv - dv0, dv_ref, GRAD_TOL[dtype], "dv")
    assert torch.all(dq[dead] == dq0[dead])  # rows that saw nothing get exactly nothing


def assert_hidden_item_adds_nothing(q, k, v, item, hidden):
    """An item whose mask hides everything: a fresh state stays empty (out 0, lse -inf), a used state stays
    exactly as it was, and the backward adds exactly nothing (no NaN from rows with lse -inf)."""
    fresh = KERNEL.forward_init(q)
    KERNEL.forward_step(fresh, q, k, v, item, 0.125, mask=hidden)
    assert torch.all(fresh.m == -math.inf) and torch.all(fresh.l == 0) and torch.all(fresh.acc == 0)
    out, lse = KERNEL.forward_finalize(fresh)
    assert torch.all(out == 0) and torch.all(lse == -math.inf)

    state = KERNEL.forward_init(q)
    KERNEL.forward_step(state, q, k, v, WorkItem(0, item.q_len, 0, 20, False), 0.125)
    before = (state.acc.clone(), state.m.clone(), state.l.clone())
    KERNEL.forward_step(state, q, k, v, item, 0.125, mask=hidden)
    for was, now in zip(before, (state.acc, state.m, state.l)):
        assert torch.equal(was, now)

    bundle = QueryBundle(q=q, dout=random(*q.shape), lse=lse, delta=torch.zeros(q.shape[:3]))
    dq, dk, dv = torch.zeros(q.shape), torch.zeros(k.shape), torch.zeros(k.shape)
    KERNEL.backward_step(bundle, k, v, item, 0.125, dq, dk, dv, mask=hidden)
    for grad in (dq, dk, dv):
        assert torch.all(grad == 0)


@pytest.mark.parametrize("kind", ["bool", "bias"])
def test_fully_hidden_item_leaves_the_state_as_it_was(kind):
    q, k, v = random(1, 4, 37, 64), random(1, 2, 45, 64), random(1, 2, 45, 64)
    hidden = (torch.zeros(1, 1, 37, 45, dtype=torch.bool) if kind == "bool"
              else torch.full((1, 1, 37, 45), -math.inf))
    assert_hidden_item_adds_nothing(q, k, v, WorkItem(0, 37, 0, 45, False), hidden)


def test_visible_bool_mask_equals_the_unmasked_item():
    """An all-True mask (and an all-zero bias) gives the unmasked item's results (same tiles, same order)."""
    q, k, v = random(1, 2, 37, 64), random(1, 2, 45, 64), random(1, 2, 45, 64)
    item = WorkItem(0, 37, 0, 45, False)
    results = []
    for mask in (None, torch.ones(37, 45, dtype=torch.bool).expand(1, 2, 37, 45), torch.zeros(1, 1, 37, 45)):
        state = KERNEL.forward_init(q)
        KERNEL.forward_step(state, q, k, v, item, 0.125, mask=mask)
        results.append(KERNEL.forward_finalize(state))
    for out, lse in results[1:]:
        assert torch.allclose(out, results[0][0], atol=1e-6) and torch.allclose(lse, results[0][1], atol=1e-6)


def test_mask_arguments_are_checked():
    q, k, v = random(2, 4, 10, 64), random(2, 2, 12, 64), random(2, 2, 12, 64)
    state = KERNEL.forward_init(q)
    item = WorkItem(0, 10, 0, 12, False)
    with pytest.raises(ValueError, match="does not cover"):
        KERNEL.forward_step(state, q, k, v, item, 0.1, mask=torch.ones(2, 4, 10, 11, dtype=torch.bool))
    with pytest.raises(ValueError, match="broadcast"):
        KERNEL.forward_step(state, q, k, v, item, 0.1, mask=torch.ones(3, 4, 10, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal"):
        KERNEL.forward_step(state, q, k, v, WorkItem(0, 10, 0, 12, True), 0.1,
                            mask=torch.ones(1, 1, 10, 12, dtype=torch.bool))
    # 32-bit in-tile offsets: a mask plane spanning 2^31 elements is refused (meta tensors: no memory)
    huge = torch.empty_strided((1, 1, 10, 12), (0, 0, 2 ** 28, 1), dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="2\\^31"):
        _item_mask(huge, torch.empty(2, 4, 10, 64, device="meta"), item)
    with pytest.raises(TypeError, match="bool or floating"):
        KERNEL.forward_step(state, q, k, v, item, 0.1, mask=torch.ones(1, 1, 10, 12, dtype=torch.int32))
    assert torch.all(state.m == -math.inf)  # nothing ran


@pytest.mark.parametrize("world, layout, backward", [(2, "contiguous", "kv_ring"), (3, "zigzag", "query_ring")])
def test_masked_virtual_ring_runs_on_the_triton_kernel(world, layout, backward, monkeypatch):
    """The ring's masked items (a window; documents with key padding) through these kernels equal SDPA
    with the materialised mask in float64, forward and gradients."""
    import burstc
    from tests.runtime.reference import dense_mask, max_errors, random_qkv, sdpa_masked_with_grads

    monkeypatch.setenv("BURST_MASK_TILE", "16")  # several tiles per chunk: full, partial and skipped ones
    b, n = 2, 45
    docs = torch.repeat_interleave(torch.arange(3), torch.tensor([10, 20, 15])).view(1, -1).expand(b, -1)
    padding = torch.rand(b, n, generator=torch.Generator().manual_seed(4)) > 0.2
    padding[1, :12] = False
    cases = [(dict(window=(5, 0)), dict(window=(5, 0))),
             (dict(document_ids=docs, key_padding_mask=padding), dict(document_ids=docs, key_padding=padding))]
    for i, (kwargs, dense) in enumerate(cases):
        q, k, v, dout = random_qkv(b, 4, 2, n, 16, torch.float32, seed=world + 10 * i)
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out = burstc.burst_attention(qq, kk, vv, causal=True, enable_gqa=True, virtual_world_size=world,
                                     layout=layout, backward=backward, kernel="triton", **kwargs)
        grads = torch.autograd.grad(out, (qq, kk, vv), dout)
        want = sdpa_masked_with_grads(q, k, v, dout, dense_mask(b, n, causal=True, **dense))
        assert max_errors((out,) + grads, want)[0] <= 1e-5, (world, layout, list(kwargs))
