"""The ring plan: for G ranks and a layout, which chunk each rank holds at each step, what work each
(query chunk, key chunk) pair needs, and what every step sends. Built from global token positions,
checked on construction, printable as a table.

Step semantics (any travelling payload, K/V in the forward, K/V or queries in the backward): at step
s the rank at ring index i holds the chunk that originated at ring index i - s; between steps every
rank sends what it holds to its successor.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import networkx as nx
import torch

from burstc.schedule import layout as layouts
from burstc.schedule.topology import flat_ring, ring_order
from burstc.schedule.work import WorkItem

FULL, DIAGONAL, SKIPPED = "full", "diagonal", "skipped"


@dataclass(frozen=True)
class PairPlan:
    """The work of query chunk `q_rank` against key chunk `k_rank`: FULL (every pair visible, no mask),
    DIAGONAL (partly visible: decomposed into full and top-left causal rectangles) or SKIPPED (fully
    masked: no compute at all)."""

    q_rank: int
    k_rank: int
    mask: str
    items: tuple[WorkItem, ...]
    visible_pairs: int


@dataclass(frozen=True)
class RingPlan:
    world_size: int
    layout: str
    seq_len: int
    causal: bool
    order: tuple[int, ...]  # ranks in ring order
    local_len: int  # padded rows per rank (what travels)
    valid_lens: tuple[int, ...]  # real tokens per rank
    pairs: tuple[tuple[PairPlan, ...], ...]  # pairs[q_rank][k_rank]

    @property
    def steps(self) -> int:
        return self.world_size

    def next_rank(self, rank: int) -> int:
        i = self.order.index(rank)
        return self.order[(i + 1) % self.world_size]

    def prev_rank(self, rank: int) -> int:
        i = self.order.index(rank)
        return self.order[(i - 1) % self.world_size]

    def held(self, step: int, rank: int) -> int:
        """Origin of the chunk that `rank` holds at `step`."""
        i = self.order.index(rank)
        return self.order[(i - step) % self.world_size]

    def pair(self, q_rank: int, k_rank: int) -> PairPlan:
        return self.pairs[q_rank][k_rank]

    def kv_visit(self, step: int, rank: int) -> PairPlan:
        """KV ring (forward, KV-ring backward): rank's queries against the visiting key chunk."""
        return self.pairs[rank][self.held(step, rank)]

    def query_visit(self, step: int, rank: int) -> PairPlan:
        """Query ring (BurstAttention backward): the visiting query chunk against rank's keys."""
        return self.pairs[self.held(step, rank)][rank]

    def transfers(self, step: int) -> list[tuple[int, int, int]]:
        """(src, dst, chunk origin) of every send after `step` (none after the last step)."""
        if step >= self.steps - 1:
            return []
        return [(r, self.next_rank(r), self.held(step, r)) for r in self.order]

    def skipped_pairs(self, rank: Optional[int] = None) -> int:
        """Fully masked pairs of rank's queries (all ranks if None)."""
        ranks = range(self.world_size) if rank is None else [rank]
        return sum(p.mask == SKIPPED for r in ranks for p in self.pairs[r])

    def table(self, bytes_per_step: Optional[int] = None) -> str:
        """Steps x ranks: which key chunk each rank's queries meet and its mask class."""
        head = ["step"] + [f"rank {r}" for r in range(self.world_size)]
        if bytes_per_step is not None:
            head.append("bytes sent / rank")
        rows = []
        for s in range(self.steps):
            cells = [str(s)]
            for r in range(self.world_size):
                p = self.kv_visit(s, r)
                cells.append(f"k{p.k_rank} {p.mask}")
            if bytes_per_step is not None:
                cells.append(str(bytes_per_step if s < self.steps - 1 else 0))
            rows.append(cells)
        title = (f"ring plan: G={self.world_size} layout={self.layout} N={self.seq_len} "
                 f"causal={self.causal} order={list(self.order)} rows/rank={self.local_len}")
        return title + "\n" + _markdown(head, rows)

    def check(self) -> None:
        """Raise AssertionError unless the plan is exact (see module docstring)."""
        g = self.world_size
        for r in range(g):
            met = sorted(self.held(s, r) for s in range(self.steps))
            assert met == list(range(g)), f"rank {r} meets key chunks {met}, not each of 0..{g - 1} once"
        for s in range(self.steps - 1):
            for src, dst, chunk in self.transfers(s):
                assert self.held(s + 1, dst) == chunk, (
                    f"step {s}: rank {src} sends chunk {chunk} to {dst}, which expects {self.held(s + 1, dst)}")
        positions = [layouts.shard_positions(self.seq_len, self.layout, g, r) for r in range(g)]
        for q_rank in range(g):
            for k_rank in range(g):
                _check_pair(self.pairs[q_rank][k_rank], positions[q_rank], positions[k_rank], self.causal)


def build_plan(world_size: int, layout: str, seq_len: int, causal: bool,
               ring: Optional[nx.DiGraph] = None) -> RingPlan:
    """The checked plan for a sequence of seq_len tokens on world_size ranks (cached)."""
    if ring is None:
        return _build_flat(world_size, layout, seq_len, causal)
    return _build(world_size, layout, seq_len, causal, ring_order(ring))


@functools.lru_cache(maxsize=256)
def _build_flat(world_size: int, layout: str, seq_len: int, causal: bool) -> RingPlan:
    return _build(world_size, layout, seq_len, causal, ring_order(flat_ring(world_size)))


def _build(world_size: int, layout: str, seq_len: int, causal: bool, order: tuple[int, ...]) -> RingPlan:
    layouts.check_layout(layout)
    if seq_len < 1:
        raise ValueError(f"sequence length must be >= 1, got {seq_len}")
    if sorted(order) != list(range(world_size)):
        raise ValueError(f"ring order {order} is not a permutation of ranks 0..{world_size - 1}")
    blocks = [layouts.rank_blocks(seq_len, layout, world_size, r) for r in range(world_size)]
    pairs = tuple(
        tuple(_pair_plan(q, k, blocks[q], blocks[k], causal) for k in range(world_size))
        for q in range(world_size))
    plan = RingPlan(
        world_size=world_size, layout=layout, seq_len=seq_len, causal=causal, order=order,
        local_len=layouts.local_padded_length(seq_len, layout, world_size),
        valid_lens=tuple(sum(b.valid for b in bl) for bl in blocks), pairs=pairs)
    plan.check()
    return plan


def _pair_plan(q_rank: int, k_rank: int, q_blocks, k_blocks, causal: bool) -> PairPlan:
    n_q = sum(b.valid for b in q_blocks)
    n_k = sum(b.valid for b in k_blocks)
    if q_rank == k_rank and causal:
        # same positions on both sides, increasing with the local index: exactly top-left causal
        items = [WorkItem(0, n_q, 0, n_k, True)] if n_q else []
    else:
        items = [it for qb in q_blocks for kb in k_blocks for it in _block_items(qb, kb, causal)]
        items = _merge_full_items(items)
    visible = sum(it.visible_pairs() for it in items)
    mask = SKIPPED if visible == 0 else FULL if visible == n_q * n_k else DIAGONAL
    return PairPlan(q_rank, k_rank, mask, tuple(items), visible)


def _block_items(qb: layouts.Block, kb: layouts.Block, causal: bool) -> list[WorkItem]:
    """Rectangles covering exactly the visible pairs of two blocks with the same stride.

    With q positions a + S*t and k positions c + S*u, key u is visible to query t iff
    u <= t + delta, delta = floor((a - c) / S): keys [0, delta) are seen by every query and keys
    [delta, n_k) form a top-left causal rectangle; for delta < 0 the first -delta queries see nothing."""
    n_q, n_k = qb.valid, kb.valid
    if n_q == 0 or n_k == 0:
        return []
    q0, k0 = qb.local_start, kb.local_start
    if not causal:
        return [WorkItem(q0, q0 + n_q, k0, k0 + n_k, False)]
    assert qb.stride == kb.stride, "blocks of one layout share a stride"
    delta = (qb.global_start - kb.global_start) // qb.stride
    if delta >= n_k - 1:
        return [WorkItem(q0, q0 + n_q, k0, k0 + n_k, False)]
    if delta >= 0:
        items = [WorkItem(q0, q0 + n_q, k0, k0 + delta, False)] if delta > 0 else []
        return items + [WorkItem(q0, q0 + n_q, k0 + delta, k0 + n_k, True)]
    if -delta >= n_q:
        return []
    return [WorkItem(q0 - delta, q0 + n_q, k0, k0 + n_k, True)]


def _merge_full_items(items: list[WorkItem]) -> list[WorkItem]:
    """Join full rectangles that share a row range and touch in columns (or vice versa), so a step
    makes as few kernel calls as possible (zigzag's off-diagonal steps become one call)."""
    items = list(items)
    merged = True
    while merged:
        merged = False
        for i, a in enumerate(items):
            for j, b in enumerate(items):
                if i == j or a.causal or b.causal:
                    continue
                if (a.q_start, a.q_stop) == (b.q_start, b.q_stop) and a.k_stop == b.k_start:
                    items[i] = WorkItem(a.q_start, a.q_stop, a.k_start, b.k_stop, False)
                elif (a.k_start, a.k_stop) == (b.k_start, b.k_stop) and a.q_stop == b.q_start:
                    items[i] = WorkItem(a.q_start, b.q_stop, a.k_start, a.k_stop, False)
                else:
                    continue
                del items[j]
                merged = True
                break
            if merged:
                break
    return items


def _check_pair(pair: PairPlan, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool) -> None:
    """The items cover exactly the visible (query, key) pairs, each once; the mask class matches."""
    n_q, n_k = len(q_pos), len(k_pos)
    if causal:
        expected = torch.searchsorted(k_pos.sort().values, q_pos, right=True)
    else:
        expected = torch.full((n_q,), n_k, dtype=torch.int64)
    covered = torch.zeros(n_q, dtype=torch.int64)
    where = f"pair (queries of rank {pair.q_rank}, keys of rank {pair.k_rank})"
    for it in pair.items:
        assert 0 <= it.q_start < it.q_stop <= n_q and 0 <= it.k_start < it.k_stop <= n_k, f"{where}: {it} out of range"
        qp, kp = q_pos[it.q_start:it.q_stop], k_pos[it.k_start:it.k_stop]
        if it.causal:
            t = torch.arange(it.q_len)
            last = torch.clamp(t, max=it.k_len - 1)  # last key row each query sees
            assert bool((kp[last] <= qp).all()) or not causal, f"{where}: {it} includes masked keys"
            if it.k_len > 1:
                nxt = t + 1 < it.k_len
                assert not causal or bool((kp[(t + 1)[nxt]] > qp[nxt]).all()), f"{where}: {it} misses visible keys"
            covered[it.q_start:it.q_stop] += torch.clamp(t + 1, max=it.k_len)
        else:
            assert not causal or bool(kp.max() <= qp.min()), f"{where}: full {it} includes masked keys"
            covered[it.q_start:it.q_stop] += it.k_len
        for other in pair.items:
            if other is not it:
                disjoint = (other.q_stop <= it.q_start or it.q_stop <= other.q_start
                            or other.k_stop <= it.k_start or it.k_stop <= other.k_start)
                assert disjoint, f"{where}: {it} overlaps {other}"
    assert torch.equal(covered, expected), f"{where}: items cover {covered.tolist()} keys per query, visible {expected.tolist()}"
    visible = int(expected.sum())
    mask = SKIPPED if visible == 0 else FULL if visible == n_q * n_k else DIAGONAL
    assert pair.mask == mask, f"{where}: mask class {pair.mask}, positions say {mask}"


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])
