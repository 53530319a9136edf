"""Ulysses x ring: inside each node an all-to-all trades sequence shards for head shards, a burst ring
runs across the nodes on the node's rows, and an all-to-all trades the result back.

Rank (node p, local index j) of a node of n ranks starts with its own rows of every head. After
`to_heads` it holds query heads [j*H/n, (j+1)*H/n) (and the K/V heads those need,
topology.ulysses_kv_range) for the real rows of all n ranks of its node, one rank's rows after the
other: exactly the chunk of plan rank p of a `ulysses_ring` plan. The ranks of local index j on
every node form one ring (plan rank p = node p). `to_sequence` is the inverse; with
`accumulate=True` rows that several ranks hold (K/V heads replicated for grouped-query attention)
are summed, which makes it the adjoint of `to_heads` for gradients.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from burstc.runtime.transport import GroupTransport, Held, VirtualTransport
from burstc.schedule.plan import RingPlan
from burstc.schedule.topology import Topology

_TAG_ALL_TO_ALL, _TAG_STRIDE = 3 << 20, 8

HeadRange = Callable[[int], tuple[int, int]]  # local index -> heads [lo, hi) that rank holds


class NodeExchange:
    """The all-to-alls of one call inside the nodes, over a transport of the G layout ranks."""

    def __init__(self, plan: RingPlan, topology: Topology, transport, valid_lens: list[int]):
        self.plan, self.topology, self.transport = plan, topology, transport
        self.valid = valid_lens  # real rows per layout rank
        self._calls = 0

    def _peers(self, rank: int) -> list[int]:
        node = self.topology.node_of(rank)
        return [self.topology.rank_at(node, j) for j in range(self.topology.node_size)]

    def _offset(self, rank: int) -> int:
        """Row of the node chunk where `rank`'s rows start."""
        return sum(self.valid[r] for r in self._peers(rank) if r < rank)

    def _tag(self) -> int:
        self._calls += 1
        return _TAG_ALL_TO_ALL + _TAG_STRIDE * self._calls

    def to_heads(self, x: Held, heads: HeadRange) -> Held:
        """Per rank: its heads `heads(j)` of every rank of its node, real rows concatenated and
        padded to plan.local_len rows. x: per-rank padded shards [B, H, L, ...]."""
        tag, local = self._tag(), self.topology.local_index
        sends, recvs = [], []
        for r in self.transport.ranks:
            for peer in self._peers(r):
                if peer != r:
                    lo, hi = heads(local(peer))
                    sends.append((r, peer, (x[r][:, lo:hi, :self.valid[r]].contiguous(),), tag))
                    recvs.append((peer, r, (_like(x[r], heads(local(r)), self.valid[peer]),), tag))
        received = self.transport.exchange(sends, recvs).wait()
        got = {(dst, src): t for (src, dst, _, _), (t,) in zip(recvs, received)}
        out = {}
        for r in self.transport.ranks:
            lo, hi = heads(local(r))
            chunk = x[r].new_zeros(x[r].shape[0], hi - lo, self.plan.local_len, *x[r].shape[3:])
            for peer in self._peers(r):
                rows = x[r][:, lo:hi, :self.valid[r]] if peer == r else got[(r, peer)]
                start = self._offset(peer)
                chunk[:, :, start:start + self.valid[peer]] = rows
            out[r] = chunk
        return out

    def to_sequence(self, chunks: Held, heads: HeadRange, total_heads: int, rows: int,
                    accumulate: bool = False) -> Held:
        """Per rank: its own rows of all total_heads heads (padded to `rows`), from the node chunks of
        every rank of its node; accumulate=True sums heads held by several ranks (else assigns)."""
        tag, local = self._tag(), self.topology.local_index
        sends, recvs = [], []
        for r in self.transport.ranks:
            for peer in self._peers(r):
                if peer != r:
                    start = self._offset(peer)
                    sends.append((r, peer, (chunks[r][:, :, start:start + self.valid[peer]].contiguous(),), tag))
                    recvs.append((peer, r, (_like(chunks[r], heads(local(peer)), self.valid[r]),), tag))
        received = self.transport.exchange(sends, recvs).wait()
        got = {(dst, src): t for (src, dst, _, _), (t,) in zip(recvs, received)}
        out = {}
        for r in self.transport.ranks:
            c = chunks[r]
            mine = c.new_zeros(c.shape[0], total_heads, rows, *c.shape[3:])
            for peer in self._peers(r):
                lo, hi = heads(local(peer))
                start = self._offset(r)
                part = c[:, :, start:start + self.valid[r]] if peer == r else got[(r, peer)]
                target = mine[:, lo:hi, :self.valid[r]]
                target.add_(part) if accumulate else target.copy_(part)
            out[r] = mine
        return out


def _like(x: torch.Tensor, heads: tuple[int, int], rows: int) -> torch.Tensor:
    """A receive template: x's batch and trailing dims with `heads` heads and `rows` rows (no memory)."""
    return torch.empty((), dtype=x.dtype, device=x.device).expand(x.shape[0], heads[1] - heads[0], rows, *x.shape[3:])


def ring_transports(plan: RingPlan, topology: Topology, phase: str, rank: Optional[int], group,
                    timeout_s: float, device: torch.device) -> dict[int, object]:
    """Per local index j that this process runs: the transport of ring j over the nodes (plan rank
    p is the group rank (p, j))."""
    n = topology.node_size
    js = range(n) if rank is None else [topology.local_index(rank)]
    out = {}
    for j in js:
        members = [topology.rank_at(p, j) for p in range(topology.nodes)]
        link = lambda a, b, m=members: topology.link(m[a], m[b])  # noqa: E731
        if rank is None:
            out[j] = VirtualTransport(range(topology.nodes), phase, link)
        else:
            out[j] = GroupTransport(phase, group, topology.node_of(rank), members, timeout_s, device, link)
    return out
