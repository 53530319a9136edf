"""Byte accounting: every transfer of the ring is counted into the active `comm_stats()` scopes."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from burstc.schedule.topology import LINK_CLASSES


@dataclass
class CommStats:
    """What the burst attention calls inside a `comm_stats()` block did on this process.

    forward_bytes / backward_bytes: bytes sent by this rank (the virtual ring: by all its G ranks).
    steps: ring steps executed, forward and backward (G per ring; the virtual ring's ranks share them).
    skipped_pairs: fully masked (query chunk, key chunk) pairs whose compute was skipped, over the
    ranks this process runs, forward and backward.
    bytes_by_link: the same bytes (forward and backward together) split by the link class they
    crossed, {"intra": ..., "inter": ...} (burstc.schedule.topology: ranks of one node or not).
    forward_calls / backward_calls: burst attention calls run (each is one whole ring), forward and
    backward; under activation checkpointing the forward runs once per step, not again in the backward.
    gathered_bytes: bytes of full tensors sequence mode gathered on this rank: inside a graph (an op that mixes
    tokens with no sharded form, an output with outputs='gathered') and SequenceShards that something outside
    a burst graph read (outputs='lazy'); the full tensor's size each time.
    all_reduce_bytes: bytes this rank all-reduced in sequence mode's reductions: losses and sums over the
    sequence, and the parameters' gradient sum (none for parameters FSDP2 reduces: burstc.runtime.fsdp).
    halo_bytes: bytes this rank sent in halo exchanges (burstc.runtime.halo: the edge rows a causal conv,
    a token shift or a roll over the sequence needs from its neighbours), forward and backward.
    collectives: how many communication calls this rank made, by purpose: "ring" (a batch of the ring's
    point-to-point transfers), "halo" (a halo exchange), "all_reduce" (a loss, a sum over the sequence, the
    gradient bucket, a shard's gradient scatter), "gather" (a full tensor gathered), "agreement" (the
    ranks' call metadata exchanged: once per compiled site and shape) and "replica_check" (a graph input's
    fingerprints compared: once per input and shape); BURST_CHECKS=always makes the last two per call."""

    forward_bytes: int = 0
    backward_bytes: int = 0
    steps: int = 0
    skipped_pairs: int = 0
    forward_calls: int = 0
    backward_calls: int = 0
    gathered_bytes: int = 0
    all_reduce_bytes: int = 0
    halo_bytes: int = 0
    collectives: dict = field(default_factory=dict)
    bytes_by_link: dict = field(default_factory=lambda: dict.fromkeys(LINK_CLASSES, 0))

    @property
    def total_bytes(self) -> int:
        return self.forward_bytes + self.backward_bytes


_active: list[CommStats] = []


@contextlib.contextmanager
def comm_stats():
    """Collect a CommStats for the burst attention calls (and their backward) inside the block."""
    stats = CommStats()
    _active.append(stats)
    try:
        yield stats
    finally:
        _active.remove(stats)


def count(field: str, amount: int) -> None:
    for stats in _active:
        setattr(stats, field, getattr(stats, field) + amount)


def count_collective(purpose: str) -> None:
    """One communication call made for `purpose` (see CommStats.collectives)."""
    for stats in _active:
        stats.collectives[purpose] = stats.collectives.get(purpose, 0) + 1


def count_message(phase: str, link: str, amount: int) -> None:
    """A message of `amount` bytes sent in `phase` ('forward' or 'backward') over a `link`-class link."""
    for stats in _active:
        setattr(stats, f"{phase}_bytes", getattr(stats, f"{phase}_bytes") + amount)
        stats.bytes_by_link[link] += amount
