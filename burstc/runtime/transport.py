"""Moving chunks around the ring: a process-group transport (one rank per process, async P2P over
torch.distributed) and a virtual transport (all G ranks in this process, tensors handed over).

Both speak in dicts {rank: tuple of tensors} over the ranks this process runs, so one ring driver
serves both. `shift` sends what every rank holds to its successor and returns what it receives
from its predecessor; `send`/`recv` carry the trailing accumulators one hop forward. Every byte
sent is counted into the active comm_stats under the transport's phase.
"""
from __future__ import annotations

import datetime
from typing import Callable, Optional

import torch
import torch.distributed as dist

from burstc.runtime import stats
from burstc.schedule.plan import RingPlan

Held = dict[int, tuple[torch.Tensor, ...]]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Pending:
    """A transfer in flight; `wait()` returns the received tensors."""

    def __init__(self, wait: Callable[[], Held]):
        self._wait = wait

    def wait(self) -> Held:
        return self._wait()


class VirtualTransport:
    """All ranks of the plan in one process: a hop hands the tensors to the successor's slot."""

    def __init__(self, plan: RingPlan, phase: str):
        self.plan = plan
        self.ranks = tuple(range(plan.world_size))
        self.traced_rank = None  # hops are free: no communication spans
        self._field = f"{phase}_bytes"
        self._mailbox: dict[int, Held] = {}

    def _hop(self, held: Held) -> Held:
        stats.count(self._field, sum(_nbytes(ts) for ts in held.values()))
        return {self.plan.next_rank(r): ts for r, ts in held.items()}

    def shift(self, held: Held, tag: int) -> Pending:
        moved = self._hop(held)
        return Pending(lambda: moved)

    def send(self, held: Held, tag: int) -> None:
        self._mailbox.setdefault(tag, {}).update(self._hop(held))

    def recv(self, like: Held, tag: int) -> Pending:
        return Pending(lambda: {r: self._mailbox[tag].pop(r) for r in like})

    def finish(self) -> None:
        assert not any(self._mailbox.values()), "virtual ring: a sent accumulator was never received"


class GroupTransport:
    """This process is one rank of `group`; hops are batched isend/irecv to the ring neighbours.
    On CPU (gloo) every wait has `timeout_s`; on CUDA the wait orders the compute stream after the
    transfer (NCCL runs transfers on its own stream) and the group's own timeout applies."""

    def __init__(self, plan: RingPlan, phase: str, group: Optional[dist.ProcessGroup], rank: int,
                 timeout_s: float, device: torch.device):
        self.plan = plan
        self._uses_cuda = device.type == "cuda"
        self.ranks = (rank,)
        self.traced_rank = rank
        self._rank = rank
        self._group = group
        self._field = f"{phase}_bytes"
        self._next = dist.get_global_rank(group or dist.group.WORLD, plan.next_rank(rank))
        self._prev = dist.get_global_rank(group or dist.group.WORLD, plan.prev_rank(rank))
        self._timeout = datetime.timedelta(seconds=timeout_s)
        self._sends: list = []  # (works, tensors) of accumulator sends still in flight

    def _wait_all(self, works, what: str) -> None:
        for w in works:
            try:
                if w is None:
                    continue
                if self._uses_cuda:
                    w.wait()
                else:
                    w.wait(self._timeout)
            except RuntimeError as e:
                raise RuntimeError(
                    f"burst ring: rank {self._rank} gave up waiting for {what} after "
                    f"{self._timeout.total_seconds():.0f} s ({e}). Another rank failed or is not running "
                    f"the same burst_attention call; set BURST_TIMEOUT_S to wait longer.") from e

    def _ops(self, send, recv, tag):
        # one tag per tensor of a payload, so matching never depends on posting order
        ops = [dist.P2POp(dist.isend, t, self._next, self._group, tag + i) for i, t in enumerate(send)]
        ops += [dist.P2POp(dist.irecv, t, self._prev, self._group, tag + i) for i, t in enumerate(recv)]
        return ops

    def shift(self, held: Held, tag: int) -> Pending:
        send = held[self._rank]
        recv = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in send)
        stats.count(self._field, _nbytes(send))
        works = dist.batch_isend_irecv(self._ops(send, recv, tag))

        def wait():
            self._wait_all(works, f"the ring shift (tag {tag}) from rank {self.plan.prev_rank(self._rank)}")
            return {self._rank: recv}
        return Pending(wait)

    def send(self, held: Held, tag: int) -> None:
        send = held[self._rank]
        stats.count(self._field, _nbytes(send))
        while self._sends:  # at most one accumulator send in flight: its buffer stays alive until done
            works, _ = self._sends.pop(0)
            self._wait_all(works, "its own accumulator send to complete")
        self._sends.append((dist.batch_isend_irecv(self._ops(send, (), tag)), send))

    def recv(self, like: Held, tag: int) -> Pending:
        recv = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in like[self._rank])
        works = dist.batch_isend_irecv(self._ops((), recv, tag))

        def wait():
            self._wait_all(works, f"partial gradients (tag {tag}) from rank {self.plan.prev_rank(self._rank)}")
            return {self._rank: recv}
        return Pending(wait)

    def finish(self) -> None:
        for works, _ in self._sends:
            self._wait_all(works, "its own sends to complete")
        self._sends.clear()
