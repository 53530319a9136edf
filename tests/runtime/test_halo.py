"""burstc.runtime.halo: window ops on shards against the same op on the whole sequence (fp64, fresh random
inputs), forward and backward, every layout, lengths that do not divide, halos wider than a shard."""
import pytest
import torch
import torch.nn.functional as F

from burstc.launch import run_ranks
from burstc.runtime import halo
from burstc.runtime.sharding import shard_sequence
from burstc.runtime.stats import comm_stats
from burstc.schedule.layout import LAYOUTS, shard_positions


@pytest.mark.parametrize("shift", [3, -2, 0, 5, -5])
def test_sequence_shift_is_pad_and_roll(shift):
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    pads = (0, 0, shift, -shift)
    assert torch.equal(halo.sequence_shift(x, 1, shift, 0.5, False), F.pad(x, pads, value=0.5))
    assert torch.equal(halo.sequence_shift(x, 1, shift, 0.0, True), torch.roll(x, shift, 1))


def test_window_conv1d_is_a_causal_conv():
    x, w, b = torch.randn(2, 4, 9), torch.randn(4, 1, 3), torch.randn(4)
    want = F.conv1d(x, w, b, padding=4, dilation=2, groups=4)[..., :9]
    torch.testing.assert_close(halo.window_conv1d(x, w, b, 4, 0, 2, 4), want)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_plans_cover_every_window_row_once(layout):
    """Every extended row is filled exactly once (own, received or fill) and what a rank sends is what its
    peer expects to receive."""
    n, world, before, after = 23, 3, 4, 2
    plans = [halo.halo_plan(n, layout, world, r, before, after, False) for r in range(world)]
    for r, plan in enumerate(plans):
        filled = torch.cat([plan.own_ext, *plan.recv.values()])
        assert len(filled) == len(set(filled.tolist()))
        for q, rows in plan.send.items():
            assert len(rows) == len(plans[q].recv[r])
            sent_positions = shard_positions(n, layout, world, r)[rows]
            ext = torch.cat([torch.arange(s - before, s + m + after) for s, m in halo._segments(
                shard_positions(n, layout, world, q))])
            assert torch.equal(ext[plans[q].recv[r]], sent_positions)


def _compare(rank, world_size, n, layout):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, n, dtype=torch.float64, generator=gen)
    w = torch.randn(5, 1, 4, dtype=torch.float64, generator=gen)
    bias = torch.randn(5, dtype=torch.float64, generator=gen)
    up = torch.randn(2, 5, n, dtype=torch.float64, generator=gen)  # the upstream gradient
    errors = {}
    cases = {
        "causal_conv": (lambda t: halo.window_conv1d(t, w, bias, 6, 0, 2, 5),
                        lambda t: halo.sharded_window_conv1d(t, w, bias, 6, 0, 2, 5, 0.0, n, layout, "")),
        "same_conv": (lambda t: halo.window_conv1d(t, w, bias, 1, 2, 1, 5, 0.25),
                      lambda t: halo.sharded_window_conv1d(t, w, bias, 1, 2, 1, 5, 0.25, n, layout, "")),
        "shift": (lambda t: halo.sequence_shift(t, 2, 3, -1.0, False),
                  lambda t: halo.sharded_sequence_shift(t, 2, 3, -1.0, False, n, layout, "")),
        "shift_back": (lambda t: halo.sequence_shift(t, 2, -2, 0.0, False),
                       lambda t: halo.sharded_sequence_shift(t, 2, -2, 0.0, False, n, layout, "")),
        "roll": (lambda t: halo.sequence_shift(t, 2, 5, 0.0, True),
                 lambda t: halo.sharded_sequence_shift(t, 2, 5, 0.0, True, n, layout, "")),
    }
    with comm_stats() as c:
        for name, (full, sharded) in cases.items():
            xf = x.clone().requires_grad_()
            (full(xf) * up).sum().backward()
            mine = shard_sequence(x, dim=2, layout=layout, world_size=world_size, rank=rank).requires_grad_()
            got = sharded(mine)
            want = shard_sequence(full(x), dim=2, layout=layout, world_size=world_size, rank=rank)
            (got * shard_sequence(up, dim=2, layout=layout, world_size=world_size, rank=rank)).sum().backward()
            want_grad = shard_sequence(xf.grad, dim=2, layout=layout, world_size=world_size, rank=rank)
            errors[name] = max((got - want).abs().max().item(), (mine.grad - want_grad).abs().max().item())
    return errors, c.halo_bytes


def _rows_sent(n, layout, world_size, rank, windows):
    """Rows a rank sends, forward (its halo rows to their readers) and backward (their gradients back)."""
    plans = [halo.halo_plan(n, layout, world_size, rank, b, a, wrap) for b, a, wrap in windows]
    return sum(len(r) for p in plans for r in [*p.send.values(), *p.recv.values()])


@pytest.mark.parametrize("world_size,n", [(2, 16), (3, 13)])
def test_sharded_window_ops_match_the_whole_sequence(world_size, n):
    windows = [(6, 0, False), (1, 2, False), (3, 0, False), (0, 2, False), (5, 0, True)]  # the cases above
    for layout in LAYOUTS:
        for rank, (errors, halo_bytes) in enumerate(run_ranks(world_size, _compare, n, layout)):
            assert max(errors.values()) <= 1e-12, (layout, rank, errors)
            row_bytes = 2 * 5 * 8  # a token's [2, 5] float64 values
            assert halo_bytes == _rows_sent(n, layout, world_size, rank, windows) * row_bytes, (layout, rank)
            if layout != "striped":  # runs of tokens: the edges travel, far less than a gather of x
                assert 0 < halo_bytes < len(windows) * 2 * 4 * 7 * row_bytes, (layout, rank, halo_bytes)
