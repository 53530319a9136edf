"""The "triton" local kernel: base.py's LocalKernel protocol on burstc's fused Triton kernels.

Runs on CUDA devices of compute capability 8.0 or newer; with TRITON_INTERPRET=1 in the
environment it runs anywhere (CPU tensors included) in Triton's interpreter. A WorkItem's rows are
passed to the kernels as views (pointer offset + the tensors' own strides), never copied. So is an
item's mask tile ([B|1, H_q|1, q_len, k_len], bool or an additive floating bias): broadcast batch and
head dims are read with stride 0, a boolean mask through a uint8 view of its bytes. An item's
PositionMask (tile_mask.py) runs as MASK "positions": the kernels read its position vectors, window
bounds, document ids and key validity (O(q_len + k_len)) and compute each tile's visibility.
`TritonKernel(softcap=c)` soft-caps the scores as c * tanh(S / c) before any mask (Gemma 2): the kernels'
SOFTCAP variants, with the cap passed to every launch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Union

import torch
import triton

from burstc.codegen import cache
from burstc.codegen.spec import (BACKWARD_DKDV, BACKWARD_DQ, DELTA, FINALIZE, FORWARD_STEP, MAX_HEAD_DIM,
                                 TORCH_DTYPES, KernelSpec, arch_of)
from burstc.runtime.kernels.base import QueryBundle, WorkItem, as_grad_sum
from burstc.runtime.kernels.tile_mask import PositionMask


@dataclass
class TritonState:
    """Running forward state of a query chunk, all float32 and unnormalised. `m` is the running row
    maximum of the scores in base-2 units (S * scale * log2 e), the kernels' internal currency."""

    acc: torch.Tensor  # [B, H_q, L, d]
    m: torch.Tensor  # [B, H_q, L]
    l: torch.Tensor  # [B, H_q, L]
    dtype: torch.dtype  # of the output


def _rows(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The rows [start, stop) along L of a [B, H, L, ...] tensor, as a view."""
    return t[:, :, start:stop]


_NO_TILE = (None,) * 5  # mask_ptr and its four strides
_NO_POSITIONS = (None,) * 10  # q_pos_ptr ... stride_kvb


@dataclass(frozen=True)
class _MaskArgs:
    """An item's mask as the kernels take it: the spec's mask fields and the 15 mask arguments."""

    kind: str = "none"
    documents: bool = False
    key_padding: bool = False
    args: tuple = _NO_TILE + _NO_POSITIONS


def _item_mask(mask, q: torch.Tensor, item: WorkItem) -> _MaskArgs:
    """The kernels' view of an item's mask: none, a tile tensor or a PositionMask."""
    if mask is None:
        return _MaskArgs()
    if item.causal:
        raise ValueError("a masked WorkItem must not be causal: the causal part belongs in the mask")
    if isinstance(mask, PositionMask):
        return _position_args(mask, q, item)
    kind, tile = _tile_args(mask, q, item)
    return _MaskArgs(kind, args=tile + _NO_POSITIONS)


def _tile_args(mask: torch.Tensor, q: torch.Tensor, item: WorkItem) -> tuple[str, tuple]:
    """(the spec's mask kind, the kernels' tile mask arguments: pointer tensor and its 4 strides)."""
    if mask.device != q.device:
        raise ValueError(f"the mask is on {mask.device}, the queries on {q.device}")
    if mask.dtype == torch.bool:
        kind = "bool"
        mask = mask.view(torch.uint8)  # same bytes, same strides: 0 = hidden, 1 = visible
    elif mask.is_floating_point():
        kind = "bias"
    else:
        raise TypeError(f"a mask is bool or floating (an additive bias), got {mask.dtype}")
    batch, heads = q.shape[:2]
    shape = (batch, heads, item.q_len, item.k_len)
    if mask.dim() > 4 or mask.shape[-2:] != shape[-2:]:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not cover the item: expected [B|1, H_q|1, "
                         f"{item.q_len}, {item.k_len}] for B={batch}, H_q={heads}")
    try:
        mask = mask.expand(shape)
    except RuntimeError as e:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to {list(shape)}") from e
    if (item.q_len - 1) * mask.stride(2) + (item.k_len - 1) * mask.stride(3) >= 2 ** 31:
        # the kernels index inside one (batch, head) plane of the mask with 32-bit offsets
        raise ValueError(f"a {item.q_len} x {item.k_len} mask tile with strides {mask.stride()[2:]} spans 2^31 "
                         "elements or more: split the item")
    return kind, (mask, *mask.stride())


def _position_args(mask: PositionMask, q: torch.Tensor, item: WorkItem) -> _MaskArgs:
    """The kernels' MASK "positions" arguments: q_pos, k_pos, the window bounds, each batch row's document
    ids and valid flags (a uint8 view; batch stride 0 where they broadcast), unit strides along L."""
    if mask.shape != (item.q_len, item.k_len):
        raise ValueError(f"a PositionMask of {mask.shape[0]} queries x {mask.shape[1]} keys does not describe "
                         f"the item's {item.q_len} x {item.k_len}")
    if (mask.q_docs is None) != (mask.k_docs is None):
        raise ValueError("a PositionMask with document ids needs both q_docs and k_docs")
    batch = q.shape[0]
    positions = (_vector(mask.q_pos, "q_pos", q, (item.q_len,)), _vector(mask.k_pos, "k_pos", q, (item.k_len,)),
                 int(mask.left), int(mask.right))
    documents = (None,) * 4
    if mask.q_docs is not None:
        q_docs = _vector(mask.q_docs, "q_docs", q, (batch, item.q_len))
        k_docs = _vector(mask.k_docs, "k_docs", q, (batch, item.k_len))
        documents = (q_docs, k_docs, q_docs.stride(0), k_docs.stride(0))
    padding = (None,) * 2
    if mask.k_valid is not None:
        k_valid = _vector(mask.k_valid, "k_valid", q, (batch, item.k_len))
        padding = (k_valid, k_valid.stride(0))
    return _MaskArgs("positions", mask.q_docs is not None, mask.k_valid is not None,
                     _NO_TILE + positions + documents + padding)


def _vector(t: torch.Tensor, name: str, q: torch.Tensor, shape: tuple) -> torch.Tensor:
    """A PositionMask field as the kernels read it: on q's device, int32 (bool as uint8), broadcast to
    shape ([L] or [B, L]) with a unit stride along L."""
    if t.device != q.device:
        raise ValueError(f"PositionMask.{name} is on {t.device}, the queries on {q.device}: build it on "
                         f"{q.device}")
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    elif t.dtype != torch.int32:
        raise TypeError(f"PositionMask.{name} must be int32 (key validity: bool), got {t.dtype}: "
                        "build it with PositionMask.of")
    try:
        t = t.expand(shape)
    except RuntimeError as e:
        raise ValueError(f"PositionMask.{name} of shape {tuple(t.shape)} does not broadcast to {list(shape)}") from e
    return t if t.stride(-1) == 1 or shape[-1] <= 1 else t.contiguous()


class TritonKernel:
    name = "triton"
    takes_position_masks = True  # the ring hands it PositionMasks where the mask allows (MASK "positions")

    def __init__(self, softcap: Optional[float] = None):
        """softcap: the scores are soft-capped as softcap * tanh(S / softcap) before any mask (Gemma 2)."""
        if softcap is not None and not softcap > 0:
            raise ValueError(f"softcap={softcap!r}: a soft-cap is a positive number")
        self.softcap = None if softcap is None else float(softcap)

    def supports(self, q: torch.Tensor) -> Optional[str]:
        if q.dtype == torch.float64:
            return "float64 is not supported: the Triton kernels accumulate in float32 (use kernel='reference')"
        if q.dtype not in TORCH_DTYPES:
            return f"dtype {q.dtype} is not supported (float16, bfloat16, float32)"
        if q.dim() != 4:
            return f"expected [B, H, L, d] tensors, got {q.dim()} dims"
        if q.shape[-1] > MAX_HEAD_DIM:
            return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
        if cache.interpreting():
            if q.dtype == torch.bfloat16:
                # triton-lang/triton#11584: the interpreter multiplies bfloat16 tl.dot operands' raw bits
                return "bfloat16 under TRITON_INTERPRET: Triton's interpreter computes bfloat16 tl.dot wrongly"
            return None
        if q.device.type != "cuda":
            return f"{q.device.type} tensors need TRITON_INTERPRET=1 (Triton's CPU interpreter)"
        if torch.version.hip is not None:
            return "ROCm devices are not supported (the kernels are tuned and checked for NVIDIA sm_80/sm_90)"
        if torch.cuda.get_device_capability(q.device) < (8, 0):
            return "the Triton kernels need compute capability 8.0 or newer"
        return None

    # -- forward -------------------------------------------------------------------------------

    def forward_init(self, q: torch.Tensor) -> TritonState:
        b, h, length, d = q.shape
        f32 = dict(dtype=torch.float32, device=q.device)
        return TritonState(acc=torch.zeros(b, h, length, d, **f32), m=torch.full((b, h, length), float("-inf"), **f32),
                           l=torch.zeros(b, h, length, **f32), dtype=q.dtype)

    def forward_step(self, state: TritonState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     item: WorkItem, scale: float, mask: Union[torch.Tensor, PositionMask, None] = None) -> None:
        if item.q_len == 0 or item.k_len == 0:
            return
        batch, heads = q.shape[:2]
        item_mask = _item_mask(mask, q, item)
        spec = self._spec(FORWARD_STEP, q, k, item.causal, item_mask)
        qs = _rows(q, item.q_start, item.q_stop)
        ks = _rows(k, item.k_start, item.k_stop)
        vs = _rows(v, item.k_start, item.k_stop)
        acc = _rows(state.acc, item.q_start, item.q_stop)
        m = _rows(state.m, item.q_start, item.q_stop)
        l = _rows(state.l, item.q_start, item.q_stop)
        grid = (triton.cdiv(item.q_len, spec.config.block_m), batch * heads)
        self._launch(spec, grid, qs, ks, vs, acc, m, l,
                     *qs.stride(), *ks.stride(), *vs.stride(), *acc.stride(), *m.stride(),
                     heads, item.q_len, item.k_len, scale, self.softcap, *item_mask.args)

    def forward_finalize(self, state: TritonState) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, length, d = state.acc.shape
        out = state.acc.new_empty((batch, heads, length, d), dtype=state.dtype)
        lse = state.acc.new_empty((batch, heads, length))
        if out.numel() == 0:
            return out, lse
        spec = self._spec_for(FINALIZE, d, state.dtype, state.acc.device)
        grid = (triton.cdiv(length, spec.config.block_m), batch * heads)
        self._launch(spec, grid, state.acc, state.m, state.l, out, lse,
                     *state.acc.stride(), *state.m.stride(), *out.stride(), *lse.stride(), heads, length)
        return out, lse

    # -- backward ------------------------------------------------------------------------------

    def delta(self, out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
        """D = rowsum(dout * out), float32 [B, H, L] (backward preprocess)."""
        batch, heads, length, d = out.shape
        delta = torch.empty((batch, heads, length), dtype=torch.float32, device=out.device)
        if delta.numel() == 0:
            return delta
        spec = self._spec_for(DELTA, d, out.dtype, out.device)
        grid = (triton.cdiv(length, spec.config.block_m), batch * heads)
        self._launch(spec, grid, out, dout, delta, *out.stride(), *dout.stride(), *delta.stride(), heads, length)
        return delta

    def backward_step(self, bundle: QueryBundle, k: torch.Tensor, v: torch.Tensor, item: WorkItem,
                      scale: float, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                      mask: Union[torch.Tensor, PositionMask, None] = None) -> None:
        if item.q_len == 0 or item.k_len == 0:
            return
        item_mask = _item_mask(mask, bundle.q, item)
        dq, dk, dv = as_grad_sum(dq), as_grad_sum(dk), as_grad_sum(dv)
        for name, acc in (("dq", dq), ("dk", dk), ("dv", dv)):
            if acc.dtype != torch.float32:
                raise TypeError(f"{name} accumulator must be float32, got {acc.dtype}")
        batch, heads = bundle.q.shape[:2]
        kv_heads = k.shape[1]
        q = _rows(bundle.q, item.q_start, item.q_stop)
        do = _rows(bundle.dout, item.q_start, item.q_stop)
        lse = _rows(bundle.lse, item.q_start, item.q_stop)
        delta = _rows(bundle.delta, item.q_start, item.q_stop)
        ks = _rows(k, item.k_start, item.k_stop)
        vs = _rows(v, item.k_start, item.k_stop)
        dqs = dq.rows(item.q_start, item.q_stop)
        dks = dk.rows(item.k_start, item.k_stop)
        dvs = dv.rows(item.k_start, item.k_stop)
        common = (*q.stride(), *ks.stride(), *vs.stride(), *do.stride(), *lse.stride(), *delta.stride())

        spec = self._spec(BACKWARD_DKDV, bundle.q, k, item.causal, item_mask)
        grid = (triton.cdiv(item.k_len, spec.config.block_n), batch * kv_heads)
        self._launch(spec, grid, q, ks, vs, do, lse, delta, dks, dvs, *common, *dks.stride(), *dvs.stride(),
                     kv_heads, item.q_len, item.k_len, scale, self.softcap, *item_mask.args)

        spec = self._spec(BACKWARD_DQ, bundle.q, k, item.causal, item_mask)
        grid = (triton.cdiv(item.q_len, spec.config.block_m), batch * heads)
        self._launch(spec, grid, q, ks, vs, do, lse, delta, dqs, *common, *dqs.stride(),
                     heads, item.q_len, item.k_len, scale, self.softcap, *item_mask.args)

    # -- plumbing ------------------------------------------------------------------------------

    def _spec(self, kind: str, q: torch.Tensor, k: torch.Tensor, causal: bool, mask: _MaskArgs) -> KernelSpec:
        heads, kv_heads = q.shape[1], k.shape[1]
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
        if k.dtype != q.dtype:
            raise TypeError(f"q is {q.dtype} but k/v are {k.dtype}")
        return self._spec_for(kind, q.shape[-1], q.dtype, q.device, heads // kv_heads, causal, mask,
                              self.softcap is not None)

    @staticmethod
    def _spec_for(kind: str, head_dim: int, dtype: torch.dtype, device: torch.device,
                  group: int = 1, causal: bool = False, mask: _MaskArgs = _MaskArgs(),
                  softcap: bool = False) -> KernelSpec:
        arch = "interpreter" if cache.interpreting() else arch_of(device)
        return KernelSpec(kind, head_dim, TORCH_DTYPES[dtype], group, causal, arch, mask.kind, mask.documents,
                          mask.key_padding, softcap)

    @staticmethod
    def _launch(spec: KernelSpec, grid: tuple, *args) -> None:
        interpret = spec.arch == "interpreter"
        kernel = cache.kernel(spec.kind, interpret)
        device = args[0].device
        if interpret:
            context = cache.stdlib_mode(interpret=True)
        elif device.type == "cuda":
            context = torch.cuda.device(device)
        else:
            context = contextlib.nullcontext()
        with context:
            kernel[grid](*args, **spec.constexprs(), **spec.launch_options())
