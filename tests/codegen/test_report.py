"""Ahead-of-time compiles for sm_90 and sm_80 (no GPU): no spills, tensor cores, shared memory in budget.

A representative subset: both archs, the three kernels of a step and one elementwise kernel, every
dtype, padded and large head dims. `python -m burstc.codegen.report` compiles all variants."""
import json

import pytest

from burstc.codegen import report
from burstc.codegen.spec import KernelSpec, SHARED_LIMIT

pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
if report.cuobjdump() is None:
    pytest.skip("cuobjdump not available (Triton ships it in backends/nvidia/bin)", allow_module_level=True)

SUBSET = [
    ("forward_step", 128, "bf16", True),
    ("forward_step", 256, "fp16", False),
    ("backward_dkdv", 96, "fp16", True),
    ("backward_dq", 64, "bf16", False),
    ("backward_dq", 128, "fp32", True),
    ("finalize", 80, "bf16", False),
]


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("kind,head_dim,dtype,causal", SUBSET)
def test_compiled_kernel_resources(arch, kind, head_dim, dtype, causal):
    row = report.report_row(KernelSpec(kind, head_dim, dtype, 1, causal, arch))
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
