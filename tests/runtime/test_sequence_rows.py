"""burstc.runtime.sequence_rows: a run of tokens gathered from sequence shards against the same slice of the
whole tensor (fp64, fresh random inputs), forward and backward, every layout, runs that straddle shards and
zigzag's segments, on gloo ranks; the bytes are the run's, not the sequence's."""
import pytest
import torch

from burstc.launch import run_ranks
from burstc.runtime import sequence_rows  # noqa: F401 (registers the ops)
from burstc.runtime.sharding import shard_sequence
from burstc.runtime.stats import comm_stats
from burstc.schedule.layout import LAYOUTS

N = 23
RUNS = [(0, 5), (N - 7, N), (4, 19), (11, 12)]


def _compare(rank, world_size):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, N, 4, dtype=torch.float64, generator=gen)
    results = []
    for layout in LAYOUTS:
        for start, stop in RUNS:
            up = torch.randn(2, 3, stop - start, 4, dtype=torch.float64, generator=gen)  # upstream gradient
            mine = shard_sequence(x, dim=2, layout=layout, world_size=world_size, rank=rank).requires_grad_()
            with comm_stats() as stats:
                got = torch.ops.burst.seq_gather_rows(mine, 2, N, layout, "", start, stop)
            got.backward(up)
            want_grad = torch.zeros_like(x)
            want_grad[:, :, start:stop] = up
            results.append(dict(
                layout=layout, run=(start, stop), out=bool(torch.equal(got, x[:, :, start:stop])),
                grad=bool(torch.equal(mine.grad, shard_sequence(want_grad, dim=2, layout=layout,
                                                                world_size=world_size, rank=rank))),
                gathered=stats.gathered_bytes, gathers=stats.collectives.get("gather", 0)))
    return results


@pytest.mark.parametrize("world_size", [3])
def test_a_run_of_tokens_is_gathered_exactly(world_size):
    for per_rank in run_ranks(world_size, _compare):
        for r in per_rank:
            assert r["out"] and r["grad"], r
            start, stop = r["run"]
            assert r["gathers"] == 1 and r["gathered"] == 2 * 3 * (stop - start) * 4 * 8, r


def test_one_process_is_the_slice():
    x = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    got = torch.ops.burst.seq_gather_rows(x, 1, 9, "zigzag", "", 2, 6)
    assert torch.equal(got, x[:, 2:6])
    got.backward(torch.ones_like(got))
    assert torch.equal(x.grad, torch.zeros(2, 9, 3, dtype=torch.float64).index_fill_(1, torch.arange(2, 6), 1.0))
