"""The whole ring on G virtual ranks in one process against single-device SDPA."""
import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

import burstc
from burstc.schedule.cost import (KV_RING, QUERY_RING, AttentionShape, backward_bytes, backward_bytes_per_row,
                                  forward_bytes)
from burstc.schedule.plan import KV, QUERY, build_plan
from burstc.schedule.layout import local_padded_length
from tests.runtime.reference import max_errors, random_qkv, run_burst, sdpa_with_grads


@pytest.mark.parametrize("world_size", range(1, 9))
def test_float64_reference_kernel_every_layout_and_scheme(world_size):
    seed = itertools.count(world_size * 1000)
    for layout, causal, scheme, (hq, hkv), seq_len in itertools.product(
            burstc.LAYOUTS, (True, False), (QUERY_RING, KV_RING), ((4, 4), (4, 1)), (3 * world_size, 29)):
        q, k, v, dout = random_qkv(2, hq, hkv, seq_len, 8, torch.float64, next(seed))
        got, _ = run_burst(q, k, v, dout, causal=causal, layout=layout, backward=scheme,
                           kernel="reference", virtual_world_size=world_size)
        abs_err, _ = max_errors(got, sdpa_with_grads(q, k, v, dout, causal))
        assert abs_err <= 1e-10, (layout, causal, scheme, hq, hkv, seq_len, abs_err)


@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("heads", [(4, 4), (4, 1), (8, 2)], ids=["mha", "mqa", "gqa4"])
def test_float32_cpu_kernel(head_dim, heads):
    seed = itertools.count(head_dim + heads[1])
    for world_size, layout, causal, scheme in itertools.product(
            (2, 3), ("zigzag", "striped", "contiguous"), (True, False), (QUERY_RING, KV_RING)):
        q, k, v, dout = random_qkv(2, *heads, 61, head_dim, torch.float32, next(seed))
        got, _ = run_burst(q, k, v, dout, causal=causal, layout=layout, backward=scheme,
                           kernel="cpu", virtual_world_size=world_size)
        _, rel_err = max_errors(got, sdpa_with_grads(q, k, v, dout, causal))
        assert rel_err <= 1e-5, (world_size, layout, causal, scheme, rel_err)


def test_half_precision_cpu_kernel_matches_sdpa_within_dtype_tolerance():
    for dtype, scheme in itertools.product((torch.bfloat16, torch.float16), (QUERY_RING, KV_RING)):
        q, k, v, dout = random_qkv(1, 4, 2, 40, 32, dtype, seed=7)
        got, _ = run_burst(q, k, v, dout, causal=True, backward=scheme, kernel="cpu", virtual_world_size=4)
        _, rel_err = max_errors(got, sdpa_with_grads(q, k, v, dout, True))
        assert rel_err <= 3e-2, (dtype, scheme, rel_err)
        assert got[0].dtype == dtype and got[1].dtype == dtype


@settings(max_examples=40, deadline=None)
@given(world_size=st.integers(1, 8), seq_len=st.integers(1, 50), batch=st.integers(1, 2),
       kv_heads=st.integers(1, 3), group=st.integers(1, 3), head_dim=st.sampled_from([4, 8, 12]),
       layout=st.sampled_from(burstc.LAYOUTS), causal=st.booleans(),
       scheme=st.sampled_from(["auto", QUERY_RING, KV_RING]), seed=st.integers(0, 2**16))
def test_random_shapes(world_size, seq_len, batch, kv_heads, group, head_dim, layout, causal, scheme, seed):
    q, k, v, dout = random_qkv(batch, kv_heads * group, kv_heads, seq_len, head_dim, torch.float64, seed)
    got, _ = run_burst(q, k, v, dout, causal=causal, layout=layout, backward=scheme,
                       kernel="reference", virtual_world_size=world_size)
    abs_err, _ = max_errors(got, sdpa_with_grads(q, k, v, dout, causal))
    assert abs_err <= 1e-10


@pytest.mark.parametrize("heads", [(8, 8), (8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_byte_counters_equal_the_cost_model(heads, dtype):
    world_size, seq_len, batch, head_dim = 4, 70, 2, 16
    q, k, v, dout = random_qkv(batch, *heads, seq_len, head_dim, dtype, seed=3)
    shape = AttentionShape(batch, *heads, head_dim, local_padded_length(seq_len, "zigzag", world_size),
                           world_size, dtype)
    plan = build_plan(world_size, "zigzag", seq_len, True)
    sent = {}
    for scheme in ("auto", QUERY_RING, KV_RING):
        _, stats = run_burst(q, k, v, dout, causal=True, backward=scheme, virtual_world_size=world_size)
        sent[scheme] = stats.backward_bytes
        # the plan trims rows nobody later needs (here: the padded tail); the cost model is the dense bound
        assert stats.forward_bytes == plan.rows_sent(KV) * forward_bytes(shape) // shape.local_rows // (world_size - 1)
        assert stats.forward_bytes < world_size * forward_bytes(shape)
        assert stats.steps == 2 * world_size
    for scheme, role in ((QUERY_RING, QUERY), (KV_RING, KV)):
        assert sent[scheme] == plan.rows_sent(role) * batch * backward_bytes_per_row(shape, scheme)
        assert sent[scheme] <= world_size * backward_bytes(shape, scheme)
    assert sent["auto"] == min(sent[QUERY_RING], sent[KV_RING])


def test_skipped_pairs_are_counted_and_not_computed():
    q, k, v, dout = random_qkv(1, 2, 2, 32, 8, torch.float64, seed=5)
    _, stats = run_burst(q, k, v, dout, causal=True, layout="contiguous", kernel="reference", virtual_world_size=4)
    assert stats.skipped_pairs == 2 * 6  # the 6 upper-triangle pairs, forward and backward
    _, stats = run_burst(q, k, v, dout, causal=True, layout="zigzag", kernel="reference", virtual_world_size=4)
    assert stats.skipped_pairs == 0


def test_more_ranks_than_tokens():
    q, k, v, dout = random_qkv(1, 2, 2, 3, 8, torch.float64, seed=9)
    got, _ = run_burst(q, k, v, dout, causal=True, kernel="reference", virtual_world_size=5)
    abs_err, _ = max_errors(got, sdpa_with_grads(q, k, v, dout, True))
    assert abs_err <= 1e-10


def test_single_process_without_a_group_is_plain_attention():
    q, k, v, dout = random_qkv(1, 4, 2, 33, 16, torch.float32, seed=11)
    got, stats = run_burst(q, k, v, dout, causal=True)
    _, rel_err = max_errors(got, sdpa_with_grads(q, k, v, dout, True))
    assert rel_err <= 1e-5 and stats.total_bytes == 0


def test_custom_scale():
    q, k, v, dout = random_qkv(1, 2, 2, 20, 8, torch.float64, seed=13)
    got, _ = run_burst(q, k, v, dout, causal=False, scale=0.37, kernel="reference", virtual_world_size=3)
    abs_err, _ = max_errors(got, sdpa_with_grads(q, k, v, dout, False, scale=0.37))
    assert abs_err <= 1e-10


def test_virtual_transport_matches_messages_in_post_order_like_nccl():
    """NCCL ignores tags: the k-th receive from a sender gets the k-th message it posted. The virtual
    transport matches the same way and raises when the tags disagree, so every virtual run checks
    that both sides of every pair post in one order."""
    from burstc.runtime.transport import VirtualTransport

    a, b = (torch.randn(2),), (torch.randn(3),)
    ok = VirtualTransport(range(2), "forward")
    ok.exchange([(0, 1, a, 10), (0, 1, b, 20)], [])
    got = ok.exchange([], [(0, 1, a, 10), (0, 1, b, 20)]).wait()
    assert got[0][0] is a[0] and got[1][0] is b[0]
    ok.finish()
    swapped = VirtualTransport(range(2), "forward")
    swapped.exchange([(0, 1, a, 10), (0, 1, b, 20)], [])
    with pytest.raises(AssertionError, match="expects tag 20 but the message posted in that order has tag 10"):
        swapped.exchange([], [(0, 1, b, 20), (0, 1, a, 10)]).wait()
    lost = VirtualTransport(range(2), "forward")
    lost.exchange([(0, 1, a, 10)], [])
    with pytest.raises(AssertionError, match="never received"):
        lost.finish()
