"""Ring drivers: execute a RingPlan with a local kernel over a transport (real or virtual).

Chunks travel along the plan's route (a flat ring, or a double ring whose jumps between nodes are
posted a whole inner cycle before they are needed). Forward (KV ring): every step folds the visiting
K/V chunk into each rank's running state while the next chunks are already in flight. Backward,
either scheme, is one driver: a payload travels (K/V for the KV ring; Q, dO, D, lse for the query
ring), each rank computes the partial gradients of the visiting chunk, and those partials trail one
hop behind, summed as they go, until they reach the chunk's owner. The owner keeps its own step-0
partial.

All tensors are per-rank dicts over `transport.ranks` of padded shards.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Union

import torch

from burstc.debug.trace import COMPUTE, POST, WAIT, maybe_span
from burstc.runtime import stats
from burstc.runtime.kernels.base import GradSum, LocalKernel, QueryBundle, accumulation_dtype
from burstc.runtime.kernels.tile_mask import POSITION_LIMIT, PositionMask, position_form
from burstc.runtime.transport import Held
from burstc.schedule.cost import KV_RING, QUERY_RING
from burstc.schedule.masks import AttentionMask
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


def _trim(rows: tuple[int, int], tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """rows (first, last + 1) of a chunk's tensors (all of them when rows is every row)."""
    lo, hi = rows
    if (lo, hi) == (0, tensors[0].shape[2]):
        return tensors
    return tuple(t[:, :, lo:hi].contiguous() for t in tensors)


def _rows_like(rows: tuple[int, int], like: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Receive templates for rows (first, last + 1) of a chunk (shapes of `like` with the row count changed)."""
    lo, hi = rows
    return tuple(torch.empty((), dtype=t.dtype, device=t.device).expand(*t.shape[:2], hi - lo, *t.shape[3:])
                 for t in like)


class _Inbox:
    """Payload transfers in flight, by the step at which their receivers need them."""

    def __init__(self):
        self._pending: dict[int, tuple] = {}  # dst step -> (Pending, receiving ranks in order)
        self._sent: list = []  # Pendings of exchanges that only send: waited with the next take

    def post(self, plan: RingPlan, transport, role: str, step: int, held: Held, like: Held) -> None:
        """Post the sends of what this process's ranks hold at step to the ranks that need it next
        (the owner trims its chunk to the rows each receiver holds), and the receives of what they get
        from step's senders. One exchange per destination step, so a transfer that is needed n steps
        later (the double ring's jump to the next node, the direct route's far neighbour) is waited for
        only then."""
        by_step: dict[int, tuple[list, list, list]] = {}
        for r in transport.ranks:
            trimmed: dict = {}  # rows -> the owner's chunk cut to them (once, however many receivers hold them)
            for dst, dst_step in plan.deliveries(role, step, r):  # none unless r holds the chunk at step
                tensors = held[r]
                if step == 0:
                    rows = plan.held_rows(role, dst_step, dst)
                    if rows not in trimmed:
                        trimmed[rows] = _trim(rows, held[r])
                    tensors = trimmed[rows]
                by_step.setdefault(dst_step, ([], [], []))[0].append((r, dst, tensors, _payload_tag(dst_step)))
            for src, dst_step in plan.arrivals(role, step, r):
                entry = by_step.setdefault(dst_step, ([], [], []))
                rows = plan.held_rows(role, dst_step, r)
                entry[1].append((src, r, _rows_like(rows, like[r]), _payload_tag(dst_step)))
                entry[2].append(r)
        for dst_step, (sends, recvs, receivers) in by_step.items():
            pending = transport.exchange(sends, recvs)
            if receivers:
                assert dst_step not in self._pending, f"two transfers for step {dst_step} posted at different steps"
                self._pending[dst_step] = (pending, receivers)
            else:
                self._sent.append(pending)

    def take(self, step: int) -> Held:
        """What this process's ranks receive for `step` (waits for it, and for the sends posted
        before, so their buffers can go)."""
        while self._sent:
            self._sent.pop().wait()
        if step not in self._pending:
            return {}
        pending, receivers = self._pending.pop(step)
        return dict(zip(receivers, pending.wait()))


def _payload_tag(dst_step: int) -> int:
    return _TAG_PAYLOAD + _TAG_STRIDE * dst_step


def _partial_tag(src_step: int) -> int:
    return _TAG_PARTIAL + _TAG_STRIDE * src_step


class _MaskTiles:
    """The call's mask on a plan's work items (global positions of both sides), on a device: the evaluated
    tile, or a PositionMask (positions, window, document ids, key padding: no tile) for a kernel that
    `takes_position_masks` when the mask has nothing else (no mask_mod, no attn_mask). The mask is the
    call's own, never plan.mask: a cached plan is shared by every call whose mask has the same content,
    and holds the tensors of the first of them, which their owner may since have changed in place."""

    def __init__(self, plan: RingPlan, mask: Optional[AttentionMask], heads: int, device: torch.device,
                 kernel: LocalKernel):
        self.heads = heads
        self.mask = mask.to(device) if mask is not None else None
        self._described = None  # the mask as PositionMask.of slices it, where the kernel takes those
        if mask is not None and getattr(kernel, "takes_position_masks", False) and plan.seq_len < POSITION_LIMIT:
            self._described = position_form(self.mask)
        self._positions = ({r: plan.positions(r).to(device) for r in range(plan.world_size)}
                           if mask is not None else {})
        if self._described is not None:  # the kernels read int32 positions: converted once, not per item
            self._positions = {r: p.to(torch.int32) for r, p in self._positions.items()}

    def __call__(self, q_rank: int, k_rank: int, item) -> Union[torch.Tensor, PositionMask, None]:
        if not item.masked:
            return None
        qp = self._positions[q_rank][item.q_start:item.q_stop]
        kp = self._positions[k_rank][item.k_start:item.k_stop]
        if self._described is not None:
            return PositionMask.of(self._described, qp, kp)
        return self.mask.evaluate(qp, kp, self.heads)

    def add_bias_grad(self, dbias: torch.Tensor, q_rank: int, k_rank: int, item, ds: torch.Tensor) -> None:
        """Add an item's score gradient ds [B, H, q_len, k_len] into dbias, the gradient of the call's
        materialised additive mask (shaped like mask.dense: its rows, all keys), summed over the dims the
        mask broadcasts."""
        qp = self._positions[q_rank][item.q_start:item.q_stop]
        kp = self._positions[k_rank][item.k_start:item.k_stop]
        for dim in (0, 1):
            if dbias.shape[dim] == 1 and ds.shape[dim] != 1:
                ds = ds.sum(dim=dim, keepdim=True)
        rows = self.mask.dense_row_index(qp).to(dbias.device)
        dbias[:, :, rows[:, None], kp.to(dbias.device)[None, :]] += ds.to(dbias.dtype)  # an item's pairs are distinct


def ring_forward(plan: RingPlan, transport, kernel: LocalKernel, q: Held, k: Held, v: Held,
                 scale: float, mask: Optional[AttentionMask] = None) -> tuple[Held, Held]:
    """Per rank (out [B, H_q, L, d] in the input dtype, lse [B, H_q, L] in the accumulation dtype).
    mask: the call's structured mask (the one plan was built for)."""
    ranks = transport.ranks
    _count_skipped(plan, ranks)
    states = {r: kernel.forward_init(q[r]) for r in ranks}
    held = {r: (k[r], v[r]) for r in ranks}
    like = dict(held)
    device = q[ranks[0]].device
    tiles = _MaskTiles(plan, mask, q[ranks[0]].shape[1], device, kernel)
    inbox = _Inbox()
    for step in range(plan.steps_for(KV)):
        with _comm_span(transport, "forward", step, POST, device):
            inbox.post(plan, transport, KV, step, held, like)
        for r in ranks:
            if not plan.holds(KV, step, r):
                continue
            visit = plan.kv_visit(step, r)
            offset = plan.row_offset(KV, step, r)
            with maybe_span(transport.members[r], "forward", step, COMPUTE, device):
                for item in visit.items:
                    kernel.forward_step(states[r], q[r], held[r][0], held[r][1], item.shifted(0, offset), scale,
                                        mask=tiles(r, visit.k_rank, item))
        stats.count("steps", 1)
        if step + 1 < plan.steps_for(KV):
            with _comm_span(transport, "forward", step, WAIT, device):
                held = {**held, **inbox.take(step + 1)}
    transport.finish()
    results = {r: kernel.forward_finalize(states[r]) for r in ranks}
    return {r: o for r, (o, _) in results.items()}, {r: lse for r, (_, lse) in results.items()}


def row_delta(dout: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """D = rowsum(dO * O) [B, H, L] in the accumulation dtype, as a batched dot product (no
    [B, H, L, d] temporary)."""
    acc = accumulation_dtype(out.dtype)
    return torch.matmul(dout.to(acc).unsqueeze(-2), out.to(acc).unsqueeze(-1)).reshape(out.shape[:-1])


def ring_backward(plan: RingPlan, transport, kernel: LocalKernel, scheme: str, q: Held, k: Held,
                  v: Held, out: Optional[Held], dout: Held, lse: Held, scale: float,
                  delta: Optional[Held] = None, mask: Optional[AttentionMask] = None,
                  dbias: Optional[torch.Tensor] = None) -> tuple[Held, Held, Held]:
    """Per rank (dq, dk, dv) in the accumulation dtype. delta: D = rowsum(dO * O) when the caller has
    it (then out may be None: the kernels work from D alone); else computed from out. mask: the
    call's structured mask (the one plan was built for). dbias: a tensor shaped like mask.dense (a
    materialised additive mask that requires grad, a learned bias) into which its gradient is added; the
    kernel must take `score_grads` (the reference kernel) and the scheme must be the kv_ring."""
    ranks = transport.ranks
    _count_skipped(plan, ranks)
    acc = accumulation_dtype(q[ranks[0]].dtype)
    if delta is None:
        delta = {r: row_delta(dout[r], out[r]) for r in ranks}
    out = out or {}
    grad_sum = lambda x: GradSum(x.shape, acc, x.device)  # noqa: E731
    tiles = _MaskTiles(plan, mask, q[ranks[0]].shape[1], q[ranks[0]].device, kernel)

    if scheme == KV_RING:
        bundles = {r: QueryBundle(q[r], dout[r], lse[r], delta[r], out=out.get(r)) for r in ranks}
        dq = {r: grad_sum(q[r]) for r in ranks}

        def compute(r: int, step: int, payload) -> tuple[torch.Tensor, ...]:
            kv_k, kv_v = payload
            dk_part, dv_part = grad_sum(kv_k), grad_sum(kv_v)
            visit = plan.kv_visit(step, r)
            offset = plan.row_offset(KV, step, r)
            for item in visit.items:
                extra = {}
                if dbias is not None and item.masked:
                    extra["score_grads"] = []
                kernel.backward_step(bundles[r], kv_k, kv_v, item.shifted(0, offset), scale, dq[r], dk_part, dv_part,
                                     mask=tiles(r, visit.k_rank, item), **extra)
                for ds in extra.get("score_grads", ()):
                    tiles.add_bias_grad(dbias, r, visit.k_rank, item, ds)
            return dk_part.tensor(), dv_part.tensor()

        payload = {r: (k[r], v[r]) for r in ranks}
        partial_like = {r: (_like(k[r], acc), _like(v[r], acc)) for r in ranks}
        own = _trailing_ring(plan, KV, transport, payload, partial_like, compute)
        return {r: dq[r].tensor() for r in ranks}, {r: own[r][0] for r in ranks}, {r: own[r][1] for r in ranks}

    if scheme == QUERY_RING:
        if dbias is not None:
            raise ValueError("a materialised mask's gradient needs the kv_ring backward (its rows stay with the queries)")
        dk = {r: grad_sum(k[r]) for r in ranks}
        dv = {r: grad_sum(v[r]) for r in ranks}

        def compute(r: int, step: int, payload) -> tuple[torch.Tensor, ...]:
            bundle = QueryBundle(*payload, out=out.get(r) if step == 0 else None)  # step 0: own queries
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
    """Run the payload along the plan's route; return each rank's summed partials of its own chunk.

    Per step: post the payload's sends and receives and the receive of the partial sums trailing
    the chunk (from the holder one step earlier), compute, add the received sums and send the total
    on: to the next holder while the chunk goes on one step later, else straight home to the chunk's
    owner (the chunk stops, or it jumps to another node on the double ring). Between any two ranks
    both sides post in the same order, as NCCL (which ignores tags) needs: the sums a rank sends
    after step s are received at the start of step s + 1, before that step's payload, which its
    sender posts after them, and added at the end of that step (one step of home buffers in
    flight, not one per node). At most one partial-sum send is in flight per rank. Accumulators of
    a trimmed chunk cover only the rows its holder holds."""
    ranks = transport.ranks
    device = next(iter(partial_like.values()))[0].device
    span = lambda step, kind: _comm_span(transport, "backward", step, kind, device)  # noqa: E731
    steps = plan.steps_for(role)
    homes_after = {}  # src step -> [receives of partial sums coming home after it]
    for r in ranks:
        for src, src_step in plan.accumulators_home(role, r):
            homes_after.setdefault(src_step, []).append(
                (src, r, _rows_like(plan.held_rows(role, src_step, src), partial_like[r]), _partial_tag(src_step)))
    home_pending = []  # (src step, receives, Pending), oldest first

    def expect_homes(src_step: int) -> None:
        if src_step in homes_after:
            home_pending.append((src_step, homes_after[src_step], transport.exchange([], homes_after[src_step])))

    def add_homes(up_to: int, step: int) -> None:
        """Add the partial sums sent home after steps <= up_to into the owners' own (waits for them)."""
        while home_pending and home_pending[0][0] <= up_to:
            src_step, homes, pending = home_pending.pop(0)
            with span(step, WAIT):
                returned = pending.wait()
            for (src, r, _, _), theirs_all in zip(homes, returned):
                lo, hi = plan.held_rows(role, src_step, src)
                for mine, theirs in zip(own[r], theirs_all):
                    mine[:, :, lo:hi].add_(theirs)
    payload_like = dict(payload)
    inbox = _Inbox()
    own: Held = {}
    last_send = None
    for step in range(steps):
        with span(step, POST):
            expect_homes(step - 1)
            prevs = {r: plan.accumulator_prev(role, step, r) for r in ranks if plan.holds(role, step, r)}
            expect = [(src, r, _rows_like(plan.held_rows(role, step, r), partial_like[r]), _partial_tag(step - 1))
                      for r, src in prevs.items() if src is not None]
            acc_in = transport.exchange([], expect) if expect else None
            inbox.post(plan, transport, role, step, payload, payload_like)
        partial = {}
        for r in ranks:
            if plan.holds(role, step, r):
                with maybe_span(transport.members[r], "backward", step, COMPUTE, device):
                    partial[r] = compute(r, step, payload[r])
        stats.count("steps", 1)
        if step == 0:
            own = partial
        else:
            if acc_in is not None:
                with span(step, WAIT):
                    received = acc_in.wait()
                for (_, r, _, _), theirs_all in zip(expect, received):
                    for mine, theirs in zip(partial[r], theirs_all):
                        mine.add_(theirs)
            if partial:
                with span(step, POST):
                    if last_send is not None:
                        last_send.wait()  # its buffers may go: bounded memory
                    last_send = transport.exchange(
                        [(r, plan.accumulator_next(role, step, r), partial[r], _partial_tag(step)) for r in partial], [])
            add_homes(step - 1, step)
        if step + 1 < steps:
            with span(step, WAIT):
                payload = {**payload, **inbox.take(step + 1)}
    expect_homes(steps - 1)
    add_homes(steps - 1, steps - 1)
    transport.finish()
    return own
