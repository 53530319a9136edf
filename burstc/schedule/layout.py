"""Sequence layouts: which global token positions each rank of the ring holds.

A layout splits a (padded) sequence into blocks, each an arithmetic progression of positions
`global_start + stride * t`. Padding to a multiple of the layout's chunk count happens at the
end of the sequence; positions >= seq_len are padding. Within a rank, positions increase with the
local index, so a rank's real tokens are always a prefix of its padded shard: `shard_sequence`
returns that prefix and the runtime pads it back.

- contiguous: G chunks, rank r holds chunk r.
- zigzag:     2G chunks, rank r holds chunks r and 2G-1-r (balances causal work).
- striped:    rank r holds tokens r, r+G, r+2G, ... (balances causal work at token granularity).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("contiguous", "zigzag", "striped")


@dataclass(frozen=True)
class Block:
    """Local rows [local_start, local_start + length) hold positions global_start + stride * t."""

    local_start: int
    global_start: int
    stride: int
    length: int  # rows of the block in the padded shard
    valid: int  # leading rows that are real tokens (position < seq_len)


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: choose one of {', '.join(LAYOUTS)}")


def chunk_count(layout: str, world_size: int) -> int:
    """Into how many equal parts the padded sequence is cut."""
    check_layout(layout)
    return 2 * world_size if layout == "zigzag" else world_size


def padded_length(seq_len: int, layout: str, world_size: int) -> int:
    """The sequence length rounded up to a multiple of the layout's chunk count."""
    c = chunk_count(layout, world_size)
    return -(-seq_len // c) * c


def local_padded_length(seq_len: int, layout: str, world_size: int) -> int:
    """Rows of every rank's padded shard (equal for all ranks)."""
    return padded_length(seq_len, layout, world_size) // world_size


def rank_blocks(seq_len: int, layout: str, world_size: int, rank: int) -> list[Block]:
    """The blocks of rank's padded shard, in local order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size} ranks")
    n_pad = padded_length(seq_len, layout, world_size)
    if layout == "striped":
        length = n_pad // world_size
        return [_block(0, rank, world_size, length, seq_len)]
    chunk = n_pad // chunk_count(layout, world_size)
    chunks = [rank] if layout == "contiguous" else [rank, 2 * world_size - 1 - rank]
    return [_block(i * chunk, c * chunk, 1, chunk, seq_len) for i, c in enumerate(chunks)]


def _block(local_start: int, global_start: int, stride: int, length: int, seq_len: int) -> Block:
    valid = 0 if global_start >= seq_len else min(length, -(-(seq_len - global_start) // stride))
    return Block(local_start, global_start, stride, length, valid)


def local_length(seq_len: int, layout: str, world_size: int, rank: int) -> int:
    """How many real tokens rank holds (its shard from `shard_sequence`)."""
    return sum(b.valid for b in rank_blocks(seq_len, layout, world_size, rank))


def shard_positions(seq_len: int, layout: str, world_size: int, rank: int) -> torch.Tensor:
    """Global token positions of rank's shard, in local order (int64). Use them to shard
    position ids (RoPE), labels or masks the same way as q, k, v."""
    parts = [b.global_start + b.stride * torch.arange(b.valid, dtype=torch.int64)
             for b in rank_blocks(seq_len, layout, world_size, rank)]
    return torch.cat(parts)

