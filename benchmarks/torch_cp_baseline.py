"""PyTorch's own context-parallel ring attention, usable as a CPU/gloo benchmark baseline.

The public ``torch.distributed.tensor.experimental.context_parallel`` API does not run on CPU
(it dispatches the CUDA SDPA ops through DTensor). Its internal ring templates do, though:
``_templated_ring_attention`` / ``_templated_ring_attention_backward`` in
``torch.distributed.tensor.experimental._context_parallel._attention`` take the attention op
as an argument, so we hand them the CPU flash kernel
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``) exactly the way
the module itself hands them ``aten._scaled_dot_product_flash_attention`` (see
``_scaled_dot_product_ring_flash_attention`` and its ``_backward`` there), and wrap the pair
in a ``torch.autograd.Function``.

Sharding (sequence dim of the full ``[B, H, N, d]`` tensor, world size ``W``, rank ``r``):

* ``causal=False``: contiguous blocks, no load balancing. Rank ``r`` holds global positions
  ``[r*N/W, (r+1)*N/W)``. Requires ``N % W == 0``.
* ``causal=True``: PyTorch's head-tail load balancing (``_HeadTailLoadBalancer``, the
  "round-robin" layout the ring template assumes). The sequence is cut into ``2W`` chunks of
  ``c = N/(2W)`` tokens; rank ``r`` holds chunk ``r`` followed by chunk ``2W-1-r``, i.e. the
  global positions ``[r*c, (r+1)*c) ++ [(2W-1-r)*c, (2W-r)*c)`` in that order. Requires
  ``N % (2W) == 0``. Example, ``N=8, W=2``: rank 0 holds ``0,1,6,7``; rank 1 holds
  ``2,3,4,5``.

``torch_cp_positions`` returns these indices; ``torch_cp_shard`` / ``torch_cp_unshard``
apply them.

Global state: the templates read the module-level ``_cp_options`` (``enable_load_balance``,
``rotate_method``, ``convert_to_f32``). ``torch_cp_attention`` sets ``enable_load_balance =
causal`` (the template raises on non-causal with load balancing, and silently computes the
wrong thing on causal without it for this layout) and ``rotate_method = ALL_TO_ALL`` (what
``set_rotate_method("alltoall")`` sets) for the duration of each forward and each backward
call, and restores the previous values afterwards, so nothing leaks into other code.
``convert_to_f32`` is left at its default ``True`` (merge / grad accumulation in float32).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor.experimental._context_parallel import _attention as _cp

__all__ = [
    "torch_cp_attention",
    "torch_cp_positions",
    "torch_cp_shard",
    "torch_cp_unshard",
]

_aten = torch.ops.aten
_SEQ_DIM = 2  # the templates hard-code [B, H, S, d]


def torch_cp_positions(
    seq_len: int, *, rank: int, world_size: int, causal: bool, device=None
) -> torch.Tensor:
    """Global sequence positions (int64, in local order) held by ``rank``."""
    if causal:
        if seq_len % (2 * world_size):
            raise ValueError(f"causal needs seq_len % (2*world_size) == 0, got {seq_len}, {world_size}")
        c = seq_len // (2 * world_size)
        tail = 2 * world_size - 1 - rank
        return torch.cat(
            [
                torch.arange(rank * c, (rank + 1) * c, device=device),
                torch.arange(tail * c, (tail + 1) * c, device=device),
            ]
        )
    if seq_len % world_size:
        raise ValueError(f"needs seq_len % world_size == 0, got {seq_len}, {world_size}")
    s = seq_len // world_size
    return torch.arange(rank * s, (rank + 1) * s, device=device)


def torch_cp_shard(
    x_full: torch.Tensor, *, dim: int, rank: int, world_size: int, causal: bool
) -> torch.Tensor:
    """The (contiguous) shard of ``x_full`` along ``dim`` that PyTorch's ring expects on ``rank``."""
    idx = torch_cp_positions(
        x_full.size(dim), rank=rank, world_size=world_size, causal=causal, device=x_full.device
    )
    return x_full.index_select(dim, idx).contiguous()


def torch_cp_unshard(
    shards: list[torch.Tensor], *, dim: int, causal: bool
) -> torch.Tensor:
    """Inverse of ``torch_cp_shard``: ``shards[r]`` is rank ``r``'s shard; returns the full tensor."""
    world_size = len(shards)
    cat = torch.cat(shards, dim=dim)
    order = torch.cat(
        [
            torch_cp_positions(cat.size(dim), rank=r, world_size=world_size, causal=causal)
            for r in range(world_size)
        ]
    ).to(cat.device)
    return cat.index_select(dim, torch.argsort(order))


@contextlib.contextmanager
def _cp_state(causal: bool) -> Iterator[None]:
    opts = _cp._cp_options
    old = (opts.enable_load_balance, opts.rotate_method)
    opts.enable_load_balance = causal
    _cp.set_rotate_method("alltoall")  # -> opts.rotate_method = _RotateMethod.ALL_TO_ALL
    try:
        yield
    finally:
        opts.enable_load_balance, opts.rotate_method = old


class _TorchRingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, group, scale):
        with _cp_state(causal):
            out, lse = _cp._templated_ring_attention(
                group,
                _SEQ_DIM,
                _aten._scaled_dot_product_flash_attention_for_cpu,
                query=q,
                key=k,
                value=v,
                is_causal=causal,
                dropout_p=0.0,
                scale=scale,
            )[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.group, ctx.scale = causal, group, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        with _cp_state(ctx.causal):
            dq, dk, dv = _cp._templated_ring_attention_backward(
                ctx.group,
                _SEQ_DIM,
                _aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
                grad_out=grad_out.contiguous(),
                grad_out_name="grad_out",
                query=q,
                key=k,
                value=v,
                out=out,
                logsumexp=lse,
                is_causal=ctx.causal,
                dropout_p=0.0,
                scale=ctx.scale,
            )[:3]
        return dq, dk, dv, None, None, None


def torch_cp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    group: dist.ProcessGroup | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """PyTorch's ring attention on this rank's shard.

    ``q, k, v``: ``[B, H, S_local, d]`` shards laid out as ``torch_cp_shard(..., dim=2,
    causal=causal)`` produces (same ``S_local`` for q and kv; no GQA). ``group``: the
    context-parallel process group (``None``: the default group). Returns this rank's
    ``[B, H, S_local, d]`` output shard, differentiable w.r.t. ``q, k, v`` (the backward is
    PyTorch's templated backward ring, which also communicates, so every rank must call
    backward). ``scale`` defaults to ``1/sqrt(d)``.
    """
    if group is None:
        group = dist.group.WORLD
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"expected equal [B, H, S_local, d] shapes, got {q.shape}, {k.shape}, {v.shape}")
    if causal and q.size(_SEQ_DIM) % 2:
        raise ValueError("causal (head-tail) layout needs an even local sequence length")
    return _TorchRingAttention.apply(q, k, v, causal, group, scale)
