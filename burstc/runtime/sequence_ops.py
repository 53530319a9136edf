"""The boundary ops of sequence-parallel graphs, as torch.library custom ops (fake + autograd), so that
Inductor compiles the local work around them and never fuses a collective.

A sequence-sharded tensor holds this rank's tokens of one dim. That dim may be the sequence merged
with neighbours by a view (`[B*N, V]` before a loss): its global size is `outer * seq_len * inner`
and the sequence is the middle factor. The four boundaries keep every gradient exact:

| op | forward | backward |
|---|---|---|
| `burst::seq_shard`   | replicated -> this rank's positions (and a replica check) | scatter to full + all-reduce |
| `burst::seq_gather`  | all-gather in global order            | this rank's slice |
| `burst::all_reduce`  | sum over the ranks                    | identity |
| `grad_sum(*ts)`      | identity (views)                      | one bucketed all-reduce of all gradients |
| `grad_scale(x, f)`   | identity (a view)                     | times f (FSDP2 sums over the ranks instead) |
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from burstc.runtime import stats
from burstc.runtime.ordering import program_order
from burstc.runtime.sharding import assemble, pad_shard
from burstc.runtime.validate import BurstInputError, replicated_checksum
from burstc.schedule import layout as layouts


def _group(group_name: str) -> Optional[dist.ProcessGroup]:
    return dist.distributed_c10d._resolve_process_group(group_name) if group_name else None


def _world(group_name: str) -> tuple[int, int]:
    """(world size, rank) of the group; (1, 0) without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    group = _group(group_name)
    return dist.get_world_size(group), dist.get_rank(group)


def _seq_view(x: torch.Tensor, dim: int, outer: int, inner: int) -> torch.Tensor:
    """x with its sequence dim split into (outer, tokens, inner); the tokens axis is dim + 1."""
    return x.unflatten(dim, (outer, x.shape[dim] // (outer * inner), inner))


def _with_rows(x: torch.Tensor, dim: int, outer: int, rows: int, inner: int) -> torch.Tensor:
    """An empty tensor like x whose dim holds outer * rows * inner (fake implementations)."""
    shape = list(x.shape)
    shape[dim] = outer * rows * inner
    return x.new_empty(shape)


def local_rows(seq_len: int, layout: str, group_name: str) -> int:
    world, rank = _world(group_name)
    return layouts.local_length(seq_len, layout, world, rank)


def take_local(x: torch.Tensor, dim: int, outer: int, inner: int, seq_len: int, layout: str,
               group_name: str) -> torch.Tensor:
    """This rank's positions of a full (replicated) tensor; no communication."""
    world, rank = _world(group_name)
    positions = layouts.shard_positions(seq_len, layout, world, rank).to(x.device)
    return _seq_view(x, dim, outer, inner).index_select(dim + 1, positions).flatten(dim, dim + 2).contiguous()


def _check_replicated(x: torch.Tensor, dim: int, what: str, group_name: str) -> None:
    group = _group(group_name)
    world = dist.get_world_size(group)
    device = x.device if dist.get_backend(group) == "nccl" else torch.device("cpu")  # NCCL talks GPU tensors
    mine = torch.tensor([float(x.numel()), *replicated_checksum(x.detach(), dim=dim)], dtype=torch.float64,
                        device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    stats.count_collective("replica_check")
    rows = torch.stack(gathered).cpu()
    tolerance = 1e-9 * max(float(rows[:, 2].max()), 1e-30)
    if bool((rows[:, 0] != rows[0, 0]).any()) or float(rows[:, 1].max() - rows[:, 1].min()) > tolerance:
        raise BurstInputError(
            f"burst sequence mode: the ranks were given different values of {what} (fingerprints "
            f"{rows[:, 1].tolist()}). Every rank must get the same full inputs and weights (seed every rank "
            "alike, broadcast the batch); to feed different batches per rank, put the ranks of one sequence "
            "in their own group (options={'group': ...}) and combine groups with data parallelism.")


_checked: set[tuple] = set()  # replica checks made (checks='once')


@torch.library.custom_op("burst::seq_shard", mutates_args=())
def seq_shard(x: torch.Tensor, dim: int, outer: int, inner: int, seq_len: int, layout: str, group_name: str,
              check: str, every_call: bool) -> torch.Tensor:
    """This rank's positions of replicated x along dim. check: '' or the name of the value, whose
    replication over the ranks is then verified (a graph input: the ranks must agree on it), on the first
    call with its shape, or on every call (every_call: the option checks='always')."""
    world, _ = _world(group_name)
    key = (check, tuple(x.shape), x.dtype, dim, seq_len, layout, group_name)
    if check and world > 1 and (every_call or key not in _checked):
        _check_replicated(x, dim, check, group_name)
        if len(_checked) > 4096:
            _checked.clear()
        _checked.add(key)
    return take_local(x, dim, outer, inner, seq_len, layout, group_name)


@seq_shard.register_fake
def _(x, dim, outer, inner, seq_len, layout, group_name, check, every_call):
    return _with_rows(x, dim, outer, local_rows(seq_len, layout, group_name), inner)


@torch.library.custom_op("burst::seq_scatter_sum", mutates_args=())
def seq_scatter_sum(g: torch.Tensor, dim: int, outer: int, inner: int, seq_len: int, layout: str,
                    group_name: str) -> torch.Tensor:
    """The full-size sum over the ranks of every rank's local gradient placed at its positions."""
    world, rank = _world(group_name)
    full = _with_rows(g, dim, outer, seq_len, inner).zero_()
    positions = layouts.shard_positions(seq_len, layout, world, rank).to(g.device)
    _seq_view(full, dim, outer, inner).index_copy_(dim + 1, positions, _seq_view(g, dim, outer, inner))
    if world > 1:
        dist.all_reduce(full, group=_group(group_name))
        stats.count_collective("all_reduce")
    return full


@seq_scatter_sum.register_fake
def _(g, dim, outer, inner, seq_len, layout, group_name):
    return _with_rows(g, dim, outer, seq_len, inner)


def _shard_backward(ctx, grad):
    return (seq_scatter_sum(grad.contiguous(), *ctx.args), None, None, None, None, None, None, None, None)


def _shard_setup(ctx, inputs, output):
    ctx.args = inputs[1:7]


seq_shard.register_autograd(_shard_backward, setup_context=_shard_setup)


@torch.library.custom_op("burst::seq_gather", mutates_args=())
def seq_gather(x: torch.Tensor, dim: int, outer: int, inner: int, seq_len: int, layout: str,
               group_name: str) -> torch.Tensor:
    """The full tensor in global token order from every rank's shard (all-gather)."""
    world, _ = _world(group_name)
    tokens = _seq_view(x, dim, outer, inner)
    if world == 1:
        return x.clone()
    rows = layouts.local_padded_length(seq_len, layout, world)
    padded = pad_shard(tokens.contiguous(), dim=dim + 1, rows=rows)
    shards = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(shards, padded, group=_group(group_name))
    stats.count_collective("gather")
    full = assemble(shards, dim=dim + 1, layout=layout, seq_len=seq_len).flatten(dim, dim + 2)
    stats.count("gathered_bytes", full.numel() * full.element_size())
    return full


@seq_gather.register_fake
def _(x, dim, outer, inner, seq_len, layout, group_name):
    return _with_rows(x, dim, outer, seq_len, inner)


def _gather_backward(ctx, grad):
    # the gradient of a replicated value is complete and the same on every rank: keep this rank's part.
    # Through the op, never take_local itself: AOTAutograd would trace this rank's positions into the
    # backward graph as a constant, and Inductor's caches (keyed without the rank) would hand that graph
    # to another rank, which then takes the wrong rows (silently wrong gradients).
    return (seq_shard(grad.contiguous(), *ctx.args, "", False), None, None, None, None, None, None)


def _gather_setup(ctx, inputs, output):
    ctx.args = inputs[1:7]


seq_gather.register_autograd(_gather_backward, setup_context=_gather_setup)


@torch.library.custom_op("burst::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """The sum of x over the ranks of the group (a partial reduction becomes the global one)."""
    out = x.clone()
    if _world(group_name)[0] > 1:
        stats.count("all_reduce_bytes", out.numel() * out.element_size())
        dist.all_reduce(out, group=_group(group_name))
        stats.count_collective("all_reduce")
    return out


@all_reduce.register_fake
def _(x, group_name):
    return torch.empty_like(x)


all_reduce.register_autograd(lambda ctx, grad: (grad, None), setup_context=lambda ctx, inputs, output: None)


class _GradSum(torch.autograd.Function):
    """Identity forward (views, no copy); backward: every gradient summed over the ranks, in one bucket."""

    @staticmethod
    def forward(ctx, group_name: str, *tensors):
        ctx.group_name = group_name
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        present = [g for g in grads if g is not None]
        if not present:
            return (None, *grads)
        summed = all_reduce(torch.cat([g.reshape(-1) for g in present]), ctx.group_name)
        parts = iter(summed.split([g.numel() for g in present]))
        return (None, *(None if g is None else next(parts).view_as(g) for g in grads))


def grad_sum(group_name: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Replicated tensors used by sharded work: the same values, with their gradients summed over the
    ranks in the backward (where a parameter's gradient becomes complete)."""
    return _GradSum.apply(group_name, *tensors)


class _GradScale(torch.autograd.Function):
    """Identity forward (a view); backward: the gradient times a constant."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x, whose gradient is multiplied by factor in the backward (an FSDP2-managed parameter's gradient
    before FSDP's reduction: burstc.runtime.fsdp)."""
    return _GradScale.apply(x, factor)


def sharded_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group_name: str, weight=None,
                          ignore_index: int = -100, reduction: str = "mean",
                          label_smoothing: float = 0.0) -> torch.Tensor:
    """F.cross_entropy over targets sharded across the ranks, reduced to the global value: the sum of
    the local sums, and for 'mean' divided by the global (weighted) count of kept targets."""
    local = torch.nn.functional.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index,
                                              reduction="sum", label_smoothing=label_smoothing)
    if reduction == "sum":
        return all_reduce(local, group_name)
    kept = target != ignore_index
    if weight is None:
        count = kept.sum().to(local.dtype)
    else:
        count = torch.where(kept, weight[target.clamp(min=0)], 0).sum().to(local.dtype)
    total = all_reduce(torch.stack([local, count]), group_name)
    return total[0] / total[1]


def sharded_sum(x: torch.Tensor, group_name: str, dim=None, keepdim: bool = False, divide_by: float = 1.0):
    """x.sum(dim) over a sharded dim (dim None: over everything), completed over the ranks; divided by
    divide_by (the global count, for a mean)."""
    local = x.sum() if dim is None else x.sum(dim=dim, keepdim=keepdim)
    total = all_reduce(local, group_name)
    return total if divide_by == 1.0 else total / divide_by


program_order(torch.ops.burst.seq_shard.default, torch.ops.burst.seq_scatter_sum.default,
              torch.ops.burst.seq_gather.default, torch.ops.burst.all_reduce.default)
