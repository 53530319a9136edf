"""passes.higher_order: one walker over a graph and its higher-order op bodies; checkpoint regions inlined
with the partitioner's tags; attention left in a body that stays is reported, never invisible."""
import copy

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.utils.checkpoint import CheckpointPolicy, checkpoint

from burstc.passes.higher_order import CHECKPOINT, attention_in_bodies, graphs, inline_checkpoints
from burstc.passes.selective_checkpoint import REGION_KEY


def _dynamo_graph(fn, *args):
    """The Dynamo graph of fn(*args), as the backend receives it."""
    captured = []

    def backend(gm, example_inputs):
        captured.append(gm)
        return gm.forward
    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    (gm,) = captured
    return gm


def _attend(x):
    q = x.view(1, 8, 2, 4).transpose(1, 2)
    return F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(1, 8, 8)


def _nested(x):
    return checkpoint(lambda y: _attend(y) + checkpoint(_attend, y, use_reentrant=False), x, use_reentrant=False)


def test_nested_checkpoints_are_inlined_with_the_outer_regions_tags():
    x = torch.randn(1, 8, 8, requires_grad=True)
    gm = _dynamo_graph(_nested, x)
    assert len(list(graphs(gm))) == 3  # the graph, the outer body, the inner body
    inline_checkpoints(gm)
    assert not gm.graph.find_nodes(op="call_function", target=CHECKPOINT)
    assert len(list(graphs(gm))) == 1
    computed = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert len([n for n in computed if n.target is torch._C._nn.scaled_dot_product_attention]) == 2
    assert all(n.meta.get("recompute") is CheckpointPolicy.PREFER_RECOMPUTE for n in computed)
    assert len({n.meta["ac_graph_id"] for n in computed}) == 1
    assert torch.equal(gm(x)[0], _nested(x))


def test_a_selective_region_is_marked_with_its_policy_or_kept_whole():
    from functools import partial

    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    context_fn = partial(create_selective_checkpoint_contexts, [torch.ops.aten.mm.default])

    def selective(x):
        return checkpoint(_attend, x, use_reentrant=False, context_fn=context_fn)
    x = torch.randn(1, 8, 8, requires_grad=True)
    kept = inline_checkpoints(_dynamo_graph(selective, x), selective=False)
    assert kept.graph.find_nodes(op="call_function", target=CHECKPOINT)
    ((node, why),) = attention_in_bodies(kept)
    assert "selective" in why and "context_fn" in why
    inlined = inline_checkpoints(_dynamo_graph(selective, x))
    assert not attention_in_bodies(inlined)
    regions = {n.meta.get("custom", {}).get(REGION_KEY) for n in inlined.graph.nodes if n.op == "call_function"}
    assert len(regions) == 1 and None not in regions


def test_attention_inside_torch_cond_is_a_site_left_and_the_program_is_exact():
    def branchy(x, flag):
        return torch.cond(flag, _attend, lambda y: y * 2, (x,))
    x, flag = torch.randn(1, 8, 8), torch.tensor(True)
    gm = _dynamo_graph(branchy, x, flag)
    ((node, why),) = attention_in_bodies(gm)
    assert "torch.ops.higher_order.cond" in why
    counters.clear()
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(branchy), backend="burst")
    assert torch.allclose(compiled(x, flag), branchy(x, flag), atol=1e-6)
    assert counters["burst"]["sites_left"] == 1
