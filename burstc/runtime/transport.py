"""Moving tensors between the ranks of a schedule: a process-group transport (one rank per process,
async P2P over torch.distributed) and a virtual transport (all ranks in this process, tensors
handed over).

Both speak in messages between *plan ranks* (the ranks of a RingPlan, or of an all-to-all): a send
is (src, dst, tensors, tag), a receive (src, dst, like, tag) with `like` giving the shapes. One
`exchange` posts a batch of both and returns a Pending whose `wait()` gives the received tensors in
the order of the receives; sends complete by `finish()` at the latest. `members[p]` is the group
rank of plan rank p (a Ulysses ring runs over one rank per node; traces record group ranks),
`link(src, dst)` the link class
of a message between plan ranks; every byte sent is counted into the active comm_stats under the
transport's phase and link class.
"""
from __future__ import annotations

import datetime
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from burstc.runtime import stats
from burstc.schedule.topology import INTRA

Held = dict[int, tuple[torch.Tensor, ...]]
Send = tuple[int, int, tuple, int]  # (src, dst, tensors, tag)
Recv = tuple[int, int, tuple, int]  # (src, dst, like, tag)
LinkOf = Callable[[int, int], str]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _same_link(src: int, dst: int) -> str:
    return INTRA


class Pending:
    """A batch of transfers in flight; `wait()` returns the received payloads in order."""

    def __init__(self, wait: Callable[[], list]):
        self._wait = wait
        self._result = None

    def wait(self) -> list:
        if self._result is None:
            self._result = self._wait()
        return self._result


class VirtualTransport:
    """Every plan rank in this process: a message is put in a queue per (sender, receiver).

    Messages match as NCCL matches them: the k-th receive a rank posts from a sender gets the
    k-th message that sender posted to it, whatever the tags. A receive whose message has another
    tag or shape raises, so every schedule run on virtual ranks proves that both sides of every
    pair post in the same order (gloo matches by tag and would hide a mismatch)."""

    def __init__(self, ranks: Sequence[int], phase: str, link: LinkOf = _same_link,
                 members: Optional[Sequence[int]] = None):
        self.ranks = tuple(ranks)
        self.members = tuple(members) if members is not None else self.ranks  # plan rank -> group rank
        self.traced_rank = None  # hops are free: no communication spans
        self._phase = phase
        self._link = link
        self._sent: dict[tuple[int, int], list] = {}  # (src, dst) -> [(tag, tensors) or None once received]
        self._posted: dict[tuple[int, int], int] = {}  # (src, dst) -> receives posted so far

    def exchange(self, sends: list[Send], recvs: list[Recv]) -> Pending:
        for src, dst, tensors, tag in sends:
            stats.count_message(self._phase, self._link(src, dst), _nbytes(tensors))
            self._sent.setdefault((src, dst), []).append((tag, tensors))
        slots = []
        for src, dst, _, _ in recvs:
            slots.append(self._posted.get((src, dst), 0))
            self._posted[(src, dst)] = slots[-1] + 1

        def wait():
            out = []
            for (src, dst, like, tag), k in zip(recvs, slots):
                queue = self._sent.get((src, dst), [])
                assert k < len(queue), f"virtual transport: receive {k} from {src} to {dst} (tag {tag}) has no message"
                sent_tag, got = queue[k]
                assert sent_tag == tag, (f"virtual transport: receive {k} from {src} to {dst} expects tag {tag} "
                                         f"but the message posted in that order has tag {sent_tag}")
                assert [t.shape for t in got] == [t.shape for t in like], "virtual transport: payload shapes differ"
                queue[k] = (sent_tag, None)  # received: let the tensors go
                out.append(got)
            return out
        return Pending(wait)

    def finish(self) -> None:
        unreceived = {pair: len(q) - self._posted.get(pair, 0) for pair, q in self._sent.items()
                      if len(q) != self._posted.get(pair, 0)}
        assert not unreceived, f"virtual transport: messages never received, per (src, dst): {unreceived}"


class GroupTransport:
    """This process is plan rank `rank`; messages are batched isend/irecv to the group ranks of
    `members`. On CPU (gloo) every wait has `timeout_s`; on CUDA the wait orders the compute stream
    after the transfer (NCCL runs transfers on its own stream) and the group's own timeout applies."""

    def __init__(self, phase: str, group: Optional[dist.ProcessGroup], rank: int, members: Sequence[int],
                 timeout_s: float, device: torch.device, link: LinkOf = _same_link):
        self._uses_cuda = device.type == "cuda"
        self.ranks = (rank,)
        self.members = tuple(members)
        self.traced_rank = self.members[rank]  # spans are recorded under the group rank
        self._rank = rank
        self._group = group
        self._phase = phase
        self._link = link
        self._global = [dist.get_global_rank(group or dist.group.WORLD, m) for m in members]
        self._timeout = datetime.timedelta(seconds=timeout_s)
        self._inflight: list = []  # (works, tensors) posted and not yet waited

    def _wait_all(self, works, what: str) -> None:
        for w in works:
            try:
                if self._uses_cuda:
                    w.wait()
                else:
                    w.wait(self._timeout)
            except RuntimeError as e:
                raise RuntimeError(
                    f"burst ring: rank {self.traced_rank} gave up waiting for {what} after "
                    f"{self._timeout.total_seconds():.0f} s ({e}). Another rank failed or is not running "
                    f"the same burst_attention call; set BURST_TIMEOUT_S to wait longer.") from e

    def exchange(self, sends: list[Send], recvs: list[Recv]) -> Pending:
        # one tag per tensor of a payload, so matching never depends on posting order
        ops, sent = [], []
        for src, dst, tensors, tag in sends:
            stats.count_message(self._phase, self._link(src, dst), _nbytes(tensors))
            ops += [dist.P2POp(dist.isend, t, self._global[dst], self._group, tag + i) for i, t in enumerate(tensors)]
            sent += tensors
        received = []
        for src, dst, like, tag in recvs:
            buffers = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in like)
            ops += [dist.P2POp(dist.irecv, t, self._global[src], self._group, tag + i) for i, t in enumerate(buffers)]
            received.append(buffers)
        entry = (dist.batch_isend_irecv(ops) if ops else [], sent)
        if ops:
            stats.count_collective("ring")
        self._inflight.append(entry)
        what = ", ".join(f"tag {tag} from rank {self.members[src]}" for src, _, _, tag in recvs) or "its own sends"

        def wait():
            if any(e is entry for e in self._inflight):
                self._inflight = [e for e in self._inflight if e is not entry]
                self._wait_all(entry[0], what)
            return received
        return Pending(wait)

    def finish(self) -> None:
        while self._inflight:
            works, _ = self._inflight.pop(0)
            self._wait_all(works, "its own sends to complete")
