"""burst_attention under every schedule (ring, double_ring, ulysses_ring) against single-device SDPA:
virtual ranks on pretend nodes (every layout, causal or not, MHA / GQA / replicated K/V, uneven
lengths, both backward schemes, masks), the errors that name the fix, the byte counters per link
class against burstc.schedule.predict, and one spawned run of 4 real gloo ranks in nodes of 2."""
import itertools

import pytest
import torch

import burstc
from burstc.schedule import predict
from burstc.schedule.cost import KV_RING, QUERY_RING, AttentionShape
from burstc.schedule.masks import AttentionMask
from burstc.schedule.topology import INTER, INTRA, LinkSpec, Topology
from tests.runtime.reference import (dense_mask, max_errors, random_qkv, run_burst, sdpa_masked_with_grads,
                                     sdpa_with_grads)

SCHEDULES = ("ring", "double_ring", "ulysses_ring")
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """The BURST_* defaults must not leak into these tests (node size, schedule, links)."""
    for name in ("BURST_NODE_SIZE", "LOCAL_WORLD_SIZE", "BURST_SCHEDULE", "BURST_BACKWARD", "BURST_LAYOUT",
                 "BURST_MASK_TILE", "BURST_INTRA_GBS", "BURST_INTER_GBS", "BURST_INTRA_LATENCY_US",
                 "BURST_INTER_LATENCY_US", "BURST_TFLOPS"):
        monkeypatch.delenv(name, raising=False)


def _not_degenerate(*tensors):
    for t in tensors:
        assert t.abs().max() > 0.1, "a zero result would hide a missing contribution"


@pytest.mark.parametrize("layout", burstc.LAYOUTS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_float64_reference_kernel_4_ranks_in_nodes_of_2(schedule, layout):
    seed = itertools.count(1000 * SCHEDULES.index(schedule) + 100 * burstc.LAYOUTS.index(layout))
    for causal, heads, seq_len, scheme in itertools.product(
            (True, False), HEADS.values(), (29, 32), (QUERY_RING, KV_RING)):
        q, k, v, dout = random_qkv(2, *heads, seq_len, 8, torch.float64, next(seed))
        got, _ = run_burst(q, k, v, dout, causal=causal, layout=layout, backward=scheme, kernel="reference",
                           virtual_world_size=4, node_size=2, schedule=schedule)
        want = sdpa_with_grads(q, k, v, dout, causal)
        _not_degenerate(*want)
        abs_err, _ = max_errors(got, want)
        assert abs_err <= 1e-10, (schedule, layout, causal, heads, seq_len, scheme, abs_err)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_float32_cpu_kernel(schedule):
    seed = itertools.count(500)
    cases = [("zigzag", True, (4, 2)), ("striped", False, (8, 8)), ("contiguous", True, (4, 1))]
    for (layout, causal, heads), scheme in itertools.product(cases, (QUERY_RING, KV_RING)):
        q, k, v, dout = random_qkv(2, *heads, 61, 16, torch.float32, next(seed))
        got, _ = run_burst(q, k, v, dout, causal=causal, layout=layout, backward=scheme, kernel="cpu",
                           virtual_world_size=4, node_size=2, schedule=schedule)
        abs_err, _ = max_errors(got, sdpa_with_grads(q, k, v, dout, causal))
        assert abs_err <= 2e-5, (schedule, layout, causal, heads, scheme, abs_err)
        assert all(t.dtype == torch.float32 for t in got)


@pytest.mark.parametrize("world_size,node_size,heads", [(6, 3, (6, 3)), (6, 3, (6, 1)), (8, 2, (4, 2))],
                         ids=["G6n3-gqa", "G6n3-mqa", "G8n2-gqa"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_larger_groups(schedule, world_size, node_size, heads):
    seed = itertools.count(world_size * 100 + heads[1])
    for layout, causal, scheme in [("zigzag", True, QUERY_RING), ("striped", False, KV_RING),
                                   ("contiguous", True, KV_RING)]:
        seq_len = 5 * world_size + 3
        q, k, v, dout = random_qkv(1, *heads, seq_len, 8, torch.float64, next(seed))
        got, _ = run_burst(q, k, v, dout, causal=causal, layout=layout, backward=scheme, kernel="reference",
                           virtual_world_size=world_size, node_size=node_size, schedule=schedule)
        abs_err, _ = max_errors(got, sdpa_with_grads(q, k, v, dout, causal))
        assert abs_err <= 1e-10, (schedule, world_size, node_size, heads, layout, causal, scheme, abs_err)


# --- masks under the schedules ---------------------------------------------------------------------

B, N = 2, 45


def _padding():
    g = torch.Generator().manual_seed(11)
    kp = torch.rand(B, N, generator=g) > 0.25
    kp[1, :13] = False  # left padding: under causal the first queries of row 1 see nothing
    return kp


def _docs(lengths):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).view(1, -1).expand(B, -1)


MASKS = {  # name -> (burst_attention kwargs, dense_mask kwargs)
    "window": (dict(causal=True, window=(5, 0)), dict(causal=True, window=(5, 0))),
    "documents": (dict(causal=True, document_ids=_docs([3, 25, 2, 15])),
                  dict(causal=True, document_ids=_docs([3, 25, 2, 15]))),
    "padding": (dict(causal=False, key_padding_mask=_padding()), dict(key_padding=_padding())),
    "padding_causal": (dict(causal=True, key_padding_mask=_padding()), dict(causal=True, key_padding=_padding())),
    "combined": (dict(causal=True, window=(8, None), document_ids=_docs([10, 30, 5]), key_padding_mask=_padding()),
                 dict(causal=True, window=(8, None), document_ids=_docs([10, 30, 5]), key_padding=_padding())),
}


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("schedule", ["double_ring", "ulysses_ring"])
def test_masks_under_schedules(schedule, name, monkeypatch):
    monkeypatch.setenv("BURST_MASK_TILE", "4")  # tiles smaller than a chunk: skipped, full and partial tiles
    kwargs, dense = MASKS[name]
    want_mask = dense_mask(B, N, **dense)
    seed = itertools.count(700)
    schemes = itertools.cycle((QUERY_RING, KV_RING))
    for layout, heads in itertools.product(burstc.LAYOUTS, ((4, 2), (4, 1))):
        scheme = next(schemes)
        q, k, v, dout = random_qkv(B, *heads, N, 8, torch.float64, next(seed))
        got, _ = run_burst(q, k, v, dout, layout=layout, backward=scheme, kernel="reference",
                           virtual_world_size=4, node_size=2, schedule=schedule, **kwargs)
        want = sdpa_masked_with_grads(q, k, v, dout, want_mask)
        abs_err, _ = max_errors(got, want)
        assert abs_err <= 1e-10, (schedule, name, layout, heads, scheme, abs_err)


def _every_third(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx) % 3 != 1


def test_ulysses_refuses_per_head_masks():
    q, k, v, _ = random_qkv(1, 4, 2, 16, 8, torch.float64, 1)
    attn_mask = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.3
    for masks in (dict(mask_mod=_every_third), dict(attn_mask=attn_mask)):
        with pytest.raises(burstc.BurstInputError, match="per-head parts"):
            burstc.burst_attention(q, k, v, enable_gqa=True, virtual_world_size=4, node_size=2,
                                   schedule="ulysses_ring", kernel="reference", **masks)


# A machine where Ulysses wins the auto choice: slow intra-node links (each double-ring hop moves all
# K/V heads, the all-to-alls fewer bytes), no latencies, compute for free; 8 ranks in nodes of 4.
ULYSSES_WINS = dict(intra=LinkSpec(1e9, 0.0), inter=LinkSpec(1e8, 0.0))
ULYSSES_ENV = {"BURST_INTRA_GBS": "1", "BURST_INTER_GBS": "0.1", "BURST_INTRA_LATENCY_US": "0",
               "BURST_INTER_LATENCY_US": "0", "BURST_TFLOPS": "1000000"}


def _choose(shape, topo, mask):
    """The schedule choice for a call with `mask` (an AttentionMask or None), as prepare_run makes it."""
    return predict.choose_schedule(shape, topo, "auto", causal=False, scheme=KV_RING, flops_per_s=1e18,
                                   per_head_mask=mask is not None and mask.per_head)


def test_auto_schedule_never_picks_ulysses_for_per_head_masks_in_the_model():
    shape = AttentionShape(1, 8, 8, 16, 8, 8, torch.float64)
    topo = Topology(8, 4, ULYSSES_WINS)
    chosen, _ = _choose(shape, topo, None)
    assert chosen == "ulysses_ring", "the setup must make Ulysses the choice without a per-head mask"
    assert _choose(shape, topo, AttentionMask(causal=False, window=(3, 3)))[0] == "ulysses_ring"
    for mask in (AttentionMask(mask_mod=_every_third), AttentionMask(dense=torch.ones(1, 1, 64, 64, dtype=torch.bool))):
        chosen, preds = _choose(shape, topo, mask)
        assert chosen in ("ring", "double_ring") and preds["ulysses_ring"].reason is not None
        assert "per-head" in preds["ulysses_ring"].reason


def _forward_bytes_by_link(**kwargs):
    q, k, v, _ = random_qkv(1, 8, 8, 32, 16, torch.float64, 3)
    with burstc.comm_stats() as stats:
        out = burstc.burst_attention(q, k, v, virtual_world_size=8, node_size=4, kernel="reference", **kwargs)
    return out, stats.bytes_by_link, (q, k, v)


def test_auto_schedule_never_picks_ulysses_for_per_head_masks_at_runtime(monkeypatch):
    for name, value in ULYSSES_ENV.items():
        monkeypatch.setenv(name, value)
    shape = AttentionShape(1, 8, 8, 16, 4, 8, torch.float64)
    topo = Topology(8, 4)
    want = {s: predict.bytes_by_link(shape, topo, s, "forward") for s in SCHEDULES}
    assert len({tuple(w.values()) for w in want.values()}) == 3, "the schedules must be told apart by bytes"

    _, unmasked, _ = _forward_bytes_by_link(schedule="auto")
    assert unmasked == want["ulysses_ring"], "the environment must make auto pick Ulysses without a mask"

    everything = lambda b, h, q_idx, kv_idx: q_idx >= 0  # noqa: E731 - a per-head mask hiding nothing
    out, masked, (q, k, v) = _forward_bytes_by_link(schedule="auto", mask_mod=everything)
    assert masked in (want["ring"], want["double_ring"]), masked
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (out - ref).abs().max() <= 1e-10

    full = torch.ones(1, 1, 32, 32, dtype=torch.bool)
    out, masked, _ = _forward_bytes_by_link(schedule="auto", attn_mask=full)
    assert masked in (want["ring"], want["double_ring"]), masked
    assert (out - ref).abs().max() <= 1e-10


def test_bad_node_size_and_schedule_name_the_fix():
    q, k, v, _ = random_qkv(1, 4, 4, 16, 8, torch.float64, 2)
    with pytest.raises(burstc.BurstInputError, match="node_size"):
        burstc.burst_attention(q, k, v, virtual_world_size=4, node_size=3, schedule="double_ring")
    with pytest.raises(burstc.BurstInputError) as err:
        burstc.burst_attention(q, k, v, virtual_world_size=4, node_size=2, schedule="tree")
    assert "tree" in str(err.value) and all(s in str(err.value) for s in SCHEDULES + ("auto",))


def test_ulysses_needs_heads_that_split_over_the_node():
    q, k, v, dout = random_qkv(1, 3, 3, 16, 8, torch.float64, 2)
    with pytest.raises(burstc.BurstInputError, match="heads"):
        burstc.burst_attention(q, k, v, virtual_world_size=4, node_size=2, schedule="ulysses_ring")
    # auto falls back to a schedule that can run, and is exact
    got, _ = run_burst(q, k, v, dout, virtual_world_size=4, node_size=2, schedule="auto", kernel="reference")
    assert max_errors(got, sdpa_with_grads(q, k, v, dout, False))[0] <= 1e-10


# --- bytes per link class --------------------------------------------------------------------------

BYTES_CASES = [(4, 2, 4, 2), (4, 2, 4, 1), (6, 3, 6, 3), (8, 2, 4, 4)]  # G, n, Hq, Hkv


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_bytes_by_link_equal_the_prediction(schedule):
    for (world_size, node_size, hq, hkv), scheme, dtype in itertools.product(
            BYTES_CASES, (QUERY_RING, KV_RING), (torch.float32, torch.float64)):
        seq_len = 4 * world_size  # no padding under zigzag
        q, k, v, dout = random_qkv(1, hq, hkv, seq_len, 8, dtype, 4)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        kernel = "reference" if dtype == torch.float64 else "cpu"
        with burstc.comm_stats() as fwd:
            out = burstc.burst_attention(q, k, v, enable_gqa=hq != hkv, virtual_world_size=world_size,
                                         node_size=node_size, schedule=schedule, backward=scheme, kernel=kernel)
        with burstc.comm_stats() as bwd:
            out.backward(dout)
        shape = AttentionShape(1, hq, hkv, 8, seq_len // world_size, world_size, dtype)
        topo = Topology(world_size, node_size)
        case = (schedule, world_size, node_size, hq, hkv, scheme, dtype)
        assert fwd.bytes_by_link == predict.bytes_by_link(shape, topo, schedule, "forward", scheme), case
        assert bwd.bytes_by_link == predict.bytes_by_link(shape, topo, schedule, "backward", scheme), case
        assert fwd.forward_bytes == sum(fwd.bytes_by_link.values()) and fwd.backward_bytes == 0
        assert bwd.backward_bytes == sum(bwd.bytes_by_link.values()) and bwd.forward_bytes == 0


def test_topology_aware_schedules_send_fewer_inter_node_bytes():
    inter = {}
    for schedule in SCHEDULES:
        q, k, v, dout = random_qkv(2, 4, 2, 32, 8, torch.float32, 5)
        got, stats = run_burst(q, k, v, dout, virtual_world_size=4, node_size=2, schedule=schedule,
                               backward=KV_RING, kernel="cpu")
        inter[schedule] = stats.bytes_by_link[INTER]
        assert stats.bytes_by_link[INTRA] > 0
    assert inter["double_ring"] < inter["ring"] and inter["ulysses_ring"] < inter["ring"], inter


# --- real gloo ranks -------------------------------------------------------------------------------

GLOO_N, GLOO_HEADS = 30, (4, 2)


def _gloo_schedules(rank, world_size):
    import os

    import burstc
    from tests.runtime.reference import random_qkv, sdpa_with_grads

    os.environ["BURST_NODE_SIZE"] = "2"  # the node size comes from the environment, as under a launcher
    results = {"correct": [], "bytes": {}}
    cases = [(s, "zigzag", QUERY_RING if i % 2 else KV_RING, "reference", torch.float64)
             for i, s in enumerate(SCHEDULES)]
    cases += [("double_ring", "striped", QUERY_RING, "reference", torch.float64),
              ("ulysses_ring", "contiguous", KV_RING, "cpu", torch.float32)]
    for i, (schedule, layout, scheme, kernel, dtype) in enumerate(cases):
        q, k, v, dout = random_qkv(2, *GLOO_HEADS, GLOO_N, 8, dtype, seed=40 + i)  # same seed on every rank
        shard = lambda x: burstc.shard_sequence(x, dim=2, layout=layout, world_size=world_size, rank=rank)  # noqa: E731
        ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
        out = burstc.burst_attention(ql, kl, vl, causal=True, enable_gqa=True, layout=layout, backward=scheme,
                                     kernel=kernel, schedule=schedule)
        out.backward(shard(dout))
        gathered = [burstc.unshard_sequence(t.detach(), dim=2, layout=layout) for t in (out, ql.grad, kl.grad, vl.grad)]
        want = sdpa_with_grads(q, k, v, dout, True)
        err = max((a.double() - b).abs().max().item() for a, b in zip(gathered, want))
        results["correct"].append((schedule, layout, scheme, kernel, str(dtype), err))
    # masks on real ranks: chunks stop early, partial sums go home at many steps (small tiles)
    from tests.runtime.reference import dense_mask, sdpa_masked_with_grads
    os.environ["BURST_MASK_TILE"] = "4"
    docs = torch.repeat_interleave(torch.arange(3), torch.tensor([7, 15, 8])).view(1, -1).expand(2, -1)
    for i, (schedule, scheme) in enumerate(itertools.product(("double_ring", "ulysses_ring"), (QUERY_RING, KV_RING))):
        q, k, v, dout = random_qkv(2, *GLOO_HEADS, GLOO_N, 8, torch.float64, seed=80 + i)
        shard = lambda x: burstc.shard_sequence(x, dim=2, layout="zigzag", world_size=world_size, rank=rank)  # noqa: E731
        ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
        out = burstc.burst_attention(ql, kl, vl, causal=True, enable_gqa=True, backward=scheme, kernel="reference",
                                     schedule=schedule, document_ids=docs, window=(6, 0))
        out.backward(shard(dout))
        gathered = [burstc.unshard_sequence(t.detach(), dim=2, layout="zigzag") for t in (out, ql.grad, kl.grad, vl.grad)]
        want = sdpa_masked_with_grads(q, k, v, dout, dense_mask(2, GLOO_N, causal=True, window=(6, 0), document_ids=docs))
        err = max((a - b).abs().max().item() for a, b in zip(gathered, want))
        results["correct"].append((schedule, "zigzag (documents + window)", scheme, "reference", str(torch.float64), err))
    del os.environ["BURST_MASK_TILE"]
    # attention-parallel mode's op: the full sequence on every rank in, the gathered result out
    import burstc.runtime.op  # noqa: F401  (registers torch.ops.burst)
    for i, schedule in enumerate(SCHEDULES):
        q, k, v, dout = random_qkv(2, *GLOO_HEADS, GLOO_N, 8, torch.float64, seed=60 + i)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        no_masks = (None, None, None, [], True, None, None, "", "")
        out, _ = torch.ops.burst.attention(*leaves, *no_masks, None, None, True, "zigzag", "auto", "reference", schedule,
                                           0, "", "", "")
        out.backward(dout)
        want = sdpa_with_grads(q, k, v, dout, True)
        err = max((a - b).abs().max().item() for a, b in zip((out, *(t.grad for t in leaves)), want))
        results["correct"].append((schedule, "zigzag (op, full sequence)", "auto", "reference", str(torch.float64), err))
    for schedule, scheme in itertools.product(SCHEDULES, (QUERY_RING, KV_RING)):
        q, k, v, dout = random_qkv(1, *GLOO_HEADS, 32, 8, torch.float32, seed=9)
        shard = lambda x: burstc.shard_sequence(x, dim=2, layout="zigzag", world_size=world_size, rank=rank)  # noqa: E731
        ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
        with burstc.comm_stats() as fwd:
            out = burstc.burst_attention(ql, kl, vl, enable_gqa=True, backward=scheme, kernel="cpu",
                                         schedule=schedule)
        with burstc.comm_stats() as bwd:
            out.backward(shard(dout))
        results["bytes"][schedule, scheme] = (dict(fwd.bytes_by_link), dict(bwd.bytes_by_link))
    return results


def test_gloo_ranks_in_nodes_of_two():
    from burstc.launch import run_ranks

    per_rank = run_ranks(4, _gloo_schedules, timeout_s=180)
    for results in per_rank:
        for schedule, layout, scheme, kernel, dtype, err in results["correct"]:
            tol = 1e-10 if dtype == str(torch.float64) else 2e-5
            assert err <= tol, (schedule, layout, scheme, kernel, dtype, err)
    shape = AttentionShape(1, *GLOO_HEADS, 8, 32 // 4, 4, torch.float32)
    topo = Topology(4, 2)
    for schedule, scheme in itertools.product(SCHEDULES, (QUERY_RING, KV_RING)):
        for i, phase in enumerate(("forward", "backward")):
            total = {c: sum(r["bytes"][schedule, scheme][i][c] for r in per_rank) for c in (INTRA, INTER)}
            assert total == predict.bytes_by_link(shape, topo, schedule, phase, scheme), (schedule, scheme, phase)
            assert total[INTER] > 0
