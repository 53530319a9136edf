"""The readable, specialised source of a kernel variant: the spec, its constexprs and launch
parameters as a header, then the @triton.jit kernel and the helpers it calls (for dumps)."""
from __future__ import annotations

import ast

from burstc.codegen.cache import KERNELS_FILE
from burstc.codegen.spec import (BACKWARD_DKDV, BACKWARD_DQ, DELTA, FINALIZE, FORWARD_STEP, TORCH_DTYPES,
                                 KernelSpec)


def _functions() -> dict[str, tuple[str, set[str]]]:
    """name -> (source, names it calls) of every top-level function in kernels.py."""
    text = KERNELS_FILE.read_text()
    tree = ast.parse(text)
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            calls = {c.func.id for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
            decorators = "".join(f"@{ast.unparse(d)}\n" for d in node.decorator_list)
            found[node.name] = (decorators + ast.get_source_segment(text, node, padded=True), calls)
    return found


def variant_name(spec: KernelSpec) -> str:
    mask = "_causal" if spec.causal else ""
    cap = "_softcap" if spec.softcap else ""
    return f"{spec.kind}_{spec.dtype}_d{spec.head_dim}_g{spec.group}{mask}{cap}_{spec.arch}"


def kernel_source(spec: KernelSpec) -> str:
    functions = _functions()
    wanted, order = [spec.kind + "_kernel"], []
    while wanted:
        name = wanted.pop()
        if name in functions and name not in order:
            order.append(name)
            wanted.extend(sorted(functions[name][1]))
    cfg = spec.config
    header = [f"# burstc kernel variant {variant_name(spec)}",
              f"# spec: {spec}",
              f"# constexprs: {spec.constexprs()}",
              f"# launch: block_m={cfg.block_m} block_n={cfg.block_n} num_warps={cfg.num_warps} "
              f"num_stages={cfg.num_stages}",
              f"# from {KERNELS_FILE.name}; helpers follow the kernel", ""]
    return "\n".join(header) + "\n\n".join(functions[n][0] for n in order) + "\n"


def site_specs(dtype, head_dim: int, group: int, causal: bool, arch: str = "sm_90",
               softcap: bool = False) -> list[KernelSpec]:
    """The kernel variants one attention site runs on GPU (both mask classes where causal: the
    diagonal pairs need the causal variant, the off-diagonal ones the full one; softcap: soft-capped)."""
    name = TORCH_DTYPES.get(dtype)
    if name is None:
        return []
    masks = (False, True) if causal else (False,)
    specs = [KernelSpec(kind, head_dim, name, group, mask, arch, softcap=softcap)
             for kind in (FORWARD_STEP, BACKWARD_DKDV, BACKWARD_DQ) for mask in masks]
    return specs + [KernelSpec(FINALIZE, head_dim, name, 1, False, arch), KernelSpec(DELTA, head_dim, name, 1, False, arch)]
