import dataclasses
import itertools

import networkx as nx
import pytest
import torch

from burstc.schedule import layout as layouts
from burstc.schedule.plan import DIAGONAL, FULL, SKIPPED, build_plan
from burstc.schedule.topology import flat_ring, ring_order
from burstc.schedule.work import WorkItem


def brute_force_visible(seq_len, layout, world_size, q_rank, k_rank, causal):
    qp = layouts.shard_positions(seq_len, layout, world_size, q_rank)
    kp = layouts.shard_positions(seq_len, layout, world_size, k_rank)
    if not causal:
        return torch.ones(len(qp), len(kp), dtype=torch.bool)
    return kp[None, :] <= qp[:, None]


def covered_by_items(items, n_q, n_k):
    cover = torch.zeros(n_q, n_k, dtype=torch.int64)
    for it in items:
        block = torch.ones(it.q_len, it.k_len, dtype=torch.int64)
        cover[it.q_start:it.q_stop, it.k_start:it.k_stop] += block.tril() if it.causal else block
    return cover


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
@pytest.mark.parametrize("causal", [True, False])
def test_items_cover_exactly_the_visible_pairs(layout, causal):
    for world_size, seq_len in itertools.product(range(1, 6), (1, 7, 16, 23, 40)):
        plan = build_plan(world_size, layout, seq_len, causal)
        for q_rank, k_rank in itertools.product(range(world_size), repeat=2):
            visible = brute_force_visible(seq_len, layout, world_size, q_rank, k_rank, causal)
            pair = plan.pair(q_rank, k_rank)
            cover = covered_by_items(pair.items, *visible.shape)
            assert torch.equal(cover, visible.long()), (world_size, seq_len, q_rank, k_rank, pair)
            expected_mask = (SKIPPED if not visible.any() else FULL if visible.all() else DIAGONAL)
            assert pair.mask == expected_mask


def test_every_rank_meets_every_chunk_once_and_sends_pair_up():
    plan = build_plan(5, "zigzag", 50, True)
    for r in range(5):
        assert sorted(plan.kv_visit(s, r).k_rank for s in range(plan.steps)) == list(range(5))
        assert sorted(plan.query_visit(s, r).q_rank for s in range(plan.steps)) == list(range(5))
    for s in range(plan.steps - 1):
        for src, dst, chunk in plan.transfers(s):
            assert dst == (src + 1) % 5 and plan.held(s + 1, dst) == chunk
    assert plan.transfers(plan.steps - 1) == []


def test_contiguous_causal_skips_exactly_the_upper_triangle():
    plan = build_plan(4, "contiguous", 64, True)
    skipped = {(q, k) for q in range(4) for k in range(4) if plan.pair(q, k).mask == SKIPPED}
    assert skipped == {(q, k) for q in range(4) for k in range(4) if k > q}
    assert plan.skipped_pairs() == 6


def test_zigzag_balances_causal_work():
    plan = build_plan(4, "zigzag", 4096, True)
    work = [sum(plan.pair(q, k).visible_pairs for k in range(4)) for q in range(4)]
    assert max(work) == min(work)
    contiguous = build_plan(4, "contiguous", 4096, True)
    work = [sum(contiguous.pair(q, k).visible_pairs for k in range(4)) for q in range(4)]
    assert max(work) > 6 * min(work)


def test_zigzag_off_diagonal_steps_are_one_kernel_call():
    plan = build_plan(2, "zigzag", 64, True)
    assert plan.pair(1, 0).items == (WorkItem(0, 32, 0, 16, False),)
    assert plan.pair(0, 1).items == (WorkItem(16, 32, 0, 32, False),)
    assert plan.pair(0, 0).items == (WorkItem(0, 32, 0, 32, True),)


def test_check_rejects_a_corrupted_plan():
    plan = build_plan(2, "zigzag", 64, True)
    bad_pair = dataclasses.replace(plan.pair(1, 0), items=(WorkItem(0, 32, 0, 17, False),))
    pairs = (plan.pairs[0], (bad_pair, plan.pairs[1][1]))
    with pytest.raises(AssertionError, match="masked keys|cover|outside"):
        dataclasses.replace(plan, pairs=pairs).check()
    missing = dataclasses.replace(plan.pair(0, 0), items=(WorkItem(0, 31, 0, 32, True),))
    with pytest.raises(AssertionError, match="cover"):
        dataclasses.replace(plan, pairs=((missing, plan.pairs[0][1]), plan.pairs[1])).check()


def test_table_lists_every_step_and_rank():
    plan = build_plan(3, "contiguous", 30, True)
    table = plan.table(bytes_per_row=1234)
    lines = table.splitlines()
    assert len(lines) == 1 + 2 + plan.steps
    assert lines[3].count("diagonal") == 3  # step 0: every rank meets its own chunk
    assert "(k2 skipped)" in lines[4] and "k0 full" in lines[4]  # chunk 2 stopped: nobody later needs it
    assert lines[-1].rstrip(" |").endswith("0")
    assert lines[3].rstrip(" |").endswith(str(20 * 1234))  # after step 0: chunks 0 and 1 travel, 10 rows each


def test_ring_order_from_a_custom_topology():
    ring = nx.DiGraph([(0, 2), (2, 1), (1, 3), (3, 0)])
    assert ring_order(ring) == (0, 2, 1, 3)
    plan = build_plan(4, "zigzag", 32, True, ring=ring)
    assert plan.transfers(0) == [(0, 2, 0), (1, 3, 1), (2, 1, 2), (3, 0, 3)] and plan.held(1, 1) == 2
    with pytest.raises(ValueError, match="not a cycle"):
        ring_order(nx.DiGraph([(0, 1), (1, 0), (2, 3)]))
    with pytest.raises(ValueError, match="several cycles"):
        ring_order(nx.DiGraph([(0, 1), (1, 0), (2, 3), (3, 2)]))
    assert ring_order(flat_ring(3)) == (0, 1, 2)
