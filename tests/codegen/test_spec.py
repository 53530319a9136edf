"""KernelSpec validation and the launch-parameter table."""
import pytest
import torch

from burstc.codegen.spec import (ARCHS, DTYPES, HEAD_DIMS, KINDS, MASKED_KINDS, MASKS, KernelSpec, TileConfig,
                                 select_config)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_variant_has_a_table_row(arch, kind):
    for dtype in DTYPES:
        for head_dim in HEAD_DIMS + (16, 40):
            spec = KernelSpec(kind, head_dim, dtype, arch=arch)
            config = select_config(spec)
            assert isinstance(config, TileConfig) and config.block_m >= 16
            if kind in MASKED_KINDS:
                assert config.block_n >= 16
            assert spec.config == config
            if kind in MASKED_KINDS:
                for mask in MASKS:
                    masked = KernelSpec(kind, head_dim, dtype, arch=arch, mask=mask)
                    assert masked.config.block_m >= 16 and masked.config.block_n >= 16


def test_block_d_pads_to_a_power_of_two():
    assert [KernelSpec("forward_step", d, "fp16").block_d for d in (8, 64, 80, 96, 128, 200, 256)] == \
        [16, 64, 128, 128, 128, 256, 256]


def test_constexprs_follow_the_kernel_kind():
    masked = KernelSpec("backward_dq", 96, "fp32", group=4, causal=True, arch="sm_80").constexprs()
    assert masked["HEAD_DIM"] == 96 and masked["BLOCK_D"] == 128 and masked["GROUP"] == 4
    assert masked["CAUSAL"] is True and masked["PRECISION"] == "ieee"
    assert KernelSpec("forward_step", 64, "bf16").constexprs()["PRECISION"] == "tf32"
    assert set(KernelSpec("finalize", 64, "bf16").constexprs()) == {"HEAD_DIM", "BLOCK_D", "BLOCK_M"}
    assert masked["MASK"] == "none"
    bias = KernelSpec("forward_step", 64, "fp16", group=2, arch="sm_90", mask="bias").constexprs()
    assert bias["MASK"] == "bias" and bias["CAUSAL"] is False


def test_mask_classes():
    assert [KernelSpec("forward_step", 64, "fp16", causal=c, mask=m).mask_class
            for c, m in ((False, "none"), (True, "none"), (False, "bool"), (False, "bias"))] == \
        ["full", "causal", "bool", "bias"]
    assert "mask='bool'" in repr(KernelSpec("backward_dq", 64, "fp16", mask="bool"))
    # masked rows narrow the key tile where the unmasked row spills, and only there
    plain, masked = (KernelSpec("forward_step", 128, "bf16", arch="sm_90", mask=m).config for m in ("none", "bool"))
    assert masked.block_n < plain.block_n and masked.block_m == plain.block_m
    assert KernelSpec("backward_dkdv", 128, "fp16", arch="sm_90", mask="bias").config == \
        KernelSpec("backward_dkdv", 128, "fp16", arch="sm_90").config


def test_position_mask_specs():
    specs = [KernelSpec("backward_dkdv", 64, "bf16", mask="positions", documents=d, key_padding=p)
             for d, p in ((False, False), (True, False), (False, True), (True, True))]
    assert [s.mask_class for s in specs] == ["pos", "pos+docs", "pos+pad", "pos+docs+pad"]
    assert [(s.constexprs()["DOCS"], s.constexprs()["PAD"]) for s in specs] == \
        [(False, False), (True, False), (False, True), (True, True)]
    assert len(set(specs)) == 4  # distinct binaries, distinct cache keys
    plain = KernelSpec("forward_step", 64, "fp16")
    assert plain.constexprs()["DOCS"] is False and plain.constexprs()["PAD"] is False
    # positions masks have their own rows where the unmasked row spills, and run it elsewhere
    config = {m: KernelSpec("forward_step", 128, "bf16", arch="sm_90", mask=m).config for m in ("none", "positions")}
    assert config["positions"] == config["none"]
    narrowed = KernelSpec("forward_step", 64, "fp16", arch="sm_90", mask="positions", documents=True).config
    assert narrowed.block_n < KernelSpec("forward_step", 64, "fp16", arch="sm_90").config.block_n


def test_softcap_specs():
    plain, capped = (KernelSpec("backward_dq", 64, "fp16", causal=True, softcap=c) for c in (False, True))
    assert plain.constexprs()["SOFTCAP"] is False and capped.constexprs()["SOFTCAP"] is True
    assert plain != capped  # distinct binaries, distinct cache keys
    with pytest.raises(ValueError, match="take no softcap"):
        KernelSpec("finalize", 64, "fp16", softcap=True)
    # soft-capped variants have their own rows where their mask class's row spills, for every mask class
    for mask in ("none", "bool", "positions"):
        spilling, capped = (KernelSpec("backward_dkdv", 64, "fp32", arch="sm_80", mask=mask, softcap=c).config
                            for c in (False, True))
        assert capped.block_m * capped.block_n < spilling.block_m * spilling.block_n
    assert KernelSpec("backward_dq", 128, "bf16", arch="sm_90", softcap=True).config == \
        KernelSpec("backward_dq", 128, "bf16", arch="sm_90").config


@pytest.mark.parametrize("fields", [
    dict(kind="attention"), dict(dtype="fp64"), dict(arch="sm_70"), dict(head_dim=512), dict(group=0),
    dict(mask="int"), dict(mask="bool", causal=True), dict(kind="finalize", mask="bias"),
    dict(mask="positions", causal=True), dict(kind="delta", mask="positions"), dict(documents=True),
    dict(mask="bool", key_padding=True),
])
def test_invalid_specs_are_refused(fields):
    with pytest.raises(ValueError):
        KernelSpec(**{**dict(kind="forward_step", head_dim=64, dtype="fp16"), **fields})


def test_specs_are_hashable_cache_keys():
    assert len({KernelSpec("forward_step", 64, "fp16"), KernelSpec("forward_step", 64, "fp16")}) == 1
    assert len({KernelSpec("forward_step", 64, "fp16", mask=m) for m in MASKS}) == len(MASKS)


def test_dumps_name_a_soft_capped_sites_variants():
    from burstc.codegen.source import kernel_source, site_specs, variant_name

    specs = site_specs(torch.float16, 64, 2, True, softcap=True)
    steps = [s for s in specs if s.kind in ("forward_step", "backward_dkdv", "backward_dq")]
    assert len(steps) == 6 and all(s.softcap and variant_name(s).endswith("_softcap_sm_90") for s in steps)
    assert "'SOFTCAP': True" in kernel_source(steps[0])
    assert not any(s.softcap for s in site_specs(torch.float16, 64, 2, True))
