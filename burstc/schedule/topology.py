"""Ring topology: the order in which ranks pass chunks, as a checked networkx cycle."""
from __future__ import annotations

import networkx as nx


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
