"""Each back-end's step functions against a float64 reference computed independently with SDPA."""

import pytest
import torch
import torch.nn.functional as F

from burstc.runtime.kernels import QueryBundle, WorkItem, select_kernel
from burstc.runtime.kernels.cpu import CpuKernel, _delta_carrier
from burstc.runtime.kernels.reference import ReferenceKernel


def chunked_forward(kernel, q, k, v, chunks, scale):
    """Fold key chunks one by one (as ring steps do) and finalise."""
    state = kernel.forward_init(q)
    for start, stop in chunks:
        kernel.forward_step(state, q, k, v, WorkItem(0, q.shape[2], start, stop, False), scale)
    return kernel.forward_finalize(state)


@pytest.mark.parametrize("kernel, dtype, tol", [(ReferenceKernel(), torch.float64, 1e-12),
                                                (CpuKernel(), torch.float32, 1e-5)])
def test_chain_of_steps_equals_full_attention(kernel, dtype, tol):
    q, k, v = (torch.randn(2, 4, 19, 16, dtype=dtype) for _ in range(3))
    out, lse = chunked_forward(kernel, q, k, v, [(0, 5), (5, 6), (6, 19)], 0.25)
    qd, kd, vd = (x.double() for x in (q, k, v))
    want = F.scaled_dot_product_attention(qd, kd, vd, scale=0.25)
    want_lse = torch.logsumexp(qd @ kd.transpose(-1, -2) * 0.25, dim=-1)
    assert (out.double() - want).abs().max() <= tol
    assert (lse.double() - want_lse).abs().max() <= tol * 10


@pytest.mark.parametrize("with_out", [True, False], ids=["kv_ring_bundle", "query_ring_bundle"])
def test_backward_items_sum_to_the_full_gradients(with_out):
    torch.manual_seed(0)
    q = torch.randn(1, 4, 12, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 12, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 12, 8, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(1, 4, 12, 8, dtype=torch.float64)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    want = torch.autograd.grad(out, (q, k, v), dout)
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 8 ** 0.5).masked_fill(
        ~torch.ones(12, 12, dtype=torch.bool).tril(), float("-inf"))
    lse = torch.logsumexp(scores, -1).detach()
    delta = (dout * out).sum(-1).detach()
    items = [WorkItem(0, 6, 0, 6, True), WorkItem(6, 12, 0, 6, False), WorkItem(6, 12, 6, 12, True)]
    for kernel in (ReferenceKernel(), CpuKernel()):
        bundle = QueryBundle(q.detach(), dout, lse, delta, out=out.detach() if with_out else None)
        dq, dk, dv = (torch.zeros_like(t, dtype=torch.float64) for t in (q, k, v))
        for item in items:
            kernel.backward_step(bundle, k.detach(), v.detach(), item, 8 ** -0.5, dq, dk, dv)
        for got, exp in zip((dq, dk, dv), want):
            assert (got - exp).abs().max() <= 1e-10, kernel.name


def test_delta_carrier_reproduces_delta_and_handles_zero_rows():
    dout = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    dout[0, 1, 3] = 0
    delta = torch.randn(1, 2, 5, dtype=torch.float64)
    delta[0, 1, 3] = 0
    carrier = _delta_carrier(QueryBundle(torch.randn_like(dout), dout, delta, delta), torch.float64)
    assert torch.allclose((dout * carrier).sum(-1), delta, atol=1e-14)
    assert torch.isfinite(carrier).all()


def test_auto_selection_on_cpu():
    assert select_kernel("auto", torch.randn(1, 1, 2, 4)).name == "cpu"
    assert select_kernel("reference", torch.randn(1, 1, 2, 4)).name == "reference"
    with pytest.raises(ValueError, match="unknown kernel"):
        select_kernel("fast", torch.randn(1, 1, 2, 4))
