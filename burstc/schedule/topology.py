"""The machine the ring runs on: ranks grouped into nodes, the link class between two ranks, and the
bandwidth and latency of each class; plus ring orders as checked networkx cycles.

Ranks are grouped into nodes the way torchrun numbers them: node p holds ranks p*n .. p*n + n - 1
for node size n (torchrun's LOCAL_WORLD_SIZE). Two ranks of one node talk over the intra-node link
(NVLink), ranks of different nodes over the inter-node link (InfiniBand); each class has a
bandwidth per direction per GPU and a latency per message.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import networkx as nx

INTRA, INTER = "intra", "inter"
LINK_CLASSES = (INTRA, INTER)


@dataclass(frozen=True)
class LinkSpec:
    """One link class: bytes per second per direction per GPU, seconds per message."""

    bandwidth: float
    latency: float


# H100 SXM figures: NVLink 4 moves 450 GB/s per direction per GPU; a node's 8 x 400 Gb/s
# InfiniBand NICs give each GPU 50 GB/s per direction. Latencies are typical NCCL point-to-point.
DEFAULT_LINKS: Mapping[str, LinkSpec] = {
    INTRA: LinkSpec(bandwidth=450e9, latency=5e-6),
    INTER: LinkSpec(bandwidth=50e9, latency=15e-6),
}


@dataclass(frozen=True)
class Topology:
    """world_size ranks in nodes of node_size consecutive ranks, with a LinkSpec per link class."""

    world_size: int
    node_size: int
    links: Mapping[str, LinkSpec] = field(default_factory=lambda: dict(DEFAULT_LINKS))

    def __post_init__(self):
        if self.world_size < 1 or self.node_size < 1:
            raise ValueError(f"world size and node size must be >= 1, got {self.world_size} and {self.node_size}")
        if self.world_size % self.node_size:
            raise ValueError(
                f"{self.world_size} ranks do not split into nodes of {self.node_size}: set node_size "
                f"(option or BURST_NODE_SIZE) to the number of ranks per node, a divisor of {self.world_size}")
        missing = set(LINK_CLASSES) - set(self.links)
        if missing:
            raise ValueError(f"topology has no link spec for {sorted(missing)}")

    @property
    def nodes(self) -> int:
        return self.world_size // self.node_size

    def node_of(self, rank: int) -> int:
        return rank // self.node_size

    def local_index(self, rank: int) -> int:
        return rank % self.node_size

    def rank_at(self, node: int, local: int) -> int:
        return node * self.node_size + local

    def link(self, src: int, dst: int) -> str:
        """The link class a message from src to dst crosses."""
        return INTRA if self.node_of(src) == self.node_of(dst) else INTER

    def describe(self) -> str:
        parts = ", ".join(f"{c} {self.links[c].bandwidth / 1e9:g} GB/s {self.links[c].latency * 1e6:g} us"
                          for c in LINK_CLASSES)
        return f"{self.nodes} node(s) x {self.node_size} rank(s) ({parts})"


def resolve_node_size(requested: Optional[int], world_size: int, environ=os.environ,
                      members: Optional[Sequence[int]] = None) -> int:
    """Ranks per node *of the group*. The machine's ranks per node come from the option if given,
    else BURST_NODE_SIZE, else torchrun's LOCAL_WORLD_SIZE; without any, the group is one node.
    Like torchrun, nodes hold consecutive global ranks, so a group (members: its global ranks; by
    default 0..G-1) has nodes of node_size_of(members, that size): a group of 2 inside a node of
    8 is one node of 2, one rank from each of two nodes is 2 nodes of 1. A given size the group's
    ranks do not fill evenly raises; LOCAL_WORLD_SIZE then counts every message as inter-node."""
    ranks = list(members) if members is not None else list(range(world_size))
    for source, raw in (("node_size", requested), ("BURST_NODE_SIZE", environ.get("BURST_NODE_SIZE"))):
        if raw is None or raw == "":
            continue
        try:
            n = int(raw)
        except ValueError:
            raise ValueError(f"{source}={raw!r} is not a number of ranks per node") from None
        size = node_size_of(ranks, n) if n >= 1 else None
        if size is None:
            raise ValueError(f"{source}={n} does not divide the group's ranks {ranks} into whole nodes: set it "
                             f"to the number of ranks per node")
        return size
    local = environ.get("LOCAL_WORLD_SIZE")
    if local and local.isdigit() and int(local) >= 1:
        return node_size_of(ranks, int(local)) or 1
    return world_size


def node_size_of(global_ranks: Sequence[int], ranks_per_node: int) -> Optional[int]:
    """Ranks per node of a group whose members are these global ranks, when every node holds
    ranks_per_node consecutive global ranks: the length of the group's runs of ranks on one node
    when the runs are equal and no node appears twice; else None."""
    nodes = [g // ranks_per_node for g in global_ranks]
    runs = [len(list(run)) for _, run in itertools.groupby(nodes)]
    if len(set(runs)) == 1 and len(runs) == len(set(nodes)):
        return runs[0]
    return None


def topology_for(world_size: int, node_size: Optional[int] = None, links: Optional[Mapping[str, LinkSpec]] = None,
                 environ=os.environ, members: Optional[Sequence[int]] = None) -> Topology:
    """The Topology of a group from the options and the environment (see resolve_node_size)."""
    return Topology(world_size, resolve_node_size(node_size, world_size, environ, members),
                    dict(links) if links is not None else dict(DEFAULT_LINKS))


def flat_ring(world_size: int) -> nx.DiGraph:
    """Ranks 0 -> 1 -> ... -> G-1 -> 0: one node, or one ring over every rank of the group."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ring = nx.DiGraph()
    ring.add_nodes_from(range(world_size))
    if world_size > 1:
        ring.add_edges_from((r, (r + 1) % world_size) for r in range(world_size))
    return ring


def ring_order(ring: nx.DiGraph) -> tuple[int, ...]:
    """The ranks in ring order starting at the smallest; raises unless the graph is a single
    directed cycle through every rank (each rank has exactly one successor and one predecessor)."""
    nodes = sorted(ring.nodes)
    if len(nodes) == 1:
        return (nodes[0],)
    bad = [n for n in nodes if ring.out_degree(n) != 1 or ring.in_degree(n) != 1]
    if bad:
        raise ValueError(f"ring topology is not a cycle: ranks {bad} do not have one successor and one predecessor")
    order = [nodes[0]]
    while len(order) < len(nodes):
        (nxt,) = ring.successors(order[-1])
        if nxt == order[0]:
            raise ValueError(f"ring topology splits into several cycles; the one through rank {nodes[0]} "
                             f"covers only {order}")
        order.append(nxt)
    return tuple(order)


def ulysses_kv_heads(heads_q: int, heads_kv: int, node_size: int) -> Optional[int]:
    """K/V heads each rank of a node holds after Ulysses' all-to-all (query heads heads_q / n each),
    or None when the heads do not split: heads_q must divide by n, and either the K/V heads divide
    by n too (heads_kv / n each) or n by them (one K/V head each, replicated over the n / heads_kv
    ranks whose query heads share it)."""
    if heads_q % node_size:
        return None
    if heads_kv % node_size == 0:
        return heads_kv // node_size
    if node_size % heads_kv == 0:
        return 1
    return None


def ulysses_kv_range(heads_q: int, heads_kv: int, node_size: int, local: int) -> tuple[int, int]:
    """The K/V heads [lo, hi) the rank at local index `local` holds in the head-sharded form."""
    per_rank = ulysses_kv_heads(heads_q, heads_kv, node_size)
    if per_rank is None:
        raise ValueError(f"{heads_q} query / {heads_kv} K/V heads do not split over {node_size} ranks")
    group = heads_q // heads_kv  # query heads per K/V head
    lo = local * (heads_q // node_size) // group
    return lo, lo + per_rank
