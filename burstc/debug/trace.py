"""Run traces: spans of every ring step (compute, transfers posted, waits) per rank, written as one
Chrome trace JSON (Perfetto / chrome://tracing) with a track per rank, and a printed summary.

    with burstc.trace("ring.json") as t:
        out = burstc.burst_attention(...); out.sum().backward()
    print(t.summary())

Spans use the host clock on CPU and CUDA events on CUDA tensors. Every span is also a
`torch.profiler.record_function` range ("burst::forward.compute" ...), so burst shows up in the
PyTorch profiler without `burstc.trace`.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

COMPUTE, POST, WAIT = "compute", "post", "wait"
ALL_TO_ALL = "all_to_all"  # Ulysses' exchanges inside a node (not overlapped with compute)


@dataclass
class Span:
    rank: int
    phase: str  # forward | backward
    step: int
    kind: str  # compute | post | wait | all_to_all
    start_us: float
    dur_us: float


class _CudaSpan:
    """A span timed by CUDA events, resolved to host-relative microseconds when the trace ends."""

    def __init__(self, base: torch.cuda.Event):
        self.base, self.start, self.end = base, torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


@dataclass
class Trace:
    """The spans recorded on this process (after `burstc.trace` exits: of every rank)."""

    path: Optional[str]
    spans: list[Span] = field(default_factory=list)
    _pending: list = field(default_factory=list)  # (rank, phase, step, kind, _CudaSpan)
    _cuda_base: Optional[torch.cuda.Event] = None

    @contextlib.contextmanager
    def span(self, rank: int, phase: str, step: int, kind: str, device: torch.device):
        with torch.profiler.record_function(f"burst::{phase}.{kind}"):
            if device.type == "cuda":
                if self._cuda_base is None:
                    self._cuda_base = torch.cuda.Event(enable_timing=True)
                    self._cuda_base.record()
                    self._cuda_t0 = time.time() * 1e6
                timed = _CudaSpan(self._cuda_base)
                timed.start.record()
                yield
                timed.end.record()
                self._pending.append((rank, phase, step, kind, timed))
            else:
                wall, start = time.time(), time.perf_counter()  # wall clock aligns ranks of one machine
                yield
                self.spans.append(Span(rank, phase, step, kind, wall * 1e6, (time.perf_counter() - start) * 1e6))

    def _resolve_cuda(self) -> None:
        if not self._pending:
            return
        torch.cuda.synchronize()
        for rank, phase, step, kind, timed in self._pending:
            start = self._cuda_t0 + timed.base.elapsed_time(timed.start) * 1e3
            self.spans.append(Span(rank, phase, step, kind, start, timed.start.elapsed_time(timed.end) * 1e3))
        self._pending.clear()

    def chrome_json(self) -> dict:
        """Chrome trace events: one process (track) per rank, one complete event per span."""
        events = [{"name": "process_name", "ph": "M", "pid": r, "args": {"name": f"rank {r}"}}
                  for r in sorted({s.rank for s in self.spans})]
        t0 = min((s.start_us for s in self.spans), default=0.0)
        for s in self.spans:
            events.append({"name": f"{s.phase} {s.kind}", "cat": s.kind, "ph": "X", "pid": s.rank,
                           "tid": 0 if s.kind == COMPUTE else 1, "ts": round(s.start_us - t0, 3),
                           "dur": round(s.dur_us, 3), "args": {"step": s.step, "phase": s.phase}})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def summary(self) -> str:
        """Per rank and phase: time per step (compute), communication hidden behind compute, and the
        load imbalance (slowest rank's compute over the mean)."""
        if not self.spans:
            return "burst trace: no ring steps recorded"
        ranks = sorted({s.rank for s in self.spans})
        phases = [p for p in ("forward", "backward") if any(s.phase == p for s in self.spans)]
        lines = ["| rank | phase | steps | compute ms / step | wait ms | all-to-all ms | comm hidden |",
                 "|---|---|---|---|---|---|---|"]
        compute_by_rank = {}
        for r in ranks:
            for p in phases:
                mine = [s for s in self.spans if s.rank == r and s.phase == p]
                compute = sum(s.dur_us for s in mine if s.kind == COMPUTE) / 1e3
                wait = sum(s.dur_us for s in mine if s.kind == WAIT) / 1e3
                a2a = sum(s.dur_us for s in mine if s.kind == ALL_TO_ALL) / 1e3
                steps = len({s.step for s in mine if s.kind == COMPUTE})
                hidden = 100.0 * compute / (compute + wait + a2a) if compute + wait + a2a > 0 else 100.0
                compute_by_rank[r] = compute_by_rank.get(r, 0.0) + compute
                lines.append(f"| {r} | {p} | {steps} | {compute / max(steps, 1):.2f} | {wait:.2f} | {a2a:.2f} | "
                             f"{hidden:.0f}% |")
        mean = sum(compute_by_rank.values()) / len(compute_by_rank)
        imbalance = max(compute_by_rank.values()) / mean if mean > 0 else 1.0
        lines.append(f"load imbalance (max / mean compute over ranks): {imbalance:.2f}")
        return "\n".join(lines)


_active: Optional[Trace] = None


def active() -> Optional[Trace]:
    return _active


@contextlib.contextmanager
def maybe_span(rank: int, phase: str, step: int, kind: str, device: torch.device):
    """A span on the active trace, or only a profiler range when no trace is active."""
    if _active is None:
        with torch.profiler.record_function(f"burst::{phase}.{kind}"):
            yield
    else:
        with _active.span(rank, phase, step, kind, device):
            yield


@contextlib.contextmanager
def trace(path: Optional[str] = None, group: Optional[dist.ProcessGroup] = None):
    """Record the ring steps of burst attention calls inside the block. On exit the spans of all
    ranks of `group` are gathered and, if `path` is given, rank 0 writes the Chrome trace there."""
    global _active
    if _active is not None:
        raise RuntimeError("burstc.trace blocks do not nest")
    recorder = Trace(path)
    _active = recorder
    try:
        yield recorder
    finally:
        _active = None
        recorder._resolve_cuda()
    distributed = dist.is_available() and dist.is_initialized()
    if distributed and dist.get_world_size(group) > 1:
        gathered = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, recorder.spans, group=group)
        recorder.spans = [s for spans in gathered for s in spans]
    if path is not None and (not distributed or dist.get_rank(group) == 0):
        with open(path, "w") as f:
            json.dump(recorder.chrome_json(), f)
