"""Ring drivers: execute a RingPlan with a local kernel over a transport (real or virtual).

Forward (KV ring): every step folds the visiting K/V chunk into each rank's running state while the
next chunk is already in flight. Backward, either scheme, is one driver: a payload travels the ring
(K/V for the KV ring; Q, dO, D, lse for the query ring), each rank computes the partial gradients of
the visiting chunk, and those partials trail one hop behind on a second ring, summed as they go,
until they reach the chunk's owner after the last step. The owner keeps its own step-0 partial.

All tensors are per-rank dicts over `transport.ranks` of padded shards.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from burstc.debug.trace import COMPUTE, POST, WAIT, maybe_span
from burstc.runtime import stats
from burstc.runtime.kernels.base import GradSum, LocalKernel, QueryBundle, accumulation_dtype
from burstc.runtime.transport import Held
from burstc.schedule.cost import KV_RING, QUERY_RING
from burstc.schedule.plan import KV, QUERY, RingPlan

# tag = base + 8 * step (+ tensor index): every message of a call has its own tag
_TAG_PAYLOAD, _TAG_PARTIAL, _TAG_STRIDE = 1 << 20, 2 << 20, 8


def _count_skipped(plan: RingPlan, ranks) -> None:
    """Fully masked pairs of these ranks' ring: never computed (and, past a chunk's last step, never sent)."""
    stats.count("skipped_pairs", sum(plan.skipped_pairs(r) for r in ranks))


@contextlib.contextmanager
def _comm_span(transport, phase: str, step: int, kind: str, device: torch.device):
    """A trace span for posting or waiting on transfers (real transports only: virtual hops are free)."""
    if transport.traced_rank is not None:
        with maybe_span(transport.traced_rank, phase, step, kind, device):
            yield
    else:
        yield


def _trim(plan: RingPlan, role: str, chunk: int, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The rows of a chunk that travel (all rows when the plan keeps them all)."""
    lo, hi = plan.travel_rows[role][chunk]
    if (lo, hi) == (0, tensors[0].shape[2]):
        return tensors
    return tuple(t[:, :, lo:hi].contiguous() for t in tensors)


def _rows_like(plan: RingPlan, role: str, chunk: int, like: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Receive templates for the travelling rows of chunk (shapes of `like` with the row count changed)."""
    lo, hi = plan.travel_rows[role][chunk]
    return tuple(torch.empty((), dtype=t.dtype, device=t.device).expand(*t.shape[:2], hi - lo, *t.shape[3:])
                 for t in like)


def _shift(plan: RingPlan, transport, role: str, step: int, held: Held, like: Held, tag: int):
    """Post this step's sends of the chunks later ranks need and the matching receives; None if no
    rank of this process sends or receives."""
    send = {r: (_trim(plan, role, plan.held(step, r), held[r]) if step == 0 else held[r])
            for r in transport.ranks if plan.sends(role, step, r)}
    recv = {r: _rows_like(plan, role, plan.held(step + 1, r), like[r])
            for r in transport.ranks if plan.holds(role, step + 1, r)}
    if not send and not recv:
        return None
    return transport.shift(send, recv, tag)


class _MaskTiles:
    """The mask of a plan evaluated on work items (global positions of both sides), on a device."""

    def __init__(self, plan: RingPlan, heads: int, device: torch.device):
        self.heads = heads
        self.mask = plan.mask.to(device) if plan.mask is not None else None
        self._positions = ({r: plan.positions(r).to(device) for r in range(plan.world_size)}
                           if plan.mask is not None else {})

    def __call__(self, q_rank: int, k_rank: int, item) -> Optional[torch.Tensor]:
        if not item.masked:
            return None
        qp = self._positions[q_rank][item.q_start:item.q_stop]
        kp = self._positions[k_rank][item.k_start:item.k_stop]
        return self.mask.evaluate(qp, kp, self.heads)


def ring_forward(plan: RingPlan, transport, kernel: LocalKernel, q: Held, k: Held, v: Held,
                 scale: float) -> tuple[Held, Held]:
    """Per rank (out [B, H_q, L, d] in the input dtype, lse [B, H_q, L] in the accumulation dtype)."""
    ranks = transport.ranks
    _count_skipped(plan, ranks)
    states = {r: kernel.forward_init(q[r]) for r in ranks}
    held = {r: (k[r], v[r]) for r in ranks}
    like = dict(held)
    device = q[ranks[0]].device
    tiles = _MaskTiles(plan, q[ranks[0]].shape[1], device)
    for step in range(plan.steps_for(KV)):
        incoming = None
        if step < plan.steps_for(KV) - 1:
            with _comm_span(transport, "forward", step, POST, device):
                incoming = _shift(plan, transport, KV, step, held, like, _TAG_PAYLOAD + _TAG_STRIDE * step)
        for r in ranks:
            if not plan.holds(KV, step, r):
                continue
            visit = plan.kv_visit(step, r)
            offset = plan.row_offset(KV, step, r)
            with maybe_span(r, "forward", step, COMPUTE, device):
                for item in visit.items:
                    kernel.forward_step(states[r], q[r], held[r][0], held[r][1], item.shifted(0, offset), scale,
                                        mask=tiles(r, visit.k_rank, item))
        stats.count("steps", 1)
        if incoming is not None:
            with _comm_span(transport, "forward", step, WAIT, device):
                held = incoming.wait()
    transport.finish()
    results = {r: kernel.forward_finalize(states[r]) for r in ranks}
    return {r: o for r, (o, _) in results.items()}, {r: lse for r, (_, lse) in results.items()}


def ring_backward(plan: RingPlan, transport, kernel: LocalKernel, scheme: str, q: Held, k: Held,
                  v: Held, out: Held, dout: Held, lse: Held, scale: float) -> tuple[Held, Held, Held]:
    """Per rank (dq, dk, dv) in the accumulation dtype."""
    ranks = transport.ranks
    _count_skipped(plan, ranks)
    acc = accumulation_dtype(q[ranks[0]].dtype)
    # D = rowsum(dO * O) as a batched dot product: no [B, H, L, d] temporary
    delta = {r: torch.matmul(dout[r].to(acc).unsqueeze(-2), out[r].to(acc).unsqueeze(-1)).reshape(lse[r].shape)
             for r in ranks}
    grad_sum = lambda x: GradSum(x.shape, acc, x.device)  # noqa: E731
    tiles = _MaskTiles(plan, q[ranks[0]].shape[1], q[ranks[0]].device)

    if scheme == KV_RING:
        bundles = {r: QueryBundle(q[r], dout[r], lse[r], delta[r], out=out[r]) for r in ranks}
        dq = {r: grad_sum(q[r]) for r in ranks}

        def compute(r: int, step: int, payload) -> tuple[torch.Tensor, ...]:
            kv_k, kv_v = payload
            dk_part, dv_part = grad_sum(kv_k), grad_sum(kv_v)
            visit = plan.kv_visit(step, r)
            offset = plan.row_offset(KV, step, r)
            for item in visit.items:
                kernel.backward_step(bundles[r], kv_k, kv_v, item.shifted(0, offset), scale, dq[r], dk_part, dv_part,
                                     mask=tiles(r, visit.k_rank, item))
            return dk_part.tensor(), dv_part.tensor()

        payload = {r: (k[r], v[r]) for r in ranks}
        partial_like = {r: (_like(k[r], acc), _like(v[r], acc)) for r in ranks}
        own = _trailing_ring(plan, KV, transport, payload, partial_like, compute)
        return {r: dq[r].tensor() for r in ranks}, {r: own[r][0] for r in ranks}, {r: own[r][1] for r in ranks}

    if scheme == QUERY_RING:
        dk = {r: grad_sum(k[r]) for r in ranks}
        dv = {r: grad_sum(v[r]) for r in ranks}

        def compute(r: int, step: int, payload) -> tuple[torch.Tensor, ...]:
            bundle = QueryBundle(*payload, out=out[r] if step == 0 else None)  # step 0: own queries
            dq_part = grad_sum(bundle.q)
            visit = plan.query_visit(step, r)
            offset = plan.row_offset(QUERY, step, r)
            for item in visit.items:
                kernel.backward_step(bundle, k[r], v[r], item.shifted(offset, 0), scale, dq_part, dk[r], dv[r],
                                     mask=tiles(visit.q_rank, r, item))
            return (dq_part.tensor(),)

        payload = {r: (q[r], dout[r], lse[r], delta[r]) for r in ranks}
        partial_like = {r: (_like(q[r], acc),) for r in ranks}
        own = _trailing_ring(plan, QUERY, transport, payload, partial_like, compute)
        return {r: own[r][0] for r in ranks}, {r: dk[r].tensor() for r in ranks}, {r: dv[r].tensor() for r in ranks}

    raise ValueError(f"unknown backward scheme {scheme!r}")


def _like(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A shape/dtype/device template that owns no memory (transports allocate receive buffers from it)."""
    return torch.empty((), dtype=dtype, device=x.device).expand(x.shape)


def _trailing_ring(plan: RingPlan, role: str, transport, payload: Held, partial_like: Held,
                   compute: Callable[[int, int, tuple], tuple[torch.Tensor, ...]]) -> Held:
    """Run the payload around the ring; return each rank's summed partials of its own chunk.

    Per step: post the receive of the accumulator coming from the predecessor, post the payload
    shift, compute, then add the received accumulator and send the sum on: to the successor while
    later ranks still need the chunk, straight back to the chunk's owner at its last step. The
    predecessor's accumulator arrives while this rank computes. Accumulators of a trimmed chunk
    cover only its travelling rows."""
    ranks = transport.ranks
    device = next(iter(partial_like.values()))[0].device
    span = lambda step, kind: _comm_span(transport, "backward", step, kind, device)  # noqa: E731
    last = plan.last_step[role]
    payload_like = dict(payload)
    own: Held = {}
    for step in range(plan.steps_for(role)):
        acc_in = incoming = None
        with span(step, POST):
            if step >= 2:
                expect = {r: _rows_like(plan, role, plan.held(step, r), partial_like[r])
                          for r in ranks if plan.holds(role, step, r)}
                if expect:
                    acc_in = transport.recv(expect, _TAG_PARTIAL + _TAG_STRIDE * (step - 1),
                                            {r: plan.prev_rank(r) for r in expect})
            if step < plan.steps_for(role) - 1:
                incoming = _shift(plan, transport, role, step, payload, payload_like, _TAG_PAYLOAD + _TAG_STRIDE * step)
        partial = {}
        for r in ranks:
            if plan.holds(role, step, r):
                with maybe_span(r, "backward", step, COMPUTE, device):
                    partial[r] = compute(r, step, payload[r])
        stats.count("steps", 1)
        if step == 0:
            own = partial
        else:
            if acc_in is not None:
                with span(step, WAIT):
                    received = acc_in.wait()
                for r, theirs_all in received.items():
                    for mine, theirs in zip(partial[r], theirs_all):
                        mine.add_(theirs)
            if partial:
                # forward while the chunk travels on, else home to its owner
                dest = {r: plan.next_rank(r) if plan.sends(role, step, r) else plan.held(step, r) for r in partial}
                with span(step, POST):
                    transport.send(partial, _TAG_PARTIAL + _TAG_STRIDE * step, dest)
        if incoming is not None:
            with span(step, WAIT):
                payload = incoming.wait()
    home = {r: _rows_like(plan, role, r, partial_like[r]) for r in ranks if last[r] >= 1}
    if home:
        with span(plan.steps_for(role) - 1, WAIT):
            returned = transport.recv(home, {r: _TAG_PARTIAL + _TAG_STRIDE * last[r] for r in home},
                                      {r: _last_holder(plan, role, r) for r in home}).wait()
        for r, theirs_all in returned.items():
            lo, hi = plan.travel_rows[role][r]
            for mine, theirs in zip(own[r], theirs_all):
                mine[:, :, lo:hi].add_(theirs)
    transport.finish()
    return own


def _last_holder(plan: RingPlan, role: str, chunk: int) -> int:
    """The rank that holds chunk at its last step (and sends its accumulator home)."""
    i = plan.order.index(chunk)
    return plan.order[(i + plan.last_step[role][chunk]) % plan.world_size]
