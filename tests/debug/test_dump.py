"""options={"dump_dir": ...}: graphs before/after each pass (re-parsable), site plans that match the
plan objects, a schedule picture, summary.json tying them together."""
import ast
import json

import pytest
import torch

from burstc.schedule.plan import build_plan
from tests.models import TinyGPT


@pytest.fixture
def dumped(tmp_path):
    torch._dynamo.reset()
    model = TinyGPT(layers=2, hand_written=True)
    torch.compile(model, backend="burst", options={"dump_dir": str(tmp_path), "inner": "eager"})(
        torch.randint(0, 50, (1, 24)))
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    return folder


def test_graph_dumps_reparse_and_show_the_rewrite(dumped):
    graphs = sorted(p.name for p in dumped.glob("*.py"))
    assert graphs == ["0_dynamo.py", "1_canonicalize.py", "2_rewrite.py"]
    for name in graphs:
        ast.parse((dumped / name).read_text())
    assert "softmax" in (dumped / "0_dynamo.py").read_text()
    assert "scaled_dot_product_attention" in (dumped / "1_canonicalize.py").read_text()
    rewritten = (dumped / "2_rewrite.py").read_text()
    assert rewritten.count("torch.ops.burst.attention.default") == 2
    assert "torch.nn.functional.softmax(" not in rewritten and "torch.nn.functional.softmax(" in (dumped / "0_dynamo.py").read_text()
    assert "# File: " in rewritten  # the user's source lines ride along as comments


def test_summary_ties_the_files_together(dumped):
    summary = json.loads((dumped / "summary.json").read_text())
    assert summary["totals"] == {"converted": 2, "left": 0}
    for site in summary["sites"]:
        assert (dumped / site["plan_file"]).exists()
        picture = dumped / site["picture"]
        assert picture.exists() and picture.read_bytes()[:4] == b"\x89PNG"
        assert "models.py" in site["source"]


def test_plan_table_matches_the_plan_object(dumped):
    summary = json.loads((dumped / "summary.json").read_text())
    site = summary["sites"][0]
    report = (dumped / site["plan_file"]).read_text()
    plan = build_plan(site["world_size"], site["layout"], site["example_seq_len"], site["causal"])
    assert plan.table() in report.replace(" | bytes sent |", " |") or plan.table().splitlines()[0] in report
    for q_rank in range(plan.world_size):
        assert f"q{q_rank} x k{q_rank}: {plan.pair(q_rank, q_rank).mask}" in report


def test_kernel_sources_of_the_sites_are_dumped(dumped):
    summary = json.loads((dumped / "summary.json").read_text())
    kernels = summary["kernels"]
    assert any("forward_step" in k and "causal" in k for k in kernels)  # diagonal pairs
    assert any("forward_step" in k and "causal" not in k for k in kernels)  # off-diagonal pairs
    source = (dumped / next(k for k in kernels if "backward_dq" in k)).read_text()
    assert "# constexprs: {'HEAD_DIM': 8" in source and "@triton.jit" in source
    assert "def backward_dq_kernel(" in source
    ast.parse(source)


def test_torch_compile_debug_gets_burst_dumps(tmp_path, monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "debug_dir_root", str(tmp_path / "torch_compile_debug"))
    monkeypatch.setenv("TORCH_COMPILE_DEBUG", "1")
    torch._dynamo.reset()
    torch.compile(TinyGPT(layers=1), backend="burst", options={"inner": "eager"})(torch.randint(0, 50, (1, 8)))
    torch._dynamo.reset()
    summaries = list(tmp_path.rglob("burst/*/summary.json"))
    assert len(summaries) == 1 and "torch_compile_debug" in str(summaries[0])
