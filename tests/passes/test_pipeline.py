"""find_attention -> plan -> rewrite (attention-parallel mode) on Dynamo graphs, with a fake 4-rank process group: graph shape,
decisions and reasons, without running anything distributed."""
import inspect
import re
import logging

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.testing._internal.distributed.fake_pg import FakeStore

from burstc.backend import burst_backend
from burstc.passes.find_attention import find_attention_sites
from tests.models import SdpaAttention, TinyGPT


@pytest.fixture
def fake_world():
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    yield 4
    dist.destroy_process_group()


def rewritten_graph(fn, *args, dynamic=False, **options):
    """Run the burst passes on fn's Dynamo graph; execute the original graph (nothing distributed).
    Attention-parallel mode, which rewrites the graph in place (sequence mode: tests/passes/test_shard.py)."""
    options.setdefault("parallel", "attention")
    graphs = []

    def capture(gm, example_inputs):
        original = torch.fx.GraphModule(gm, gm.graph.__deepcopy__())
        graphs.append(burst_backend(gm, example_inputs, options=dict(options, inner="eager")) and gm)
        return original.forward

    torch._dynamo.reset()
    counters.clear()
    torch.compile(fn, backend=capture, fullgraph=True, dynamic=dynamic)(*args)
    return graphs[-1]


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_gpt_sites_become_burst_ops(fake_world):
    model = TinyGPT(layers=3, heads=4, kv_heads=1).eval()
    gm = rewritten_graph(model, torch.randint(0, 50, (2, 16)))
    assert targets(gm).count(torch.ops.burst.attention.default) == 3
    assert torch._C._nn.scaled_dot_product_attention not in targets(gm)
    assert counters["burst"]["sites_converted"] == 3 and counters["burst"]["sites_left"] == 0
    call = next(n for n in gm.graph.nodes if n.target == torch.ops.burst.attention.default)
    # (q, k, v, attn_mask, key_padding, document_ids, mask_buffers, causal, window_left, window_right, mask_mod,
    #  mask_proof, scale, softcap, enable_gqa, layout, backward, kernel, schedule, node_size, group, site_key,
    #  verify_site)
    assert call.args[3:7] == (None, None, None, [])
    assert call.args[7:17] == (True, None, None, "", "", None, None, True, "zigzag", "auto")  # each call decides


def test_the_schedule_option_reaches_the_op_or_falls_back_per_site(fake_world, caplog):
    """The op gets the schedule and the machine's node size; a site the requested schedule cannot
    run (2 heads do not split over nodes of 4) asks for auto instead, with a warning."""
    idx = torch.randint(0, 50, (1, 16))
    gm = rewritten_graph(TinyGPT(layers=1, heads=2, kv_heads=2).eval(), idx, schedule="ulysses_ring", node_size=2)
    call = next(n for n in gm.graph.nodes if n.target == torch.ops.burst.attention.default)
    assert call.args[18:20] == ("ulysses_ring", 2)
    with caplog.at_level("WARNING", logger="burstc.passes"):
        gm = rewritten_graph(TinyGPT(layers=1, heads=2, kv_heads=2).eval(), idx, schedule="ulysses_ring",
                             node_size=4)
    call = next(n for n in gm.graph.nodes if n.target == torch.ops.burst.attention.default)
    assert call.args[18:20] == ("auto", 4)
    assert "schedule 'ulysses_ring' cannot run here" in caplog.text and "2 query heads" in caplog.text


def test_options_apply(fake_world):
    model = TinyGPT(layers=1, heads=4, kv_heads=4).eval()
    gm = rewritten_graph(model, torch.randint(0, 50, (1, 16)), layout="striped", backward="query_ring", verify=True)
    call = next(n for n in gm.graph.nodes if n.target == torch.ops.burst.attention.default)
    assert call.args[15:17] == ("striped", "query_ring")
    assert re.fullmatch(r"g\d+/y", call.args[22])  # verify is on: the site is named <graph id>/<node name>


def test_unsupported_sites_stay_sdpa_with_a_logged_reason(fake_world, caplog):
    def f(q, k, v, mask):
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
        c = F.scaled_dot_product_attention(q, k[:, :, :5], v[:, :, :5])
        d = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return a + b + c + d

    x = torch.randn(1, 2, 8, 4)
    learned_bias = torch.zeros(8, 8, requires_grad=True)  # a mask with a gradient converts (its gradient is dS)
    with caplog.at_level(logging.WARNING, logger="burstc.passes"):
        gm = rewritten_graph(f, x, x, x, learned_bias)
    assert targets(gm).count(torch._C._nn.scaled_dot_product_attention) == 2
    assert targets(gm).count(torch.ops.burst.attention.default) == 2
    assert counters["burst"]["sites_left"] == 2
    text = caplog.text
    assert "dropout_p=0.1" in text and "lengths may differ" in text
    assert "test_pipeline.py" in text  # the user's source line is named


def test_dynamic_sequence_length_plans_symbolically(fake_world):
    from burstc.config import BurstConfig
    from burstc.passes.plan import plan_sites

    captured = []

    def capture(gm, example_inputs):
        captured.append(plan_sites(find_attention_sites(gm), BurstConfig(), 4))
        return gm.forward

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    torch._dynamo.reset()
    x = torch.randn(1, 2, 12, 8)
    torch.compile(f, backend=capture, dynamic=True)(x, x, x)
    (plan,) = captured[0]
    assert plan.converts and not isinstance(plan.seq_len, int)
    assert plan.cost["forward_bytes"].free_symbols  # bytes are a formula of the symbolic length


def test_excluded_sites_stay(fake_world):
    model = TinyGPT(layers=2).eval()
    gm = rewritten_graph(model, torch.randint(0, 50, (1, 8)), exclude=["y_1"])  # by node name
    assert targets(gm).count(torch.ops.burst.attention.default) == 1
    lines, first = inspect.getsourcelines(SdpaAttention.forward)
    line = first + next(i for i, text in enumerate(lines) if "scaled_dot_product_attention" in text)
    gm = rewritten_graph(model, torch.randint(0, 50, (1, 8)), exclude=[f"models.py:{line}"])  # by source
    assert targets(gm).count(torch.ops.burst.attention.default) == 0


def test_unknown_option_is_rejected():
    with pytest.raises(ValueError, match="unknown burst option"):
        burst_backend(torch.fx.symbolic_trace(lambda x: x), [], options={"layuot": "zigzag"})
    with pytest.raises(ValueError, match="unknown backward 'kv': choose one of auto, query_ring, kv_ring"):
        burst_backend(torch.fx.symbolic_trace(lambda x: x), [], options={"backward": "kv"})
