"""The shard pass on Dynamo graphs with a fake 4-rank process group (rank 0): placements, boundaries and
fallbacks, checked on the plan without running anything distributed (the numbers are checked against
eager on real gloo ranks in tests/test_sequence_parallel.py)."""
import logging

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.testing._internal.distributed.fake_pg import FakeStore

from burstc.config import BurstConfig
from burstc.passes.canonicalize import canonicalize_attention
from burstc.passes.find_attention import find_attention_sites
from burstc.passes.plan import plan_sites
from burstc.passes.shard import ShardingError, shard_graph
from burstc.passes.shard_rules import SeqDim, ViewMap
from tests.models import TinyGPT


@pytest.fixture
def fake_world():
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    yield 4
    dist.destroy_process_group()


def sharding(fn, *args, layout="zigzag", **compile_kwargs):
    """(ShardingPlan, sharded GraphModule) of fn's Dynamo graph for rank 0 of 4."""
    captured = []

    def capture(gm, example_inputs):
        captured.append((canonicalize_attention(gm, example_inputs), example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, fullgraph=True, **compile_kwargs)(*args)
    gm, example_inputs = captured[-1]
    plans = plan_sites(find_attention_sites(gm), BurstConfig(layout=layout), 4)
    return shard_graph(gm, example_inputs, plans, layout=layout, world_size=4, rank=0, group_name=""), gm


def boundaries(plan, kind):
    return [b for b in plan.boundaries if b.kind == kind]


def test_tiny_gpt_shards_ids_and_positions_and_sums_every_weight_gradient(fake_world):
    model = TinyGPT(layers=2, heads=4, kv_heads=2)
    plan, gm = sharding(model, torch.randint(0, 50, (2, 30)))
    assert plan.local_len == 6  # zigzag over 8 chunks of 4 (the last has 2): rank 0 holds chunks 0 and 7
    assert [b.tensor for b in boundaries(plan, "shard")] == ["l_idx_", "arange"]
    assert [t.placement for t in plan.tensors if t.op == "embedding"] == ["seq@1", "seq@0"]
    (bucket,) = boundaries(plan, "grad_sum")
    assert f"{len(list(model.parameters()))} replicated inputs" in bucket.reason
    assert [b.tensor for b in boundaries(plan, "output_gather")] == [plan.tensors[-1].name]
    assert not boundaries(plan, "gather")
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.burst.seq_shard.default in ops and torch.ops.burst.seq_gather.default in ops
    # positions enter through the op, taken at run time: no rank's positions are traced in as a constant
    # (Inductor's caches would hand such a graph to another rank)
    (positions,) = [n for n in gm.graph.nodes if n.target is torch.ops.burst.seq_shard.default
                    and getattr(n.args[0], "target", None) is torch.arange]
    assert positions.args[-2] == ""  # an arange is the same on every rank: nothing to fingerprint
    views = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "view"]
    assert views and all(n.args[2] == 6 for n in views)  # the literal 30 became this rank's 6 tokens


def test_a_token_mixing_op_is_gathered_with_its_source_line(fake_world, caplog):
    with caplog.at_level(logging.WARNING, logger="burstc.passes"):
        plan, _ = sharding(TinyGPT(layers=1, conv=True), torch.randint(0, 50, (1, 24)))
    (gather,) = boundaries(plan, "gather")
    assert "conv1d is not token-wise" in gather.reason and "models.py" in gather.source
    assert gather.bytes_per_rank == 24 * 32 * 4  # the full [1, 32, 24] float32 tensor lands on every rank
    assert "conv1d" in caplog.text
    assert len(boundaries(plan, "shard")) == 3  # ids, positions, and the conv's output re-entering


def test_a_short_run_of_tokens_gathers_only_its_rows(fake_world):
    """HF's sliding-window cache keeps k[:, :, -(window - 1):]: those rows are gathered, not the sequence; a
    run longer than half the sequence, or two runs of one tensor (a difference of shifts), share the full
    gather."""
    def f(q):
        y = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        return y.sum(), y[:, :, -5:].clone(), y[..., 3:7, 1:]

    plan, gm = sharding(f, torch.randn(2, 3, 32, 8))
    assert not boundaries(plan, "output_gather") or all(b.tensor != "y" for b in boundaries(plan, "output_gather"))
    rows = [n for n in gm.graph.nodes if n.target == torch.ops.burst.seq_gather_rows.default]
    assert sorted(n.args[-2:] for n in rows) == [(3, 7), (27, 32)]
    gathers = boundaries(plan, "gather")
    assert sorted(b.bytes_per_rank for b in gathers) == [2 * 3 * 4 * 8 * 4, 2 * 3 * 5 * 8 * 4]
    assert all("only its rows are gathered" in b.reason for b in gathers)

    def g(q):
        y = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        return y[:, :, 1:] - y[:, :, :-1]

    plan, gm = sharding(g, torch.randn(2, 3, 32, 8))
    assert not any(n.target == torch.ops.burst.seq_gather_rows.default for n in gm.graph.nodes)
    (gather,) = boundaries(plan, "gather")
    assert gather.bytes_per_rank == 2 * 3 * 32 * 8 * 4


def test_a_tensor_sliced_for_a_cache_is_still_computed_on_this_ranks_tokens(fake_world):
    """k feeds the attention and a cache slice: the slice must not stop k's sharding (k computed whole on
    every rank, then sharded for the attention)."""
    def f(x, w):
        k = (x @ w).view(2, 32, 2, 4).transpose(1, 2)
        y = F.scaled_dot_product_attention(k, k, k, is_causal=True)
        return y.sum(), k[:, :, -3:]

    plan, gm = sharding(f, torch.randn(2, 32, 8), torch.randn(8, 8))
    assert [b.spec for b in boundaries(plan, "shard")] == ["seq@1"]  # x, and nothing computed from it
    assert [b.bytes_per_rank for b in boundaries(plan, "gather")] == [2 * 2 * 3 * 4 * 4]


def test_unflatten_of_another_dim_keeps_the_sequence_sharded(fake_world):
    def f(x, w):
        k = (x @ w).unflatten(-1, (2, 4)).transpose(1, 2)
        return F.scaled_dot_product_attention(k, k, k, is_causal=True).sum()

    plan, _ = sharding(f, torch.randn(2, 32, 8), torch.randn(8, 8))
    assert [b.tensor for b in boundaries(plan, "shard")] == ["l_x_"] and not boundaries(plan, "gather")


def test_a_tensor_that_only_lends_its_dtype_does_not_stop_sharding(fake_world):
    """Gemma's RMSNorm casts back with `.type_as(inputs_embeds)`: reading only its dtype, that use must not
    keep the embeddings replicated (computed on every token of every rank)."""
    def f(x, w):
        e = x * 2.0
        k = (e @ w).float().type_as(e).view(2, 32, 2, 4).transpose(1, 2)
        return F.scaled_dot_product_attention(k, k, k, is_causal=True).sum()

    plan, _ = sharding(f, torch.randn(2, 32, 8), torch.randn(8, 8))
    assert [b.tensor for b in boundaries(plan, "shard")] == ["l_x_"] and not boundaries(plan, "gather")


def test_sequence_slice_reads_basic_indices():
    from burstc.passes.shard_rules import sequence_slice
    shape = (2, 3, 32, 8)
    assert sequence_slice(shape, (slice(None), slice(None), slice(-5, None)), 2, 32) == \
        (27, 32, (slice(None), slice(None), slice(None), slice(None)))
    assert sequence_slice(shape, (Ellipsis, slice(3, 7), 0), 2, 32) == (3, 7, (slice(None),) * 3 + (0,))
    assert sequence_slice(shape, (0, None, slice(None), slice(1, 4)), 2, 32) == \
        (1, 4, (0, None, slice(None), slice(None), slice(None)))
    assert sequence_slice(shape, (slice(None), slice(None), slice(0, 8, 2)), 2, 32) is None  # strided
    assert sequence_slice(shape, (slice(None), slice(None), 5), 2, 32) is None  # one token: not a run
    assert sequence_slice(shape, (slice(None), slice(None), slice(9, 9)), 2, 32) is None  # empty
    assert sequence_slice(shape, (slice(None), slice(None), torch.tensor([1, 2])), 2, 32) is None
    assert sequence_slice(shape, (slice(None), slice(1, 2)), 2, 32) is None  # the sequence left whole


def test_reductions_over_the_sequence_become_local_plus_all_reduce(fake_world):
    def f(q):
        y = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        return y.sum(), y.mean(dim=2), F.cross_entropy(y.flatten(0, 2), torch.zeros(2 * 3 * 16, dtype=torch.long))

    plan, gm = sharding(f, torch.randn(2, 3, 16, 5))
    assert [b.reason.split(" over")[0] for b in boundaries(plan, "reduce")] == ["sum", "mean", "cross_entropy"]
    # q enters sharded; the targets of the flattened [2*3*16] rows take this rank's rows of each of the 6
    assert [b.spec for b in boundaries(plan, "shard")] == ["seq@2", "seq@0 (outer 6, inner 1)"]
    assert not boundaries(plan, "output_gather")  # every output is reduced


def test_view_maps_follow_the_sequence_through_merged_dims():
    merge = ViewMap(None, (2, 16, 50), (32, 50), 16)
    assert merge._move(SeqDim(1), (2, 16, 50), (32, 50)) == SeqDim(0, outer=2)
    split = ViewMap(None, (32, 50), (2, 16, 50), 16)
    assert split._move(SeqDim(0, outer=2), (32, 50), (2, 16, 50)) == SeqDim(1)
    heads = (2, 16, 4, 8)
    assert ViewMap(None, (2, 16, 32), heads, 16)._move(SeqDim(1), (2, 16, 32), heads) == SeqDim(1)
    flat = (2, 16 * 32)
    assert ViewMap(None, (2, 16, 32), flat, 16)._move(SeqDim(1), (2, 16, 32), flat) == SeqDim(1, inner=32)
    # a view that cuts the sequence apart has no sharded form
    assert ViewMap(None, (2, 16, 32), (2, 4, 4, 32), 16)._move(SeqDim(1), (2, 16, 32), (2, 4, 4, 32)) is None


def test_sites_over_different_lengths_cannot_share_one_partition(fake_world):
    def f(q, kv):
        return F.scaled_dot_product_attention(q, q, q), F.scaled_dot_product_attention(kv, kv, kv)

    with pytest.raises(ShardingError, match="sequence lengths"):
        sharding(f, torch.randn(1, 2, 16, 4), torch.randn(1, 2, 24, 4))


def test_too_few_tokens_for_the_layout(fake_world):
    def f(q):
        return F.scaled_dot_product_attention(q, q, q)

    with pytest.raises(ShardingError, match="fewer than the 8 chunks"):
        sharding(f, torch.randn(1, 2, 5, 4))


def test_a_symbolic_length_is_refused_by_the_pass(fake_world):
    def f(q):
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)

    with pytest.raises(ShardingError, match="symbolic"):
        sharding(f, torch.randn(1, 2, 12, 4), dynamic=True)


def test_an_in_place_update_of_a_replicated_tensor_by_sharded_data_gathers_the_data(fake_world):
    def f(q, acc):
        y = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        acc.add_(y)  # acc is whole on every rank (and the caller's): it takes the whole of y
        return acc * 2

    plan, gm = sharding(f, torch.randn(1, 2, 16, 4), torch.zeros(1, 2, 16, 4))
    (gather,) = boundaries(plan, "gather")
    assert "add_ writes the replicated l_acc_" in gather.reason
    assert [t.placement for t in plan.tensors if t.op == "add_"] == ["replicated"]
    (add,) = [n for n in gm.graph.nodes if n.target == "add_"]
    assert add.args[0].op == "placeholder"  # the write reaches the input itself, never a shard of it


def _placements(plan, op):
    return [t.placement for t in plan.tensors if t.op == op]


def test_a_buffer_made_by_new_empty_and_filled_by_slices_stays_sharded(fake_world):
    """DeepSeek-V3's expand_kv. new_empty reads nothing of kv (it once gathered kv, and the buffer, left
    whole, made the slice copies mix sharded and replicated data: the graph fell back); the slice writes
    leave the sequence whole, so each rank writes its shards into its shard of the buffer."""
    def f(q, kv):
        k_nope, v = kv.split([4, 6], dim=-1)
        k = kv.new_empty(*kv.shape[:-1], 6)
        k[..., :4].copy_(k_nope)
        k[..., 4:] = q[..., :1]  # broadcast over the last dim
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    plan, gm = sharding(f, torch.randn(1, 2, 16, 6), torch.randn(1, 2, 16, 10))
    assert not boundaries(plan, "gather")
    assert sorted(b.tensor for b in boundaries(plan, "shard")) == ["l_kv_", "l_q_"]
    assert _placements(plan, "new_empty") == _placements(plan, "copy_") == ["seq@2"]
    (new_empty,) = [n for n in gm.graph.nodes if n.target == "new_empty"]
    assert new_empty.args[1:] == (1, 2, plan.local_len, 6)


def test_zeros_like_takes_no_gather_and_follows_its_users(fake_world):
    def f(q, x):
        acc = torch.zeros_like(q)  # wanted sharded by the attention: made at this rank's size
        acc += q
        whole = torch.zeros_like(q)  # q is sharded, the buffer is not (a token-mixing write): made whole
        whole.index_add_(2, torch.arange(0, 16, 2), x)
        return F.scaled_dot_product_attention(acc, q, q, is_causal=True), whole

    plan, gm = sharding(f, torch.randn(1, 2, 16, 4), torch.randn(1, 2, 8, 4))
    assert not boundaries(plan, "gather")
    assert _placements(plan, "zeros_like") == ["seq@2"]  # the sharded q lends its local shape
    assert _placements(plan, "_sized_like") == ["replicated"]
    (sized,) = [n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "_sized_like"]
    assert sized.args[1:3] == ((1, 2, 16, 4), "zeros_like")  # made whole from a size, not from a gather


def test_a_write_that_picks_tokens_of_a_sharded_tensor_is_refused(fake_world):
    def f(q):
        k = q * 2
        k[:, :, 0] = 0.0  # the first token only: no local form (it once wrote into a gathered copy, lost)
        return F.scaled_dot_product_attention(q, k, k, is_causal=True)

    with pytest.raises(ShardingError, match="in-place setitem on the sharded"):
        sharding(f, torch.randn(1, 2, 16, 4))


def test_a_tensor_filled_in_place_enters_after_the_write(fake_world):
    """A replicated buffer enters sharded work after the in-place writes its consumer sees (the shard
    was once taken right after new_empty: uninitialised memory, fingerprinted as if it were an input);
    its fingerprint covers what was written, and a constant factory is not fingerprinted."""
    def f(q, x):
        buf = x.new_empty(x.shape)
        buf.copy_(x.cumsum(2))  # replicated (cumsum mixes tokens)
        ones = x.new_ones(x.shape)
        return F.scaled_dot_product_attention(q, buf, ones), buf.flip(2), ones.flip(2)

    plan, gm = sharding(f, torch.randn(1, 2, 16, 4), torch.randn(1, 2, 16, 4))
    nodes = list(gm.graph.nodes)
    shards = {n.args[0].name: n for n in nodes if n.target is torch.ops.burst.seq_shard.default}
    (copy,) = [n for n in nodes if n.target == "copy_"]
    assert nodes.index(shards["buf"]) > nodes.index(copy)
    assert shards["buf"].args[-2] == "buf" and shards["ones"].args[-2] == ""


def test_an_attention_with_only_replicated_inputs_is_still_sharded(fake_world):
    def f(x):
        q = x.cumsum(2)  # replicated, and wanted whole by the flip: the site once stayed replicated
        return F.scaled_dot_product_attention(q, q, q, is_causal=True), q.flip(2)

    plan, _ = sharding(f, torch.randn(1, 2, 16, 4))
    assert [b.tensor for b in boundaries(plan, "shard")] == ["q"]
    assert _placements(plan, "scaled_dot_product_attention") == ["seq@2"]


def test_a_view_across_a_boundary_of_a_tensor_written_later(fake_world):
    """k[:, :, 3] picks a token: it is taken from a gathered k. A view of k in eager, it would miss the
    later k.add_ (it once did, silently): refused when the view is used after the write, fine before."""
    def used_after(q):
        k = q * 2
        head = k[:, :, 3]
        k.add_(1.0)
        return F.scaled_dot_product_attention(q, k, k, is_causal=True), head

    def used_before(q):
        k = q * 2
        head = k[:, :, 3].sum()
        k.add_(1.0)
        return F.scaled_dot_product_attention(q, k, k, is_causal=True), head

    with pytest.raises(ShardingError, match="written in place later"):
        sharding(used_after, torch.randn(1, 2, 16, 4))
    plan, _ = sharding(used_before, torch.randn(1, 2, 16, 4))
    (gather,) = boundaries(plan, "gather")
    assert gather.tensor == "k"


# ---- MoE dispatch: ops along other dims, and rank-private rows ----------------------------------------

def routed_moe(x, router, w_up, w_down, k=2):
    """A top-k routed MoE block over [B, N, H] as MoE libraries write it under torch.compile: flattened
    expert ids sorted (argsort), each slot's token picked (perm // k), an expert weight per slot (bmm
    over W[expert]), the rows added back at their tokens (index_add_); and the load-balancing loss (a
    histogram of the ids, the mean router probability over all tokens)."""
    flat = x.reshape(-1, x.shape[-1])
    probs = F.linear(flat, router).softmax(dim=-1)
    top, ids = torch.topk(probs, k, dim=-1)
    weights = (top / top.sum(dim=-1, keepdim=True)).reshape(-1)
    ids = ids.reshape(-1)
    perm = torch.argsort(ids)
    tokens = perm // k
    expert = ids[perm]
    up = F.silu(torch.bmm(w_up[expert], flat[tokens].unsqueeze(-1)).squeeze(-1))
    down = torch.bmm(w_down[expert], up.unsqueeze(-1)).squeeze(-1) * weights[perm].unsqueeze(-1)
    out = torch.zeros_like(flat).index_add_(0, tokens, down)
    experts = router.shape[0]
    counts = torch.histc(ids.float(), bins=experts, min=0, max=experts - 1) / ids.numel()
    aux = (counts * probs.mean(dim=0)).sum() * experts
    return out.view(x.shape), aux


def moe_block(q, router, w_up, w_down):
    """Attention, then the routed MoE on its output; the loss: mean square plus the aux loss."""
    y = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    h = y.transpose(1, 2).flatten(2)
    moe, aux = routed_moe(h, router, w_up, w_down)
    return (h + moe).pow(2).mean() + 0.1 * aux


def moe_weights(hidden=8, experts=4, inner=6):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(experts, hidden, generator=g), torch.randn(experts, inner, hidden, generator=g) / 3,
            torch.randn(experts, hidden, inner, generator=g) / 3)


def test_a_sorted_moe_dispatch_stays_on_its_rank(fake_world):
    q = torch.randn(2, 2, 16, 4)
    plan, gm = sharding(moe_block, q, *moe_weights())
    assert not boundaries(plan, "gather")
    (private,) = boundaries(plan, "private")
    assert private.spec == "seq@0 (outer 2, inner 2)" and private.reason.endswith("at out (index_add_)")
    placed = {t.name: t.placement for t in plan.tensors}
    assert placed["top"] == placed["ids"] == "seq@0 (outer 2, inner 1)"  # topk over the experts' dim: token-wise
    assert placed["perm"] == placed["tokens"] == "local rows@0 (sorted by perm, slots index; rank-private)"
    assert _placements(plan, "bmm") == ["local rows@0 (sorted by perm; rank-private)"] * 2
    assert _placements(plan, "index_add_") == ["seq@0 (outer 2, inner 1)"]  # back at this rank's tokens
    reduced = [(b.tensor, b.reason.split(":")[0]) for b in boundaries(plan, "reduce")]
    assert reduced == [("histc", "histc of this rank's elements"), ("probs", "mean over the sequence"),
                       ("pow_1", "mean over the sequence")]
    assert _placements(plan, "zeros_like") == ["seq@0 (outer 2, inner 1)"]  # made for the rows added into it


def test_a_dispatch_the_pass_cannot_prove_gathers_with_the_reason(fake_world, caplog):
    def rows_mixed(q, router):  # a running sum over the sorted rows mixes rows of many tokens
        flat = F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).flatten(2).flatten(0, 1)
        ids = torch.topk(F.linear(flat, router), 2, dim=-1)[1].reshape(-1)
        perm = torch.argsort(ids)
        return flat[perm // 2].cumsum(0).sum()

    with caplog.at_level(logging.WARNING, logger="burstc.passes"):
        plan, _ = sharding(rows_mixed, torch.randn(1, 2, 16, 4), torch.randn(4, 8))
    ids, rows = boundaries(plan, "gather")  # the ids before the sort, the rows it picks from
    assert ids.tensor == "ids" and ids.reason.startswith("argsort orders tokens of all ranks")
    assert ids.reason.endswith("(cumsum (cumsum) combines rows of different orders, or mixes rows)")
    assert (rows.tensor, rows.reason) == ("flat", "getitem mixes tokens along the sequence")
    assert not boundaries(plan, "private") and "cumsum" in caplog.text


def test_an_index_from_a_replicated_tensor_gathers_what_it_picks(fake_world):
    def picked(q, ids):  # ids: the whole sequence's expert ids, given replicated: not this rank's
        flat = F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).flatten(2).flatten(0, 1)
        return flat[torch.argsort(ids) // 2].sum()

    plan, _ = sharding(picked, torch.randn(1, 2, 16, 4), torch.randint(0, 4, (32,)))
    (gather,) = boundaries(plan, "gather")
    assert gather.reason == "getitem mixes tokens along the sequence"


def test_topk_over_the_sequence_gathers_and_over_other_dims_does_not(fake_world):
    def f(q):
        y = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        best = torch.topk(y, 2, dim=-1).values  # over the head dim: token-wise
        ranked = y.sort(dim=-1).values.cumsum(-1)
        chosen = torch.topk(y, 1, dim=-1).indices
        mask = torch.zeros_like(y)  # DeepSeek-V3's group mask: sharded like the index written into it
        mask.scatter_(-1, chosen, 1)
        return (best.sum(dim=2), torch.topk(y, 3, dim=2).values, ranked.amax(-1), F.one_hot(y.argmax(-1), 4),
                y.gather(-1, y.argsort(-1)) * mask, torch.histc(y, bins=4), torch.histc(y, bins=4, min=-1, max=1))

    plan, _ = sharding(f, torch.randn(1, 2, 16, 4))
    (gather,) = boundaries(plan, "gather")  # y, for the topk, and for the histc whose bins follow the data
    assert gather.reason == "topk mixes tokens along the sequence"  # (min == max: each rank's data range)
    assert [b.tensor for b in boundaries(plan, "reduce")] == ["best", "histc_1"]  # sum over seq; fixed bins
    for op in ("cumsum", "amax", "one_hot", "zeros_like", "scatter_", "gather", "argsort"):
        assert _placements(plan, op) == ["seq@2"], op
