"""What a kernel is specialised on (`KernelSpec`) and its launch parameters (`TileConfig`).

Launch parameters come from one fixed table per architecture below: no runtime autotuning, so a
spec always gets the same binary and `python -m burstc.codegen.report` shows exactly what runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FORWARD_STEP = "forward_step"
FINALIZE = "finalize"
DELTA = "delta"
BACKWARD_DKDV = "backward_dkdv"
BACKWARD_DQ = "backward_dq"
KINDS = (FORWARD_STEP, FINALIZE, DELTA, BACKWARD_DKDV, BACKWARD_DQ)
MASKED_KINDS = (FORWARD_STEP, BACKWARD_DKDV, BACKWARD_DQ)  # kernels that see a WorkItem's mask class
# The generic mask of an item: none (full or causal by `causal`), a boolean mask (True = visible) or an
# additive floating bias on the scaled scores (-inf = hidden), read from a tile tensor covering the item,
# or "positions": visibility computed in the kernel from the item's global positions and a window, plus
# document ids (`documents`) and key padding (`key_padding`) where the mask has them.
MASKS = ("none", "bool", "bias", "positions")
TILE_MASKS = ("bool", "bias")

HEAD_DIMS = (64, 80, 96, 128, 256)  # the head dims the table is tuned for; any d <= MAX_HEAD_DIM runs
MAX_HEAD_DIM = 256
DTYPES = ("fp16", "bf16", "fp32")
ARCHS = ("sm_80", "sm_90", "interpreter")

TORCH_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# Largest dynamic shared memory one block may use. sm_80's budget is that of sm_86/sm_89 (99 KiB),
# not the A100's 163 KiB, so that the sm_80 table runs on every Ampere/Ada part.
SHARED_LIMIT = {"sm_80": 99 * 1024, "sm_90": 227 * 1024}


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class KernelSpec:
    """One kernel variant. `group` is H_q // H_kv; `causal` is the WorkItem's mask class (top-left
    causal inside its rectangle, else full); `mask` is the item's generic mask ("none", "bool",
    "bias", "positions"; one of MASKS), never together with `causal` (a given mask holds the causal
    part); `documents` and `key_padding` say what a "positions" mask holds besides its window;
    `softcap`: the scores are soft-capped (softcap * tanh(S / softcap) before any mask, the cap a runtime
    argument). Kernels without a mask (finalize, delta) ignore group, causal and mask, and take no softcap."""

    kind: str
    head_dim: int
    dtype: str
    group: int = 1
    causal: bool = False
    arch: str = "sm_90"
    mask: str = "none"
    documents: bool = False
    key_padding: bool = False
    softcap: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown kernel kind {self.kind!r}; one of {KINDS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; one of {DTYPES}")
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; one of {ARCHS}")
        if not 1 <= self.head_dim <= MAX_HEAD_DIM:
            raise ValueError(f"head dim {self.head_dim} outside 1..{MAX_HEAD_DIM}")
        if self.group < 1:
            raise ValueError(f"GQA group size {self.group} < 1")
        if self.mask not in MASKS:
            raise ValueError(f"unknown mask {self.mask!r}; one of {MASKS}")
        if self.mask != "none" and self.causal:
            raise ValueError(f"a {self.mask} mask is not combined with causal: the mask holds the causal part")
        if self.mask != "none" and self.kind not in MASKED_KINDS:
            raise ValueError(f"{self.kind} kernels take no mask")
        if (self.documents or self.key_padding) and self.mask != "positions":
            raise ValueError("documents and key_padding are parts of a positions mask: set mask='positions'")
        if self.softcap and self.kind not in MASKED_KINDS:
            raise ValueError(f"{self.kind} kernels take no softcap")

    @property
    def mask_class(self) -> str:
        """What the kernel masks: "full", "causal", "bool", "bias", or "pos" with "+docs" and "+pad" for a
        positions mask's parts (reports, names)."""
        if self.mask == "positions":
            return "pos" + "+docs" * self.documents + "+pad" * self.key_padding
        if self.mask != "none":
            return self.mask
        return "causal" if self.causal else "full"

    @property
    def block_d(self) -> int:
        """The head dim padded to a power of two (at least 16, the smallest tl.dot extent)."""
        return max(16, 1 << (self.head_dim - 1).bit_length())

    @property
    def config(self) -> TileConfig:
        return select_config(self)

    @property
    def dot_precision(self) -> str:
        """fp32 inputs multiply in full fp32 ("ieee"), not TF32: the fp32 path is the accurate one."""
        return "ieee" if self.dtype == "fp32" else "tf32"

    def launch_options(self) -> dict:
        """Triton compile options: the table row's warps and stages, and FMA contraction on (Triton's
        default until 3.9, explicit because 3.10 turns it off)."""
        cfg = self.config
        return {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "enable_fp_fusion": True}

    def constexprs(self) -> dict:
        """The kernel's tl.constexpr arguments for this spec."""
        cfg = self.config
        values = {"HEAD_DIM": self.head_dim, "BLOCK_D": self.block_d, "BLOCK_M": cfg.block_m}
        if self.kind in MASKED_KINDS:
            values.update(BLOCK_N=cfg.block_n, GROUP=self.group, CAUSAL=self.causal, MASK=self.mask,
                          DOCS=self.documents, PAD=self.key_padding, SOFTCAP=self.softcap,
                          PRECISION=self.dot_precision)
        return values


def arch_of(device: torch.device) -> str:
    """The table a CUDA device uses: sm_90 for Hopper and later data-centre parts, sm_80 otherwise."""
    major, _ = torch.cuda.get_device_capability(device)
    return "sm_90" if major in (9, 10) else "sm_80"


# The table: (arch, kind) -> {BLOCK_D: TileConfig}, for 16-bit inputs in `_TABLE`, float32 inputs in
# `_FP32_TABLE`; head dims 80 and 96 use the BLOCK_D 128 row, head dims below 64 the 64 row.
# forward_step / backward_dq: block_m query rows stay on chip, block_n key rows stream.
# backward_dkdv: block_n key rows stay on chip, block_m query rows stream.
# finalize / delta: block_m rows per program (block_n unused).
# Rows were chosen by compiling candidates largest-tile first and keeping the first with zero spills,
# shared memory within SHARED_LIMIT and (16-bit) tensor-core instructions; `python -m
# burstc.codegen.report` re-checks every variant. They are not measured on a GPU yet.
# float32 multiplies in full precision on CUDA cores (see KernelSpec.dot_precision), whose operands
# live in registers: hence its small tiles.
_T = TileConfig
_ELEMENTWISE = {64: _T(64, 0, 4, 1), 128: _T(64, 0, 4, 1), 256: _T(32, 0, 4, 1)}
_TABLE = {
    ("sm_90", FORWARD_STEP): {64: _T(128, 64, 4, 3), 128: _T(128, 64, 8, 3), 256: _T(64, 64, 8, 2)},
    ("sm_90", BACKWARD_DKDV): {64: _T(32, 128, 8, 3), 128: _T(32, 64, 8, 2), 256: _T(32, 32, 8, 1)},
    ("sm_90", BACKWARD_DQ): {64: _T(128, 64, 8, 3), 128: _T(128, 32, 8, 2), 256: _T(64, 32, 8, 2)},
    ("sm_90", FINALIZE): _ELEMENTWISE,
    ("sm_90", DELTA): _ELEMENTWISE,
    ("sm_80", FORWARD_STEP): {64: _T(128, 64, 8, 3), 128: _T(128, 32, 8, 2), 256: _T(64, 64, 8, 1)},
    ("sm_80", BACKWARD_DKDV): {64: _T(32, 128, 8, 3), 128: _T(32, 64, 8, 2), 256: _T(32, 32, 8, 1)},
    ("sm_80", BACKWARD_DQ): {64: _T(128, 64, 8, 3), 128: _T(128, 32, 8, 2), 256: _T(64, 32, 8, 1)},
    ("sm_80", FINALIZE): _ELEMENTWISE,
    ("sm_80", DELTA): _ELEMENTWISE,
}
_FP32_TABLE = {
    ("sm_90", FORWARD_STEP): {64: _T(64, 32, 8, 1), 128: _T(32, 16, 8, 1), 256: _T(32, 16, 8, 1)},
    ("sm_90", BACKWARD_DKDV): {64: _T(32, 32, 8, 1), 128: _T(16, 32, 8, 1), 256: _T(16, 16, 8, 1)},
    ("sm_90", BACKWARD_DQ): {64: _T(64, 32, 8, 1), 128: _T(32, 16, 8, 1), 256: _T(32, 16, 8, 1)},
    ("sm_80", FORWARD_STEP): {64: _T(64, 32, 8, 1), 128: _T(64, 32, 8, 1), 256: _T(32, 32, 8, 1)},
    ("sm_80", BACKWARD_DKDV): {64: _T(32, 64, 8, 1), 128: _T(32, 32, 8, 1), 256: _T(16, 32, 8, 1)},
    ("sm_80", BACKWARD_DQ): {64: _T(64, 32, 8, 1), 128: _T(64, 32, 8, 1), 256: _T(32, 16, 8, 1)},
}
# Rows of the generic tile masks (mask "bool" / "bias") where the unmasked row spills: the mask tile
# takes registers (and its load a pipeline buffer), so these use a smaller tile or fewer stages;
# chosen like the rows above, by compiling the unmasked row's tile and its halvings largest first and
# keeping the first with no spill and shared memory in budget for bool and bias masks (fp16 and bf16
# alike; head dims 80, 96 and 128 for the BLOCK_D 128 rows). Every other masked variant runs its
# unmasked row.
_MASKED_TABLE = {
    ("sm_90", FORWARD_STEP, "16bit"): {64: _T(64, 64, 4, 3), 128: _T(128, 32, 8, 3), 256: _T(64, 32, 8, 2)},
    ("sm_90", BACKWARD_DQ, "16bit"): {256: _T(64, 16, 8, 2)},
    ("sm_80", FORWARD_STEP, "16bit"): {128: _T(128, 32, 8, 1)},
    ("sm_80", BACKWARD_DKDV, "16bit"): {64: _T(32, 128, 8, 1)},
    ("sm_80", BACKWARD_DQ, "16bit"): {64: _T(128, 32, 8, 3), 128: _T(128, 16, 8, 2)},
    ("sm_80", BACKWARD_DKDV, "fp32"): {128: _T(32, 16, 8, 1)},
    ("sm_80", BACKWARD_DQ, "fp32"): {128: _T(32, 16, 8, 1)},
}
# Rows of the positions mask (mask "positions", any of its parts) where the unmasked row spills: its
# visibility is computed from position vectors, which takes registers where the tile masks load; chosen
# like _MASKED_TABLE's rows, by compiling the unmasked row's tile and its halvings largest first (fewer
# stages before a smaller tile) and keeping the first with no spill and shared memory in budget for all
# four positions classes (pos, pos+docs, pos+pad, pos+docs+pad), fp16 and bf16 alike, head dims 80, 96
# and 128 for the BLOCK_D 128 rows. Every other positions variant runs its unmasked row.
_POSITION_MASK_TABLE = {
    ("sm_90", FORWARD_STEP, "16bit"): {64: _T(128, 32, 4, 3), 256: _T(64, 32, 8, 2)},
    ("sm_80", BACKWARD_DQ, "16bit"): {64: _T(128, 64, 8, 1), 128: _T(128, 32, 8, 1)},
    ("sm_90", FORWARD_STEP, "fp32"): {64: _T(32, 32, 8, 1), 256: _T(16, 16, 8, 1)},
    ("sm_90", BACKWARD_DQ, "fp32"): {64: _T(64, 16, 8, 1)},
    ("sm_80", FORWARD_STEP, "fp32"): {64: _T(64, 16, 8, 1), 128: _T(16, 16, 8, 1)},
    ("sm_80", BACKWARD_DKDV, "fp32"): {64: _T(16, 64, 8, 1)},
    ("sm_80", BACKWARD_DQ, "fp32"): {64: _T(64, 16, 8, 1), 128: _T(32, 16, 8, 1)},
}
# Rows of soft-capped variants (SOFTCAP, any mask class) where their mask class's row spills: the tanh's
# operands take registers (and in the backward the tanh stays live until dS); chosen like _POSITION_MASK_TABLE's
# rows, by compiling the spilling row's tile and its halvings largest first (fewer stages before a smaller tile)
# and keeping the first with no spill, shared memory in budget and (16-bit) tensor cores for all eight mask
# classes soft-capped, fp16 and bf16 alike, head dims 80, 96 and 128 for the BLOCK_D 128 rows. Every other
# soft-capped variant runs its mask class's row.
_SOFTCAP_TABLE = {
    ("sm_90", FORWARD_STEP, "16bit"): {128: _T(128, 32, 8, 3), 256: _T(64, 32, 8, 2)},
    ("sm_90", BACKWARD_DQ, "16bit"): {256: _T(64, 16, 8, 2)},
    ("sm_90", FORWARD_STEP, "fp32"): {64: _T(64, 16, 8, 1)},
    ("sm_90", BACKWARD_DQ, "fp32"): {256: _T(16, 16, 8, 1)},
    ("sm_80", BACKWARD_DKDV, "16bit"): {64: _T(32, 128, 8, 1)},
    ("sm_80", BACKWARD_DKDV, "fp32"): {64: _T(16, 32, 8, 1), 128: _T(32, 16, 8, 1)},
    ("sm_80", BACKWARD_DQ, "fp32"): {128: _T(16, 32, 8, 1), 256: _T(16, 16, 8, 1)},
}
# The interpreter runs one numpy program per tile: small tiles keep the tests' lengths short while
# crossing several tiles, and block_m != block_n exercises the causal tile arithmetic.
_INTERPRETER = {
    FORWARD_STEP: _T(32, 16, 1, 1), BACKWARD_DQ: _T(32, 16, 1, 1), BACKWARD_DKDV: _T(16, 32, 1, 1),
    FINALIZE: _T(32, 0, 1, 1), DELTA: _T(32, 0, 1, 1),
}


def select_config(spec: KernelSpec) -> TileConfig:
    """The table row of a spec."""
    if spec.arch == "interpreter":
        return _INTERPRETER[spec.kind]
    table = _FP32_TABLE if spec.dtype == "fp32" and (spec.arch, spec.kind) in _FP32_TABLE else _TABLE
    rows = table[(spec.arch, spec.kind)]
    block_d = min(bd for bd in rows if bd >= spec.block_d)
    precision = "fp32" if spec.dtype == "fp32" else "16bit"
    if spec.softcap and block_d in _SOFTCAP_TABLE.get((spec.arch, spec.kind, precision), {}):
        return _SOFTCAP_TABLE[(spec.arch, spec.kind, precision)][block_d]
    if spec.mask != "none":
        table = _MASKED_TABLE if spec.mask in TILE_MASKS else _POSITION_MASK_TABLE
        masked = table.get((spec.arch, spec.kind, precision), {})
        if block_d in masked:
            return masked[block_d]
    return rows[block_d]
