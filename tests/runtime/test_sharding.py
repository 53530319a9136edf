"""shard_sequence / unshard_sequence on spawned gloo ranks: unshard is differentiable, shard is its
adjoint, and their composition is the identity, values and gradients, for every layout and uneven lengths."""
import pytest
import torch

from burstc.launch import run_ranks


def _round_trip(rank, world_size):
    import burstc

    results = []
    for layout, seq_len in (("zigzag", 13), ("striped", 10), ("contiguous", 7)):
        g = torch.Generator().manual_seed(seq_len)
        x = torch.randn(2, seq_len, 3, generator=g, dtype=torch.float64, requires_grad=True)
        weights = torch.randn(2, seq_len, 3, generator=g, dtype=torch.float64)  # the same on every rank
        local = burstc.shard_sequence(x, dim=1, layout=layout, world_size=world_size, rank=rank)
        full = burstc.unshard_sequence(local, dim=1, layout=layout)
        loss = (full.sin() * weights).sum()  # f(y), replicated: every rank computes the same number
        loss.backward()
        summed = x.grad.clone()
        torch.distributed.all_reduce(summed)  # x's gradient over the ranks that each took one shard
        want = weights * x.detach().cos()  # d f(x) / dx on one device
        results.append((layout, seq_len, (full - x).abs().max().item(), (summed - want).abs().max().item(),
                        bool((x.grad[:, burstc.shard_positions(seq_len, layout, world_size, rank)] != 0).all())))
    return results


@pytest.mark.parametrize("world_size", [2, 3])
def test_unshard_is_differentiable_and_shard_is_its_adjoint(world_size):
    for per_rank in run_ranks(world_size, _round_trip):
        for layout, seq_len, value_err, grad_err, own_rows_set in per_rank:
            assert value_err == 0.0 and grad_err <= 1e-12 and own_rows_set, (world_size, layout, seq_len, grad_err)
