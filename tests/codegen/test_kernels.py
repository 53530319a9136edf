"""The Triton kernels under TRITON_INTERPRET against a float64 plain-torch reference.

Small shapes with odd lengths that cross several tiles (the interpreter's tiles are 16 and 32 rows),
every head dim of the table, both mask classes, GQA, non-contiguous views, fresh random inputs."""
import math

import pytest
import torch

from burstc.codegen import cache
from burstc.runtime.kernels.base import QueryBundle, WorkItem
from burstc.runtime.kernels.triton import TritonKernel

pytestmark = pytest.mark.usefixtures("interpret")

KERNEL = TritonKernel()
# fp32 kernels in the interpreter: numpy float32 matmuls and exp2, against float64.
ATOL = {torch.float32: 2e-5, torch.float16: 4e-3}


def reference_attention(q, k, v, visible, scale):
    """float64 attention of q [B, H, Lq, d] on k, v [B, H_kv, Lk, d] under a boolean visible [Lq, Lk]:
    (out, natural-log lse); rows that see nothing give out = 0, lse = -inf."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1)
    v = v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(scores, -1)
    weights = torch.exp(scores - torch.where(lse.isinf(), 0.0, lse)[..., None])
    return weights @ v, lse


def visible_mask(items, q_len, k_len):
    """The union of WorkItem rectangles as a boolean [q_len, k_len] mask (top-left causal inside causal items)."""
    visible = torch.zeros(q_len, k_len, dtype=torch.bool)
    for item in items:
        block = torch.ones(item.q_len, item.k_len, dtype=torch.bool)
        if item.causal:
            block = block.tril()
        visible[item.q_start:item.q_stop, item.k_start:item.k_stop] |= block
    return visible


def random(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def chunk_bounds(length, parts):
    """Uneven chunk boundaries of [0, length)."""
    cuts = sorted(torch.randperm(length - 1)[: parts - 1].add(1).tolist())
    return list(zip([0] + cuts, cuts + [length]))


def ring_items(q_len, k_len, causal, parts):
    """(key chunk bounds, item) pairs of a virtual ring: full attention over key chunks, or (q_len ==
    k_len) global causal, where the chunk [a, b) is one top-left causal item of query rows [a, L)."""
    pairs = []
    for a, b in chunk_bounds(k_len, parts):
        if causal:
            pairs.append(((a, b), WorkItem(a, q_len, 0, b - a, True)))
        else:
            pairs.append(((a, b), WorkItem(0, q_len, 0, b - a, False)))
    return pairs


def assert_close(actual, expected, atol, what):
    error = (actual.double() - expected).abs().max().item()
    assert error <= atol, f"{what}: max error {error:.3g} > {atol:.3g}"


def backward_reference(q, k, v, dout, visible, scale):
    """float64 (out, lse, dq, dk, dv) by autograd."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    out, lse = reference_attention(q, k, v, visible, scale)
    out.backward(dout.double())
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


CASES = [  # (head dim, H_q, H_kv, causal)
    (64, 2, 2, False), (64, 4, 2, True), (80, 2, 1, True), (96, 3, 3, False),
    (128, 4, 1, False), (128, 2, 2, True), (256, 2, 1, True),
]


@pytest.mark.parametrize("head_dim,heads,kv_heads,causal", CASES)
def test_ring_of_forward_steps_equals_attention(head_dim, heads, kv_heads, causal):
    batch, q_len = 2, 41
    k_len = q_len if causal else 53
    q, k, v = random(batch, heads, q_len, head_dim), random(batch, kv_heads, k_len, head_dim), random(
        batch, kv_heads, k_len, head_dim)
    scale = head_dim ** -0.5

    state = KERNEL.forward_init(q)
    for (a, b), item in ring_items(q_len, k_len, causal, parts=3):
        # the visiting chunk arrives as its own tensor, as on a ring
        KERNEL.forward_step(state, q, k[:, :, a:b].clone(), v[:, :, a:b].clone(), item, scale)
    out, lse = KERNEL.forward_finalize(state)

    visible = torch.ones(q_len, k_len, dtype=torch.bool)
    expected_out, expected_lse = reference_attention(q.double(), k.double(), v.double(),
                                                     visible.tril() if causal else visible, scale)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert_close(out, expected_out, ATOL[q.dtype], "out")
    assert_close(lse, expected_lse, ATOL[q.dtype], "lse")


@pytest.mark.parametrize("head_dim,heads,kv_heads,causal", CASES)
def test_backward_steps_give_gradients(head_dim, heads, kv_heads, causal):
    batch, q_len = 1, 41
    k_len = q_len if causal else 37
    q, k, v = random(batch, heads, q_len, head_dim), random(batch, kv_heads, k_len, head_dim), random(
        batch, kv_heads, k_len, head_dim)
    dout = random(batch, heads, q_len, head_dim)
    scale = head_dim ** -0.5
    visible = torch.ones(q_len, k_len, dtype=torch.bool)
    visible = visible.tril() if causal else visible
    out, lse, dq_ref, dk_ref, dv_ref = backward_reference(q, k, v, dout, visible, scale)

    out32 = out.float()
    delta = KERNEL.delta(out32, dout)
    assert_close(delta, (out * dout.double()).sum(-1), ATOL[q.dtype], "delta")
    bundle = QueryBundle(q=q, dout=dout, lse=lse.float(), delta=delta, out=out32)
    dq = random(*q.shape)  # accumulators start non-zero: the kernels add into them
    dk, dv = random(*k.shape), random(*k.shape)
    dq0, dk0, dv0 = dq.clone(), dk.clone(), dv.clone()
    for (a, b), item in ring_items(q_len, k_len, causal, parts=3):
        KERNEL.backward_step(bundle, k[:, :, a:b], v[:, :, a:b], item, scale, dq, dk[:, :, a:b], dv[:, :, a:b])

    tol = 10 * ATOL[q.dtype]
    assert_close(dq - dq0, dq_ref, tol, "dq")
    assert_close(dk - dk0, dk_ref, tol, "dk")
    assert_close(dv - dv0, dv_ref, tol, "dv")


def test_items_of_a_step_with_offsets_and_strides():
    """Several rectangles of one step, at row offsets of strided views, wide and tall causal ones."""
    batch, heads, kv_heads, head_dim, q_len, k_len = 2, 4, 2, 80, 45, 50
    items = [
        WorkItem(0, 12, 0, 30, True),    # q_len < k_len: keys 12.. of the slice are seen by nobody
        WorkItem(12, 45, 0, 9, True),    # q_len > k_len: rows beyond 9 see all 9 keys
        WorkItem(12, 45, 30, 50, False),
        WorkItem(0, 12, 33, 47, False),
    ]
    # q as a transposed [B, L, H, d] buffer, k with a head-dim stride of 2, v a slice of a longer buffer
    q = random(batch, q_len, heads, head_dim).transpose(1, 2)
    k = random(batch, kv_heads, k_len, 2 * head_dim)[..., ::2]
    v = random(batch, kv_heads, k_len + 7, head_dim)[:, :, 7:]
    dout = random(batch, q_len, heads, head_dim).transpose(1, 2)
    scale = 0.3
    visible = visible_mask(items, q_len, k_len)
    out_ref, lse_ref, dq_ref, dk_ref, dv_ref = backward_reference(q, k, v, dout, visible, scale)

    state = KERNEL.forward_init(q)
    for item in items:
        KERNEL.forward_step(state, q, k, v, item, scale)
    out, lse = KERNEL.forward_finalize(state)
    assert_close(out, out_ref, ATOL[q.dtype], "out")
    assert_close(lse, lse_ref, ATOL[q.dtype], "lse")

    bundle = QueryBundle(q=q, dout=dout, lse=lse, delta=KERNEL.delta(out, dout))
    dq, dk, dv = torch.zeros(q.shape), torch.zeros(k.shape), torch.zeros(k.shape)
    for item in items:
        KERNEL.backward_step(bundle, k, v, item, scale, dq, dk, dv)
    tol = 10 * ATOL[q.dtype]
    assert_close(dq, dq_ref, tol, "dq")
    assert_close(dk, dk_ref, tol, "dk")
    assert_close(dv, dv_ref, tol, "dv")


def test_rows_that_see_no_key():
    q, k, v = random(1, 2, 40, 64), random(1, 2, 20, 64), random(1, 2, 20, 64)
    state = KERNEL.forward_init(q)
    KERNEL.forward_step(state, q, k, v, WorkItem(5, 30, 0, 20, True), 0.125)
    KERNEL.forward_step(state, q, k, v, WorkItem(5, 5, 0, 20, False), 0.125)  # empty item: no-op
    out, lse = KERNEL.forward_finalize(state)
    unseen = torch.ones(40, dtype=torch.bool)
    unseen[5:30] = False
    assert torch.all(out[:, :, unseen] == 0)
    assert torch.all(lse[:, :, unseen] == -math.inf)
    assert torch.isfinite(lse[:, :, ~unseen]).all()

    # backward with the saved -inf lse of unseen rows adds nothing, and no NaN
    bundle = QueryBundle(q=q, dout=random(*q.shape), lse=lse, delta=KERNEL.delta(out, random(*q.shape)))
    dq, dk, dv = torch.zeros(q.shape), torch.zeros(k.shape), torch.zeros(k.shape)
    KERNEL.backward_step(bundle, k, v, WorkItem(30, 40, 0, 20, False), 0.125, dq, dk, dv)
    for grad in (dq, dk, dv):
        assert torch.all(grad == 0)


def test_float16_forward_and_backward():
    heads, head_dim, length = 2, 64, 35
    q, k, v, dout = (random(1, heads, length, head_dim, dtype=torch.float16) for _ in range(4))
    scale = head_dim ** -0.5
    visible = torch.ones(length, length, dtype=torch.bool).tril()
    out_ref, lse_ref, dq_ref, dk_ref, dv_ref = backward_reference(q, k, v, dout, visible, scale)
    item = WorkItem(0, length, 0, length, True)
    state = KERNEL.forward_init(q)
    KERNEL.forward_step(state, q, k, v, item, scale)
    out, lse = KERNEL.forward_finalize(state)
    assert out.dtype == torch.float16
    assert_close(out, out_ref, ATOL[torch.float16], "out")
    assert_close(lse, lse_ref, 1e-4, "lse")
    bundle = QueryBundle(q=q, dout=dout, lse=lse, delta=KERNEL.delta(out, dout))
    dq, dk, dv = torch.zeros(q.shape), torch.zeros(k.shape), torch.zeros(k.shape)
    KERNEL.backward_step(bundle, k, v, item, scale, dq, dk, dv)
    for name, grad, expected in (("dq", dq, dq_ref), ("dk", dk, dk_ref), ("dv", dv, dv_ref)):
        assert_close(grad, expected, 5 * ATOL[torch.float16], name)


def test_supports(monkeypatch):
    assert KERNEL.name == "triton"
    assert KERNEL.supports(random(1, 1, 4, 64)) is None
    assert KERNEL.supports(random(1, 1, 4, 64, dtype=torch.float16)) is None
    assert "float64" in KERNEL.supports(random(1, 1, 4, 64, dtype=torch.float64))
    assert "bfloat16" in KERNEL.supports(random(1, 1, 4, 64, dtype=torch.bfloat16))  # Triton interpreter bug
    assert "head dim" in KERNEL.supports(random(1, 1, 4, 512))
    assert "int" in KERNEL.supports(torch.zeros(1, 1, 4, 64, dtype=torch.int32))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET" in KERNEL.supports(random(1, 1, 4, 64))


def test_each_mode_has_its_own_kernels():
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(cache.kernel("forward_step", interpret=True), InterpretedFunction)
    assert isinstance(cache.kernel("forward_step", interpret=False), triton.runtime.JITFunction)


def test_interpreted_launches_leave_triton_language_as_it_was():
    """Triton's interpreter leaks its numpy patches of triton.language from nested @jit calls;
    the launch undoes them, or a later compile in this process would fail."""
    import triton.language as tl

    namespaces = (tl, tl.core, tl.math, tl.core.tensor, tl.standard)
    before = [dict(vars(namespace)) for namespace in namespaces]
    q = random(1, 1, 20, 64)
    state = KERNEL.forward_init(q)
    KERNEL.forward_step(state, q, q, q, WorkItem(0, 20, 0, 20, True), 0.125)
    KERNEL.forward_finalize(state)
    for namespace, old in zip(namespaces, before):
        now = vars(namespace)
        changed = [name for name in old if now.get(name) is not old[name]]
        assert not changed, f"{namespace.__name__}: {changed[:5]}"


@pytest.mark.parametrize("causal,backward,world",
                         [(False, "query_ring", 2), (True, "kv_ring", 2), (True, "query_ring", 4)])
def test_virtual_ring_runs_on_the_triton_kernel(causal, backward, world):
    """The runtime's ring (its layouts, WorkItems and bundles) on these kernels equals SDPA in float64."""
    import torch.nn.functional as F

    import burstc

    q = random(1, 4, 50, 64).requires_grad_()
    k, v = (random(1, 2, 50, 64).requires_grad_() for _ in range(2))
    out = burstc.burst_attention(q, k, v, causal=causal, enable_gqa=True, virtual_world_size=world,
                                 kernel="triton", backward=backward)
    dout = random(*out.shape)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, enable_gqa=True)
    expected_grads = torch.autograd.grad(expected, (qd, kd, vd), dout.double())
    assert_close(out, expected.detach(), ATOL[torch.float32], "out")
    for name, grad, want in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(grad, want, 10 * ATOL[torch.float32], name)
