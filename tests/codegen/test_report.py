"""Ahead-of-time compiles for sm_90 and sm_80 (no GPU): no spills, tensor cores, shared memory in budget.

A representative subset: both archs, the three kernels of a step and one elementwise kernel, every
dtype, padded and large head dims, every mask class (full, causal, the generic tile masks bool and bias,
and the in-kernel positions mask with and without documents and key padding), and soft-capped scores.
`python -m burstc.codegen.report` compiles all variants."""
import json

import pytest

from burstc.codegen import report
from burstc.codegen.spec import SHARED_LIMIT

pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
if report.cuobjdump() is None:
    pytest.skip("cuobjdump not available (Triton ships it in backends/nvidia/bin)", allow_module_level=True)

SUBSET = [
    ("forward_step", 128, "bf16", "causal"),
    ("forward_step", 256, "fp16", "full"),
    ("backward_dkdv", 96, "fp16", "causal"),
    ("backward_dq", 64, "bf16", "full"),
    ("backward_dq", 128, "fp32", "causal"),
    ("finalize", 80, "bf16", "full"),
    ("forward_step", 128, "fp16", "bias"),
    ("backward_dkdv", 64, "bf16", "bool"),
    ("backward_dq", 128, "fp16", "bool"),
    ("forward_step", 128, "bf16", "pos+docs+pad"),
    ("backward_dkdv", 128, "fp16", "pos+pad"),
    ("backward_dq", 64, "fp16", "pos+docs"),
    ("forward_step", 64, "fp32", "pos"),
]


SOFTCAP_SUBSET = [
    ("forward_step", 128, "bf16", "causal"),
    ("backward_dkdv", 128, "fp16", "causal"),
    ("backward_dq", 256, "bf16", "pos"),
    ("forward_step", 64, "fp32", "bias"),
]


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("kind,head_dim,dtype,mask,softcap",
                         [case + (False,) for case in SUBSET] + [case + (True,) for case in SOFTCAP_SUBSET])
def test_compiled_kernel_resources(arch, kind, head_dim, dtype, mask, softcap):
    row = report.report_row(report.spec_of(kind, head_dim, dtype, arch, mask, softcap))
    assert row["mask"] == mask and row["softcap"] == softcap
    assert row["spill_bytes"] == 0, row
    assert 0 < row["registers"] <= 255, row
    assert row["shared_bytes"] <= SHARED_LIMIT[arch], row
    if kind in ("forward_step", "backward_dkdv", "backward_dq") and dtype != "fp32":
        assert row["tensor_core_op"] == ("HGMMA" if arch == "sm_90" else "HMMA"), row


def test_cli_writes_json_rows(tmp_path, capsys):
    path = tmp_path / "report.json"
    status = report.main(["--arch", "sm_80", "--kind", "delta", "--dtype", "fp16", "--head-dim", "64",
                          "--json", str(path)])
    assert status == 0
    rows = json.loads(path.read_text())
    assert len(rows) == 1
    assert {"kernel", "arch", "registers", "spill_bytes", "shared_bytes", "tensor_core"} <= set(rows[0])
    assert "### delta" in capsys.readouterr().out


def test_variants_cover_the_mask_classes():
    specs = report.variants(archs=("sm_90",), dtypes=("fp16",), head_dims=(64,))
    classes = {(spec.kind, spec.mask_class) for spec in specs}
    for kind in ("forward_step", "backward_dkdv", "backward_dq"):
        assert {c for k, c in classes if k == kind} == {"full", "causal", "bool", "bias", "pos", "pos+docs",
                                                        "pos+pad", "pos+docs+pad"}
    assert {c for k, c in classes if k in ("finalize", "delta")} == {"full"}
    step_kinds = ("forward_step", "backward_dkdv", "backward_dq")
    assert {(spec.kind, spec.softcap) for spec in specs} == \
        {(kind, cap) for kind in step_kinds for cap in (False, True)} | {("finalize", False), ("delta", False)}
    masked_only = report.variants(archs=("sm_80",), dtypes=("bf16",), head_dims=(128,), masks=("bool", "bias"),
                                  softcaps=(False,))
    assert len(masked_only) == 6 and all(spec.mask in ("bool", "bias") for spec in masked_only)
    capped = report.variants(archs=("sm_80",), dtypes=("bf16",), head_dims=(128,), softcaps=(True,))
    assert len(capped) == 3 * 8 and all(spec.softcap for spec in capped)


def test_masked_arguments_compile_as_a_launch_passes_them():
    """No mask: the five mask arguments are constexpr None (the unmasked binary); a mask: a uint8 or
    input-dtype pointer, a unit key stride, the other strides plain ints."""
    plain = report.ast_source(report.spec_of("forward_step", 64, "fp16", "sm_90", "full"))
    for name in ("mask_ptr", "stride_mb", "stride_mh", "stride_mq", "stride_mk"):
        assert plain.signature[name] == "constexpr"
        index = (plain.fn.arg_names.index(name),)
        assert index in plain.constants and plain.constants[index] is None
    for mask, pointer in (("bool", "*u8"), ("bias", "*fp16")):
        source = report.ast_source(report.spec_of("forward_step", 64, "fp16", "sm_90", mask))
        assert source.signature["mask_ptr"] == pointer
        assert source.signature["stride_mk"] == "constexpr" and source.signature["stride_mq"] == "i32"


def test_position_mask_arguments_compile_as_a_launch_passes_them():
    """A positions mask passes int32 positions and the window bounds, document ids and their batch strides
    only with documents, key validity (uint8) only with key padding; everything else is None."""
    tile_args = {"mask_ptr", "stride_mb", "stride_mh", "stride_mq", "stride_mk"}
    doc_args = {"q_doc_ptr", "k_doc_ptr", "stride_qdocb", "stride_kdocb"}
    pad_args = {"k_valid_ptr", "stride_kvb"}
    for mask_class, present in (("pos", set()), ("pos+docs", doc_args), ("pos+pad", pad_args),
                                ("pos+docs+pad", doc_args | pad_args)):
        source = report.ast_source(report.spec_of("backward_dq", 64, "bf16", "sm_80", mask_class))
        assert source.signature["q_pos_ptr"] == "*i32" and source.signature["window_left"] == "i32"
        for name in tile_args | doc_args | pad_args:
            assert (source.signature[name] == "constexpr") == (name not in present), (mask_class, name)
        if pad_args <= present:
            assert source.signature["k_valid_ptr"] == "*u8"
    for mask_class in ("full", "bool"):
        source = report.ast_source(report.spec_of("forward_step", 64, "fp16", "sm_90", mask_class))
        assert all(source.signature[name] == "constexpr" for name in ("q_pos_ptr", "window_right", "k_valid_ptr"))


def test_softcap_argument_compiles_as_a_launch_passes_it():
    """Without a soft-cap the cap argument is constexpr None and SOFTCAP False (the un-capped binary); with one,
    an fp32 argument and SOFTCAP True."""
    for kind in ("forward_step", "backward_dkdv", "backward_dq"):
        plain = report.ast_source(report.spec_of(kind, 64, "fp16", "sm_90", "causal"))
        assert plain.signature["softcap"] == "constexpr" and plain.signature["SOFTCAP"] == "constexpr"
        assert plain.constants[(plain.fn.arg_names.index("softcap"),)] is None
        assert plain.constants[(plain.fn.arg_names.index("SOFTCAP"),)] is False
        capped = report.ast_source(report.spec_of(kind, 64, "fp16", "sm_90", "causal", softcap=True))
        assert capped.signature["softcap"] == "fp32"
        assert capped.constants[(capped.fn.arg_names.index("SOFTCAP"),)] is True
