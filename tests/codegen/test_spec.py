"""KernelSpec validation and the launch-parameter table."""
import pytest

from burstc.codegen.spec import (ARCHS, DTYPES, HEAD_DIMS, KINDS, MASKED_KINDS, KernelSpec, TileConfig,
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


def test_block_d_pads_to_a_power_of_two():
    assert [KernelSpec("forward_step", d, "fp16").block_d for d in (8, 64, 80, 96, 128, 200, 256)] == \
        [16, 64, 128, 128, 128, 256, 256]


def test_constexprs_follow_the_kernel_kind():
    masked = KernelSpec("backward_dq", 96, "fp32", group=4, causal=True, arch="sm_80").constexprs()
    assert masked["HEAD_DIM"] == 96 and masked["BLOCK_D"] == 128 and masked["GROUP"] == 4
    assert masked["CAUSAL"] is True and masked["PRECISION"] == "ieee"
    assert KernelSpec("forward_step", 64, "bf16").constexprs()["PRECISION"] == "tf32"
    assert set(KernelSpec("finalize", 64, "bf16").constexprs()) == {"HEAD_DIM", "BLOCK_D", "BLOCK_M"}


@pytest.mark.parametrize("fields", [
    dict(kind="attention"), dict(dtype="fp64"), dict(arch="sm_70"), dict(head_dim=512), dict(group=0),
])
def test_invalid_specs_are_refused(fields):
    with pytest.raises(ValueError):
        KernelSpec(**{**dict(kind="forward_step", head_dim=64, dtype="fp16"), **fields})


def test_specs_are_hashable_cache_keys():
    assert len({KernelSpec("forward_step", 64, "fp16"), KernelSpec("forward_step", 64, "fp16")}) == 1
