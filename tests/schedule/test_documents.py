"""Plans of a pure document mask in closed form (burstc.schedule.documents): exact against the mask
materialised independently, with no masked item, on every layout and schedule; document ids that recur
in separate runs; per-row packings keep the tiled plan."""
import itertools

import torch
from hypothesis import given, settings, strategies as st

from burstc.schedule.documents import document_runs, shared_document_row
from burstc.schedule.layout import LAYOUTS, rank_blocks
from burstc.schedule.masks import AttentionMask
from burstc.schedule.plan import SKIPPED, build_plan
from tests.runtime.reference import dense_mask
from tests.schedule.test_masks import _covered, _visible


def _recurring_documents(seq_len: int, n_runs: int, n_ids: int, g: torch.Generator) -> torch.Tensor:
    """[1, seq_len] ids of n_runs runs cut at random, each labelled with one of n_ids ids (so ids recur)."""
    cuts = torch.randint(0, seq_len + 1, (n_runs - 1,), generator=g).sort().values
    lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([seq_len])]))
    labels = torch.randint(0, n_ids, (n_runs,), generator=g)
    return torch.repeat_interleave(labels, lengths).view(1, -1)


@settings(max_examples=60, deadline=None)
@given(world_size=st.integers(1, 6), seq_len=st.integers(1, 80), layout=st.sampled_from(LAYOUTS),
       causal=st.booleans(), n_runs=st.integers(1, 7), n_ids=st.integers(1, 4), seed=st.integers(0, 2**16),
       schedule=st.sampled_from(["ring", "double_ring", "ulysses_ring"]))
def test_document_plans_are_exact_without_masked_items(world_size, seq_len, layout, causal, n_runs, n_ids, seed,
                                                       schedule):
    g = torch.Generator().manual_seed(seed)
    docs = _recurring_documents(seq_len, n_runs, n_ids, g).expand(2, -1)  # a batch of two equal rows
    mask = AttentionMask(causal=causal, document_ids=docs)
    node_size = next(n for n in (2, 1) if world_size % n == 0) if schedule != "ring" else None
    plan = build_plan(world_size, layout, seq_len, causal, mask=mask, schedule=schedule, node_size=node_size)
    plan.check(brute_force=True)
    full = dense_mask(2, seq_len, causal=causal, document_ids=docs)
    for q_rank, k_rank in itertools.product(range(plan.world_size), repeat=2):
        pair = plan.pair(q_rank, k_rank)
        q_pos, k_pos = plan.positions(q_rank), plan.positions(k_rank)
        seen = _visible(full, q_pos, k_pos)
        count, _ = _covered(pair, len(q_pos), len(k_pos))
        assert torch.equal(count, seen.to(torch.int64)), (q_rank, k_rank, pair)  # visible once, hidden never
        assert (pair.mask == SKIPPED) == (not bool(seen.any()))
        assert not any(it.masked for it in pair.items)
    for rank in range(plan.world_size):  # a rank's share: the same travel, its pairs as above
        mine = build_plan(world_size, layout, seq_len, causal, mask=mask, schedule=schedule, node_size=node_size,
                          rank=rank)
        assert mine.travel_rows == plan.travel_rows and mine.last_step == plan.last_step
        assert all(mine.pair(rank, k) == plan.pair(rank, k) for k in range(plan.world_size))


def test_runs_split_blocks_at_every_document_change():
    docs = torch.tensor([0, 0, 1, 1, 1, 0, 2, 2, 2, 2, 2, 2])
    blocks = rank_blocks(12, "zigzag", 2, 0)  # positions 0..2 and 9..11
    runs = [(r.document, r.block.local_start, r.block.global_start, r.block.valid) for r in document_runs(blocks, docs)]
    assert runs == [(0, 0, 0, 2), (1, 2, 2, 1), (2, 3, 9, 3)]


def test_per_row_packings_and_other_parts_keep_the_tiled_plan():
    docs = torch.tensor([[0] * 10 + [1] * 6, [0] * 4 + [1] * 12])
    assert shared_document_row(AttentionMask(causal=True, document_ids=docs)) is None
    assert shared_document_row(AttentionMask(causal=True, document_ids=docs[:1], window=(3, None))) is None
    plan = build_plan(2, "zigzag", 16, True, mask=AttentionMask(causal=True, document_ids=docs), tile=4)
    plan.check(brute_force=True)
    assert any(it.masked for r in range(2) for k in range(2) for it in plan.pair(r, k).items)
