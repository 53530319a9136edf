"""burst_attention on real spawned gloo ranks (G = 2, 4) against single-device SDPA; bad inputs raise
the same error on every rank. Each spawn runs many cases: importing torch per rank is the cost."""
import itertools

import pytest
import torch

from burstc.launch import run_ranks


def _correctness_cases(rank, world_size, cases):
    import burstc
    from tests.runtime.reference import max_errors, random_qkv, sdpa_with_grads

    results = []
    for i, (layout, causal, scheme, heads, seq_len, head_dim, kernel, dtype) in enumerate(cases):
        q, k, v, dout = random_qkv(2, *heads, seq_len, head_dim, dtype, seed=100 + i)
        shard = lambda x: burstc.shard_sequence(x, dim=2, layout=layout, world_size=world_size, rank=rank)  # noqa: E731
        ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
        with burstc.comm_stats() as stats:
            out = burstc.burst_attention(ql, kl, vl, causal=causal, enable_gqa=heads[0] != heads[1],
                                         layout=layout, backward=scheme, kernel=kernel)
            out.backward(shard(dout))
        want = [shard(t) for t in sdpa_with_grads(q, k, v, dout, causal)]
        abs_err, rel_err = max_errors((out.detach(), ql.grad, kl.grad, vl.grad), want)
        full_ref = sdpa_with_grads(q, k, v, dout, causal)[0]
        gathered = burstc.unshard_sequence(out, dim=2, layout=layout)
        gather_err = (gathered.double() - full_ref).abs().max().item()
        results.append(dict(case=cases[i], abs_err=abs_err, rel_err=rel_err, gather_err=gather_err,
                            forward_bytes=stats.forward_bytes, backward_bytes=stats.backward_bytes))
    return results


def _cases(world_size):
    f64 = [(layout, causal, scheme, heads, seq_len, 8, "reference", torch.float64)
           for layout, causal, scheme, heads, seq_len in itertools.product(
               ("zigzag", "striped", "contiguous"), (True, False), ("query_ring", "kv_ring"),
               ((4, 4), (4, 1)), (8 * world_size, 8 * world_size + 3))]
    f32 = [(layout, True, scheme, heads, 45, d, "cpu", torch.float32)
           for layout, scheme, heads, d in itertools.product(
               ("zigzag", "striped"), ("query_ring", "kv_ring"), ((4, 4), (8, 2)), (64, 80))]
    return f64 + f32


@pytest.mark.parametrize("world_size", [2, 4])
def test_matches_single_device_sdpa(world_size):
    for rank_results in run_ranks(world_size, _correctness_cases, _cases(world_size)):
        for r in rank_results:
            dtype = r["case"][-1]
            if dtype == torch.float64:
                assert r["abs_err"] <= 1e-10, r
                assert r["gather_err"] <= 1e-10, r
            else:
                assert r["rel_err"] <= 1e-5, r
                assert r["gather_err"] <= 1e-4, r


def _bytes_per_rank(rank, world_size):
    import burstc
    from burstc.schedule.plan import KV, QUERY, build_plan
    from tests.runtime.reference import random_qkv

    out = {}
    for scheme, heads in itertools.product(("auto", "query_ring", "kv_ring"), ((4, 4), (4, 2))):
        q, k, v, dout = random_qkv(1, *heads, 50, 16, torch.float32, seed=1)
        shard = lambda x: burstc.shard_sequence(x, dim=2, layout="zigzag", world_size=world_size, rank=rank)  # noqa: E731
        ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
        with burstc.comm_stats() as stats:
            o = burstc.burst_attention(ql, kl, vl, causal=True, enable_gqa=True, backward=scheme)
            o.backward(shard(dout))
        plan = build_plan(world_size, "zigzag", 50, True)
        hq, hkv, d, e = *heads, 16, 4  # float32: payload and accumulators 4 bytes per element
        kv_row, q_row = 2 * hkv * d * e, hq * (2 * d * e + 2 * e)  # (k, v) / (q, dout, lse, delta) per row
        out[scheme, heads] = (stats.forward_bytes, stats.backward_bytes, plan.rows_sent(KV, rank) * kv_row,
                              {"kv_ring": kv_row * (plan.rows_sent(KV, rank) + plan.rows_sent(KV, rank, True)),
                               "query_ring": q_row * plan.rows_sent(QUERY, rank)
                               + hq * d * e * plan.rows_sent(QUERY, rank, True)})
    return out


def test_byte_counters_per_rank_equal_the_plan():
    for per_rank in run_ranks(2, _bytes_per_rank):
        for (scheme, heads), (fwd, bwd, want_fwd, want_bwd) in per_rank.items():
            assert fwd == want_fwd
            if scheme == "auto":
                assert bwd == want_bwd["query_ring" if heads[0] == heads[1] else "kv_ring"]
            else:
                assert bwd == want_bwd[scheme]


def _bad_inputs(rank, world_size):
    import burstc

    def attempt(make):
        try:
            make()
        except burstc.BurstInputError as e:
            return str(e)
        return None

    x = lambda *shape: torch.randn(*shape)  # noqa: E731
    shard = lambda t: burstc.shard_sequence(t, dim=2, layout="zigzag", world_size=world_size, rank=rank)  # noqa: E731
    full = x(1, 2, 16, 8)
    ok = shard(full)
    return {
        "heads_disagree": attempt(lambda: burstc.burst_attention(
            x(1, 2 + 2 * rank, 8, 8), x(1, 2 + 2 * rank, 8, 8), x(1, 2 + 2 * rank, 8, 8))),
        "dtype_disagree": attempt(lambda: burstc.burst_attention(
            *(ok.to(torch.float64 if rank else torch.float32),) * 3)),
        "wrong_local_length": attempt(lambda: burstc.burst_attention(
            x(1, 2, 6 + 4 * rank, 8), x(1, 2, 6 + 4 * rank, 8), x(1, 2, 6 + 4 * rank, 8))),
        "one_rank_bad_mask": attempt(lambda: burstc.burst_attention(
            ok, ok, ok, attn_mask=torch.ones(8, 8, dtype=torch.bool) if rank == 1 else None)),
        "causal_disagrees": attempt(lambda: burstc.burst_attention(ok, ok, ok, causal=rank == 0)),
        "gqa_without_flag": attempt(lambda: burstc.burst_attention(shard(x(1, 4, 16, 8)), ok, ok)),
        "dropout": attempt(lambda: burstc.burst_attention(ok, ok, ok, dropout_p=0.1)),
        "node_size_disagrees": attempt(lambda: burstc.burst_attention(ok, ok, ok, node_size=1 + rank)),
        "still_works_after_errors": burstc.burst_attention(ok, ok, ok, causal=True).shape,
    }


def test_bad_inputs_raise_on_every_rank_before_the_ring():
    results = run_ranks(2, _bad_inputs)
    for rank, r in enumerate(results):
        assert "ranks disagree on heads_q" in r["heads_disagree"]
        assert "ranks disagree on dtype" in r["dtype_disagree"]
        assert "burstc.shard_sequence" in r["wrong_local_length"] and "expected [8, 8]" in r["wrong_local_length"]
        assert "rank 1: attn_mask must be a 4-D" in r["one_rank_bad_mask"]
        assert "ranks disagree on causal" in r["causal_disagrees"]
        assert "enable_gqa=True" in r["gqa_without_flag"]
        assert "dropout_p" in r["dropout"]
        assert "ranks disagree on node_size" in r["node_size_disagrees"] and "BURST_NODE_SIZE" in r["node_size_disagrees"]
        assert r["still_works_after_errors"] == torch.Size([1, 2, 8, 8])


def _one_rank_skips(rank, world_size, where):
    import os
    import time

    import burstc

    os.environ["BURST_TIMEOUT_S"] = "3"
    q = torch.randn(1, 2, 8, 8, requires_grad=True)
    start = time.monotonic()
    try:
        if where == "forward" and rank == 1:
            return None  # never joins: rank 0 must not wait forever
        out = burstc.burst_attention(q, q, q, causal=True)
        if where == "backward" and rank == 1:
            return None
        out.sum().backward()
    except RuntimeError as e:
        return str(e), time.monotonic() - start
    return "finished"


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_missing_rank_raises_instead_of_hanging(where):
    results = run_ranks(2, _one_rank_skips, where, group_timeout_s=5)
    message, waited = results[0]
    assert waited < 60
    if where == "backward":
        assert "gave up waiting" in message and "BURST_TIMEOUT_S" in message
