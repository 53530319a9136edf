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
from typing import Callable

import torch

from burstc.debug.trace import COMPUTE, POST, WAIT, maybe_span
from burstc.runtime import stats
from burstc.runtime.kernels.base import GradSum, LocalKernel, QueryBundle, accumulation_dtype
from burstc.runtime.transport import Held
from burstc.schedule.cost import KV_RING, QUERY_RING
from burstc.schedule.plan import SKIPPED, PairPlan, RingPlan

# tag = base + 8 * step (+ tensor index): every message of a call has its own tag
_TAG_PAYLOAD, _TAG_PARTIAL, _TAG_STRIDE = 1 << 20, 2 << 20, 8


def _visit_done(visit: PairPlan) -> None:
    if visit.mask == SKIPPED:
        stats.count("skipped_pairs", 1)


@contextlib.contextmanager
def _comm_span(transport, phase: str, step: int, kind: str, device: torch.device):
    """A trace span for posting or waiting on transfers (real transports only: virtual hops are free)."""
    if transport.traced_rank is not None:
        with maybe_span(transport.traced_rank, phase, step, kind, device):
            yield
    else:
        yield


def ring_forward(plan: RingPlan, transport, kernel: LocalKernel, q: Held, k: Held, v: Held,
                 scale: float) -> tuple[Held, Held]:
    """Per rank (out [B, H_q, L, d] in the input dtype, lse [B, H_q, L] in the accumulation dtype)."""
    ranks = transport.ranks
    states = {r: kernel.forward_init(q[r]) for r in ranks}
    held = {r: (k[r], v[r]) for r in ranks}
    device = q[ranks[0]].device
    for step in range(plan.steps):
        incoming = None
        if step < plan.steps - 1:
            with _comm_span(transport, "forward", step, POST, device):
                incoming = transport.shift(held, _TAG_PAYLOAD + _TAG_STRIDE * step)
        for r in ranks:
            visit = plan.kv_visit(step, r)
            with maybe_span(r, "forward", step, COMPUTE, device):
                for item in visit.items:
                    kernel.forward_step(states[r], q[r], held[r][0], held[r][1], item, scale)
            _visit_done(visit)
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
    acc = accumulation_dtype(q[ranks[0]].dtype)
    # D = rowsum(dO * O) as a batched dot product: no [B, H, L, d] temporary
    delta = {r: torch.matmul(dout[r].to(acc).unsqueeze(-2), out[r].to(acc).unsqueeze(-1)).reshape(lse[r].shape)
             for r in ranks}
    grad_sum = lambda x: GradSum(x.shape, acc, x.device)  # noqa: E731

    if scheme == KV_RING:
        bundles = {r: QueryBundle(q[r], dout[r], lse[r], delta[r], out=out[r]) for r in ranks}
        dq = {r: grad_sum(q[r]) for r in ranks}

        def compute(r: int, step: int, payload) -> tuple[torch.Tensor, ...]:
            kv_k, kv_v = payload
            dk_part, dv_part = grad_sum(kv_k), grad_sum(kv_v)
            visit = plan.kv_visit(step, r)
            for item in visit.items:
                kernel.backward_step(bundles[r], kv_k, kv_v, item, scale, dq[r], dk_part, dv_part)
            _visit_done(visit)
            return dk_part.tensor(), dv_part.tensor()

        payload = {r: (k[r], v[r]) for r in ranks}
        partial_like = {r: (_like(k[r], acc), _like(v[r], acc)) for r in ranks}
        own = _trailing_ring(plan, transport, payload, partial_like, compute)
        return {r: dq[r].tensor() for r in ranks}, {r: own[r][0] for r in ranks}, {r: own[r][1] for r in ranks}

    if scheme == QUERY_RING:
        dk = {r: grad_sum(k[r]) for r in ranks}
        dv = {r: grad_sum(v[r]) for r in ranks}

        def compute(r: int, step: int, payload) -> tuple[torch.Tensor, ...]:
            bundle = QueryBundle(*payload, out=out[r] if step == 0 else None)  # step 0: own queries
            dq_part = grad_sum(bundle.q)
            visit = plan.query_visit(step, r)
            for item in visit.items:
                kernel.backward_step(bundle, k[r], v[r], item, scale, dq_part, dk[r], dv[r])
            _visit_done(visit)
            return (dq_part.tensor(),)

        payload = {r: (q[r], dout[r], lse[r], delta[r]) for r in ranks}
        partial_like = {r: (_like(q[r], acc),) for r in ranks}
        own = _trailing_ring(plan, transport, payload, partial_like, compute)
        return {r: own[r][0] for r in ranks}, {r: dk[r].tensor() for r in ranks}, {r: dv[r].tensor() for r in ranks}

    raise ValueError(f"unknown backward scheme {scheme!r}")


def _like(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A shape/dtype/device template that owns no memory (transports allocate receive buffers from it)."""
    return torch.empty((), dtype=dtype, device=x.device).expand(x.shape)


def _trailing_ring(plan: RingPlan, transport, payload: Held, partial_like: Held,
                   compute: Callable[[int, int, tuple], tuple[torch.Tensor, ...]]) -> Held:
    """Run the payload around the ring; return each rank's summed partials of its own chunk.

    Per step: post the receive of the accumulator coming from the predecessor, post the payload
    shift, compute, then add the received accumulator and send the sum on. The predecessor's
    accumulator arrives while this rank computes."""
    ranks = transport.ranks
    device = next(iter(partial_like.values()))[0].device
    span = lambda step, kind: _comm_span(transport, "backward", step, kind, device)  # noqa: E731
    own: Held = {}
    for step in range(plan.steps):
        acc_in = incoming = None
        with span(step, POST):
            if step >= 2:
                acc_in = transport.recv(partial_like, _TAG_PARTIAL + _TAG_STRIDE * (step - 1))
            if step < plan.steps - 1:
                incoming = transport.shift(payload, _TAG_PAYLOAD + _TAG_STRIDE * step)
        partial = {}
        for r in ranks:
            with maybe_span(r, "backward", step, COMPUTE, device):
                partial[r] = compute(r, step, payload[r])
        stats.count("steps", 1)
        if step == 0:
            own = partial
        else:
            if acc_in is not None:
                with span(step, WAIT):
                    received = acc_in.wait()
                for r in ranks:
                    for mine, theirs in zip(partial[r], received[r]):
                        mine.add_(theirs)
            with span(step, POST):
                transport.send(partial, _TAG_PARTIAL + _TAG_STRIDE * step)
        if incoming is not None:
            with span(step, WAIT):
                payload = incoming.wait()
    if plan.steps > 1:
        with span(plan.steps - 1, WAIT):
            returned = transport.recv(partial_like, _TAG_PARTIAL + _TAG_STRIDE * (plan.steps - 1)).wait()
        for r in ranks:
            for mine, theirs in zip(own[r], returned[r]):
                mine.add_(theirs)
    transport.finish()
    return own
