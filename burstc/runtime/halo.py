"""halo: token mixing over a bounded window (a causal conv, a token shift, a roll) on sequence shards,
exchanging only the rows each shard's window reaches into, never gathering the sequence.

A rank's shard is a few *segments*: runs of consecutive global positions (one under the contiguous
layout, two under zigzag, one per token under striped). `seq_halo` returns the segments one after the
other, each extended by `before` rows in front and `after` rows behind, taken from the ranks that hold
them (or `fill` past the ends of the sequence, or wrapped round for a roll). A window op with padding 0
run on that tensor computes every row of the shard exactly; `seq_halo_rows` then keeps, of each
extended segment, the rows that belong to the shard. Both are custom ops with exact adjoints: the
gradient of a halo row travels back to its owner and is added there.

Which rows go where follows from (seq_len, layout, world, before, after, wrap) alone, the same on every
rank, so no metadata is exchanged: `halo_plan` is computed once per shape and cached.
"""
from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import _disable_current_modes

from burstc.runtime import stats
from burstc.runtime.ordering import program_order
from burstc.schedule.layout import shard_positions

_TAG = 0x4A10


@dataclass(frozen=True)
class HaloPlan:
    """Rank `rank`'s side of one halo exchange. Ext rows are the extended segments back to back:
    segment i occupies ext rows [offsets[i], offsets[i] + lengths[i] + before + after)."""

    rank: int
    ext_rows: int
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    own_ext: torch.Tensor  # ext rows filled from this rank's own shard ...
    own_local: torch.Tensor  # ... from these local rows
    recv: dict  # peer -> ext rows filled, in message order, from that peer
    send: dict  # peer -> local rows sent to that peer, in message order

    def kept_rows(self, offset: int) -> torch.Tensor:
        """The rows [offsets[i] + offset, + lengths[i]) of every segment: the shard's own rows of a tensor
        laid out like the extended segments (offset = before) or of a window op's output (offset 0)."""
        parts = [torch.arange(o + offset, o + offset + n) for o, n in zip(self.offsets, self.lengths)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def __str__(self) -> str:
        peers = ", ".join(f"{len(r)} rows from rank {p}" for p, r in sorted(self.recv.items())) or "nothing"
        sends = ", ".join(f"{len(r)} rows to rank {p}" for p, r in sorted(self.send.items())) or "nothing"
        return (f"halo plan of rank {self.rank}: {len(self.lengths)} segments of {list(self.lengths)} rows, "
                f"{self.ext_rows} extended rows; receives {peers}; sends {sends}")


def _segments(positions: torch.Tensor) -> list[tuple[int, int]]:
    """(first global position, length) of each run of consecutive positions, in local order."""
    if len(positions) == 0:
        return []
    breaks = (torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1).tolist()
    starts = [0, *breaks]
    ends = [*breaks, len(positions)]
    return [(int(positions[s]), e - s) for s, e in zip(starts, ends)]


def _extended(segments, before: int, after: int, seq_len: int, wrap: bool) -> torch.Tensor:
    """Global positions of the extended segments back to back; -1 where a row lies past the sequence's
    ends (it takes the fill), wrapped round instead when wrap."""
    parts = [torch.arange(s - before, s + n + after) for s, n in segments]
    ext = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    if wrap:
        return ext % seq_len
    return torch.where((ext >= 0) & (ext < seq_len), ext, -1)


@functools.lru_cache(maxsize=64)
def halo_plan(seq_len: int, layout: str, world: int, rank: int, before: int, after: int, wrap: bool) -> HaloPlan:
    """What rank receives into which extended rows and sends from which local rows (see module doc)."""
    if before < 0 or after < 0:
        raise ValueError(f"a halo reaches back {before} and ahead {after} rows; both must be >= 0")
    with _disable_current_modes():  # real index tensors, also when first asked by a fake implementation
        return _halo_plan(seq_len, layout, world, rank, before, after, wrap)


def _halo_plan(seq_len: int, layout: str, world: int, rank: int, before: int, after: int, wrap: bool) -> HaloPlan:
    positions = [shard_positions(seq_len, layout, world, r) for r in range(world)]
    owner = torch.empty(seq_len, dtype=torch.int64)
    row = torch.empty(seq_len, dtype=torch.int64)
    for r, p in enumerate(positions):
        owner[p] = r
        row[p] = torch.arange(len(p))
    segments = [_segments(p) for p in positions]
    ext = [_extended(s, before, after, seq_len, wrap) for s in segments]
    mine = ext[rank]
    inside = mine >= 0
    held_by = torch.where(inside, owner[mine.clamp(min=0)], -1)
    own = torch.nonzero(held_by == rank).flatten()
    recv = {p: torch.nonzero(held_by == p).flatten() for p in range(world) if p != rank and bool((held_by == p).any())}
    send = {}
    for q in range(world):
        if q == rank:
            continue
        theirs = ext[q][ext[q] >= 0]
        wanted = theirs[owner[theirs] == rank]
        if len(wanted):
            send[q] = row[wanted]
    lengths = tuple(n for _, n in segments[rank])
    offsets, at = [], 0
    for n in lengths:
        offsets.append(at)
        at += n + before + after
    return HaloPlan(rank, len(mine), tuple(offsets), lengths, own, row[mine[own]], recv, send)


def _world(group_name: str):
    group = dist.distributed_c10d._resolve_process_group(group_name) if group_name else None
    if not (dist.is_available() and dist.is_initialized()):
        return None, 1, 0
    return group, dist.get_world_size(group), dist.get_rank(group)


def _plan(seq_len: int, layout: str, group_name: str, before: int, after: int, wrap: bool) -> HaloPlan:
    _, world, rank = _world(group_name)
    return halo_plan(seq_len, layout, world, rank, before, after, wrap)


def _exchange(group_name: str, outgoing: dict, incoming: dict) -> dict:
    """Send outgoing[peer] (a tensor) to each peer and receive incoming[peer] (an empty tensor to fill)
    from each; returns the filled incoming. Waits at most BURST_TIMEOUT_S on CPU."""
    group, _, _ = _world(group_name)
    members = group or dist.group.WORLD
    ops = [dist.P2POp(dist.isend, t.contiguous(), dist.get_global_rank(members, p), group, _TAG)
           for p, t in sorted(outgoing.items())]
    ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(members, p), group, _TAG) for p, t in sorted(incoming.items())]
    stats.count("halo_bytes", sum(t.numel() * t.element_size() for t in outgoing.values()))
    if not ops:
        return incoming
    stats.count_collective("halo")
    timeout = datetime.timedelta(seconds=float(os.environ.get("BURST_TIMEOUT_S") or 300))
    for work in dist.batch_isend_irecv(ops):
        try:
            work.wait() if any(t.is_cuda for t in incoming.values()) else work.wait(timeout)
        except RuntimeError as e:
            raise RuntimeError(f"burst halo exchange: gave up after {timeout.total_seconds():.0f} s ({e}); another "
                               "rank failed or is not running the same graph. Set BURST_TIMEOUT_S to wait longer.") \
                from e
    return incoming


def _rows_like(x: torch.Tensor, dim: int, rows: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = rows
    return x.new_empty(shape)


def _move_rows(src: torch.Tensor, dst: torch.Tensor, dim: int, group_name: str, local: tuple, sends: dict,
               recvs: dict, add: bool) -> torch.Tensor:
    """Rows of src into rows of dst along dim: local = (src rows, dst rows) on this rank, sends[peer] = src
    rows that peer receives, recvs[peer] = dst rows filled from that peer; copied, or added when add (the
    adjoint). Returns dst."""
    device = src.device
    put = dst.index_add_ if add else dst.index_copy_
    put(dim, local[1].to(device), src.index_select(dim, local[0].to(device)))
    outgoing = {p: src.index_select(dim, rows.to(device)) for p, rows in sends.items()}
    incoming = {p: _rows_like(src, dim, len(rows)) for p, rows in recvs.items()}
    for p, got in _exchange(group_name, outgoing, incoming).items():
        put(dim, recvs[p].to(device), got)
    return dst


@torch.library.custom_op("burst::seq_halo", mutates_args=())
def seq_halo(x: torch.Tensor, dim: int, seq_len: int, layout: str, group_name: str, before: int, after: int,
             fill: float, wrap: bool) -> torch.Tensor:
    """This rank's segments of the sharded x (along dim), each extended by `before` rows in front and
    `after` behind from the ranks holding them; `fill` past the ends, or wrapped round when wrap."""
    plan = _plan(seq_len, layout, group_name, before, after, wrap)
    ext = _rows_like(x, dim, plan.ext_rows).fill_(fill)
    return _move_rows(x, ext, dim, group_name, (plan.own_local, plan.own_ext), plan.send, plan.recv, add=False)


@seq_halo.register_fake
def _(x, dim, seq_len, layout, group_name, before, after, fill, wrap):
    return _rows_like(x, dim, _plan(seq_len, layout, group_name, before, after, wrap).ext_rows)


@torch.library.custom_op("burst::seq_halo_grad", mutates_args=())
def seq_halo_grad(grad_ext: torch.Tensor, dim: int, seq_len: int, layout: str, group_name: str, before: int,
                  after: int, wrap: bool) -> torch.Tensor:
    """The adjoint of seq_halo: each extended row's gradient added to the row it was copied from, on the
    rank that holds it (halo rows' gradients travel back)."""
    plan = _plan(seq_len, layout, group_name, before, after, wrap)
    grad = _rows_like(grad_ext, dim, sum(plan.lengths)).zero_()
    return _move_rows(grad_ext, grad, dim, group_name, (plan.own_ext, plan.own_local), plan.recv, plan.send, add=True)


@seq_halo_grad.register_fake
def _(grad_ext, dim, seq_len, layout, group_name, before, after, wrap):
    return _rows_like(grad_ext, dim, sum(_plan(seq_len, layout, group_name, before, after, wrap).lengths))


def _halo_setup(ctx, inputs, output):
    ctx.args = inputs[1:7] + (inputs[8],)  # dim, seq_len, layout, group_name, before, after, wrap


seq_halo.register_autograd(
    lambda ctx, grad: (seq_halo_grad(grad.contiguous(), *ctx.args), *([None] * 8)), setup_context=_halo_setup)


@torch.library.custom_op("burst::seq_halo_rows", mutates_args=())
def seq_halo_rows(y: torch.Tensor, dim: int, seq_len: int, layout: str, group_name: str, before: int,
                  after: int, offset: int) -> torch.Tensor:
    """The shard's own rows of y, a tensor laid out like the extended segments of seq_halo(before, after)
    (or a window op's output on them): rows [offsets[i] + offset, + lengths[i]) of each segment."""
    plan = _plan(seq_len, layout, group_name, before, after, False)
    return y.index_select(dim, plan.kept_rows(offset).to(y.device))


@seq_halo_rows.register_fake
def _(y, dim, seq_len, layout, group_name, before, after, offset):
    return _rows_like(y, dim, sum(_plan(seq_len, layout, group_name, before, after, False).lengths))


@torch.library.custom_op("burst::seq_halo_unrows", mutates_args=())
def seq_halo_unrows(grad: torch.Tensor, rows: int, dim: int, seq_len: int, layout: str, group_name: str,
                    before: int, after: int, offset: int) -> torch.Tensor:
    """The adjoint of seq_halo_rows: grad placed at the kept rows of a tensor of `rows` rows, zeros elsewhere."""
    plan = _plan(seq_len, layout, group_name, before, after, False)
    out = _rows_like(grad, dim, rows).zero_()
    return out.index_copy_(dim, plan.kept_rows(offset).to(grad.device), grad)


@seq_halo_unrows.register_fake
def _(grad, rows, dim, seq_len, layout, group_name, before, after, offset):
    return _rows_like(grad, dim, rows)


def _rows_setup(ctx, inputs, output):
    ctx.rows = inputs[0].shape[inputs[1]]
    ctx.args = inputs[1:]


seq_halo_rows.register_autograd(
    lambda ctx, grad: (seq_halo_unrows(grad.contiguous(), ctx.rows, *ctx.args), *([None] * 7)),
    setup_context=_rows_setup)

program_order(torch.ops.burst.seq_halo.default, torch.ops.burst.seq_halo_grad.default)


# ---- the window ops: their full-sequence meaning, and their form on shards ------------------------

def sequence_shift(x: torch.Tensor, dim: int, shift: int, fill: float, wrap: bool) -> torch.Tensor:
    """y[t] = x[t - shift] along dim: `fill` where t - shift leaves the sequence, or wrapped round (torch.roll)
    when wrap. What F.pad(x, (.., shift, -shift, ..)) and torch.roll(x, shift, dim) compute."""
    if wrap:
        return torch.roll(x, shift, dim)
    n = x.shape[dim]
    k = max(-n, min(n, shift))
    kept = x.narrow(dim, max(0, -k), n - abs(k))
    edge = _rows_like(x, dim, abs(k)).fill_(fill)
    return torch.cat([edge, kept] if k >= 0 else [kept, edge], dim=dim)


def sharded_sequence_shift(x, dim, shift, fill, wrap, seq_len, layout, group_name):
    """sequence_shift on this rank's shard: the |shift| rows each segment needs come from their holders."""
    before, after = max(shift, 0), max(-shift, 0)
    ext = torch.ops.burst.seq_halo(x, dim, seq_len, layout, group_name, before, after, float(fill), wrap)
    return torch.ops.burst.seq_halo_rows(ext, dim, seq_len, layout, group_name, before, after, before - shift)


def window_conv1d(x, weight, bias, before: int, after: int, dilation: int, groups: int, fill: float = 0.0):
    """conv1d over the last dim with stride 1 whose output row t reads input rows t - before .. t + after
    (`fill` past the ends): the full-sequence meaning of a causal or 'same' conv over the sequence, however
    it was spelled (padding in the conv, F.pad first, or a slice of the output)."""
    padded = torch.nn.functional.pad(x, (before, after), value=fill)
    return torch.nn.functional.conv1d(padded, weight, bias, 1, 0, dilation, groups)


def sharded_window_conv1d(x, weight, bias, before, after, dilation, groups, fill, seq_len, layout, group_name):
    """window_conv1d on this rank's shard (the sequence on the last dim): halo, a conv with padding 0 over
    the extended segments, the shard's rows of its output."""
    dim = x.dim() - 1
    ext = torch.ops.burst.seq_halo(x, dim, seq_len, layout, group_name, before, after, float(fill), False)
    y = torch.nn.functional.conv1d(ext, weight, bias, 1, 0, dilation, groups)
    return torch.ops.burst.seq_halo_rows(y, dim, seq_len, layout, group_name, before, after, 0)
