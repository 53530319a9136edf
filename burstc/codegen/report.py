"""Static resource report of every kernel variant, compiled ahead of time for sm_90 and sm_80 (no GPU).

    python -m burstc.codegen.report [--json PATH] [--arch sm_90] [--kind forward_step] [--dtype bf16]
                                    [--head-dim 128] [--mask bool] [--softcap on]

Each variant (kind x head dim x dtype x mask class x soft-cap x arch, GQA group 1: the group only changes index
arithmetic) is compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` with
the launch parameters of the spec's table row. The cubin is read with the `cuobjdump` shipped in
Triton's package: registers per thread, spill bytes per thread (STACK + LOCAL: Triton kernels make
no calls and keep no local arrays, so any stack frame or local memory holds spilled registers;
ptxas can report few registers and a large stack frame), shared memory (Triton's dynamic
allocation plus any static), and whether the SASS holds tensor-core instructions (HGMMA on sm_90a,
HMMA on sm_80).

The mask classes of a step's kernels are full, causal, the generic tile masks bool and bias (a
[B, H, q_len, k_len] mask read with a unit key stride and row/batch/head strides with no divisibility
to promise; a boolean mask as uint8, a bias in the inputs' dtype) and the positions mask computed in
the kernel: "pos" (positions and a window), with "+docs" (document ids) and "+pad" (key padding).
Each comes without and with soft-capped scores (SOFTCAP, the cap an fp32 argument).
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from burstc.codegen import cache
from burstc.codegen.spec import (ARCHS, DTYPES, HEAD_DIMS, KINDS, MASKED_KINDS, SHARED_LIMIT, TILE_MASKS,
                                 KernelSpec)

POSITION_CLASSES = ("pos", "pos+docs", "pos+pad", "pos+docs+pad")
MASK_CLASSES = ("full", "causal", "bool", "bias") + POSITION_CLASSES  # KernelSpec.mask_class of the masked kinds

COMPUTE_CAPABILITY = {"sm_80": 80, "sm_90": 90}
TENSOR_CORE_OPS = {"sm_80": ("HMMA",), "sm_90": ("HGMMA", "HMMA")}  # wgmma first; mma.sync also counts

# Pointer arguments that are float32 whatever the input dtype (state, statistics, gradient accumulators).
FP32_POINTERS = {"acc_ptr", "m_ptr", "l_ptr", "lse_ptr", "delta_ptr", "dq_ptr", "dk_ptr", "dv_ptr"}
# Strides that are 1 for contiguous tensors: Triton's JIT specialises an int argument equal to 1 into
# a constant, so the representative compile does the same (head-dim strides, row strides of [B, H, L]).
UNIT_STRIDES = {"stride_qd", "stride_kd", "stride_vd", "stride_ad", "stride_od", "stride_dod", "stride_dkd",
                "stride_dvd", "stride_dqd", "stride_sl", "stride_ll", "stride_dl"}
# Integer arguments with no divisibility to promise (lengths, head counts); other ints are strides
# of contiguous tensors, multiples of 16 for every head dim of the table.
PLAIN_INTS = {"n_heads", "n_kv_heads", "q_len", "k_len", "seq_len"}
# The generic tile mask's arguments (None, hence constexpr, without a mask). Its key stride is 1; its
# row stride is a key count and its batch/head strides are 0 (broadcast) or products of lengths: no
# divisibility to promise. A boolean mask arrives as a uint8 view, a bias in the inputs' dtype.
MASK_ARGS = {"mask_ptr", "stride_mb", "stride_mh", "stride_mq", "stride_mk"}
MASK_UNIT_STRIDES = {"stride_mk"}
# The positions mask's arguments, by the part of it that passes them (else None, hence constexpr).
# Positions are int32 slices of the ring's position vectors at any offset (no alignment to promise);
# document ids (int32) and key validity (uint8) are fresh gathers per item; the window bounds and the
# batch strides (0 when broadcast, else a length) are plain ints.
POSITION_ARGS = {"pos": {"q_pos_ptr", "k_pos_ptr", "window_left", "window_right"},
                 "docs": {"q_doc_ptr", "k_doc_ptr", "stride_qdocb", "stride_kdocb"},
                 "pad": {"k_valid_ptr", "stride_kvb"}}
POSITION_POINTERS = {"q_pos_ptr": "*i32", "k_pos_ptr": "*i32", "q_doc_ptr": "*i32", "k_doc_ptr": "*i32",
                     "k_valid_ptr": "*u8"}
ALIGNED_POSITION_POINTERS = {"q_doc_ptr", "k_doc_ptr", "k_valid_ptr"}


def spec_of(kind: str, head_dim: int, dtype: str, arch: str, mask_class: str = "full",
            softcap: bool = False) -> KernelSpec:
    """The GQA-group-1 spec of a mask class (MASK_CLASSES), soft-capped or not."""
    if mask_class not in MASK_CLASSES:
        raise ValueError(f"unknown mask class {mask_class!r}; one of {MASK_CLASSES}")
    if mask_class in POSITION_CLASSES:
        parts = mask_class.split("+")
        return KernelSpec(kind, head_dim, dtype, 1, False, arch, "positions", "docs" in parts, "pad" in parts,
                          softcap)
    mask = mask_class if mask_class in TILE_MASKS else "none"
    return KernelSpec(kind, head_dim, dtype, 1, mask_class == "causal", arch, mask, softcap=softcap)


def _passed_position_args(spec: KernelSpec) -> set:
    """The positions mask's arguments a launch of spec passes (the others are None)."""
    if spec.mask != "positions":
        return set()
    return (POSITION_ARGS["pos"] | (POSITION_ARGS["docs"] if spec.documents else set())
            | (POSITION_ARGS["pad"] if spec.key_padding else set()))


def variants(archs=("sm_90", "sm_80"), kinds=KINDS, dtypes=DTYPES, head_dims=HEAD_DIMS,
             masks=MASK_CLASSES, softcaps=(False, True)) -> list[KernelSpec]:
    """Every (arch, kind, dtype, head dim, mask class, soft-cap) combination; mask classes other than full and
    soft-capped variants only for masked kinds (kernels without a mask appear once, when `masks` holds full
    and `softcaps` False)."""
    specs = []
    for arch in archs:
        for kind in kinds:
            classes = [m for m in masks if m in MASK_CLASSES] if kind in MASKED_KINDS else \
                [m for m in masks if m == "full"]
            caps = softcaps if kind in MASKED_KINDS else [c for c in softcaps if not c]
            for dtype in dtypes:
                for head_dim in head_dims:
                    for mask_class in classes:
                        specs += [spec_of(kind, head_dim, dtype, arch, mask_class, cap) for cap in caps]
    return specs


def ast_source(spec: KernelSpec) -> ASTSource:
    """The kernel of a spec with the argument types and specialisations a contiguous launch gets."""
    fn = cache.kernel(spec.kind, interpret=False)
    constants = dict(spec.constexprs())
    signature, attrs = {}, {}
    passed = _passed_position_args(spec)
    position_args = set().union(*POSITION_ARGS.values())
    for index, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif (name in MASK_ARGS and spec.mask not in TILE_MASKS) or (name in position_args and name not in passed):
            signature[name] = "constexpr"  # the launch passes None
            constants[name] = None
        elif name in POSITION_POINTERS:
            signature[name] = POSITION_POINTERS[name]
            if name in ALIGNED_POSITION_POINTERS:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in position_args:
            signature[name] = "i32"
        elif name == "mask_ptr":
            signature[name] = "*u8" if spec.mask == "bool" else "*" + spec.dtype
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in MASK_UNIT_STRIDES:
            signature[name] = "constexpr"
            constants[name] = 1
        elif name in MASK_ARGS:
            signature[name] = "i32"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in FP32_POINTERS else "*" + spec.dtype
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name == "scale":
            signature[name] = "fp32"
        elif name == "softcap":
            signature[name] = "fp32" if spec.softcap else "constexpr"
            if not spec.softcap:
                constants[name] = None  # the launch passes None
        elif name in UNIT_STRIDES:
            signature[name] = "constexpr"
            constants[name] = 1
        elif name in PLAIN_INTS:
            signature[name] = "i32"
        elif name.startswith("stride_"):
            signature[name] = "i32"
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            raise ValueError(f"{fn.__name__}: no representative type for argument {name!r}")
    return ASTSource(fn, signature=signature, constexprs=constants, attrs=attrs)


def compile_spec(spec: KernelSpec):
    """Compile a spec for its arch (no GPU needed); returns Triton's CompiledKernel."""
    target = GPUTarget("cuda", COMPUTE_CAPABILITY[spec.arch], 32)
    with cache.stdlib_mode(interpret=False):
        return triton.compile(ast_source(spec), target=target, options=spec.launch_options())


@functools.lru_cache(maxsize=1)
def cuobjdump() -> str | None:
    """Path of the cuobjdump shipped with Triton (or set by TRITON_CUOBJDUMP_PATH), None if missing."""
    try:
        return triton.knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001 - Triton raises RuntimeError or similar when the tool is absent
        return None


def inspect_cubin(cubin: bytes, arch: str) -> dict:
    """Registers, spill bytes (stack + local), static shared bytes and the tensor-core op found in the SASS."""
    tool = cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (Triton's NVIDIA backend ships it in backends/nvidia/bin)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([tool, "--dump-resource-usage", str(path)], check=True, capture_output=True,
                               text=True).stdout
        sass = subprocess.run([tool, "--dump-sass", str(path)], check=True, capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"unexpected cuobjdump output:\n{usage}")
    registers, stack, shared, local = map(int, found.groups())
    op = next((op for op in TENSOR_CORE_OPS[arch] if re.search(rf"\b{op}\b", sass)), "")
    return {"registers": registers, "spill_bytes": stack + local, "static_shared": shared, "tensor_core_op": op}


def report_row(spec: KernelSpec) -> dict:
    """One variant's entry: its spec, table row and what the compiled binary uses."""
    compiled = compile_spec(spec)
    usage = inspect_cubin(compiled.asm["cubin"], spec.arch)
    shared = compiled.metadata.shared + usage["static_shared"]
    return {
        "kernel": spec.kind, "arch": spec.arch, "dtype": spec.dtype, "head_dim": spec.head_dim,
        "causal": spec.causal, "mask": spec.mask_class, "softcap": spec.softcap, **asdict(spec.config),
        "registers": usage["registers"], "spill_bytes": usage["spill_bytes"], "shared_bytes": shared,
        "shared_limit": SHARED_LIMIT[spec.arch], "tensor_core": bool(usage["tensor_core_op"]),
        "tensor_core_op": usage["tensor_core_op"],
    }


def markdown(rows: list[dict]) -> str:
    """One table per kernel kind."""
    lines = []
    for kind in dict.fromkeys(row["kernel"] for row in rows):
        lines += [f"\n### {kind}\n",
                  "| arch | dtype | d | mask | softcap | tile (M x N, warps, stages) | regs | spill B | smem B | "
                  "tensor core |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in (row for row in rows if row["kernel"] == kind):
            mask, softcap = r["mask"], "yes" if r["softcap"] else "-"
            tile = f"{r['block_m']} x {r['block_n']}, {r['num_warps']}, {r['num_stages']}"
            lines.append(f"| {r['arch']} | {r['dtype']} | {r['head_dim']} | {mask} | {softcap} | {tile} | "
                         f"{r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} | {r['tensor_core_op'] or '-'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m burstc.codegen.report", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows as a JSON list to this path")
    parser.add_argument("--arch", choices=[a for a in ARCHS if a != "interpreter"], action="append")
    parser.add_argument("--kind", choices=KINDS, action="append")
    parser.add_argument("--dtype", choices=DTYPES, action="append")
    parser.add_argument("--head-dim", type=int, choices=HEAD_DIMS, action="append")
    parser.add_argument("--mask", choices=MASK_CLASSES, action="append",
                        help="mask classes of the step kernels (default: all; finalize/delta only with full)")
    parser.add_argument("--softcap", choices=("off", "on"), action="append",
                        help="the step kernels without / with soft-capped scores (default: both; finalize/delta: off)")
    args = parser.parse_args(argv)
    specs = variants(archs=args.arch or ("sm_90", "sm_80"), kinds=args.kind or KINDS,
                     dtypes=args.dtype or DTYPES, head_dims=args.head_dim or HEAD_DIMS,
                     masks=args.mask or MASK_CLASSES,
                     softcaps=[cap == "on" for cap in args.softcap or ("off", "on")])
    rows = []
    for number, spec in enumerate(specs, 1):
        print(f"[{number}/{len(specs)}] {spec}", file=sys.stderr, flush=True)
        rows.append(report_row(spec))
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    problems = [r for r in rows if r["spill_bytes"] or r["shared_bytes"] > r["shared_limit"]]
    for r in problems:
        print(f"problem: {r['kernel']} {r['arch']} {r['dtype']} d={r['head_dim']} {r['mask']}"
              f"{' softcap' if r['softcap'] else ''}: "
              f"spills {r['spill_bytes']} B, shared {r['shared_bytes']} of {r['shared_limit']} B", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
