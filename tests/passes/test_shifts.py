"""passes.shifts: shifted next-token losses become the unshifted logits against padded targets, with the
same value and gradients (one process, against eager), in every matched spelling; other slices stay."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

from burstc.passes.shifts import unshift_losses

V = 11


def _nanogpt(logits, y, **kw):
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), y[:, 1:].reshape(-1), **kw)


def _hf_older(logits, y, **kw):
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = y[..., 1:].contiguous()
    return nn.CrossEntropyLoss(**kw)(shift_logits.view(-1, V), shift_labels.view(-1))


def _flat(logits, y, **kw):
    return F.cross_entropy(logits.view(-1, V)[:-1], y.view(-1)[1:], **kw)


def _by_two(logits, y, **kw):
    return F.cross_entropy(logits[:, :-2, :].reshape(-1, V), y[:, 2:].reshape(-1), **kw)


def _rewritten(fn, logits, y, kw):
    """fn compiled through a backend that runs only this pass; the number of losses it rewrote."""
    def backend(gm, example_inputs):
        unshift_losses(gm)
        return gm.forward
    counters.clear()
    torch._dynamo.reset()
    out = torch.compile(lambda a, b: fn(a, b, **kw), backend=backend, fullgraph=True)(logits, y)
    return out, counters["burst"]["shifts_unshifted"]


@pytest.mark.parametrize("fn", [_nanogpt, _hf_older, _flat, _by_two])
@pytest.mark.parametrize("kw", [{}, {"reduction": "sum"}, {"ignore_index": 3}, {"label_smoothing": 0.1},
                                {"weight": torch.rand(V, dtype=torch.float64) + 0.5}])
def test_same_loss_and_gradient(fn, kw):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 16, V, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (3, 16), generator=g)
    y[0, 5] = -100 if "ignore_index" not in kw else kw["ignore_index"]
    want = fn(logits, y, **kw)
    (want_grad,) = torch.autograd.grad(want, logits)
    got, rewritten = _rewritten(fn, logits, y, kw)
    (got_grad,) = torch.autograd.grad(got, logits)
    assert rewritten == 1
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12) and torch.allclose(got_grad, want_grad, atol=1e-12)


def _mismatched(logits, y):  # the logits lose the last row, the targets the last one too: not a shift
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), y[:, :-1].reshape(-1))


def _per_token(logits, y):
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), y[:, 1:].reshape(-1), reduction="none")


@pytest.mark.parametrize("fn", [_mismatched, _per_token])
def test_other_slices_are_left_alone(fn):
    logits, y = torch.randn(2, 8, V), torch.randint(0, V, (2, 8))
    got, rewritten = _rewritten(lambda a, b: fn(a, b), logits, y, {})
    assert rewritten == 0 and torch.allclose(got, fn(logits, y))


class _GptWithShiftedLoss(nn.Module):
    def __init__(self):
        super().__init__()
        from tests.models import TinyGPT

        self.gpt = TinyGPT(vocab=V, dim=32, layers=2)

    def forward(self, idx):
        return _nanogpt(self.gpt(idx), idx)


def _two_ranks(rank, world_size):
    import copy

    torch.manual_seed(0)
    model = _GptWithShiftedLoss()
    idx = torch.randint(0, V, (2, 64), generator=torch.Generator().manual_seed(1))
    want = model(idx)
    want.backward()
    counters.clear()
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), backend="burst")
    got = compiled(idx)
    got.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad for n, p in compiled.named_parameters()}
    err = max(((grads[n] - p.grad).norm() / p.grad.norm()).item() for n, p in model.named_parameters())
    return abs(got - want).item(), err, dict(counters["burst"])


def test_sequence_mode_keeps_the_logits_sharded():
    """nanoGPT's loss inside the compiled model on 2 ranks: no gather of the logits (the slice along the
    sequence is gone), the targets enter sharded, loss and gradients as on one device."""
    from burstc.launch import run_ranks

    for loss_err, grad_err, c in run_ranks(2, _two_ranks, timeout_s=600):
        assert loss_err <= 1e-5 and grad_err <= 1e-4, (loss_err, grad_err, c)
        assert c.get("shifts_unshifted") == 1 and c.get("seq_graphs") == 1 and not c.get("seq_gathers"), c
