"""torch.compile(model, backend="burst") end to end: one process and 2 gloo ranks, outputs and every
parameter gradient against eager; recompilation; verify=True; the custom ops' registration."""
import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import burstc.runtime.op  # noqa: F401
from burstc.config import BurstConfig
from burstc.launch import run_ranks
from tests.models import TinyGPT, loss_and_grads


def assert_close_to_eager(model, compiled, idx, tol=2e-5):
    want_loss, want = loss_and_grads(model, idx)
    got_loss, got = loss_and_grads(compiled, idx)
    assert abs(got_loss - want_loss) <= tol, (got_loss, want_loss)
    for name in want:
        err = (got[name] - want[name]).abs().max().item()
        assert err <= tol * max(1.0, want[name].abs().max().item()), (name, err)


def test_backend_resolves_by_name_without_import():
    from burstc.backend import burst_backend

    assert torch._dynamo.lookup_backend("burst") is burst_backend


def test_custom_ops_pass_opcheck():
    q = torch.randn(2, 4, 10, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, 10, 8, requires_grad=True) for _ in range(2))
    # attn_mask, key_padding, document_ids, mask_buffers, causal, window_left, window_right, mask_mod, mask_proof
    no_masks = (None, None, None, [], True, None, None, "", "")
    masks = (torch.rand(1, 1, 10, 10) > 0.2, torch.rand(2, 10) > 0.2, torch.tensor([[0] * 4 + [1] * 6] * 2), [], True, 3, None,
             "", "")
    for mask_args in (no_masks, masks):
        torch.library.opcheck(torch.ops.burst.attention.default,
                              (q, k, v, *mask_args, None, None, True, "zigzag", "auto", "auto", "auto", 0, "", "", ""))
        out, lse = torch.ops.burst.attention(q, k, v, *mask_args, 0.3, None, True, "zigzag", "auto", "auto", "auto", 0, "",
                                             "", "")
        torch.library.opcheck(torch.ops.burst.attention_backward.default,
                              (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
                               None, False, *mask_args, 0.3, None, True, "zigzag", "auto", "auto", "auto", 0, "", "", ""))


@pytest.mark.parametrize("inner", ["inductor", "aot_eager"])
@pytest.mark.parametrize("attn", [dict(heads=4, kv_heads=4), dict(heads=4, kv_heads=1), dict(hand_written=True)],
                         ids=["mha", "mqa", "nanogpt"])
def test_single_process_fullgraph_matches_eager(inner, attn):
    torch.manual_seed(0)
    model = TinyGPT(layers=2, **attn)
    counters.clear()
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), backend="burst", fullgraph=True, options={"inner": inner})
    assert_close_to_eager(model, compiled, torch.randint(0, 50, (2, 33)))
    assert counters["burst"]["sites_converted"] == 2 and counters["burst"]["sites_left"] == 0


def test_dynamic_lengths_compile_once():
    torch.manual_seed(1)
    model = TinyGPT(layers=1)
    counters.clear()
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), backend="burst", dynamic=True, options={"inner": "aot_eager"})
    for length in (17, 40, 64):
        assert_close_to_eager(model, compiled, torch.randint(0, 50, (1, length)))
    assert counters["stats"]["unique_graphs"] == 1  # one compiled graph serves every length


def test_unconvertible_site_stays_exact():
    class Cross(torch.nn.Module):
        def forward(self, q, memory):
            return F.scaled_dot_product_attention(q, memory, memory) * 2

    q, memory = torch.randn(1, 2, 9, 8), torch.randn(1, 2, 5, 8)  # cross-attention: burst leaves the site alone
    counters.clear()
    torch._dynamo.reset()
    out = torch.compile(Cross(), backend="burst", options={"inner": "eager"})(q, memory)
    assert torch.equal(out, Cross()(q, memory))
    assert counters["burst"]["sites_left"] == 1 and counters["burst"]["sites_converted"] == 0


def _compiled_gpt_on_ranks(rank, world_size, cases):
    torch.manual_seed(0)
    results = []
    for layout, attn, inner, length in cases:
        model = TinyGPT(layers=2, **attn)
        idx = torch.randint(0, 50, (2, length), generator=torch.Generator().manual_seed(length))
        want_loss, want = loss_and_grads(model, idx)
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(model), backend="burst", fullgraph=True,
                                 options={"layout": layout, "inner": inner, "verify": True, "parallel": "attention"})
        got_loss, got = loss_and_grads(compiled, idx)
        err = max((got[n] - want[n]).abs().max().item() for n in want)
        results.append((layout, attn, abs(got_loss - want_loss).item(), err, counters["burst"]["sites_converted"]))
    return results


def test_two_gloo_ranks_match_single_device_eager():
    cases = [("zigzag", dict(heads=4, kv_heads=2), "aot_eager", 30), ("striped", dict(heads=4, kv_heads=4), "aot_eager", 33),
             ("zigzag", dict(hand_written=True), "aot_eager", 31), ("zigzag", dict(heads=4, kv_heads=4), "inductor", 32)]
    for rank_results in run_ranks(2, _compiled_gpt_on_ranks, cases, timeout_s=600):
        for layout, attn, loss_err, grad_err, converted in rank_results:
            assert loss_err <= 2e-5 and grad_err <= 5e-5, (layout, attn, loss_err, grad_err)
            assert converted >= 2


def _llama_on_ranks(rank, world_size, length):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    idx = torch.randint(0, 64, (2, length), generator=torch.Generator().manual_seed(1))

    def run(m):
        m.zero_grad()
        loss = m(idx, labels=idx).loss
        loss.backward()
        return loss.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in m.named_parameters()}

    want_loss, want = run(model)
    counters.clear()
    torch._dynamo.reset()
    got_loss, got = run(torch.compile(copy.deepcopy(model), backend="burst", fullgraph=True,
                                      options={"inner": "aot_eager"}))
    return (abs(got_loss - want_loss).item(), max((got[n] - want[n]).abs().max().item() for n in want),
            counters["burst"]["sites_converted"])


@pytest.mark.parametrize("world_size", [1, 2])
def test_hf_llama_causal_gqa_matches_eager(world_size):
    pytest.importorskip("transformers")
    for loss_err, grad_err, converted in run_ranks(world_size, _llama_on_ranks, 37):
        assert converted == 2
        assert loss_err <= 1e-5 and grad_err <= 5e-5, (loss_err, grad_err)


def _verify_with_fault(rank, world_size, inject):
    import burstc.runtime.attention as attention
    from burstc.runtime.op import BurstVerificationError

    if inject:  # a broken conversion: gather the output shards as if they were striped
        original = attention.assemble
        attention.assemble = lambda shards, *, dim, layout, seq_len: original(
            shards, dim=dim, layout="striped" if layout == "zigzag" else "zigzag", seq_len=seq_len)
    torch.manual_seed(0)  # the same model and inputs on every rank
    model = TinyGPT(layers=1)
    compiled = torch.compile(model, backend="burst", options={"inner": "eager", "verify": True,
                                                              "parallel": "attention"})
    try:
        compiled(torch.randint(0, 50, (1, 16)))
    except BurstVerificationError as e:
        return str(e)
    return None


@pytest.mark.parametrize("inject", [True, False], ids=["broken", "correct"])
def test_verify_catches_a_broken_conversion(inject):
    for message in run_ranks(2, _verify_with_fault, inject):
        if inject:
            assert message is not None and "differs from F.scaled_dot_product_attention" in message
        else:
            assert message is None


def _different_inputs_per_rank(rank, world_size):
    import burstc

    torch.manual_seed(0)
    model = TinyGPT(layers=1)
    compiled = torch.compile(model, backend="burst", options={"inner": "eager", "parallel": "attention"})
    idx = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(rank))  # not the same batch
    try:
        compiled(idx)
    except burstc.BurstInputError as e:
        return str(e)
    return None


def test_ranks_with_different_inputs_get_an_error_not_a_wrong_answer():
    for message in run_ranks(2, _different_inputs_per_rank):
        assert message is not None and "q/k/v differ" in message and "same inputs" in message


class _SoftCapped(torch.nn.Module):
    """Gemma-2-style soft-capped scores, cap * tanh(S / cap); uncapped: tanh(S) alone, which is no
    soft-cap (nothing outside the tanh) and is left."""

    def __init__(self, capped=True):
        super().__init__()
        self.capped = capped

    def forward(self, q, k, v):
        scores = torch.matmul(q, k.transpose(-1, -2)) * 0.25
        scores = torch.tanh(scores / 30.0) * 30.0 if self.capped else torch.tanh(scores)
        return torch.matmul(torch.softmax(scores, dim=-1), v)


def test_unconverted_softmax_attention_is_reported(caplog):
    q = torch.randn(1, 2, 12, 8)
    counters.clear()
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="burstc.passes"):
        out = torch.compile(_SoftCapped(capped=False), backend="burst", options={"inner": "eager"})(q, q, q)
    torch.testing.assert_close(out, _SoftCapped(capped=False)(q, q, q))
    assert counters["burst"]["sites_left"] == 1 and not counters["burst"].get("sites_converted")
    assert "without a positive constant cap" in caplog.text and "test_backend.py" in caplog.text
    from burstc.debug.explain import explain
    text = explain(_SoftCapped(capped=False), (q, q, q), world_size=2, seq_len=12, cfg=BurstConfig())
    assert "without a positive constant cap" in text and "1 softmax attention not converted" in text


def test_softcapped_attention_converts_with_its_gradients():
    q, k, v = (torch.randn(2, 2, 12, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    counters.clear()
    torch._dynamo.reset()
    out = torch.compile(_SoftCapped(), backend="burst", options={"inner": "eager"})(q, k, v)
    want = _SoftCapped()(q, k, v)
    torch.testing.assert_close(out, want)
    dout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(a, b)
    assert counters["burst"]["sites_converted"] == 1 and not counters["burst"].get("sites_left")


def test_gpt2_eager_attention_converts():
    """HF GPT-2's eager path casts P with .type(value.dtype) and masks with where(M, 0, finfo.min)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config._attn_implementation = "eager"
    model = transformers.GPT2LMHeadModel(config).eval()
    idx = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(1))
    counters.clear()
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), backend="burst", options={"inner": "aot_eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx, use_cache=False).logits, model(idx, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-5)
    assert counters["burst"]["sites_converted"] == 2 and not counters["burst"].get("sites_left"), counters["burst"]


def test_inductor_caches_are_keyed_on_the_burst_op_schemas():
    """A cached graph compiled against other burst op schemas (an older burstc) is never reused: the
    no-op post-grad pass the backend installs has the schemas in its uuid, which Inductor's FX-graph and
    AOTAutograd cache keys include."""
    from burstc.backend import OpsVersion

    before = OpsVersion().uuid()
    assert before == OpsVersion().uuid()

    @torch.library.custom_op("burst::_schema_probe", mutates_args=())
    def probe(x: torch.Tensor) -> torch.Tensor:
        return x.clone()
    assert OpsVersion().uuid() != before
