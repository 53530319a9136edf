"""The schedule cost model: byte counts checked by hand, feasibility, the time model and the auto pick,
and the simulate CLI."""
import contextlib
import io

import pytest
import sympy
import torch

from burstc.schedule.cost import KV_RING, QUERY_RING, AttentionShape
from burstc.schedule.predict import (REFERENCE, SCHEDULES, bytes_by_link, choose_schedule, feasibility, predict,
                                     predict_all, predict_reference)
from burstc.schedule.simulate import main as simulate_main
from burstc.schedule.topology import INTER, INTRA, LinkSpec, Topology


def shape(hq=4, hkv=2, d=8, rows=10, g=4, b=1, dtype=torch.float32):
    return AttentionShape(batch=b, heads_q=hq, heads_kv=hkv, head_dim=d, local_rows=rows, world_size=g, dtype=dtype)


def links(intra=1e9, inter=1e9, intra_lat=0.0, inter_lat=0.0):
    return {INTRA: LinkSpec(intra, intra_lat), INTER: LinkSpec(inter, inter_lat)}


# G = 4 ranks in P = 2 nodes of n = 2: nodes {0, 1} and {2, 3}. Shape: B = 1, H = 4, Hk = 2, d = 8,
# float32 (e = a = 4), L = 10 rows per rank. K, V of one rank's shard: 10 rows * 2 * 2 heads * 8 * 4 B.
KV_CHUNK = 10 * 2 * 2 * 8 * 4  # 1280 bytes


def test_ring_bytes_by_hand():
    s, t = shape(), Topology(4, 2)
    # Edges 0->1 and 2->3 stay in a node, 1->2 and 3->0 cross; each edge carries 3 chunks (G - 1 hops).
    assert bytes_by_link(s, t, "ring", "forward") == {INTRA: 2 * 3 * 1280, INTER: 2 * 3 * 1280}
    # KV ring backward: K, V (e) + dK, dV (a) = 2 * 1280 per chunk.
    assert bytes_by_link(s, t, "ring", "backward", KV_RING) == {INTRA: 2 * 3 * 2560, INTER: 2 * 3 * 2560}
    # Query ring: Q, dO (32 B per head-row each), D, lse (4 B each) = 4 heads * 72 B, dQ 4 * 32 B; 10 rows.
    per_hop = 10 * (4 * 72 + 4 * 32)
    assert per_hop == 4160
    assert bytes_by_link(s, t, "ring", "backward", QUERY_RING) == {INTRA: 6 * per_hop, INTER: 6 * per_hop}


def test_double_ring_bytes_by_hand():
    s, t = shape(), Topology(4, 2)
    # Each rank: one inner hop per outer cycle (2 cycles) and one outer hop; 4 ranks.
    assert bytes_by_link(s, t, "double_ring", "forward") == {INTRA: 4 * 2 * KV_CHUNK, INTER: 4 * 1 * KV_CHUNK}
    assert bytes_by_link(s, t, "double_ring", "backward") == {INTRA: 8 * 2560, INTER: 4 * 2560}
    # Same total as the flat ring (G - 1 hops per rank), fewer of them across nodes.
    fwd_ring = bytes_by_link(s, t, "ring", "forward")
    assert sum(bytes_by_link(s, t, "double_ring", "forward").values()) == sum(fwd_ring.values()) == 15360


def test_ulysses_bytes_by_hand():
    s, t = shape(), Topology(4, 2)
    # After the all-to-all each rank holds h = 2 query heads and c = 1 K/V head of its node's 20 rows.
    # Forward all-to-all in: each rank sends its peer 10 rows of q (2 heads) and k, v (1 head each),
    # 32 B per head-row: 10 * 4 * 32 = 1280; out back: 10 * 2 * 32 = 640, and lse (4 B a head-row):
    # 10 * 2 * 4 = 80. Four ranks.
    fwd = bytes_by_link(s, t, "ulysses_ring", "forward")
    assert fwd[INTRA] == 4 * (1280 + 640 + 80)
    # Ring over the 2 nodes: one hop of a 20-row chunk of k, v with 1 head: 20 * 2 * 32 = 1280 per rank.
    assert fwd[INTER] == 4 * 1280
    # Backward in: q, k, v, dout (2 + 1 + 1 + 2 head-rows of 32 B) + lse and D = rowsum(dO O) (2 heads *
    # 4 B each) per row; back: dq, dk, dv (4 head-rows of 8 * 4 B). KV ring over nodes: k, v + dk, dv,
    # 20 rows * 4 * 32 B.
    bwd = bytes_by_link(s, t, "ulysses_ring", "backward", KV_RING)
    assert bwd == {INTRA: 4 * 10 * (6 * 32 + 2 * 8 + 4 * 32), INTER: 4 * 20 * 4 * 32}
    # Query ring over nodes: q, dO (2 heads * 32 B each), D, lse (2 heads * 4 B each), dQ (2 * 32 B).
    assert bytes_by_link(s, t, "ulysses_ring", "backward", QUERY_RING)[INTER] == 4 * 20 * (2 * 72 + 2 * 32)


def test_ulysses_bytes_bf16_and_replicated_kv():
    # bfloat16 (e = 2, a = 4), H = 4, Hk = 1 over nodes of 2: each rank keeps a copy of the one K/V head.
    s, t = shape(hkv=1, dtype=torch.bfloat16), Topology(4, 2)
    head_row_e, head_row_a = 8 * 2, 8 * 4
    fwd = bytes_by_link(s, t, "ulysses_ring", "forward")
    # q (2 heads), k, v (1 each), out (2 heads); lse (2 heads, 4 B)
    assert fwd[INTRA] == 4 * 10 * (head_row_e * (2 + 2 + 2) + 2 * 4)
    assert fwd[INTER] == 4 * 20 * 2 * head_row_e
    bwd = bytes_by_link(s, t, "ulysses_ring", "backward", KV_RING)
    assert bwd[INTRA] == 4 * 10 * (head_row_e * 6 + 2 * 2 * 4 + head_row_a * 4)  # q, k, v, dout; lse, D; grads
    assert bwd[INTER] == 4 * 20 * 2 * (head_row_e + head_row_a)


def test_ulysses_degenerate_topologies():
    s = shape()
    one_per_node = Topology(4, 1)  # no all-to-all: the ring over nodes is the flat ring
    assert bytes_by_link(s, one_per_node, "ulysses_ring", "forward") == {INTRA: 0, INTER: 4 * 3 * KV_CHUNK}
    one_node = Topology(4, 4)  # no ring over nodes
    assert bytes_by_link(s, one_node, "ulysses_ring", "forward")[INTER] == 0
    assert bytes_by_link(s, one_node, "ulysses_ring", "backward")[INTER] == 0


def test_one_node_ring_equals_double_ring():
    s, t = shape(), Topology(4, 4)
    for phase in ("forward", "backward"):
        ring = bytes_by_link(s, t, "ring", phase)
        assert ring == bytes_by_link(s, t, "double_ring", phase)
        assert ring[INTER] == 0
    p = predict_all(s, t, causal=True, scheme="auto")
    assert p["ring"].total_s == p["double_ring"].total_s


@pytest.mark.parametrize("world,node", [(4, 2), (8, 2), (8, 4), (6, 3), (16, 4)])
def test_topology_aware_schedules_send_fewer_inter_node_bytes(world, node):
    s = shape(hq=12, hkv=12, g=world)
    for phase in ("forward", "backward"):
        ring = bytes_by_link(s, Topology(world, node), "ring", phase)[INTER]
        for sched in ("double_ring", "ulysses_ring"):
            assert bytes_by_link(s, Topology(world, node), sched, phase)[INTER] < ring


def test_ulysses_infeasible_with_few_heads():
    s, t = shape(hq=2, hkv=2, g=8), Topology(8, 4)
    assert feasibility(s, t, "ulysses_ring") == "2 query heads do not split over nodes of 4 ranks"
    assert feasibility(s, t, "ring") is None and feasibility(s, t, "double_ring") is None
    with pytest.raises(ValueError, match="2 query heads do not split"):
        bytes_by_link(s, t, "ulysses_ring", "forward")
    p = predict(s, t, "ulysses_ring", causal=True, scheme=KV_RING)
    assert p.reason is not None and p.total_s is None and p.bytes_by_link is None
    pick, preds = choose_schedule(s, t, causal=True, scheme=KV_RING)
    assert pick != "ulysses_ring"
    with pytest.raises(ValueError, match=r"2 query heads do not split.*choose one of auto, ring, double_ring"):
        choose_schedule(s, t, "ulysses_ring", causal=True, scheme=KV_RING)
    # K/V heads that neither divide by the node size nor divide it
    assert "3 K/V heads" in feasibility(shape(hq=6, hkv=3), Topology(4, 2), "ulysses_ring")


def test_unknown_names_raise_naming_the_choices():
    s, t = shape(), Topology(4, 2)
    with pytest.raises(ValueError, match="ring, double_ring, ulysses_ring"):
        bytes_by_link(s, t, "tree", "forward")
    with pytest.raises(ValueError, match="forward, backward"):
        bytes_by_link(s, t, "ring", "sideways")
    with pytest.raises(ValueError, match="auto, ring, double_ring, ulysses_ring"):
        choose_schedule(s, t, "tree", causal=False, scheme=KV_RING)
    with pytest.raises(ValueError, match="query_ring"):
        predict(s, t, "ring", causal=False, scheme="bogus")
    with pytest.raises(ValueError, match="topology has 8"):
        bytes_by_link(s, Topology(8, 2), "ring", "forward")


def test_time_model_by_hand():
    # Non-causal flops of the call: 4 * B * H * N^2 * d with N = 4 * 10 = 40: 204800; per rank per step
    # (G = 4 steps) at 1e12 flop/s: 1.28e-8 s. Links without latency: intra 1 GB/s, inter 0.1 GB/s.
    s, t = shape(), Topology(4, 2, links(intra=1e9, inter=1e8))
    c, intra_hop, inter_hop = 204800 / 16 / 1e12, 1280 / 1e9, 1280 / 1e8
    ring = predict(s, t, "ring", causal=False, scheme=KV_RING, flops_per_s=1e12)
    assert ring.forward_s == pytest.approx(c + 3 * inter_hop)  # every step waits for the inter-node hop
    inner = c + intra_hop
    double = predict(s, t, "double_ring", causal=False, scheme=KV_RING, flops_per_s=1e12)
    assert double.forward_s == pytest.approx(inter_hop + inner)
    # Backward: 2.5x the flops, the chunk plus accumulators (2560 B a hop).
    assert double.backward_s == pytest.approx(2560 / 1e8 + 2.5 * c + 2560 / 1e9)
    compute = 3.5 * 4 * c
    assert double.exposed_comm_s == pytest.approx(double.total_s - compute)
    assert ring.steps == double.steps == 4
    # Compute-bound (slow kernel): the rings take the compute time, nothing exposed; Ulysses adds its
    # all-to-alls (forward 2000 B + backward (2080 + 1280) B per rank at 1 GB/s, no latency).
    slow = predict_all(s, t, causal=True, scheme=KV_RING, flops_per_s=1e3)
    compute = 0.5 * 204800 * 3.5 / 4 / 1e3
    for sched in ("ring", "double_ring"):
        assert slow[sched].total_s == pytest.approx(compute)
        assert slow[sched].exposed_comm_s == pytest.approx(0, abs=1e-12)
    assert slow["ulysses_ring"].exposed_comm_s == pytest.approx((2000 + 2080 + 1280) / 1e9)
    assert slow["ulysses_ring"].steps == 2


def test_ulysses_time_by_hand():
    # All-to-all: bytes per rank / bandwidth + (n - 1) latencies, not overlapped; then a ring of P steps.
    s, t = shape(), Topology(4, 2, links(intra=1e9, inter=1e8, intra_lat=1e-6))
    c = 204800 / 4 / 2 / 1e12  # per rank, per step over the 2 nodes
    p = predict(s, t, "ulysses_ring", causal=False, scheme=KV_RING, flops_per_s=1e12)
    a2a_in, a2a_out = 1280 / 1e9 + 1e-6, 720 / 1e9 + 1e-6  # out back, and lse
    assert p.forward_s == pytest.approx(a2a_in + c + 1280 / 1e8 + a2a_out)


def test_symbolic_local_rows():
    L = sympy.Symbol("L", positive=True, integer=True)
    t = Topology(8, 4)
    sym, num = shape(hq=8, hkv=8, g=8, rows=L), shape(hq=8, hkv=8, g=8, rows=4096)
    for sched in SCHEDULES:
        b = bytes_by_link(sym, t, sched, "backward", QUERY_RING)
        assert {k: v.subs(L, 4096) for k, v in b.items()} == bytes_by_link(num, t, sched, "backward", QUERY_RING)
        p = predict(sym, t, sched, causal=True, scheme="auto")
        assert isinstance(p.total_s, sympy.Expr) and p.total_s.free_symbols == {L}
        concrete = predict(num, t, sched, causal=True, scheme="auto").total_s
        assert float(p.total_s.subs(L, 4096)) == pytest.approx(concrete)
    with pytest.raises(TypeError, match="concrete sizes"):
        choose_schedule(sym, t, causal=True, scheme="auto")


def test_auto_avoids_the_flat_ring_over_a_slow_network():
    s = shape(hq=8, hkv=8, rows=4096, g=16)
    t = Topology(16, 4, links(intra=450e9, inter=1e9, intra_lat=5e-6, inter_lat=15e-6))
    pick, preds = choose_schedule(s, t, causal=True, scheme="auto")
    assert pick != "ring"
    assert preds[pick].total_s < preds["ring"].total_s
    assert choose_schedule(s, t, "ring", causal=True, scheme="auto")[0] == "ring"


def test_auto_tie_keeps_the_flat_ring():
    # One node with instant links: all three schedules equal the compute time; ring comes first.
    s, t = shape(hq=4, hkv=4), Topology(4, 4, links(intra=1e30, inter=1e30))
    assert choose_schedule(s, t, causal=True, scheme=KV_RING)[0] == "ring"


def test_reference_is_the_flat_kv_ring():
    s, t = shape(hq=8, hkv=8, rows=1024, g=8), Topology(8, 4)
    ref = predict_reference(s, t, causal=True)
    assert ref.schedule == REFERENCE
    kv = predict(s, t, "ring", causal=True, scheme=KV_RING)
    assert (ref.total_s, ref.bytes_by_link) == (kv.total_s, kv.bytes_by_link)


def test_simulate_cli():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert simulate_main(["--nodes", "2", "--node-size", "2", "--seq-lens", "4K,8K"]) == 0
    text = out.getvalue()
    for name in SCHEDULES + (REFERENCE, "LLaMA-7B-like", "LLaMA-70B-like", "| 4K |", "| 8K |"):
        assert name in text
    assert text.count("** (auto)") == 2 * 2  # one pick per model and sequence length
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        simulate_main(["--nodes", "2", "--node-size", "3", "--seq-lens", "6K"])
    assert "cannot run: 32 query heads do not split over nodes of 3 ranks" in out.getvalue()
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()):
        simulate_main(["--help"])
    assert e.value.code == 0


def test_node_size_from_torchrun_and_sub_groups():
    from burstc.schedule.topology import node_size_of, resolve_node_size

    env = {"LOCAL_WORLD_SIZE": "8"}
    assert resolve_node_size(None, 16, env) == 8  # the default group of 2 nodes of 8
    assert resolve_node_size(None, 4, env) == 4  # a group inside one node
    assert resolve_node_size(None, 2, env, members=[3, 11]) == 1  # one rank on each of two nodes
    assert node_size_of([0, 1, 8, 9], 8) == 2 and node_size_of([0, 8, 1, 9], 8) is None
    assert resolve_node_size(None, 4, env, members=[0, 8, 1, 9]) == 1  # interleaved: every message inter-node
    assert resolve_node_size(2, 4, env) == 2 and resolve_node_size(None, 4, {"BURST_NODE_SIZE": "2", **env}) == 2
    assert resolve_node_size(8, 2, env, members=[4, 5]) == 2  # the machine's node size, a group inside a node
    with pytest.raises(ValueError, match="node_size=3 does not divide"):
        resolve_node_size(3, 4, env)
    assert resolve_node_size(None, 4, {}) == 4  # no torchrun: one node
