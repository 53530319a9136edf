"""Local kernel back-ends and the choice among them (`kernel=` of burst_attention)."""
from __future__ import annotations

import logging

import torch

from burstc.runtime.kernels.base import LocalKernel, QueryBundle, WorkItem, accumulation_dtype
from burstc.runtime.kernels.cpu import CpuKernel
from burstc.runtime.kernels.reference import ReferenceKernel

__all__ = ["KERNELS", "LocalKernel", "QueryBundle", "WorkItem", "accumulation_dtype", "select_kernel"]

KERNELS = ("auto", "cpu", "reference", "triton")
log = logging.getLogger("burstc.runtime")


def _triton_kernel():
    try:
        from burstc.runtime.kernels.triton import TritonKernel
    except ImportError as e:  # triton missing or the kernels not importable on this install
        raise ValueError(f"kernel='triton' is unavailable here ({e}); use kernel='auto'") from e
    return TritonKernel()


def select_kernel(name: str, q: torch.Tensor) -> LocalKernel:
    """The back-end `name` for tensors like q; 'auto' is triton on CUDA (reference where triton
    cannot run) and cpu on CPU (reference for dtypes the cpu kernel lacks)."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}: choose one of {', '.join(KERNELS)}")
    if name == "auto":
        candidates = [_triton_kernel] if q.device.type == "cuda" else [CpuKernel]
        for make in candidates:
            try:
                kernel = make()
            except ValueError as e:
                log.warning("burst: %s; falling back to the reference kernel", e)
                continue
            reason = kernel.supports(q)
            if reason is None:
                return kernel
            log.warning("burst: %s kernel cannot run these inputs (%s); using the reference kernel",
                        kernel.name, reason)
        return ReferenceKernel()
    kernel = {"cpu": CpuKernel, "reference": ReferenceKernel, "triton": _triton_kernel}[name]()
    reason = kernel.supports(q)
    if reason is not None:
        raise ValueError(f"kernel={name!r} cannot run these inputs: {reason}")
    return kernel
