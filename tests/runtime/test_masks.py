"""Masks under the ring (virtual ranks, one process) against single-device SDPA with the same mask
materialised: every mask kind alone and combined, every layout, both backward schemes, GQA, uneven
lengths, tiles smaller than a chunk (BURST_MASK_TILE) so that tiles are skipped, full and partial."""
import itertools

import pytest
import torch

import burstc
from burstc.schedule.cost import KV_RING, QUERY_RING
from tests.runtime.reference import dense_mask, max_errors, random_qkv, run_burst, sdpa_masked_with_grads

B, N = 2, 45


def _docs(lengths):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).view(1, -1).expand(B, -1)


def _padding():
    g = torch.Generator().manual_seed(7)
    kp = torch.rand(B, N, generator=g) > 0.25
    kp[1, :20] = False  # left padding: the first queries of row 1 see no key under causal
    return kp


def _every_third(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx) % 3 != 1


# name -> (burst_attention mask kwargs, dense_mask kwargs)
MASKS = {
    "window": (dict(causal=True, window=(5, 0)), dict(causal=True, window=(5, 0))),
    "window_of_one": (dict(causal=True, window=(0, 0)), dict(causal=True, window=(0, 0))),
    "window_longer_than_sequence": (dict(causal=False, window=(100, 3)), dict(window=(100, 3))),
    "bidirectional_window": (dict(causal=False, window=(4, 6)), dict(window=(4, 6))),
    "padding": (dict(causal=True, key_padding_mask=_padding()), dict(causal=True, key_padding=_padding())),
    "documents_short_and_long": (dict(causal=True, document_ids=_docs([3, 30, 2, 10])),
                                 dict(causal=True, document_ids=_docs([3, 30, 2, 10]))),
    "cu_seqlens": (dict(causal=True, cu_seqlens=torch.tensor([0, 10, 11, 45])),
                   dict(causal=True, document_ids=_docs([10, 1, 34]))),
    "combined": (dict(causal=True, document_ids=_docs([3, 30, 2, 10]), window=(7, None), key_padding_mask=_padding()),
                 dict(causal=True, document_ids=_docs([3, 30, 2, 10]), window=(7, None), key_padding=_padding())),
    "mask_mod": (dict(causal=False, mask_mod=_every_third), dict(mask_mod=_every_third)),
    "mask_mod_and_causal": (dict(causal=True, mask_mod=_every_third), dict(causal=True, mask_mod=_every_third)),
}


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setenv("BURST_MASK_TILE", "4")


@pytest.mark.parametrize("name", sorted(MASKS))
def test_float64_reference_kernel(name):
    kwargs, dense = MASKS[name]
    want_mask = dense_mask(B, N, **dense)
    seed = itertools.count(100)
    schemes = itertools.cycle((QUERY_RING, KV_RING))
    for world_size, layout in itertools.product((2, 3, 8), burstc.LAYOUTS):
        scheme = next(schemes)
        q, k, v, dout = random_qkv(B, 4, 2, N, 8, torch.float64, next(seed))
        got, _ = run_burst(q, k, v, dout, layout=layout, backward=scheme, kernel="reference",
                      virtual_world_size=world_size, **kwargs)
        abs_err, _ = max_errors(got, sdpa_masked_with_grads(q, k, v, dout, want_mask))
        assert abs_err <= 1e-10, (name, world_size, layout, scheme, abs_err)


@pytest.mark.parametrize("name", sorted(MASKS))
def test_float32_cpu_kernel(name):
    kwargs, dense = MASKS[name]
    want_mask = dense_mask(B, N, **dense)
    seed = itertools.count(200)
    for world_size, layout, scheme in itertools.product((2, 3), ("zigzag", "contiguous"), (QUERY_RING, KV_RING)):
        q, k, v, dout = random_qkv(B, 4, 1, N, 16, torch.float32, next(seed))
        got, _ = run_burst(q, k, v, dout, layout=layout, backward=scheme, kernel="cpu",
                      virtual_world_size=world_size, **kwargs)
        abs_err, _ = max_errors(got, sdpa_masked_with_grads(q, k, v, dout, want_mask))
        assert abs_err <= 2e-5, (name, world_size, layout, scheme, abs_err)  # O(1) values (a window of one has zero dq)


@pytest.mark.parametrize("additive", [False, True], ids=["bool", "additive"])
def test_materialised_attn_mask(additive):
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(B, 1, N, N, generator=g) > 0.4
    mask[0, 0, 5] = False  # a row with no visible key
    if additive:
        bias = torch.randn(B, 1, N, N, generator=g, dtype=torch.float64)
        mask = bias.masked_fill(~mask, float("-inf"))
    for world_size, layout, kernel in itertools.product((1, 3), ("zigzag", "striped"), ("reference", "cpu")):
        dtype = torch.float64 if kernel == "reference" else torch.float32
        q, k, v, dout = random_qkv(B, 2, 2, N, 8, dtype, world_size)
        got, _ = run_burst(q, k, v, dout, layout=layout, kernel=kernel, virtual_world_size=world_size,
                      attn_mask=mask if mask.dtype == torch.bool else mask.to(dtype))
        abs_err, _ = max_errors(got, sdpa_masked_with_grads(q, k, v, dout, mask))
        assert abs_err <= (1e-10 if kernel == "reference" else 2e-5), (world_size, layout, kernel, abs_err)


def test_rows_with_no_visible_key_are_zero_with_zero_gradients():
    kp = torch.ones(B, N, dtype=torch.bool)
    kp[1] = False  # batch row 1 attends to nothing
    q, k, v, dout = random_qkv(B, 2, 2, N, 8, torch.float64, 5)
    got, _ = run_burst(q, k, v, dout, causal=True, key_padding_mask=kp, kernel="reference", virtual_world_size=3)
    assert all(bool(torch.isfinite(t).all()) for t in got)
    assert float(got[0][1].abs().max()) == 0.0 and float(got[1][1].abs().max()) == 0.0
    assert float(got[0][0].abs().max()) > 0.0


def test_short_window_sends_only_the_halo():
    """Contiguous layout, window shorter than a chunk: each rank receives only the last `left` rows of
    its predecessor, once; the forward ring runs two steps; the work skipped is counted."""
    world_size, n, left = 4, 64, 3
    q, k, v, dout = random_qkv(1, 2, 2, n, 8, torch.float64, 11)
    got, stats = run_burst(q, k, v, dout, causal=True, window=(left, 0), layout="contiguous", kernel="reference",
                      virtual_world_size=world_size)
    abs_err, _ = max_errors(got, sdpa_masked_with_grads(q, k, v, dout, dense_mask(1, n, causal=True, window=(left, 0))))
    assert abs_err <= 1e-10
    row_bytes = 2 * 2 * 8 * 8  # k and v: 2 heads x 8 dims x float64
    assert stats.forward_bytes == (world_size - 1) * left * row_bytes
    dense_ring = world_size * (world_size - 1) * (n // world_size) * row_bytes
    assert stats.forward_bytes * 10 < dense_ring
    assert stats.skipped_pairs == 2 * (world_size * world_size - (2 * world_size - 1))


@pytest.mark.parametrize("scheme", [KV_RING, QUERY_RING])
def test_a_window_under_zigzag_sends_only_the_halos(scheme):
    """Zigzag, window shorter than a segment: each of a rank's two segments needs the `left` rows before it,
    held by its neighbours; they go straight there (the direct route), once, not round the ring. Exact
    against SDPA, forward and backward."""
    world_size, n, left = 4, 96, 5
    q, k, v, dout = random_qkv(1, 2, 2, n, 8, torch.float64, 12)
    got, stats = run_burst(q, k, v, dout, causal=True, window=(left, 0), layout="zigzag", kernel="reference",
                           backward=scheme, virtual_world_size=world_size)
    abs_err, _ = max_errors(got, sdpa_masked_with_grads(q, k, v, dout, dense_mask(1, n, causal=True, window=(left, 0))))
    assert abs_err <= 1e-10
    halo_rows = (2 * world_size - 2) * left  # segment boundaries between different ranks, `left` rows each
    heads_bytes = 2 * 8 * 8  # 2 heads x 8 dims x float64
    assert stats.forward_bytes == halo_rows * 2 * heads_bytes  # k and v
    # backward: KV ring, k and v out and dk and dv home; query ring, q, dO, lse and D out and dq home
    per_row = 4 * heads_bytes if scheme == KV_RING else 3 * heads_bytes + 2 * 2 * 8
    assert stats.backward_bytes == halo_rows * per_row


def test_masks_that_disagree_with_the_sequence_name_the_fix():
    q, k, v, _ = random_qkv(1, 2, 2, 8, 8, torch.float32, 1)
    with pytest.raises(burstc.BurstInputError, match="covers 9 tokens"):
        burstc.burst_attention(q, k, v, key_padding_mask=torch.ones(1, 9, dtype=torch.bool), virtual_world_size=2)
    with pytest.raises(burstc.BurstInputError, match="query rows over all"):
        burstc.burst_attention(q, k, v, attn_mask=torch.ones(1, 1, 4, 8, dtype=torch.bool), virtual_world_size=2)


def _gloo_cases(rank, world_size):
    import os

    from tests.runtime.test_masks import MASKS
    os.environ["BURST_MASK_TILE"] = "4"
    results = []
    names = ["combined", "padding", "window", "mask_mod_and_causal", "attn_mask"]
    for i, (name, layout) in enumerate(itertools.product(names, ("zigzag", "contiguous"))):
        q, k, v, dout = random_qkv(B, 4, 2, N, 8, torch.float64, 300 + i)
        if name == "attn_mask":
            g = torch.Generator().manual_seed(i)
            full = torch.rand(B, 1, N, N, generator=g) > 0.5
            want_mask, kwargs = full, {}
        else:
            kwargs, dense = MASKS[name]
            want_mask = dense_mask(B, N, **dense)
        shard = lambda x: burstc.shard_sequence(x, dim=2, layout=layout, world_size=world_size, rank=rank)  # noqa: E731
        if name == "attn_mask":
            kwargs = dict(attn_mask=shard(full))  # this rank's query rows over all keys
        ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
        out = burstc.burst_attention(ql, kl, vl, enable_gqa=True, layout=layout, kernel="reference",
                                     backward=QUERY_RING, **kwargs)
        out.backward(shard(dout))
        want = [shard(t) for t in sdpa_masked_with_grads(q, k, v, dout, want_mask)]
        results.append((name, layout, max_errors((out.detach(), ql.grad, kl.grad, vl.grad), want)[0]))
    return results


@pytest.mark.parametrize("world_size", [2, 3])
def test_gloo_ranks(world_size):
    from burstc.launch import run_ranks
    for per_rank in run_ranks(world_size, _gloo_cases):
        for name, layout, abs_err in per_rank:
            assert abs_err <= 1e-10, (world_size, name, layout, abs_err)


def _disagreeing_masks(rank, world_size):
    q, k, v, _ = random_qkv(1, 2, 2, 4, 8, torch.float32, 1)
    try:
        burstc.burst_attention(q, k, v, causal=True, window=(2 + rank, 0))
    except burstc.BurstInputError as e:
        return str(e)
    return None


def test_ranks_passing_different_masks_get_the_same_error():
    from burstc.launch import run_ranks
    errors = run_ranks(2, _disagreeing_masks)
    assert errors[0] == errors[1] and "mask arguments differ" in errors[0]


def test_a_cached_plan_never_evaluates_a_mask_its_owner_changed_in_place():
    """Plans are cached by mask content. A call with padding X (contents A) builds and caches one;
    X is then changed in place; a new tensor holding A hits the cached plan, whose tiles must be
    evaluated from this call's mask, not from X."""
    torch.manual_seed(5)
    q, k, v, dout = random_qkv(2, 4, 2, 24, 8, torch.float64, 41)
    original = torch.rand(2, 24) > 0.3
    original[:, 0] = True
    caller_tensor = original.clone()
    run_burst(q, k, v, dout, key_padding_mask=caller_tensor, causal=True, kernel="reference",
              virtual_world_size=3, layout="striped")
    caller_tensor[:, 5:] = ~caller_tensor[:, 5:]  # the caller reuses its buffer
    got, _ = run_burst(q, k, v, dout, key_padding_mask=original.clone(), causal=True, kernel="reference",
                       virtual_world_size=3, layout="striped")
    want = sdpa_masked_with_grads(q, k, v, dout, dense_mask(2, 24, causal=True, key_padding=original))
    assert max_errors(got, want)[0] <= 1e-10
