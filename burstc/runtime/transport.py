"""Moving chunks around the ring: a process-group transport (one rank per process, async P2P over
torch.distributed) and a virtual transport (all G ranks in this process, tensors handed over).

Both speak in dicts {rank: tuple of tensors} over the ranks this process runs, so one ring driver
serves both. `shift` sends what the sending ranks hold to their successors and returns what the
receiving ranks get from their predecessors (the plan says who sends and who receives at each step;
shapes may differ per chunk); `send`/`recv` carry the trailing accumulators to a named peer (the
successor, or a chunk's owner at its last step). Every byte sent is counted into the active
comm_stats under the transport's phase.
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


def _tag_of(tag, rank: int) -> int:
    """A tag given per rank ({rank: tag}) or one for all."""
    return tag[rank] if isinstance(tag, dict) else tag


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
        self._mailbox: dict[tuple[int, int, int], dict] = {}  # (tag, src, dst) -> {0: tensors}

    def shift(self, send: Held, recv_like: Held, tag: int) -> Pending:
        stats.count(self._field, sum(_nbytes(ts) for ts in send.values()))
        moved = {self.plan.next_rank(r): ts for r, ts in send.items()}
        assert set(moved) == set(recv_like), f"virtual ring: ranks {sorted(moved)} receive, {sorted(recv_like)} expected"
        for r, ts in moved.items():
            assert [t.shape for t in ts] == [t.shape for t in recv_like[r]], "virtual ring: payload shapes differ"
        return Pending(lambda: moved)

    def send(self, held: Held, tag: int, dest: dict[int, int]) -> None:
        stats.count(self._field, sum(_nbytes(ts) for ts in held.values()))
        for r, ts in held.items():
            self._mailbox.setdefault((_tag_of(tag, r), r, dest[r]), {})[0] = ts

    def recv(self, like: Held, tag, source: dict[int, int]) -> Pending:
        return Pending(lambda: {r: self._mailbox[(_tag_of(tag, r), source[r], r)].pop(0) for r in like})

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

    def _ops(self, send, recv, tag, dst=None, src=None):
        # one tag per tensor of a payload, so matching never depends on posting order
        dst = self._next if dst is None else self._global(dst)
        src = self._prev if src is None else self._global(src)
        ops = [dist.P2POp(dist.isend, t, dst, self._group, tag + i) for i, t in enumerate(send)]
        ops += [dist.P2POp(dist.irecv, t, src, self._group, tag + i) for i, t in enumerate(recv)]
        return ops

    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self._group or dist.group.WORLD, rank)

    @staticmethod
    def _post(ops):
        return dist.batch_isend_irecv(ops) if ops else []

    def shift(self, send: Held, recv_like: Held, tag: int) -> Pending:
        out = send.get(self._rank, ())
        recv = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in recv_like.get(self._rank, ()))
        stats.count(self._field, _nbytes(out))
        works = self._post(self._ops(out, recv, tag))

        def wait():
            self._wait_all(works, f"the ring shift (tag {tag}) from rank {self.plan.prev_rank(self._rank)}")
            return {self._rank: recv} if self._rank in recv_like else {}
        return Pending(wait)

    def send(self, held: Held, tag: int, dest: dict[int, int]) -> None:
        send = held[self._rank]
        stats.count(self._field, _nbytes(send))
        while self._sends:  # at most one accumulator send in flight: its buffer stays alive until done
            works, _ = self._sends.pop(0)
            self._wait_all(works, "its own accumulator send to complete")
        self._sends.append((self._post(self._ops(send, (), tag, dst=dest[self._rank])), send))

    def recv(self, like: Held, tag, source: dict[int, int]) -> Pending:
        recv = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in like[self._rank])
        tag = _tag_of(tag, self._rank)
        works = self._post(self._ops((), recv, tag, src=source[self._rank]))

        def wait():
            self._wait_all(works, f"partial gradients (tag {tag}) from rank {source[self._rank]}")
            return {self._rank: recv}
        return Pending(wait)

    def finish(self) -> None:
        for works, _ in self._sends:
            self._wait_all(works, "its own sends to complete")
        self._sends.clear()
