import sympy
import torch

from burstc.schedule.cost import KV_RING, QUERY_RING, AttentionShape, backward_bytes, choose_backward, forward_bytes


def shape(hq, hkv, d=64, dtype=torch.float32, rows=100, g=4, b=2):
    return AttentionShape(batch=b, heads_q=hq, heads_kv=hkv, head_dim=d, local_rows=rows, world_size=g, dtype=dtype)


def test_formulas():
    s = shape(8, 8)
    hops = 2 * 100 * 3
    assert forward_bytes(s) == hops * 2 * 8 * 64 * 4
    assert backward_bytes(s, QUERY_RING) == hops * 8 * (3 * 64 * 4 + 2 * 4)
    assert backward_bytes(s, KV_RING) == hops * 4 * 8 * 64 * 4
    bf = shape(8, 2, dtype=torch.bfloat16)
    assert backward_bytes(bf, QUERY_RING) == hops * 8 * (2 * 64 * 2 + 2 * 4 + 64 * 4)
    assert backward_bytes(bf, KV_RING) == hops * 2 * (2 * 64 * 2 + 2 * 64 * 4)


def test_auto_picks_the_query_ring_for_mha_and_the_kv_ring_for_gqa():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert choose_backward(shape(8, 8, dtype=dtype)) == QUERY_RING
        assert choose_backward(shape(8, 4, dtype=dtype)) == KV_RING
        assert choose_backward(shape(32, 8, dtype=dtype)) == KV_RING
        assert choose_backward(shape(8, 1, dtype=dtype)) == KV_RING
    mha = shape(8, 8)
    assert backward_bytes(mha, QUERY_RING) < 0.8 * backward_bytes(mha, KV_RING)  # ~25% less for MHA
    assert choose_backward(shape(8, 8), KV_RING) == KV_RING


def test_symbolic_sequence_length():
    rows = sympy.Symbol("L", positive=True, integer=True)
    s = shape(8, 8, rows=rows)
    assert forward_bytes(s) == 2 * rows * 3 * 2 * 8 * 64 * 4
    assert choose_backward(s) == QUERY_RING
