"""SequenceShard on spawned gloo ranks: reading its values gives the exact full tensor, gathered once and
counted; a write keeps its rows in step; gradients come back as this rank's rows whether eager code or the
next graph consumed it; burst graphs hand shards to each other without gathering."""
import torch

from burstc.launch import run_ranks


def _reads_writes_and_gradients(rank, world_size):
    import burstc
    from burstc.runtime.sequence_shard import SequenceShard, ShardSpec, from_local, to_full, to_local
    from burstc.runtime.stats import comm_stats

    results = []
    for layout, seq_len in (("zigzag", 13), ("contiguous", 7)):
        g = torch.Generator().manual_seed(seq_len)
        full = torch.randn(2, seq_len, 3, generator=g, dtype=torch.float64)
        weights = torch.randn(2, seq_len, 3, generator=g, dtype=torch.float64)  # the same on every rank
        spec = ShardSpec(dim=1, outer=1, inner=1, seq_len=seq_len, layout=layout, group_name="")
        local = burstc.shard_sequence(full, dim=1, layout=layout, world_size=world_size, rank=rank)
        local.requires_grad_(True)
        with comm_stats() as stats:
            shard = from_local(local, spec)
            shape_ok = isinstance(shard, SequenceShard) and shard.shape == full.shape and stats.gathered_bytes == 0
            loss = (shard.sin() * weights).sum() + (shard * weights).sum()  # two reads, one gather
        loss.backward()
        want_grad = burstc.shard_sequence(weights * full.cos() + weights, dim=1, layout=layout,
                                          world_size=world_size, rank=rank)
        # the next graph's side: to_local's gradient travels back as a shard, row for row
        rows = local.detach().clone().requires_grad_(True)
        (to_local(from_local(rows, spec)) * 2).sum().backward()
        written = from_local(local.detach().clone(), spec)
        written.add_(1.0)
        rows_written = from_local(local.detach().clone(), spec)
        before = rows_written.full().clone()  # kept ...
        rows_written.local.mul_(2.0)  # ... until a later graph writes the rows in place: gathered again
        stale_err = (rows_written.full() - 2 * before).abs().max().item()
        results.append(dict(
            layout=layout, shape_ok=shape_ok, gathered=stats.gathered_bytes, full_bytes=full.numel() * 8,
            value_err=(shard.full() - full).abs().max().item(),
            grad_err=(local.grad - want_grad).abs().max().item(),
            full_err=(to_full(from_local(local.detach(), spec)) - full).abs().max().item(),
            write_err=(written.local - (local.detach() + 1)).abs().max().item(),
            rows_grad_err=(rows.grad - 2).abs().max().item(), stale_err=stale_err))
    return results


def test_reads_gather_once_writes_stay_in_step_gradients_come_back_as_rows():
    for per_rank in run_ranks(2, _reads_writes_and_gradients):
        for r in per_rank:
            assert r["shape_ok"] and r["gathered"] == r["full_bytes"], r
            assert r["value_err"] == 0 and r["grad_err"] <= 1e-12 and r["full_err"] == 0 and r["write_err"] == 0, r
            assert r["rows_grad_err"] == 0 and r["stale_err"] == 0, r
