"""burstc.trace: Chrome trace JSON with one track per rank and the plan's step count; summary."""
import json

import torch

import burstc
from burstc.launch import run_ranks


def _traced_call(rank, world_size, path):
    q = burstc.shard_sequence(torch.randn(1, 2, 64, 8, generator=torch.Generator().manual_seed(0)),
                              dim=2, layout="zigzag", world_size=world_size, rank=rank).requires_grad_()
    with burstc.trace(path) as t:
        burstc.burst_attention(q, q, q, causal=True).sum().backward()
    return t.summary()


def _compute_steps(events, rank, phase):
    return sorted(e["args"]["step"] for e in events
                  if e["ph"] == "X" and e["pid"] == rank and e["name"] == f"{phase} compute")


def test_trace_has_a_track_per_rank_with_every_step(tmp_path):
    path = tmp_path / "ring.json"
    summaries = run_ranks(2, _traced_call, str(path))
    events = json.loads(path.read_text())["traceEvents"]
    tracks = {e["args"]["name"] for e in events if e["ph"] == "M"}
    assert tracks == {"rank 0", "rank 1"}
    for rank in (0, 1):
        assert _compute_steps(events, rank, "forward") == [0, 1]
        assert _compute_steps(events, rank, "backward") == [0, 1]
        assert any(e["pid"] == rank and e["cat"] == "wait" for e in events if e["ph"] == "X")
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in events if e["ph"] == "X")
    for text in summaries:  # every rank gets the gathered summary
        assert "| 1 | backward | 2 |" in text and "load imbalance" in text


def _traced_ulysses(rank, world_size, path):
    q = burstc.shard_sequence(torch.randn(1, 4, 64, 8, generator=torch.Generator().manual_seed(0)),
                              dim=2, layout="zigzag", world_size=world_size, rank=rank).requires_grad_()
    with burstc.trace(path) as t:
        burstc.burst_attention(q, q, q, causal=True, schedule="ulysses_ring", node_size=2).sum().backward()
    return t.summary()


def test_ulysses_trace_records_group_ranks_and_the_all_to_alls(tmp_path):
    """4 ranks as 2 nodes of 2: each ring over the nodes has 2 steps, its spans sit on the group rank's
    track (not the node index), and the all-to-alls inside the nodes are spans of their own."""
    path = tmp_path / "ulysses.json"
    summaries = run_ranks(4, _traced_ulysses, str(path))
    events = json.loads(path.read_text())["traceEvents"]
    for rank in range(4):
        assert _compute_steps(events, rank, "forward") == [0, 1]
        # forward: q, k, v in, out and lse back; backward: q, k, v, out, dout, lse in, dq, dk, dv back
        assert sum(e["pid"] == rank and e["cat"] == "all_to_all" for e in events if e["ph"] == "X") == 5 + 9
    assert "| 3 | backward | 2 |" in summaries[0]


def test_virtual_ring_trace_and_profiler_labels(tmp_path):
    q = torch.randn(1, 2, 48, 8, requires_grad=True)
    with torch.profiler.profile() as prof, burstc.trace(str(tmp_path / "v.json")) as t:
        burstc.burst_attention(q, q, q, causal=True, virtual_world_size=3).sum().backward()
    events = json.loads((tmp_path / "v.json").read_text())["traceEvents"]
    assert {e["pid"] for e in events if e["ph"] == "X"} == {0, 1, 2}
    assert all(_compute_steps(events, r, "forward") == [0, 1, 2] for r in range(3))
    assert "burst::forward.compute" in {e.name for e in prof.events()}
    assert t.summary().count("| forward |") == 3
