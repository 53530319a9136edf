"""Masked models end to end: HF decoders with a padded batch, the eager attention path, a sliding window,
packed documents through restarting position ids, a FlexAttention document mask_mod, and a mask no
construction describes, compiled with
backend="burst" on 2 and 3 gloo ranks against single-device eager (loss, logits, every gradient)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from burstc.launch import run_ranks
from tests.models import hf_training_step

N = 37


def _grads(model):
    return {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _decoder(kind, impl, **extra):
    import transformers

    torch.manual_seed(0)
    prefix = {"llama": "Llama", "mistral": "Mistral"}[kind]
    config = getattr(transformers, f"{prefix}Config")(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, **extra)
    config._attn_implementation = impl
    return getattr(transformers, f"{prefix}ForCausalLM")(config)


class _RandomMaskModel(torch.nn.Module):
    """Attention under a fixed random mask (a buffer: nothing describes it) on top of a causal one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.embed, self.qkv, self.head = torch.nn.Embedding(50, 32), torch.nn.Linear(32, 96), torch.nn.Linear(32, 50)
        mask = torch.rand(N, N, generator=torch.Generator().manual_seed(5)) > 0.5
        self.register_buffer("mask", mask | torch.eye(N, dtype=torch.bool))

    def forward(self, idx):
        b, n = idx.shape
        q, k, v = self.qkv(self.embed(idx)).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        return self.head(y.transpose(1, 2).reshape(b, n, 32))


class _FlexDocuments(torch.nn.Module):
    """FlexAttention with a document mask_mod over a captured [N] tensor (inference: FlexAttention has no
    CPU backward)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.embed, self.qkv = torch.nn.Embedding(50, 32), torch.nn.Linear(32, 96)

    def forward(self, idx):
        from torch.nn.attention.flex_attention import flex_attention

        b, n = idx.shape
        q, k, v = self.qkv(self.embed(idx)).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        return flex_attention(q, k, v, block_mask=_FLEX_MASK[n]).transpose(1, 2).reshape(b, n, 32)


def _flex_mask(n):
    from torch.nn.attention.flex_attention import create_block_mask

    docs = torch.repeat_interleave(torch.arange(3), torch.tensor([9, 20, n - 29]))

    def same_document_causal(b, h, q_idx, kv_idx):
        return (docs[q_idx] == docs[kv_idx]) & (kv_idx <= q_idx)
    return create_block_mask(same_document_causal, None, None, n, n, device="cpu")


_FLEX_MASK = {}


def _case(name):
    idx = torch.randint(0, 50, (2, N), generator=torch.Generator().manual_seed(1))
    if name == "flex_documents":
        _FLEX_MASK[N] = _flex_mask(N)
        model = _FlexDocuments().eval()

        def step(m):
            with torch.no_grad():
                out = m(idx)
            return out.sum(), out, {}
        return model, step
    labels, kwargs = idx.clone(), {}
    if name == "random_mask":
        model = _RandomMaskModel()

        def step(m):
            m.zero_grad()
            logits = m(idx)
            loss = F.cross_entropy(logits.view(-1, 50), idx.view(-1))
            loss.backward()
            return loss.detach(), logits.detach(), _grads(m)
        return model, step
    if name == "llama_padded":
        model = _decoder("llama", "sdpa")
        mask = torch.ones(2, N, dtype=torch.long)
        mask[1, :6] = 0  # left padding
        labels = labels.masked_fill(mask == 0, -100)
        kwargs = dict(attention_mask=mask)
    elif name == "llama_eager":
        model, kwargs = _decoder("llama", "eager"), dict(use_cache=False)
    elif name == "mistral_window":
        model, kwargs = _decoder("mistral", "sdpa", sliding_window=6), dict(use_cache=False)
    elif name == "llama_packed":
        positions = torch.cat([torch.arange(12), torch.arange(3), torch.arange(22)]).view(1, -1)
        model, kwargs = _decoder("llama", "sdpa"), dict(position_ids=positions, use_cache=False)

    def step(m):
        return hf_training_step(m, idx, labels, **kwargs)
    return model, step


def _compare(rank, world_size, cases):
    import os
    os.environ["BURST_MASK_TILE"] = "8"  # tiles smaller than a chunk: skipped, full and masked tiles
    results = []
    for name, options in cases:
        model, step = _case(name)
        want_loss, want_out, want = step(model)
        counters.clear()
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(model), backend="burst", options={"inner": "aot_eager", **options})
        got_loss, got_out, got = step(compiled)
        grad_err = max(((got[n] - want[n]).abs().max().item() / max(1.0, want[n].abs().max().item()) for n in want),
                       default=0.0)
        results.append(dict(name=name, options=options, loss_err=abs(got_loss - want_loss).item(),
                            out_err=(got_out - want_out).abs().max().item(), grad_err=grad_err,
                            counters=dict(counters["burst"])))
    return results


def _check(results):
    for r in results:
        assert r["loss_err"] <= 5e-5 and r["out_err"] <= 5e-5 and r["grad_err"] <= 5e-5, r
        c = r["counters"]
        assert c.get("sites_converted", 0) >= 1 and not c.get("sites_left"), r
        if r["options"].get("parallel") != "attention":  # the default on several ranks: sequence mode
            assert c.get("seq_graphs") == c["graphs"] and not c.get("seq_fallbacks"), r
            # packed: HF's document ids (a diff over the row) are computed from the replicated position ids
            assert not c.get("seq_gathers"), r


def test_masked_models_on_two_ranks():
    pytest.importorskip("transformers")
    # no parallel option: the default ("auto") must be sequence mode on several ranks (_check asserts it)
    cases = [("llama_padded", {}), ("llama_eager", {}), ("mistral_window", {"layout": "contiguous"}),
             ("llama_packed", {}), ("random_mask", {}), ("flex_documents", {}),
             ("llama_padded", {"parallel": "attention"}), ("random_mask", {"parallel": "attention"})]
    for rank_results in run_ranks(2, _compare, cases, timeout_s=900):
        _check(rank_results)


def test_masked_models_on_three_ranks():
    pytest.importorskip("transformers")
    cases = [("llama_padded", {"layout": "striped"}), ("mistral_window", {}), ("llama_packed", {})]
    for rank_results in run_ranks(3, _compare, cases, timeout_s=900):
        _check(rank_results)
