"""Byte accounting: every transfer of the ring is counted into the active `comm_stats()` scopes."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass


@dataclass
class CommStats:
    """What the burst attention calls inside a `comm_stats()` block did on this process.

    forward_bytes / backward_bytes: bytes sent by this rank (the virtual ring: by all its G ranks).
    steps: ring steps executed, forward and backward (G per ring; the virtual ring's ranks share them).
    skipped_pairs: fully masked (query chunk, key chunk) pairs whose compute was skipped, over the
    ranks this process runs, forward and backward."""

    forward_bytes: int = 0
    backward_bytes: int = 0
    steps: int = 0
    skipped_pairs: int = 0

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
