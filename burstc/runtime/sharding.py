"""Shard a full sequence tensor for a layout, pad shards to the ring's uniform size, and gather
shards back in global order."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from burstc.runtime import stats
from burstc.schedule import layout as layouts


def shard_sequence(x: torch.Tensor, *, dim: int, layout: str, world_size: int, rank: int) -> torch.Tensor:
    """rank's shard of the full tensor x along dim (no communication). With a length that does not
    divide evenly, ranks hold different numbers of tokens; burst_attention accepts exactly these."""
    positions = layouts.shard_positions(x.shape[dim], layout, world_size, rank).to(x.device)
    return x.index_select(dim, positions)


def pad_shard(x: torch.Tensor, *, dim: int, rows: int) -> torch.Tensor:
    """x with zero rows appended along dim up to `rows` (x itself if already that long)."""
    missing = rows - x.shape[dim]
    if missing == 0:
        return x
    if missing < 0:
        raise ValueError(f"shard has {x.shape[dim]} rows, more than the padded {rows}")
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def assemble(shards: list[torch.Tensor], *, dim: int, layout: str, seq_len: int) -> torch.Tensor:
    """The full tensor from every rank's shard (real rows only, any padding cut off first)."""
    world_size = len(shards)
    first = shards[0]
    shape = list(first.shape)
    shape[dim] = seq_len
    full = first.new_empty(shape)
    for rank, shard in enumerate(shards):
        positions = layouts.shard_positions(seq_len, layout, world_size, rank).to(first.device)
        full.index_copy_(dim, positions, shard.narrow(dim, 0, len(positions)))
    return full


def unshard_sequence(x_local: torch.Tensor, *, dim: int, layout: str,
                     group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Gather every rank's shard of the group into the full tensor in global token order, on every
    rank. Differentiable: the full result is treated as one replicated value, so the gradient of a
    shard is this rank's slice of the full gradient (`shard_sequence` of it); composed with
    `shard_sequence` it is the identity, gradients included, once the ranks' input gradients are summed."""
    return _Unshard.apply(x_local, dim, layout, group)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, dim, layout, group):
        world_size = dist.get_world_size(group)
        lengths = torch.tensor([x_local.shape[dim]], device=x_local.device)
        all_lengths = [torch.empty_like(lengths) for _ in range(world_size)]
        dist.all_gather(all_lengths, lengths, group=group)
        stats.count_collective("gather")
        seq_len = int(sum(int(n) for n in all_lengths))
        rows = layouts.local_padded_length(seq_len, layout, world_size)
        padded = pad_shard(x_local.contiguous(), dim=dim, rows=rows)
        gathered = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(gathered, padded, group=group)
        ctx.dim, ctx.layout, ctx.world_size, ctx.rank = dim, layout, world_size, dist.get_rank(group)
        return assemble(gathered, dim=dim, layout=layout, seq_len=seq_len)

    @staticmethod
    def backward(ctx, grad_full):
        grad = shard_sequence(grad_full, dim=ctx.dim, layout=ctx.layout, world_size=ctx.world_size, rank=ctx.rank)
        return grad, None, None, None
