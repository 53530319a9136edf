"""Masked ring plans: work items checked against the mask materialised independently
(tests/runtime/reference.py), skipped work exactly the empty pairs, transfers only of rows somebody
later reads."""
import itertools
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings, strategies as st

from burstc.schedule.cost import KV_RING, QUERY_RING, AttentionShape, choose_backward
from burstc.schedule.layout import LAYOUTS
from burstc.schedule.masks import EMPTY, FULL, PARTIAL, AttentionMask, documents_from_cu_seqlens
from burstc.schedule.plan import KV, QUERY, SKIPPED, build_plan
from burstc.schedule.route import flat_route
from tests.runtime.reference import dense_mask


def _visible(full_mask, q_pos, k_pos):
    """[Lq, Lk]: visible for some batch row, from the independent materialised mask."""
    return full_mask[:, :, q_pos][..., k_pos].any(dim=1).any(dim=0)


def _covered(pair, n_q, n_k):
    """How many items compute each (query, key) pair, and which pairs unmasked items compute."""
    count = torch.zeros(n_q, n_k, dtype=torch.int64)
    unmasked = torch.zeros(n_q, n_k, dtype=torch.bool)
    for it in pair.items:
        shape = torch.ones(it.q_len, it.k_len, dtype=torch.bool)
        shape = shape.tril() if it.causal else shape
        count[it.q_start:it.q_stop, it.k_start:it.k_stop] += shape
        if not it.masked:
            unmasked[it.q_start:it.q_stop, it.k_start:it.k_stop] |= shape
    return count, unmasked


def _random_documents(seq_len: int, n_docs: int, g: torch.Generator):
    """[1, seq_len] ids of n_docs packed documents cut at random (None for no documents)."""
    if not n_docs:
        return None
    cuts = torch.randint(0, seq_len + 1, (n_docs - 1,), generator=g).sort().values
    return documents_from_cu_seqlens(torch.cat([torch.tensor([0]), cuts, torch.tensor([seq_len])]), seq_len)


@settings(max_examples=40, deadline=None)
@given(world_size=st.integers(1, 5), seq_len=st.integers(1, 70), layout=st.sampled_from(LAYOUTS),
       causal=st.booleans(), left=st.one_of(st.none(), st.integers(0, 20)), right=st.one_of(st.none(), st.integers(0, 20)),
       n_docs=st.integers(0, 5), padded=st.booleans(), tile=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_random_masks_give_exact_plans(world_size, seq_len, layout, causal, left, right, n_docs, padded, tile, seed):
    g = torch.Generator().manual_seed(seed)
    docs = _random_documents(seq_len, n_docs, g)
    padding = torch.rand(2, seq_len, generator=g) > 0.3 if padded else None
    window = None if left is None and right is None else (left, right)
    mask = AttentionMask(causal=causal, window=window, key_padding=padding, document_ids=docs)
    plan = build_plan(world_size, layout, seq_len, causal, mask=mask, tile=tile)
    plan.check(brute_force=True)
    full = dense_mask(2, seq_len, causal=causal, window=window, key_padding=padding,
                      document_ids=None if docs is None else docs.expand(2, -1))
    everywhere = full.all(dim=1).all(dim=0)
    for q_rank, k_rank in itertools.product(range(world_size), repeat=2):
        pair = plan.pair(q_rank, k_rank)
        q_pos, k_pos = plan.positions(q_rank), plan.positions(k_rank)
        seen = _visible(full, q_pos, k_pos)
        assert (pair.mask == SKIPPED) == (not bool(seen.any()))
        count, unmasked = _covered(pair, len(q_pos), len(k_pos))
        assert bool((count[seen] == 1).all()) and bool((count <= 1).all())  # each visible pair exactly once
        assert bool(everywhere[q_pos][:, k_pos][unmasked].all()), "an unmasked item computes a hidden pair"
        for it in pair.items:  # no item is wasted on a region with nothing visible
            assert bool(seen[it.q_start:it.q_stop, it.k_start:it.k_stop].any()), it


def test_classify_proves_empty_and_full_tiles():
    mask = AttentionMask(causal=True, window=(3, None))
    tiles = [torch.arange(a, a + 4) for a in range(0, 16, 4)]
    classes = mask.classify(tiles, tiles)
    assert classes[0] == [PARTIAL, EMPTY, EMPTY, EMPTY]
    assert classes[2][:2] == [EMPTY, PARTIAL]
    docs = torch.tensor([[0] * 8 + [1] * 8])
    classes = AttentionMask(document_ids=docs).classify(tiles, tiles)
    assert classes[0] == [FULL, FULL, EMPTY, EMPTY] and classes[3] == [EMPTY, EMPTY, FULL, FULL]


@pytest.mark.parametrize("window", [1, 16, 100])
def test_window_halo_rows_follow_the_window(window):
    """Contiguous layout: a window of w keys shorter than a chunk needs the last w - 1 keys of the
    predecessor only; the forward ring is two steps; the queries' halo goes the other way round, which
    the relay would cover in G - 1 hops: the plan takes the direct route, one hop each."""
    world_size, n = 4, 512
    plan = build_plan(world_size, "contiguous", n, True, mask=AttentionMask(causal=True, window=(window - 1, 0)), tile=32)
    assert plan.steps == (1 if window == 1 else 2)
    assert plan.rows_sent(KV) == (world_size - 1) * (window - 1)
    assert plan.rows_sent(QUERY) == (world_size - 1) * (window - 1)
    relayed = replace(plan, route=flat_route(plan.route.order))
    assert relayed.rows_sent(KV) == plan.rows_sent(KV)
    assert relayed.rows_sent(QUERY) == (world_size - 1) ** 2 * (window - 1)
    assert plan.route.name == ("ring" if window == 1 else "direct")
    dense = build_plan(world_size, "contiguous", n, True)
    assert plan.rows_sent(KV) < dense.rows_sent(KV) * window / (n // world_size)  # bytes fall with the window
    shape = AttentionShape(1, 4, 4, 64, plan.local_len, world_size, torch.float32)
    if window > 1:  # auto picks the scheme by the plan's bytes
        # relayed, the queries' halo makes G - 1 hops: the KV ring is cheaper
        assert choose_backward(shape, "auto", relayed) == KV_RING
        # direct, both schemes move the halo once; the query ring's partial sums are dq alone, not dk and dv
        assert choose_backward(shape, "auto", plan) == QUERY_RING
        assert choose_backward(shape, "auto") == QUERY_RING
    assert "steps=" in plan.table() and "rows sent" in plan.table()


def test_documents_stop_travelling_when_nobody_needs_them():
    """Eight documents, two ranks: chunk rows that no later query shares a document with stay home."""
    n = 1024
    lengths = torch.tensor([64, 200, 40, 160, 300, 60, 100, 100])
    docs = torch.repeat_interleave(torch.arange(8), lengths).view(1, -1)
    plan = build_plan(2, "zigzag", n, True, mask=AttentionMask(causal=True, document_ids=docs), tile=32)
    dense = build_plan(2, "zigzag", n, True)
    assert plan.rows_sent(KV) < dense.rows_sent(KV)
    plan.check(brute_force=True)


def test_content_masks_share_one_plan_and_functions_rebuild():
    docs = torch.tensor([[0] * 20 + [1] * 12])
    a = build_plan(2, "zigzag", 32, True, mask=AttentionMask(causal=True, document_ids=docs.clone()), tile=4)
    b = build_plan(2, "zigzag", 32, True, mask=AttentionMask(causal=True, document_ids=docs.clone()), tile=4)
    assert a is b
    fn = AttentionMask(causal=True, mask_mod=lambda b, h, q, k: q - k < 5)
    assert build_plan(2, "zigzag", 32, True, mask=fn, tile=4) is not build_plan(2, "zigzag", 32, True, mask=fn, tile=4)


class _DigestedMod:
    """A mask_mod with a digest, like a compiled FlexAttention one: every third key hidden, by a stride."""

    def __init__(self, stride: int):
        self.stride = stride

    def __call__(self, b, h, q_idx, kv_idx):
        return kv_idx % self.stride != 0

    def digest(self) -> bytes:
        return repr(("every", self.stride)).encode()


def test_mask_mods_with_a_digest_share_a_plan_and_eager_callables_do_not():
    def plan(mod):
        return build_plan(2, "zigzag", 32, True, mask=AttentionMask(causal=True, mask_mod=mod), tile=4)
    assert plan(_DigestedMod(3)) is plan(_DigestedMod(3))
    assert plan(_DigestedMod(3)) is not plan(_DigestedMod(5))
    eager = _DigestedMod(3).__call__  # a bound method: no digest, so nothing says what it computes
    assert plan(eager) is not plan(eager)


@settings(max_examples=40, deadline=None)
@given(world_size=st.integers(1, 5), seq_len=st.integers(1, 70), layout=st.sampled_from(LAYOUTS),
       causal=st.booleans(), left=st.one_of(st.none(), st.integers(0, 20)), n_docs=st.integers(0, 5),
       padded=st.booleans(), strided_mod=st.booleans(), tile=st.integers(1, 9), seed=st.integers(0, 2**16),
       schedule=st.sampled_from(["ring", "double_ring"]))
def test_a_rank_plan_is_its_share_of_every_rank_plan(world_size, seq_len, layout, causal, left, n_docs, padded,
                                                     strided_mod, tile, seed, schedule):
    """build_plan(rank=r): r's pairs exactly as in the all-rank plan, the other pairs as summaries of the same
    kind and extent, and the same travel (last steps, rows): so every rank's sends meet the receives."""
    g = torch.Generator().manual_seed(seed)
    docs = _random_documents(seq_len, n_docs, g)
    padding = torch.rand(2, seq_len, generator=g) > 0.3 if padded else None
    mod = _DigestedMod(3) if strided_mod else None
    mask = AttentionMask(causal=causal, window=None if left is None else (left, None), key_padding=padding,
                         document_ids=docs, mask_mod=mod)
    node_size = 1 if schedule == "ring" or world_size == 1 else next(n for n in (2, 1) if world_size % n == 0)
    kwargs = dict(mask=mask, tile=tile, schedule=schedule, node_size=node_size if schedule != "ring" else None)
    every = build_plan(world_size, layout, seq_len, causal, **kwargs)
    for rank in range(world_size):
        mine = build_plan(world_size, layout, seq_len, causal, rank=rank, **kwargs)
        assert mine.last_step == every.last_step and mine.travel_rows == every.travel_rows
        assert mine.route == every.route, "every rank takes the same route"
        for role, step, r in itertools.product((KV, QUERY), range(1, world_size), range(world_size)):
            assert mine.holds(role, step, r) == every.holds(role, step, r)
            if every.holds(role, step, r):
                assert mine.held_rows(role, step, r) == every.held_rows(role, step, r)
        for q_rank, k_rank in itertools.product(range(world_size), repeat=2):
            want, got = every.pair(q_rank, k_rank), mine.pair(q_rank, k_rank)
            if rank in (q_rank, k_rank) or not mask.structured:  # without a structured mask pairs cost nothing
                assert got == want
            else:
                assert not got.detailed and not got.items and got.mask == want.mask
                assert [got.bounds(role) for role in ("kv", "query")] == [want.bounds(role) for role in ("kv", "query")]
        assert mine.skipped_pairs(rank) == every.skipped_pairs(rank)
