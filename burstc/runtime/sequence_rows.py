"""A slice of the sequence taken from a sequence-sharded tensor: every rank gets rows [start, stop) in
global order, and only the ranks that hold them send them (an all-gather of at most the slice's rows per
rank, not of the whole sequence). HF's sliding-window cache keeps each layer's last `window - 1` keys and
values so (`full_key_states[:, :, -window + 1:]`): a step gathers those rows, not the layer's K/V.

| op | forward | backward |
|---|---|---|
| `burst::seq_gather_rows`      | the slice's rows from their owners, on every rank | this rank's rows of the gradient |
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from burstc.runtime import stats
from burstc.runtime.ordering import program_order
from burstc.runtime.sequence_ops import _group, _with_rows, _world
from burstc.runtime.sharding import pad_shard
from burstc.schedule import layout as layouts


@functools.lru_cache(maxsize=256)
def _picked(seq_len: int, layout: str, world: int, rank: int, start: int,
            stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(local rows of rank's shard whose positions lie in [start, stop), their rows in the slice); cached: a
    model slices the same run at every layer and step."""
    positions = layouts.shard_positions(seq_len, layout, world, rank)
    local = ((positions >= start) & (positions < stop)).nonzero().flatten()
    return local, positions[local] - start


@torch.library.custom_op("burst::seq_gather_rows", mutates_args=())
def seq_gather_rows(x: torch.Tensor, dim: int, seq_len: int, layout: str, group_name: str, start: int,
                    stop: int) -> torch.Tensor:
    """Rows [start, stop) of the sequence (dim `dim`; x holds this rank's rows) in global order, on every rank."""
    world, rank = _world(group_name)
    if world == 1:
        return x.narrow(dim, start, stop - start).clone()
    picks = [_picked(seq_len, layout, world, r, start, stop) for r in range(world)]
    most = max(len(local) for local, _ in picks)
    mine = x.index_select(dim, picks[rank][0].to(x.device))
    sent = pad_shard(mine.contiguous(), dim=dim, rows=most)
    received = [torch.empty_like(sent) for _ in range(world)]
    dist.all_gather(received, sent, group=_group(group_name))
    stats.count_collective("gather")
    out = _with_rows(x, dim, 1, stop - start, 1)
    for (local, rows), piece in zip(picks, received):
        out.index_copy_(dim, rows.to(x.device), piece.narrow(dim, 0, len(local)))
    stats.count("gathered_bytes", out.numel() * out.element_size())
    return out


@seq_gather_rows.register_fake
def _(x, dim, seq_len, layout, group_name, start, stop):
    return _with_rows(x, dim, 1, stop - start, 1)


@torch.library.custom_op("burst::seq_gather_rows_grad", mutates_args=())
def seq_gather_rows_grad(grad: torch.Tensor, rows: int, dim: int, seq_len: int, layout: str, group_name: str,
                         start: int, stop: int) -> torch.Tensor:
    """This rank's part of the gradient of seq_gather_rows (the slice's gradient is the same on every rank): a
    tensor of `rows` local rows, the gradient at those the slice took, zero elsewhere."""
    world, rank = _world(group_name)
    out = torch.zeros_like(_with_rows(grad, dim, 1, rows, 1))
    if world == 1:
        out.narrow(dim, start, stop - start).copy_(grad)
        return out
    local, picked = _picked(seq_len, layout, world, rank, start, stop)
    out.index_copy_(dim, local.to(grad.device), grad.index_select(dim, picked.to(grad.device)))
    return out


@seq_gather_rows_grad.register_fake
def _(grad, rows, dim, seq_len, layout, group_name, start, stop):
    return _with_rows(grad, dim, 1, rows, 1)


def _setup(ctx, inputs, output):
    ctx.rows = inputs[0].shape[inputs[1]]
    ctx.args = inputs[1:]


seq_gather_rows.register_autograd(
    lambda ctx, grad: (seq_gather_rows_grad(grad.contiguous(), ctx.rows, *ctx.args), *([None] * 6)),
    setup_context=_setup)

program_order(torch.ops.burst.seq_gather_rows.default)
