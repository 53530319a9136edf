"""python -m burstc explain on the nanoGPT, HF LLaMA and Gemma 3 models."""
import subprocess
import sys

import pytest
import torch

from burstc.config import BurstConfig
from burstc.debug.explain import explain


def test_explain_nanogpt_plans_every_site():
    from examples.nanogpt import factory

    model, args = factory(2048)
    text = explain(model, args, world_size=4, seq_len=2048, cfg=BurstConfig(), full=True)
    assert text.count(": converted") == 2 and "summary: 2 converted, 0 left as SDPA" in text
    assert "examples/nanogpt.py" in text  # the source line of the hand-written attention
    assert "backward scheme: **query_ring**" in text  # MHA
    assert "| 3    | k1 diagonal | k2 diagonal | k3 diagonal | k0 diagonal |" in text
    assert "- q3 x k0: diagonal" in text  # every pair's work items


def test_explain_at_64_ranks_and_a_million_tokens_is_a_page():
    """The default report summarises each site per rank (min / median / max); the G x G tables are --full."""
    pytest.importorskip("transformers")
    result = subprocess.run([sys.executable, "-m", "burstc", "explain", "examples.train_llama:factory",
                             "--world-size", "64", "--seq-len", str(1 << 20)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert len(out.splitlines()) <= 150 and out.count(": converted") == 2, out
    assert "| forward K/V bytes sent" in out and "16384 on every rank" in out and "- q0 x k1" not in out
    assert "ring order: 0 -> 1 -> 2 -> 3 -> 4 -> 5 -> 6 -> 7 -> ... -> 62 -> 63 -> 0" in out


def test_explain_shows_the_schedules_over_nodes():
    from examples.nanogpt import factory

    model, args = factory(2048)
    text = explain(model, args, world_size=8, seq_len=2048, cfg=BurstConfig(node_size=4, inter_gbs=1.0))
    assert "G=8 ranks in 2 nodes of 4" in text
    assert text.count("## Schedules (predicted by the cost model") == 2
    # a slow link between the nodes: the flat ring's every step waits on it, so auto does not pick it
    assert "| **ring** (chosen)" not in text and text.count("(chosen)") == 2
    assert "schedule: double_ring (2 nodes of 4)" in text or "schedule: ulysses_ring" in text


def test_explain_llama_from_the_command_line():
    pytest.importorskip("transformers")
    result = subprocess.run([sys.executable, "-m", "burstc", "explain", "examples.train_llama:factory",
                             "--world-size", "8", "--seq-len", "1024", "--layout", "striped"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "2 attention site(s), G=8 ranks, N=1024, layout striped" in out
    assert out.count(": converted") == 2
    assert "backward scheme: **kv_ring**" in out  # GQA 8/2: the KV ring moves fewer bytes
    assert "transformers/integrations/sdpa_attention.py" in out  # where HF calls SDPA


def test_explain_names_what_it_leaves():
    import torch
    import torch.nn.functional as F

    class Cross(torch.nn.Module):
        def forward(self, q, memory):
            return F.scaled_dot_product_attention(q, memory, memory)

    text = explain(Cross(), (torch.randn(1, 2, 64, 8), torch.randn(1, 2, 16, 8)), world_size=2, seq_len=64,
                   cfg=BurstConfig())
    assert "left as plain SDPA" in text and "lengths may differ" in text and "0 converted, 1 left" in text


def test_explain_sees_attention_inside_checkpoint_regions():
    """explain runs the backend's own front passes: a checkpointed model's sites are planned, not hidden
    inside tag_activation_checkpoint bodies."""
    import torch

    from burstc.debug.explain import trace_plans
    from tests.models import Checkpointed, TinyGPT

    model = TinyGPT(vocab=50, dim=32, layers=2)
    for i, block in enumerate(model.blocks):
        model.blocks[i] = Checkpointed(block)
    plans = trace_plans(model, (torch.randint(0, 50, (1, 64)),), BurstConfig(), world_size=2)
    assert len(plans) == 2 and all(p.converts for p in plans)


def test_explain_shows_a_sliding_layer_of_a_mixed_model_sending_its_halos_directly():
    """Gemma 3's sliding and full layers share zigzag (the full causal layers need it); the sliding site's
    window is a compile-time constant, so its plan shows the window and the direct route's halo bytes."""
    pytest.importorskip("transformers")
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=16,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256)
    config._attn_implementation = "sdpa"
    model = Gemma3ForCausalLM(config)
    text = explain(model, (torch.randint(0, 64, (1, 256)),), world_size=4, seq_len=256, cfg=BurstConfig())
    assert "layout zigzag" in text and text.count(": converted") == 2
    sliding = next(part for part in text.split("# site ")[1:] if "window=(15, None)" in part)
    assert "route: direct" in sliding
    # K/V halos: 6 segment boundaries between ranks x 15 rows x (k, v) x 2 heads (repeated by HF) x 16 x fp32
    assert f"forward bytes sent, all ranks: {6 * 15 * 2 * 2 * 16 * 4} " in sliding
