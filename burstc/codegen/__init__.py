"""Triton kernel generation for burstc's local attention steps.

`spec` says what a kernel is specialised on and picks its launch parameters from a fixed table,
`kernels` holds the @triton.jit kernels (one per stage), `cache` loads them per execution mode,
`report` compiles every variant ahead of time and reports its resources. The LocalKernel that runs
them is burstc.runtime.kernels.triton.TritonKernel.
"""
from burstc.codegen.spec import KernelSpec, TileConfig, select_config


def sources_for_sites(plans) -> dict[str, str]:
    """variant name -> specialised source, for the kernels the converted sites run on GPU (dumps)."""
    from burstc.codegen.source import kernel_source, site_specs, variant_name

    sources = {}
    for plan in plans:
        if not plan.converts:
            continue
        q, k = plan.site.tensor("query"), plan.site.tensor("key")
        group = int(q.shape[1]) // int(k.shape[1])
        for spec in site_specs(q.dtype, int(q.shape[3]), group, plan.causal, softcap=plan.site.softcap is not None):
            sources.setdefault(variant_name(spec), kernel_source(spec))
    return sources


__all__ = ["KernelSpec", "TileConfig", "select_config", "sources_for_sites"]
