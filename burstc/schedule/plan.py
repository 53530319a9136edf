"""The ring plan: for G ranks and a layout, which chunk each rank holds at each step, what work each
(query chunk, key chunk) pair needs, and what every step sends. Built from global token positions,
checked on construction, printable as a table.

Step semantics (any travelling payload, K/V in the forward, K/V or queries in the backward): the
plan's route (burstc.schedule.route) says which chunk each rank holds at each step and from whom it
got it: on the flat ring the rank at ring index i holds the chunk of ring index i - s and received it
from its predecessor; on the double ring chunks also jump to the next node once per inner cycle. A
rank sends what it holds on unless no later holder needs that chunk. A chunk travels only its rows
that later ranks need (with a short sliding window: a halo of `left` rows), and the ring stops after
the last step anybody needs. Where a mask leaves each chunk to a few ranks that the relay would reach
only through many others (a window under zigzag: the two neighbours), the `ring` schedule takes the
direct route instead: each such rank gets the rows it reads straight from the chunk's owner
(`_direct_if_cheaper`).

Schedules: `ring` and `double_ring` are routes over the G ranks. `ulysses_ring` plans the ring over
the P nodes: plan rank p is node p's group of ranks, whose chunk is the concatenation of their
shards' real rows (after the all-to-all that trades heads for rows, burstc.runtime.ulysses).

With a structured mask (burstc.schedule.masks: windows, padding, documents, mask_mod, attn_mask)
every pair is cut into tiles of `tile` rows, each classified empty (skipped), full (unmasked call)
or partial (a masked call, `WorkItem.masked`); tiles are merged back into as few calls as possible.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Optional

import networkx as nx
import torch

from burstc.schedule import layout as layouts
from burstc.schedule import masks as mask_classes
from burstc.schedule.documents import DocumentRun, document_runs, same_document_pairs, shared_document_row
from burstc.schedule.masks import AttentionMask, TileBounds
from burstc.schedule.route import DIRECT, DOUBLE_RING, RING, Route, direct_route, double_ring_route, flat_route
from burstc.schedule.topology import LINK_CLASSES, flat_ring, ring_order
from burstc.schedule.work import WorkItem

FULL, DIAGONAL, PARTIAL, SKIPPED = "full", "diagonal", "partial", "skipped"
ULYSSES_RING = "ulysses_ring"
SCHEDULES = (RING, DOUBLE_RING, ULYSSES_RING)
SCHEDULE_CHOICES = ("auto",) + SCHEDULES
KV, QUERY = "kv", "query"  # travelling roles: key/value chunks, query chunks (query-ring backward)
DEFAULT_TILE = 256
# brute-force self-check of a masked plan only up to this many (batch x query x key) evaluations
_BRUTE_FORCE_LIMIT = 1 << 22


@dataclass(frozen=True)
class PairPlan:
    """The work of query chunk `q_rank` against key chunk `k_rank`: FULL (every pair visible, no mask),
    DIAGONAL (partly visible: decomposed into full and top-left causal rectangles), PARTIAL (a
    structured mask: full, causal and masked rectangles) or SKIPPED (fully masked: no compute at all).
    visible_pairs: pairs the items compute (a masked rectangle counts whole).
    A summary (a per-rank plan's pair that its rank does not run) has no items, visible_pairs -1 and its
    items' extent (k_start, k_stop, q_start, q_stop): what the chunks' travel needs of it."""

    q_rank: int
    k_rank: int
    mask: str
    items: tuple[WorkItem, ...]
    visible_pairs: int
    extent: Optional[tuple[int, int, int, int]] = None

    @property
    def detailed(self) -> bool:
        return self.extent is None

    def bounds(self, role: str) -> Optional[tuple[int, int]]:
        """The rows of the travelling side (keys for KV, queries for QUERY) that the items read, as
        (first, last + 1); None when the pair is skipped."""
        if self.mask == SKIPPED:
            return None
        if self.extent is not None:
            k_lo, k_hi, q_lo, q_hi = self.extent
            return (k_lo, k_hi) if role == KV else (q_lo, q_hi)
        if role == KV:
            return min(it.k_start for it in self.items), max(it.k_stop for it in self.items)
        return min(it.q_start for it in self.items), max(it.q_stop for it in self.items)


@dataclass(frozen=True)
class RingPlan:
    world_size: int
    layout: str
    seq_len: int
    causal: bool
    route: Route  # who holds which chunk at each step, and where it came from
    local_len: int  # padded rows per rank (what travels)
    valid_lens: tuple[int, ...]  # real tokens per rank
    pairs: tuple[tuple[PairPlan, ...], ...]  # pairs[q_rank][k_rank]
    mask: Optional[AttentionMask] = None  # a structured mask (None: causal or no mask)
    # per travelling role, per chunk origin: the last step anybody needs it, the rows that travel
    last_step: dict = None  # {KV: (int, ...), QUERY: (int, ...)}
    travel_rows: dict = None  # {KV: ((lo, hi), ...), QUERY: (...)}
    schedule: str = RING
    # ulysses_ring: plan rank p is the group of layout ranks groups[p] (a node); None: plan rank = rank
    groups: Optional[tuple[tuple[int, ...], ...]] = None
    # a per-rank plan: only this rank's pairs (its queries' row, its keys' column) have work items, the
    # others are summaries (PairPlan.extent); None: every rank's plan
    rank: Optional[int] = None

    @property
    def order(self) -> Optional[tuple[int, ...]]:
        """The ring order of a flat ring (None for a double ring)."""
        return self.route.order

    @property
    def steps(self) -> int:
        """Steps of the forward ring (KV chunks travelling)."""
        return self.steps_for(KV)

    def steps_for(self, role: str) -> int:
        return 1 + max(self.last_step[role])

    def deliveries(self, role: str, step: int, rank: int) -> list[tuple[int, int]]:
        """(dst, dst_step) of the transfers rank posts right after step: the chunk it holds, to the
        ranks that hold it next (see holds)."""
        return [(dst, s) for dst, s in self.route.deliveries(step, rank) if self.holds(role, s, dst)]

    def arrivals(self, role: str, step: int, rank: int) -> list[tuple[int, int]]:
        """(src, dst_step) of the transfers to rank that their senders post right after step."""
        return self._tables[role][0].get((step, rank), [])

    def sends(self, role: str, step: int, rank: int) -> bool:
        """Whether rank sends the chunk it holds at step on to anybody."""
        return bool(self.deliveries(role, step, rank))

    def accumulator_next(self, role: str, step: int, rank: int) -> int:
        """Where the holder of a chunk at step >= 1 sends its summed partial gradients: the chunk's
        next holder when that one gets the chunk from it one step later (the partials trail the
        chunk), else the chunk's owner (the chunk stops, or jumps to another node)."""
        for dst, s in self.deliveries(role, step, rank):
            if s == step + 1:
                return dst
        return self.held(step, rank)

    def accumulator_prev(self, role: str, step: int, rank: int) -> Optional[int]:
        """The rank whose partial sums of the chunk rank holds at step arrive before rank adds its
        own (the previous holder, when it held the chunk one step earlier at a step >= 1)."""
        if step < 2:
            return None
        src, src_step = self.route.source[step][rank]
        return src if src_step == step - 1 else None

    def accumulators_home(self, role: str, rank: int) -> list[tuple[int, int]]:
        """(src, src_step) of the partial sums of rank's own chunk that come back to it."""
        return self._tables[role][1].get(rank, [])

    @functools.cached_property
    def _tables(self) -> dict:
        """Per role, from one pass over the steps after 0 (the driver asks at every step):
        arrivals {(src step, receiving rank): [(src, dst_step)]} of the transfers that happen, and
        homes {owner: [(src, src_step)]} of the partial sums sent straight home."""
        tables = {}
        for role in (KV, QUERY):
            arrivals: dict = {}
            homes: dict = {}
            for s in range(1, self.route.world_size):
                for r in range(self.world_size):
                    if not self.holds(role, s, r):
                        continue
                    src, src_step = self.route.source[s][r]
                    arrivals.setdefault((src_step, r), []).append((src, s))
                    chunk = self.held(s, r)
                    if self.accumulator_next(role, s, r) == chunk:
                        homes.setdefault(chunk, []).append((r, s))
            tables[role] = (arrivals, homes)
        return tables

    def holds(self, role: str, step: int, rank: int) -> bool:
        """Whether rank holds a chunk at step: its own at step 0; a relayed chunk up to the last step
        anybody needs it (a holder may only pass it on); a chunk sent straight from its owner (the direct
        route) only where rank's pair with it has work."""
        if step and self.route.name == DIRECT:
            return self.visit(role, step, rank).mask != SKIPPED
        return step <= self.last_step[role][self.held(step, rank)]

    def held_rows(self, role: str, step: int, rank: int) -> tuple[int, int]:
        """The rows (of the origin's shard, as (first, last + 1)) of the chunk rank holds at step >= 1:
        a relayed chunk's travelling rows, the same at every holder; on the direct route the rows that
        rank's own pair reads."""
        if self.route.name == DIRECT:
            return self.visit(role, step, rank).bounds(role) or (0, 0)
        return self.travel_rows[role][self.held(step, rank)]

    def row_offset(self, role: str, step: int, rank: int) -> int:
        """First row (of the origin's shard) of the trimmed chunk rank holds at step (0 at step 0)."""
        return 0 if step == 0 else self.held_rows(role, step, rank)[0]

    def positions(self, rank: int) -> torch.Tensor:
        """Global positions of rank's real rows."""
        if self.groups is None:
            return _positions(self.seq_len, self.layout, self.world_size, rank)
        world = sum(len(g) for g in self.groups)
        return torch.cat([_positions(self.seq_len, self.layout, world, r) for r in self.groups[rank]])

    def held(self, step: int, rank: int) -> int:
        """Origin of the chunk that `rank` holds at `step`."""
        return self.route.held[step][rank]

    def pair(self, q_rank: int, k_rank: int) -> PairPlan:
        return self.pairs[q_rank][k_rank]

    def kv_visit(self, step: int, rank: int) -> PairPlan:
        """KV ring (forward, KV-ring backward): rank's queries against the visiting key chunk."""
        return self.pairs[rank][self.held(step, rank)]

    def query_visit(self, step: int, rank: int) -> PairPlan:
        """Query ring (BurstAttention backward): the visiting query chunk against rank's keys."""
        return self.pairs[self.held(step, rank)][rank]

    def visit(self, role: str, step: int, rank: int) -> PairPlan:
        """The pair rank computes at step when chunks of `role` travel."""
        return self.kv_visit(step, rank) if role == KV else self.query_visit(step, rank)

    def transfers(self, step: int, role: str = KV) -> list[tuple[int, int, int]]:
        """(src, dst, chunk origin) of every send after `step` (none after the last step)."""
        return [(r, dst, self.held(step, r)) for r in range(self.world_size)
                for dst, _ in self.deliveries(role, step, r)]

    def messages(self, role: str = KV, accumulators: bool = False, step: Optional[int] = None):
        """(src, dst, rows) of every message of one ring of `role` (posted after `step` only, if
        given): the travelling chunks, or (accumulators=True, backward) the partial sums every holder
        after step 0 sends on."""
        for s in range(self.steps_for(role)) if step is None else [step]:
            for r in range(self.world_size):
                if accumulators:
                    if s >= 1 and self.holds(role, s, r):
                        lo, hi = self.held_rows(role, s, r)
                        yield r, self.accumulator_next(role, s, r), hi - lo
                else:
                    for dst, dst_step in self.deliveries(role, s, r):
                        lo, hi = self.held_rows(role, dst_step, dst)
                        yield r, dst, hi - lo

    def rows_sent(self, role: str = KV, rank: Optional[int] = None, accumulators: bool = False) -> int:
        """Sequence rows that `rank` (all ranks if None) sends in one ring of `role` (see messages)."""
        by_rank = self._rows_by_rank(role, accumulators)[0]
        return sum(by_rank) if rank is None else by_rank[rank]

    def rows_received(self, role: str = KV, rank: Optional[int] = None) -> int:
        """Sequence rows of travelling chunks that `rank` (all ranks if None) receives in one ring of `role`."""
        by_rank = self._rows_by_rank(role, False)[1]
        return sum(by_rank) if rank is None else by_rank[rank]

    @functools.cached_property
    def _row_tables(self) -> dict:
        return {}

    def _rows_by_rank(self, role: str, accumulators: bool) -> tuple[list[int], list[int]]:
        """(rows sent, rows received) per rank in one ring of `role`, from one pass over its messages, kept
        (a call's backward-scheme choice reads them on every call of a cached plan)."""
        key = (role, accumulators)
        if key not in self._row_tables:
            sent, received = [0] * self.world_size, [0] * self.world_size
            for src, dst, rows in self.messages(role, accumulators):
                sent[src] += rows
                received[dst] += rows
            self._row_tables[key] = (sent, received)
        return self._row_tables[key]

    def rows_by_link(self, link, role: str = KV, accumulators: bool = False) -> dict[str, int]:
        """Rows all ranks send per link class; link(src, dst) names the class of a message between
        plan ranks (e.g. Topology.link, or for a ring over nodes the class between nodes)."""
        out = dict.fromkeys(LINK_CLASSES, 0)
        for src, dst, rows in self.messages(role, accumulators):
            out[link(src, dst)] += rows
        return out

    def skipped_pairs(self, rank: Optional[int] = None) -> int:
        """Fully masked pairs of rank's queries (all ranks if None)."""
        ranks = range(self.world_size) if rank is None else [rank]
        return sum(p.mask == SKIPPED for r in ranks for p in self.pairs[r])

    def table(self, bytes_per_row: Optional[int] = None) -> str:
        """Steps x ranks: which key chunk each rank's queries meet and its mask class; a chunk that
        stopped travelling shows as '(kN skipped)'. Last columns: K/V rows all ranks send after
        the step (times bytes_per_row, if given, as bytes)."""
        head = ["step"] + [f"rank {r}" for r in range(self.world_size)] + ["rows sent"]
        if bytes_per_row is not None:
            head.append("bytes sent")
        rows = []
        for s in range(self.steps):
            cells = [str(s)]
            for r in range(self.world_size):
                p = self.kv_visit(s, r)
                cells.append(f"k{p.k_rank} {p.mask}" if self.holds(KV, s, r) else f"(k{p.k_rank} {p.mask})")
            sent = sum(rows for _, _, rows in self.messages(KV, step=s))
            cells.append(str(sent))
            if bytes_per_row is not None:
                cells.append(str(sent * bytes_per_row))
            rows.append(cells)
        mask = f" mask={self.mask.describe()}" if self.mask is not None else ""
        title = (f"ring plan: G={self.world_size} layout={self.layout} N={self.seq_len} "
                 f"causal={self.causal}{mask} {self.describe_route()} rows/rank={self.local_len} "
                 f"steps={self.steps} skipped pairs={self.skipped_pairs()}")
        return title + "\n" + markdown_table(head, rows)

    def describe_route(self) -> str:
        """The schedule in words: the ring order, or how the nodes take part."""
        if self.schedule == ULYSSES_RING:
            return f"schedule=ulysses_ring nodes={[list(g) for g in self.groups]}"
        if self.route.name == DIRECT:
            return f"route=direct order={list(self.route.order)}"
        if self.route.order is not None:
            return f"order={list(self.route.order)}"
        nodes = self.world_size // self.route.node_size
        return f"schedule={self.schedule} ({nodes} nodes of {self.route.node_size})"

    def check(self, brute_force: Optional[bool] = None) -> None:
        """Raise AssertionError unless the plan is exact (see module docstring). A masked plan is
        checked against a brute-force evaluation of its mask when that is small (brute_force=None)
        or when asked to."""
        g = self.world_size
        for r in range(g):
            met = sorted(self.held(s, r) for s in range(g))
            assert met == list(range(g)), f"rank {r} meets key chunks {met}, not each of 0..{g - 1} once"
        for role, visit in ((KV, lambda s, r: self.kv_visit(s, r)), (QUERY, lambda s, r: self.query_visit(s, r))):
            for s in range(g):
                for r in range(g):
                    pair = visit(s, r)
                    if pair.mask != SKIPPED:
                        assert self.holds(role, s, r), f"{role} ring: rank {r} needs chunk {self.held(s, r)} at step {s} but it stopped travelling"
                        if s:
                            lo, hi = self.held_rows(role, s, r)
                            a, b = pair.bounds(role)
                            assert lo <= a and b <= hi, f"{role} ring: {pair} reads rows outside the travelling {lo}:{hi}"
        detailed = [(q, k) for q in range(g) for k in range(g) if self.rank is None or self.rank in (q, k)]
        positions = {r: self.positions(r) for r in {r for pair in detailed for r in pair}}
        if self.mask is None:
            for q_rank, k_rank in detailed:
                _check_pair(self.pairs[q_rank][k_rank], positions[q_rank], positions[k_rank], self.causal)
            return
        batch = self.mask._batch()
        if brute_force is None:
            brute_force = batch * self.seq_len * self.seq_len <= _BRUTE_FORCE_LIMIT and self.mask.dense_rows is None
        if brute_force:
            for q_rank, k_rank in detailed:
                _check_masked_pair(self.pairs[q_rank][k_rank], positions[q_rank], positions[k_rank], self.mask)


def build_plan(world_size: int, layout: str, seq_len: int, causal: bool,
               ring: Optional[nx.DiGraph] = None, mask: Optional[AttentionMask] = None,
               tile: int = DEFAULT_TILE, schedule: str = RING, node_size: Optional[int] = None,
               rank: Optional[int] = None) -> RingPlan:
    """The checked plan for a sequence of seq_len tokens on world_size ranks (cached without a
    structured mask). mask: a structured mask (its `causal` must equal causal). schedule: ring
    (over `ring`'s order, default the flat ring), double_ring or ulysses_ring (both need node_size,
    the ranks per node; ulysses_ring's plan runs over the world_size / node_size nodes).
    rank: rank r's share only, what a rank runs: the work items of its queries and of its keys, every
    other pair as a summary (skipped or not, the rows its items read, which every rank computes alike, so
    sends and receives still pair up), checked for its pairs only; None: every rank's plan (explain,
    dumps, tests). A plan rank of ulysses_ring is a node."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if schedule != RING:
        if ring is not None:
            raise ValueError("a custom ring order applies to the flat ring only")
        if node_size is None:
            raise ValueError(f"schedule {schedule} needs node_size, the ranks per node")
    node_size = node_size if schedule != RING else None
    plan_ranks = world_size // node_size if schedule == ULYSSES_RING else world_size
    if rank is not None and not 0 <= rank < plan_ranks:
        raise ValueError(f"rank {rank} is outside the plan's {plan_ranks} ranks")
    if mask is not None:
        mask = mask.normalized()
    if mask is not None and mask.structured:
        if mask.causal != causal:
            raise ValueError(f"mask.causal={mask.causal} disagrees with causal={causal}")
        order = ring_order(ring) if ring is not None else None
        key = mask.fingerprint()
        if key is None:
            return _build_scheduled(world_size, layout, seq_len, causal, schedule, node_size, order, mask, tile, rank)
        cache_key = (world_size, layout, seq_len, schedule, node_size, order, tile, key, rank)
        cached = _masked_plans.get(cache_key)
        if cached is None:
            cached = _build_scheduled(world_size, layout, seq_len, causal, schedule, node_size, order, mask, tile,
                                      rank)
            _masked_plans[cache_key] = cached
            while len(_masked_plans) > 64:
                _masked_plans.pop(next(iter(_masked_plans)))
        return cached
    if ring is None:
        return _build_cached(world_size, layout, seq_len, causal, schedule, node_size, rank)
    return _build(world_size, layout, seq_len, causal, flat_route(ring_order(ring)), rank=rank)


_masked_plans: dict = {}  # plans of masks described by content (no mask_mod / attn_mask), newest last


@functools.lru_cache(maxsize=256)
def _positions(seq_len: int, layout: str, world_size: int, rank: int) -> torch.Tensor:
    return layouts.shard_positions(seq_len, layout, world_size, rank)


@functools.lru_cache(maxsize=256)
def _build_cached(world_size: int, layout: str, seq_len: int, causal: bool, schedule: str,
                  node_size: Optional[int], rank: Optional[int]) -> RingPlan:
    return _build_scheduled(world_size, layout, seq_len, causal, schedule, node_size, rank=rank)


def _build_scheduled(world_size: int, layout: str, seq_len: int, causal: bool, schedule: str,
                     node_size: Optional[int], order: Optional[tuple[int, ...]] = None,
                     mask: Optional[AttentionMask] = None, tile: int = DEFAULT_TILE,
                     rank: Optional[int] = None) -> RingPlan:
    if schedule == RING:
        route = flat_route(order if order is not None else ring_order(flat_ring(world_size)))
        return _build(world_size, layout, seq_len, causal, route, mask, tile, rank=rank)
    if schedule == DOUBLE_RING:
        return _build(world_size, layout, seq_len, causal, double_ring_route(world_size, node_size), mask, tile,
                      rank=rank)
    if world_size % node_size:
        raise ValueError(f"{world_size} ranks do not split into nodes of {node_size}")
    nodes = world_size // node_size
    groups = tuple(tuple(range(p * node_size, (p + 1) * node_size)) for p in range(nodes))
    return _build(world_size, layout, seq_len, causal, flat_route(tuple(range(nodes))), mask, tile,
                  groups=groups, schedule=ULYSSES_RING, rank=rank)


def _group_blocks(seq_len: int, layout: str, world_size: int, group: tuple[int, ...]) -> list[layouts.Block]:
    """The blocks of a node's chunk after the all-to-all: its ranks' real rows, one after another."""
    out, start = [], 0
    for r in group:
        for b in layouts.rank_blocks(seq_len, layout, world_size, r):
            if b.valid:
                out.append(layouts.Block(start, b.global_start, b.stride, b.valid, b.valid))
                start += b.valid
    return out


def _build(world_size: int, layout: str, seq_len: int, causal: bool, route: Route,
           mask: Optional[AttentionMask] = None, tile: int = DEFAULT_TILE,
           groups: Optional[tuple[tuple[int, ...], ...]] = None, schedule: Optional[str] = None,
           rank: Optional[int] = None) -> RingPlan:
    """The plan over `world_size` layout ranks; with groups, over len(groups) chunks of several ranks.
    rank: only that plan rank's pairs get work items (see build_plan)."""
    layouts.check_layout(layout)
    if seq_len < 1:
        raise ValueError(f"sequence length must be >= 1, got {seq_len}")
    if tile < 1:
        raise ValueError(f"mask tile must be >= 1 rows, got {tile}")
    local_len = layouts.local_padded_length(seq_len, layout, world_size)
    if groups is None:
        blocks = [layouts.rank_blocks(seq_len, layout, world_size, r) for r in range(world_size)]
        positions = [_positions(seq_len, layout, world_size, r) for r in range(world_size)]
    else:
        blocks = [_group_blocks(seq_len, layout, world_size, g) for g in groups]
        positions = [torch.cat([_positions(seq_len, layout, world_size, r) for r in g]) for g in groups]
        local_len *= len(groups[0])
    chunks = len(blocks)
    if route.world_size != chunks:
        raise ValueError(f"route over {route.world_size} ranks for a plan of {chunks} chunks")
    if mask is None:
        pairs = tuple(
            tuple(_pair_plan(q, k, blocks[q], blocks[k], causal) for k in range(chunks))
            for q in range(chunks))
    elif (documents := shared_document_row(mask)) is not None:
        runs = [document_runs(bl, documents) for bl in blocks]
        pairs = tuple(
            tuple(_document_pair_plan(q, k, runs[q], runs[k], causal, summary=rank is not None and rank not in (q, k))
                  for k in range(chunks))
            for q in range(chunks))
    else:
        tiled = [_TiledChunk.of(bl, positions[c], tile, mask) for c, bl in enumerate(blocks)]
        beside_causal = replace(mask, causal=False) if mask.causal else None
        pairs = tuple(
            tuple(_masked_pair_plan(q, k, tiled[q], tiled[k], mask, beside_causal) if rank is None or rank in (q, k)
                  else _masked_pair_summary(q, k, tiled[q], tiled[k], mask, beside_causal)
                  for k in range(chunks))
            for q in range(chunks))
    last_step, travel_rows = _travel(pairs, route)
    plan = RingPlan(
        world_size=chunks, layout=layout, seq_len=seq_len, causal=causal, route=route,
        local_len=local_len, valid_lens=tuple(sum(b.valid for b in bl) for bl in blocks), pairs=pairs,
        mask=mask, last_step=last_step, travel_rows=travel_rows, schedule=schedule or route.name, groups=groups,
        rank=rank)
    if mask is not None and route.name == RING:
        plan = _direct_if_cheaper(plan)
    plan.check()
    return plan


def _direct_if_cheaper(plan: RingPlan) -> RingPlan:
    """plan on the direct route (burstc.schedule.route.direct_route) when that sends fewer rows, chunks
    and partial sums of both roles together, and no rank receives more than two shards' rows (a rank's
    receives are all posted at step 0 and live until used, where the relay holds about two chunks at a
    time); else plan. Every rank decides alike: it reads only which pairs are skipped and their rows,
    which a per-rank plan's summaries carry too."""
    if plan.world_size < 3:
        return plan  # two ranks: the ring is the direct route
    direct = replace(plan, route=direct_route(plan.route.order))
    if any(direct.rows_received(role, r) > 2 * plan.local_len for role in (KV, QUERY) for r in range(plan.world_size)):
        return plan
    sent = lambda p: sum(p.rows_sent(role, accumulators=acc) for role in (KV, QUERY) for acc in (False, True))  # noqa: E731
    return direct if sent(direct) < sent(plan) else plan


def _travel(pairs, route: Route) -> tuple[dict, dict]:
    """Per role and chunk origin: the last step a rank needs the chunk, and the rows it needs after
    step 0 (the chunk's owner uses it at step 0 in place)."""
    g = route.world_size
    holder = {(route.held[s][r], s): r for s in range(g) for r in range(g)}  # (chunk, step) -> rank
    last_step, travel_rows = {}, {}
    for role in (KV, QUERY):
        lasts, rows = [], []
        for chunk in range(g):
            last, lo, hi = 0, None, None
            for s in range(1, g):
                visitor = holder[chunk, s]
                pair = pairs[visitor][chunk] if role == KV else pairs[chunk][visitor]
                if pair.mask == SKIPPED:
                    continue
                last = s
                a, b = pair.bounds(role)
                lo, hi = (a, b) if lo is None else (min(lo, a), max(hi, b))
            lasts.append(last)
            rows.append((lo, hi) if lo is not None else (0, 0))
        last_step[role], travel_rows[role] = tuple(lasts), tuple(rows)
    return last_step, travel_rows


def _pair_plan(q_rank: int, k_rank: int, q_blocks, k_blocks, causal: bool) -> PairPlan:
    n_q = sum(b.valid for b in q_blocks)
    n_k = sum(b.valid for b in k_blocks)
    if q_rank == k_rank and causal and _increasing(q_blocks):
        # same positions on both sides, increasing with the local index: exactly top-left causal
        items = [WorkItem(0, n_q, 0, n_k, True)] if n_q else []
    else:
        items = [it for qb in q_blocks for kb in k_blocks for it in _block_items(qb, kb, causal)]
        items = _merge_full_items(items)
    visible = sum(it.visible_pairs() for it in items)
    mask = SKIPPED if visible == 0 else FULL if visible == n_q * n_k else DIAGONAL
    return PairPlan(q_rank, k_rank, mask, tuple(items), visible)


def _document_pair_plan(q_rank: int, k_rank: int, q_runs: list[DocumentRun], k_runs: list[DocumentRun],
                        causal: bool, summary: bool) -> PairPlan:
    """A pair under a pure document mask, in closed form (burstc.schedule.documents): the full or causal
    rectangles of its same-document runs, merged; summary: only their kind and extent."""
    items = _merge_full_items([it for qb, kb in same_document_pairs(q_runs, k_runs)
                               for it in _block_items(qb, kb, causal)])
    if not items:
        return PairPlan(q_rank, k_rank, SKIPPED, (), 0, extent=(0, 0, 0, 0) if summary else None)
    n_q = sum(run.block.valid for run in q_runs)
    n_k = sum(run.block.valid for run in k_runs)
    visible = sum(it.visible_pairs() for it in items)
    kind = FULL if visible == n_q * n_k else PARTIAL
    if summary:
        extent = (min(it.k_start for it in items), max(it.k_stop for it in items),
                  min(it.q_start for it in items), max(it.q_stop for it in items))
        return PairPlan(q_rank, k_rank, kind, (), -1, extent=extent)
    return PairPlan(q_rank, k_rank, kind, tuple(items), visible)


def _increasing(blocks: list[layouts.Block]) -> bool:
    """Whether positions increase with the local row across the blocks (a layout's own shard)."""
    real = [b for b in blocks if b.valid]
    return all(a.global_start + a.stride * (a.valid - 1) < b.global_start for a, b in zip(real, real[1:]))


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


def _tiles(blocks: list[layouts.Block], tile: int) -> list[tuple[int, int]]:
    """Local row ranges of at most `tile` real rows, never crossing a block."""
    out = []
    for b in blocks:
        for start in range(0, b.valid, tile):
            out.append((b.local_start + start, b.local_start + min(start + tile, b.valid)))
    return out


@dataclass(frozen=True)
class _TiledChunk:
    """A chunk cut into tiles for a structured mask: local row ranges, their global positions, and what the
    mask's classification reads of them, computed once for every pair the chunk takes part in; `whole`
    bounds the chunk as one tile (a quick proof that a pair has nothing visible; None where the mask has
    no bounds to reason with: a mask_mod, a dense mask)."""

    ranges: list
    sets: list
    bounds: Optional[TileBounds]
    whole: Optional[TileBounds]

    @classmethod
    def of(cls, blocks: list[layouts.Block], positions: torch.Tensor, tile: int, mask: AttentionMask) -> "_TiledChunk":
        ranges = _tiles(blocks, tile)
        sets = [positions[a:b] for a, b in ranges]
        if not sets:
            return cls(ranges, sets, None, None)
        whole = mask.tile_bounds([positions]) if mask.mask_mod is None and mask.dense is None else None
        return cls(ranges, sets, mask.tile_bounds(sets), whole)


def _tile_classes(qc: _TiledChunk, kc: _TiledChunk, mask: AttentionMask):
    """(empty, full) [nq, nk] bool tensors of the pair's tiles, or None when nothing can be visible."""
    if not qc.sets or not kc.sets:
        return None
    if qc.whole is not None and kc.whole is not None and bool(mask.classify_bounds(qc.whole, kc.whole)[0].all()):
        return None
    empty, full = mask.classify_bounds(qc.bounds, kc.bounds)
    return None if bool(empty.all()) else (empty, full)


def _tile_item(i: int, j: int, full: bool, qc: _TiledChunk, kc: _TiledChunk, mask: AttentionMask,
               beside_causal: Optional[AttentionMask]) -> Optional[WorkItem]:
    """The work item of a tile that is not proven empty: the whole tile when full, a causal item for a
    diagonal tile that only the causal part cuts, else the masked box of what is visible (None: nothing)."""
    (qa, qb), (ka, kb) = qc.ranges[i], kc.ranges[j]
    if full:
        return WorkItem(qa, qb, ka, kb, False)
    if (beside_causal is not None and torch.equal(qc.sets[i], kc.sets[j])
            and beside_causal.classify([qc.sets[i]], [kc.sets[j]])[0][0] == mask_classes.FULL):
        return WorkItem(qa, qb, ka, kb, True)
    return _visible_box(mask, qc.sets[i], kc.sets[j], qa, ka)


def _masked_pair_plan(q_rank: int, k_rank: int, qc: _TiledChunk, kc: _TiledChunk, mask: AttentionMask,
                      beside_causal: Optional[AttentionMask]) -> PairPlan:
    """Tile the pair, classify every tile by the mask, and merge tiles into as few calls as possible:
    runs of full tiles and runs of partial tiles (with the same rows) along a row of tiles, then equal full
    column ranges down the rows; a merge covers exactly the items it joins, so the items span what their
    tiles' own items span (what _masked_pair_summary finds). A partial tile on the diagonal that only the
    causal part cuts is a causal item."""
    classes = _tile_classes(qc, kc, mask)
    if classes is None:
        return PairPlan(q_rank, k_rank, SKIPPED, (), 0)
    empty, full = (t.tolist() for t in classes)
    rows: list[list[WorkItem]] = []
    for i in range(len(qc.ranges)):
        row: list[WorkItem] = []
        for j in range(len(kc.ranges)):
            if empty[i][j]:
                continue
            item = _tile_item(i, j, full[i][j], qc, kc, mask, beside_causal)
            if item is None:
                continue
            last = row[-1] if row else None
            if last is not None and not last.causal and not item.causal and last.masked == item.masked \
                    and last.k_stop == item.k_start and (last.q_start, last.q_stop) == (item.q_start, item.q_stop):
                row[-1] = WorkItem(item.q_start, item.q_stop, last.k_start, item.k_stop, False, item.masked)
            else:
                row.append(item)
        rows.append(row)
    items = _merge_full_rows(rows)
    n_q, n_k = sum(b - a for a, b in qc.ranges), sum(b - a for a, b in kc.ranges)
    computed = sum(it.visible_pairs() for it in items)
    every = all(all(r) for r in full)
    kind = SKIPPED if not items else FULL if every else PARTIAL
    assert kind != FULL or computed == n_q * n_k
    return PairPlan(q_rank, k_rank, kind, tuple(items), computed)


def _masked_pair_summary(q_rank: int, k_rank: int, qc: _TiledChunk, kc: _TiledChunk, mask: AttentionMask,
                         beside_causal: Optional[AttentionMask]) -> PairPlan:
    """What _masked_pair_plan's items would span, without building them: the same kind and the extreme
    rows of its items, found by evaluating only the tiles that can hold an extreme (full tiles bound the
    answer; a partial tile is evaluated only while its tile could still beat the best found)."""
    classes = _tile_classes(qc, kc, mask)
    if classes is None:
        return PairPlan(q_rank, k_rank, SKIPPED, (), 0, extent=(0, 0, 0, 0))
    empty, full = classes
    items: dict = {}

    def item(i: int, j: int) -> Optional[WorkItem]:
        if (i, j) not in items:
            items[i, j] = _tile_item(i, j, bool(full[i, j]), qc, kc, mask, beside_causal)
        return items[i, j]

    nq, nk = empty.shape
    q_rows = torch.tensor(qc.ranges, dtype=torch.int64)
    k_rows = torch.tensor(kc.ranges, dtype=torch.int64)
    sides = (("k_start", k_rows[:, 0].view(1, nk).expand(nq, nk), True),
             ("k_stop", k_rows[:, 1].view(1, nk).expand(nq, nk), False),
             ("q_start", q_rows[:, 0].view(nq, 1).expand(nq, nk), True),
             ("q_stop", q_rows[:, 1].view(nq, 1).expand(nq, nk), False))
    extent = []
    for field, coarse, smallest in sides:
        best = _extreme(coarse if smallest else -coarse, ~empty, full, item,
                        (lambda it, f=field: getattr(it, f)) if smallest else (lambda it, f=field: -getattr(it, f)))
        if best is None:  # every tile evaluated empty: the pair is skipped after all
            return PairPlan(q_rank, k_rank, SKIPPED, (), 0, extent=(0, 0, 0, 0))
        extent.append(best if smallest else -best)
    kind = FULL if bool(full.all()) else PARTIAL
    return PairPlan(q_rank, k_rank, kind, (), -1, extent=tuple(extent))


def _extreme(key: torch.Tensor, candidate: torch.Tensor, full: torch.Tensor, item, exact) -> Optional[int]:
    """The smallest exact(item(i, j)) over candidate tiles, where key[i, j] bounds it from below and is
    exact for full tiles: full tiles give a bound at once, partial ones are evaluated in key order while
    they could still beat it."""
    best = int(key[full & candidate].min()) if bool((full & candidate).any()) else None
    open_tiles = candidate & ~full
    if best is not None:
        open_tiles &= key < best
    where = open_tiles.nonzero()
    order = key[where[:, 0], where[:, 1]].argsort(stable=True)
    for i, j in where[order].tolist():
        if best is not None and int(key[i, j]) >= best:
            break
        found = item(i, j)
        if found is not None:
            value = exact(found)
            best = value if best is None else min(best, value)
    return best


def _visible_box(mask: AttentionMask, q_pos: torch.Tensor, k_pos: torch.Tensor, q0: int, k0: int) -> Optional[WorkItem]:
    """A partial tile evaluated: None when nothing is visible after all, else a masked item trimmed to
    the rows and columns that see anything (so transfers carry only keys somebody reads). An
    attn_mask held as this rank's rows only is left out: what stays visible is then a superset."""
    probe = mask if mask.dense_rows is None else replace(mask, dense=None, dense_rows=None)
    m = probe.evaluate(q_pos, k_pos)
    seen = mask_classes.visible(m).any(dim=1).any(dim=0)
    rows, cols = seen.any(dim=1).nonzero().flatten(), seen.any(dim=0).nonzero().flatten()
    if len(rows) == 0:
        return None
    return WorkItem(q0 + int(rows[0]), q0 + int(rows[-1]) + 1, k0 + int(cols[0]), k0 + int(cols[-1]) + 1, False,
                    masked=True)


def _merge_full_rows(rows: list[list[WorkItem]]) -> list[WorkItem]:
    """Join full items of consecutive tile rows that cover the same key rows."""
    items: list[WorkItem] = []
    open_full: dict[tuple[int, int], int] = {}  # (k_start, k_stop) -> index in items of a full item ending at the previous row
    for row in rows:
        still_open = {}
        for it in row:
            key = (it.k_start, it.k_stop)
            if not it.causal and not it.masked and key in open_full and items[open_full[key]].q_stop == it.q_start:
                prev = items[open_full[key]]
                items[open_full[key]] = WorkItem(prev.q_start, it.q_stop, it.k_start, it.k_stop, False)
                still_open[key] = open_full[key]
                continue
            items.append(it)
            if not it.causal and not it.masked:
                still_open[key] = len(items) - 1
        open_full = still_open
    return items


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


def _check_masked_pair(pair: PairPlan, q_pos: torch.Tensor, k_pos: torch.Tensor, mask: AttentionMask) -> None:
    """Brute force: every visible (query, key) pair is computed by exactly one item, full and causal
    items only compute visible pairs, and the class matches the evaluated mask."""
    where = f"pair (queries of rank {pair.q_rank}, keys of rank {pair.k_rank})"
    m = mask.evaluate(q_pos, k_pos)
    visible = mask_classes.visible(m)
    anywhere = visible.any(dim=1).any(dim=0)  # [Lq, Lk]: visible for some batch row / head
    everywhere = visible.all(dim=1).all(dim=0)
    if m.dtype != torch.bool:
        everywhere = everywhere & (m == 0).all(dim=1).all(dim=0)
    covered = torch.zeros(len(q_pos), len(k_pos), dtype=torch.int64)
    for it in pair.items:
        region = (slice(it.q_start, it.q_stop), slice(it.k_start, it.k_stop))
        shape = torch.ones(it.q_len, it.k_len, dtype=torch.bool)
        if it.causal:
            shape = shape.tril()
        covered[region] += shape
        if not it.masked:
            assert bool(everywhere[region][shape].all()), f"{where}: unmasked {it} computes hidden pairs"
    assert covered.numel() == 0 or int(covered.max()) <= 1, f"{where}: items overlap"
    assert bool((covered[anywhere] == 1).all()), f"{where}: visible pairs are not computed"
    if pair.mask == SKIPPED:
        assert not bool(anywhere.any()), f"{where}: skipped but has visible pairs"
    if pair.mask == FULL:
        assert bool(everywhere.all()), f"{where}: class full but some pairs are hidden"


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    """Rows of cells as an aligned markdown table."""
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])
