"""Ulysses x ring: inside each node an all-to-all trades sequence shards for head shards, a burst ring
runs across the nodes on the node's rows, and an all-to-all trades the result back.

Rank (node p, local index j) of a node of n ranks starts with its own rows of every head. After
`to_heads` it holds query heads [j*H/n, (j+1)*H/n) (and the K/V heads those need,
topology.ulysses_kv_range) for the real rows of all n ranks of its node, one rank's rows after the
other: exactly the chunk of plan rank p of a `ulysses_ring` plan. The ranks of local index j on
every node form one ring (plan rank p = node p). `to_sequence` is the inverse; with
`accumulate=True` rows that several ranks hold (K/V heads replicated for grouped-query attention)
are summed, which makes it the adjoint of `to_heads` for gradients. `ulysses_forward` and
`ulysses_backward` run a whole call of a RingRun whose plan is a ulysses_ring plan.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from burstc.debug.trace import ALL_TO_ALL, maybe_span
from burstc.runtime.ring import ring_backward, ring_forward, row_delta
from burstc.runtime.transport import GroupTransport, Held, VirtualTransport
from burstc.schedule.plan import RingPlan
from burstc.schedule.topology import Topology, ulysses_kv_range

_TAG_ALL_TO_ALL, _TAG_STRIDE = 3 << 20, 8

HeadRange = Callable[[int], tuple[int, int]]  # local index -> heads [lo, hi) that rank holds


class NodeExchange:
    """The all-to-alls of one call inside the nodes, over a transport of the G layout ranks."""

    def __init__(self, plan: RingPlan, topology: Topology, transport, valid_lens: list[int], phase: str,
                 device: torch.device):
        self.plan, self.topology, self.transport = plan, topology, transport
        self.valid = valid_lens  # real rows per layout rank
        self._phase, self._device = phase, device
        self._calls = 0

    def _exchange(self, sends, recvs) -> list:
        """One all-to-all, waited for (a trace span on a real transport: nothing overlaps it)."""
        if self.transport.traced_rank is None:
            return self.transport.exchange(sends, recvs).wait()
        with maybe_span(self.transport.traced_rank, self._phase, self._calls, ALL_TO_ALL, self._device):
            return self.transport.exchange(sends, recvs).wait()

    def _peers(self, rank: int) -> list[int]:
        node = self.topology.node_of(rank)
        return [self.topology.rank_at(node, j) for j in range(self.topology.node_size)]

    def _offset(self, rank: int) -> int:
        """Row of the node chunk where `rank`'s rows start."""
        return sum(self.valid[r] for r in self._peers(rank) if r < rank)

    def _tag(self) -> int:
        self._calls += 1
        return _TAG_ALL_TO_ALL + _TAG_STRIDE * self._calls

    def _all_to_all(self, part: Callable, like: Callable) -> dict[tuple[int, int], torch.Tensor]:
        """One all-to-all inside the nodes: rank r sends part(r, peer) to every other rank of its
        node and receives a tensor shaped like(r, peer) from it. Returns {(r, peer): what r holds
        from peer}, its own part(r, r) included (never sent)."""
        tag = self._tag()
        sends, recvs = [], []
        for r in self.transport.ranks:
            for peer in self._peers(r):
                if peer != r:
                    sends.append((r, peer, (part(r, peer).contiguous(),), tag))
                    recvs.append((peer, r, (like(r, peer),), tag))
        received = self._exchange(sends, recvs)
        got = {(dst, src): t for (src, dst, _, _), (t,) in zip(recvs, received)}
        got.update({(r, r): part(r, r) for r in self.transport.ranks})
        return got

    def to_heads(self, x: Held, heads: HeadRange) -> Held:
        """Per rank: its heads `heads(j)` of every rank of its node, real rows concatenated and
        padded to plan.local_len rows. x: per-rank padded shards [B, H, L, ...]."""
        local = self.topology.local_index

        def part(r: int, peer: int) -> torch.Tensor:  # r's real rows of the heads peer keeps
            lo, hi = heads(local(peer))
            return x[r][:, lo:hi, :self.valid[r]]
        got = self._all_to_all(part, lambda r, peer: _like(x[r], heads(local(r)), self.valid[peer]))
        out = {}
        for r in self.transport.ranks:
            lo, hi = heads(local(r))
            chunk = x[r].new_zeros(x[r].shape[0], hi - lo, self.plan.local_len, *x[r].shape[3:])
            for peer in self._peers(r):
                start = self._offset(peer)
                chunk[:, :, start:start + self.valid[peer]] = got[(r, peer)]
            out[r] = chunk
        return out

    def to_sequence(self, chunks: Held, heads: HeadRange, total_heads: int, rows: int,
                    accumulate: bool = False) -> Held:
        """Per rank: its own rows of all total_heads heads (padded to `rows`), from the node chunks of
        every rank of its node; accumulate=True sums heads held by several ranks (else assigns)."""
        local = self.topology.local_index

        def part(r: int, peer: int) -> torch.Tensor:  # peer's rows of r's node chunk
            start = self._offset(peer)
            return chunks[r][:, :, start:start + self.valid[peer]]
        got = self._all_to_all(part, lambda r, peer: _like(chunks[r], heads(local(peer)), self.valid[r]))
        out = {}
        for r in self.transport.ranks:
            c = chunks[r]
            mine = c.new_zeros(c.shape[0], total_heads, rows, *c.shape[3:])
            for peer in self._peers(r):
                lo, hi = heads(local(peer))
                target = mine[:, lo:hi, :self.valid[r]]
                target.add_(got[(r, peer)]) if accumulate else target.copy_(got[(r, peer)])
            out[r] = mine
        return out


def _like(x: torch.Tensor, heads: tuple[int, int], rows: int) -> torch.Tensor:
    """A receive template: x's batch and trailing dims with `heads` heads and `rows` rows (no memory)."""
    return torch.empty((), dtype=x.dtype, device=x.device).expand(x.shape[0], heads[1] - heads[0], rows, *x.shape[3:])


def _rings(run, phase: str, device: torch.device):
    """The transport of every ring across the nodes this process runs: ring j joins the ranks of
    local index j (plan rank p is the group rank (p, j), transport.members[p])."""
    topology = run.topology
    js = range(topology.node_size) if run.rank is None else [topology.local_index(run.rank)]
    for j in js:
        members = [topology.rank_at(p, j) for p in range(topology.nodes)]
        link = lambda a, b, m=members: topology.link(m[a], m[b])  # noqa: E731
        if run.rank is None:
            transport = VirtualTransport(range(topology.nodes), phase, link, members)
        else:
            transport = GroupTransport(phase, run.group, topology.node_of(run.rank), members, run.timeout_s, device,
                                       link)
        yield transport


def _head_ranges(run, qd: Held, kd: Held) -> tuple[HeadRange, HeadRange, int, int]:
    """(query head range, K/V head range) of a local index, and the head counts."""
    n = run.topology.node_size
    heads_q, heads_kv = next(iter(qd.values())).shape[1], next(iter(kd.values())).shape[1]
    per = heads_q // n
    return (lambda j: (j * per, (j + 1) * per)), (lambda j: ulysses_kv_range(heads_q, heads_kv, n, j)), heads_q, heads_kv


def _exchange(run, phase: str, device: torch.device) -> NodeExchange:
    return NodeExchange(run.plan, run.topology, run.transport(phase, device),
                        [run.valid_rows(r) for r in range(run.world_size)], phase, device)


def ulysses_forward(run, qd: Held, kd: Held, vd: Held, device: torch.device) -> tuple[Held, Held]:
    """(out, lse) per rank's padded shard of a RingRun with a ulysses_ring plan."""
    qh, kvh, heads_q, _ = _head_ranges(run, qd, kd)
    ex = _exchange(run, "forward", device)
    qn, kn, vn = ex.to_heads(qd, qh), ex.to_heads(kd, kvh), ex.to_heads(vd, kvh)
    out_n, lse_n = {}, {}
    for transport in _rings(run, "forward", device):
        pick = lambda d: {p: d[transport.members[p]] for p in transport.ranks}  # noqa: E731
        out, lse = ring_forward(run.plan, transport, run.kernel, pick(qn), pick(kn), pick(vn), run.scale,
                                mask=run.mask)
        for p in transport.ranks:
            out_n[transport.members[p]], lse_n[transport.members[p]] = out[p], lse[p]
    rows = run.shard_rows()
    return ex.to_sequence(out_n, qh, heads_q, rows), ex.to_sequence(lse_n, qh, heads_q, rows)


def ulysses_backward(run, qd: Held, kd: Held, vd: Held, out: Held, dout: Held, lse: Held,
                     device: torch.device, delta: Optional[Held] = None) -> tuple[Held, Held, Held]:
    """(dq, dk, dv) per rank's padded shard (accumulation dtype) of a RingRun with a ulysses_ring plan;
    K/V heads held by several ranks of a node have their gradients summed. delta: D per rank when the
    caller has it (attention sinks: D - dlse), else rowsum(dO * O)."""
    qh, kvh, heads_q, heads_kv = _head_ranges(run, qd, kd)
    ex = _exchange(run, "backward", device)
    qn, kn, vn = ex.to_heads(qd, qh), ex.to_heads(kd, kvh), ex.to_heads(vd, kvh)
    # D = rowsum(dO * O) travels instead of O: one number per row and head instead of d
    if delta is None:
        delta = {r: row_delta(dout[r], out[r]) for r in dout}
    don, ln, dn = ex.to_heads(dout, qh), ex.to_heads(lse, qh), ex.to_heads(delta, qh)
    dq_n, dk_n, dv_n = {}, {}, {}
    for transport in _rings(run, "backward", device):
        pick = lambda d: {p: d[transport.members[p]] for p in transport.ranks}  # noqa: E731
        dq, dk, dv = ring_backward(run.plan, transport, run.kernel, run.scheme, pick(qn), pick(kn), pick(vn),
                                   None, pick(don), pick(ln), run.scale, delta=pick(dn), mask=run.mask)
        for p in transport.ranks:
            g = transport.members[p]
            dq_n[g], dk_n[g], dv_n[g] = dq[p], dk[p], dv[p]
    rows = run.shard_rows()
    return (ex.to_sequence(dq_n, qh, heads_q, rows), ex.to_sequence(dk_n, kvh, heads_kv, rows, accumulate=True),
            ex.to_sequence(dv_n, kvh, heads_kv, rows, accumulate=True))
