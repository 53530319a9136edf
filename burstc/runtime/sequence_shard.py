"""SequenceShard: a sequence-carrying tensor as one rank holds it between burst graphs. Its shape is the
global one; it stores only this rank's rows (`local`, in the layout's order) and costs nothing until its
values are read.

- A burst graph that receives one takes it as already sharded: no gather, no re-slice (graph breaks,
  FSDP2's per-layer graphs, blocks compiled one by one).
- Anything else that reads its values (eager code, another backend) gets the exact full tensor: the
  first read all-gathers it once (counted in comm_stats().gathered_bytes) and the result is kept.
  Every rank must read it, as every rank runs the same program; a read on some ranks only waits for the
  others until the group's timeout.
- Gradients: whatever reaches it (a shard from the next burst graph, or the full gradient eager code
  computed identically on every rank) comes back as this rank's rows of the gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils._pytree import tree_map_only

from burstc.runtime.sequence_ops import seq_gather, take_local


@dataclass(frozen=True)
class ShardSpec:
    """Where the sequence is in a tensor: dim holds outer * seq_len * inner elements, the sequence the
    middle factor (burstc.runtime.sequence_ops), split over the group's ranks in layout's order."""

    dim: int
    outer: int
    inner: int
    seq_len: int
    layout: str
    group_name: str

    def args(self) -> tuple:
        return (self.dim, self.outer, self.inner, self.seq_len, self.layout, self.group_name)

    def global_shape(self, local_shape) -> tuple[int, ...]:
        shape = list(local_shape)
        shape[self.dim] = self.outer * self.seq_len * self.inner
        return tuple(shape)


# ops that keep a shard a shard (no values are read): detach, alias, and a view to its own shape (what
# autograd makes of an autograd.Function that returns its input, as FSDP2's hooks do)
_ALIASES = (torch.ops.aten.detach.default, torch.ops.aten.alias.default)
_VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)


def _keeps_shard(func, args) -> bool:
    if not (args and isinstance(args[0], SequenceShard)):
        return False
    return func in _ALIASES or (func in _VIEWS and list(args[1]) == list(args[0].shape))


class SequenceShard(torch.Tensor):
    """This rank's rows (`local`) of a global tensor split along the sequence as `spec` says."""

    local: torch.Tensor
    spec: ShardSpec

    @staticmethod
    def __new__(cls, local: torch.Tensor, spec: ShardSpec, requires_grad: bool = False, shape=None, stride=None):
        shape = spec.global_shape(local.shape) if shape is None else shape
        return torch.Tensor._make_wrapper_subclass(cls, shape, strides=stride, dtype=local.dtype,
                                                   device=local.device, requires_grad=requires_grad)

    def __init__(self, local: torch.Tensor, spec: ShardSpec, requires_grad: bool = False, shape=None, stride=None):
        self.local, self.spec = local, spec
        self._full: Optional[torch.Tensor] = None
        self._full_version = -1  # local's version counter when _full was gathered

    def __repr__(self) -> str:
        return (f"SequenceShard(global {tuple(self.shape)}, this rank's {self.local.shape[self.spec.dim]} rows on "
                f"dim {self.spec.dim}, {self.spec.layout} layout)")

    def __tensor_flatten__(self):
        return ["local"], self.spec

    @staticmethod
    def __tensor_unflatten__(inner, spec, outer_size, outer_stride):
        return SequenceShard(inner["local"], spec, shape=outer_size, stride=outer_stride)

    __torch_function__ = torch._C._disabled_torch_function_impl

    def full(self) -> torch.Tensor:
        """The whole tensor in global order (gathered on the first call, then kept while the rows are not
        written: a later graph that writes its input in place invalidates it). No autograd."""
        if self._full is None or self._full_version != self.local._version:
            self._full = seq_gather(self.local.contiguous(), *self.spec.args())  # counts gathered_bytes
            self._full_version = self.local._version
        return self._full

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _keeps_shard(func, args):
            shard = args[0]
            return SequenceShard(torch.ops.aten.alias.default(shard.local), shard.spec)
        full_args, full_kwargs = tree_map_only(SequenceShard, SequenceShard.full, (args, kwargs))
        out = func(*full_args, **full_kwargs)
        for i, arg in enumerate(func._schema.arguments):  # a write into a shard's values: keep its rows in step
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            if arg.is_write and isinstance(value, SequenceShard):
                value.local.copy_(take_local(value.full(), *value.spec.args()))
                value._full_version = value.local._version  # the kept whole tensor is the written one
        return out


class _FromLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, spec: ShardSpec):
        ctx.spec = spec
        return SequenceShard(local.detach(), spec)

    @staticmethod
    def backward(ctx, grad):
        if isinstance(grad, SequenceShard):
            return grad.local, None
        return take_local(grad.contiguous(), *ctx.spec.args()), None  # the same full gradient on every rank


class _ToLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard: SequenceShard):
        ctx.spec = shard.spec
        return shard.local.view_as(shard.local)

    @staticmethod
    def backward(ctx, grad):
        return SequenceShard(grad, ctx.spec)


class _Full(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard: SequenceShard):
        return shard.full().view_as(shard.full())

    @staticmethod
    def backward(ctx, grad):
        return grad  # the full gradient, the same on every rank: _FromLocal keeps this rank's rows


def from_local(local: torch.Tensor, spec: ShardSpec) -> SequenceShard:
    """A graph's sharded output as a SequenceShard (differentiable)."""
    return _FromLocal.apply(local, spec)


def to_local(shard: SequenceShard) -> torch.Tensor:
    """This rank's rows of a SequenceShard, for a graph that takes it sharded (differentiable)."""
    return _ToLocal.apply(shard)


def to_full(shard: SequenceShard) -> torch.Tensor:
    """The whole tensor, for a graph that needs it so (differentiable; gathers once)."""
    return _Full.apply(shard)
