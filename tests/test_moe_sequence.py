"""MoE in sequence mode: HF Mixtral and Qwen3-MoE (transformers' sorted grouped-matmul dispatch under
torch.compile) and a hand-written top-k MoE block, compiled with backend="burst" on 2 and 3 gloo ranks
against single-device eager: a training step with the router's load-balancing loss in the loss, the loss and
every gradient exact, and no gather: each rank routes, sorts and runs its own tokens' slots (rank-private
rows, burstc.passes.shard), and the aux loss's token counts and means are all-reduced."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

from burstc.launch import run_ranks
from tests.models import hf_training_step
from tests.passes.test_shard import moe_block, moe_weights

AUX_LOSS_COEF = 0.02
OPTIONS = {"inner": "aot_eager"}


def _hf_moe(kind: str):
    """A tiny HF MoE causal LM (4 experts, 2 per token, sdpa) returning the router logits, so that the
    load-balancing loss is part of the loss."""
    import transformers

    torch.manual_seed(0)
    shared = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=256, output_router_logits=True,
                  router_aux_loss_coef=AUX_LOSS_COEF)
    if kind == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=64, num_local_experts=4, **shared)
        model_class = transformers.MixtralForCausalLM
    else:
        config = transformers.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                             head_dim=16, **shared)
        model_class = transformers.Qwen3MoeForCausalLM
    config._attn_implementation = "sdpa"
    return model_class(config)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm().clamp(min=1e-30)).item()


def _hf_case(kind: str, length: int) -> dict:
    model = _hf_moe(kind)
    ids = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(1))
    want_loss, _, want = hf_training_step(model, ids, ids)
    counters.clear()
    torch._dynamo.reset()
    got_loss, _, got = hf_training_step(torch.compile(copy.deepcopy(model), backend="burst", options=OPTIONS), ids, ids)
    assert set(got) == set(want), set(got) ^ set(want)
    return dict(name=kind, loss_err=_relative(got_loss, want_loss), grad_err=max(_relative(got[n], want[n]) for n in want),
                counters=dict(counters["burst"]))


def _block_case(length: int) -> dict:
    q = torch.randn(2, 2, length, 4, generator=torch.Generator().manual_seed(2))
    weights = [w.requires_grad_() for w in moe_weights()]

    def step(fn):
        for w in weights:
            w.grad = None
        loss = fn(q, *weights)
        loss.backward()
        return loss.detach(), {i: w.grad.clone() for i, w in enumerate(weights)}

    want_loss, want = step(moe_block)
    counters.clear()
    torch._dynamo.reset()
    got_loss, got = step(torch.compile(moe_block, backend="burst", options=OPTIONS))
    return dict(name="hand_written", loss_err=_relative(got_loss, want_loss),
                grad_err=max(_relative(got[i], want[i]) for i in want), counters=dict(counters["burst"]))


def _compare(rank, world_size, kinds, length):
    return [_block_case(length)] + [_hf_case(kind, length) for kind in kinds]


def _check(results):
    for r in results:
        assert r["loss_err"] < 1e-4 and r["grad_err"] < 1e-4, r
        c = r["counters"]
        assert c.get("seq_graphs") == c["graphs"] and not c.get("seq_fallbacks"), r
        assert not c.get("seq_gathers"), r  # the dispatch, the router and the aux loss: nothing gathered
        assert c.get("seq_private_regions") == (1 if r["name"] == "hand_written" else 2), r  # a sort per layer


def test_mixtral_and_qwen3_moe_with_the_aux_loss_on_two_ranks():
    pytest.importorskip("transformers")
    for rank_results in run_ranks(2, _compare, ["mixtral", "qwen3moe"], 64, timeout_s=600):
        _check(rank_results)


def test_qwen3_moe_on_three_ranks_with_a_length_that_does_not_divide():
    pytest.importorskip("transformers")
    for rank_results in run_ranks(3, _compare, ["qwen3moe"], 50, timeout_s=600):
        _check(rank_results)
