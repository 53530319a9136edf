"""Triton kernel generation for burstc's local attention steps.

`spec` says what a kernel is specialised on and picks its launch parameters from a fixed table,
`kernels` holds the @triton.jit kernels (one per stage), `cache` loads them per execution mode,
`report` compiles every variant ahead of time and reports its resources. The LocalKernel that runs
them is burstc.runtime.kernels.triton.TritonKernel.
"""
from burstc.codegen.spec import KernelSpec, TileConfig, select_config

__all__ = ["KernelSpec", "TileConfig", "select_config"]
