"""Routes: at each step of a ring schedule, which chunk every rank holds and where it came from.

A route over G ranks has G steps. At step s rank r holds the chunk that originated at rank
`held[s][r]` (its own at step 0) and got it from `source[s][r] = (src, src_step)`: the rank that
held the same chunk at an earlier step and sent it on right after that step. Every rank holds every
chunk exactly once.

- flat ring: the chunk arrives from the ring predecessor, one step later (`flat_route`).
- double ring (`double_ring_route`): nodes of n ranks; steps come in P outer cycles of n inner
  steps. Inside a cycle chunks rotate on the node's inner ring (intra-node, one step). At the start
  of a cycle every rank also sends the chunk it holds to the rank of the same local index on the
  next node, which needs it n steps later, at the start of the next cycle: one inter-node transfer
  per chunk and cycle, overlapped with a whole inner cycle of compute.
- direct (`direct_route`): the flat ring's steps, but every chunk goes straight from its owner to each
  rank that needs it, all posted at step 0. With a short window under zigzag a chunk is needed one
  segment away in both directions (ranks r - 1 and r + 1); the relay would carry it round the whole
  ring, the direct route sends each neighbour only the edge rows it reads (a bidirectional halo).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from burstc.schedule.topology import Topology

RING, DOUBLE_RING, DIRECT = "ring", "double_ring", "direct"


@dataclass(frozen=True)
class Route:
    name: str
    held: tuple[tuple[int, ...], ...]  # held[step][rank]: origin of the chunk rank holds at step
    source: tuple[tuple[Optional[tuple[int, int]], ...], ...]  # source[step][rank]: (src rank, src step)
    order: Optional[tuple[int, ...]] = None  # the ring order of a flat ring
    node_size: Optional[int] = None  # the double ring's ranks per node
    # outgoing[step][rank]: (dst, dst_step) of the transfers rank posts right after step (derived)
    outgoing: tuple = field(default=(), compare=False, repr=False)

    def __post_init__(self):
        out = [[[] for _ in self.held[0]] for _ in self.held]
        for s in range(1, len(self.held)):
            for r, (src, src_step) in enumerate(self.source[s]):
                out[src_step][src].append((r, s))
        object.__setattr__(self, "outgoing", tuple(tuple(map(tuple, step)) for step in out))

    @property
    def world_size(self) -> int:
        return len(self.held[0])

    def deliveries(self, step: int, rank: int) -> list[tuple[int, int]]:
        """(dst, dst_step) of every transfer rank posts right after `step` (the chunk it holds)."""
        return self.outgoing[step][rank]

    def check(self) -> None:
        """Raise ValueError unless every rank holds every chunk once, its own at step 0, and every
        chunk arrives from a rank that held it at an earlier step."""
        g = self.world_size
        if len(self.held) != g:
            raise ValueError(f"route {self.name}: {len(self.held)} steps for {g} ranks")
        for r in range(g):
            met = sorted(self.held[s][r] for s in range(g))
            if met != list(range(g)) or self.held[0][r] != r:
                raise ValueError(f"route {self.name}: rank {r} holds chunks {met} (its own first), not each once")
            for s in range(1, g):
                src, src_step = self.source[s][r]
                if not 0 <= src_step < s or self.held[src_step][src] != self.held[s][r]:
                    raise ValueError(f"route {self.name}: step {s} rank {r} gets chunk {self.held[s][r]} from "
                                     f"rank {src} at step {src_step}, which does not hold it then")


def flat_route(order: tuple[int, ...]) -> Route:
    """The flat ring through `order`: at step s the rank at ring index i holds the chunk of index i - s."""
    g = len(order)
    held = [[0] * g for _ in range(g)]
    source: list[list] = [[None] * g for _ in range(g)]
    for s in range(g):
        for i, r in enumerate(order):
            held[s][r] = order[(i - s) % g]
            if s:
                source[s][r] = (order[(i - 1) % g], s - 1)
    route = Route(RING, tuple(map(tuple, held)), tuple(map(tuple, source)), order=tuple(order))
    route.check()
    return route


def direct_route(order: tuple[int, ...]) -> Route:
    """The flat ring's holdings through `order`, every chunk sent by its owner right after step 0."""
    ring = flat_route(order)
    source = tuple(tuple(None if s == 0 else (ring.held[s][r], 0) for r in range(ring.world_size))
                   for s in range(ring.world_size))
    route = Route(DIRECT, ring.held, source, order=tuple(order))
    route.check()
    return route


def double_ring_route(world_size: int, node_size: int) -> Route:
    """The double ring over nodes of node_size consecutive ranks (see the module docstring)."""
    topo = Topology(world_size, node_size)
    n, nodes = node_size, topo.nodes
    held = [[0] * world_size for _ in range(world_size)]
    source: list[list] = [[None] * world_size for _ in range(world_size)]
    for s in range(world_size):
        cycle, inner = divmod(s, n)
        for r in range(world_size):
            p, local = topo.node_of(r), topo.local_index(r)
            held[s][r] = topo.rank_at((p - cycle) % nodes, (local - inner) % n)
            if inner:
                source[s][r] = (topo.rank_at(p, (local - 1) % n), s - 1)
            elif cycle:
                source[s][r] = (topo.rank_at((p - 1) % nodes, local), s - n)
    route = Route(DOUBLE_RING, tuple(map(tuple, held)), tuple(map(tuple, source)), node_size=node_size)
    route.check()
    return route
