"""The masks pass on Dynamo graphs of HF decoders and hand-written models: which mask constructions
become descriptors (and which stay materialised, or run as eager math), with the rewritten graph
computing exactly what the original computed."""
import copy

import pytest
import torch

from burstc.passes.canonicalize import canonicalize_attention
from burstc.passes.find_attention import find_attention_sites
from burstc.passes.masks import recognize_masks
from burstc.runtime.masked_sdpa import additive_attention, masked_sdpa

transformers = pytest.importorskip("transformers")
N = 23


def _hf(kind="llama", impl="sdpa", **extra):
    torch.manual_seed(0)
    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[kind]
    config = getattr(transformers, f"{prefix}Config")(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, **extra)
    config._attn_implementation = impl
    return getattr(transformers, f"{prefix}ForCausalLM")(config).eval()


def _captured(model, **inputs):
    """(original graph, graph after the masks pass, example inputs) of the model's forward."""
    captured = []

    def capture(gm, example_inputs):
        gm = canonicalize_attention(gm, example_inputs)
        captured.append((copy.deepcopy(gm), recognize_masks(gm), example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture)(**inputs)
    return captured[-1]


def _sites(gm):
    return [(s.node.target, s) for s in find_attention_sites(gm)]


def _same_outputs(before, after, example_inputs):
    with torch.no_grad():
        want, got = before(*example_inputs), after(*example_inputs)
    for a, b in zip(want, got):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


IDS = torch.randint(0, 64, (2, N), generator=torch.Generator().manual_seed(1))
PADDED = torch.ones(2, N, dtype=torch.long).index_fill_(1, torch.arange(4), 0)
PACKED = torch.cat([torch.arange(9), torch.arange(6), torch.arange(8)]).view(1, -1)


@pytest.mark.parametrize("case, inputs, extra, expect", [
    ("padding", dict(attention_mask=PADDED), {}, dict(is_causal=True, padding=True, docs=False, left=None)),
    ("all-ones tokenizer mask", dict(attention_mask=torch.ones(2, N, dtype=torch.long)), {},
     dict(is_causal=True, padding=True, docs=False, left=None)),
    ("packed documents", dict(position_ids=PACKED, use_cache=False), {},
     dict(is_causal=True, padding=False, docs=True, left=None)),
    ("model positions, no cache", dict(use_cache=False), {}, dict(is_causal=True, padding=False, docs=False, left=None)),
])
def test_llama_sdpa_masks_become_descriptors(case, inputs, extra, expect):
    before, after, example_inputs = _captured(_hf(**extra), input_ids=IDS, **inputs)
    sites = _sites(after)
    assert len(sites) == 2 and all(target is masked_sdpa for target, _ in sites), case
    for _, s in sites:
        assert s.is_causal == expect["is_causal"] and s.window_left == expect["left"]
        assert (s.key_padding is not None) == expect["padding"] and (s.document_ids is not None) == expect["docs"]
    assert not any(n.op == "call_method" and n.target == "expand" and len(n.args) == 5 for n in after.graph.nodes), \
        "the N x N mask is still built"
    _same_outputs(before, after, example_inputs)


def test_mistral_sliding_window():
    before, after, example_inputs = _captured(_hf("mistral", sliding_window=5), input_ids=IDS, use_cache=False)
    for target, s in _sites(after):
        assert target is masked_sdpa and s.is_causal and s.window_left == 4 and s.window_right is None
    _same_outputs(before, after, example_inputs)


def test_eager_attention_path():
    """HF eager: the index-built causal mask as where(M, 0, finfo.min) becomes descriptors; with key
    padding (rows of padding average every value) the site runs the eager formula, left alone."""
    before, after, example_inputs = _captured(_hf(impl="eager"), input_ids=IDS, use_cache=False)
    for target, s in _sites(after):
        assert target is masked_sdpa and s.is_causal and s.fill == torch.finfo(torch.float32).min
    _same_outputs(before, after, example_inputs)
    before, after, example_inputs = _captured(_hf(impl="eager"), input_ids=IDS, attention_mask=PADDED)
    assert all(target is additive_attention and s.node.meta["burst_leave"] for target, s in _sites(after))
    _same_outputs(before, after, example_inputs)
    assert after.meta["burst_masks"]["materialised"]


class _RandomMask(torch.nn.Module):
    """A mask no construction describes (a buffer), and a 2-D one that broadcasts over rows."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mask", torch.rand(N, N, generator=torch.Generator().manual_seed(2)) > 0.3)
        self.register_buffer("keys", torch.rand(1, N, generator=torch.Generator().manual_seed(3)) > 0.3)

    def forward(self, q, k, v):
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        return a + torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.keys)


def test_unrecognised_masks_take_the_row_form():
    q = torch.randn(2, 2, N, 8)
    before, after, example_inputs = _captured(_RandomMask(), q=q, k=q, v=q)
    sites = find_attention_sites(after)
    assert [tuple(s.attn_mask.meta["example_value"].shape) for s in sites] == [(1, 1, N, N)] * 2
    assert len(after.meta["burst_masks"]["materialised"]) == 2
    _same_outputs(before, after, example_inputs)


def test_flex_attention_mask_mod_becomes_a_registered_descriptor():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    docs = torch.repeat_interleave(torch.arange(2), torch.tensor([9, N - 9]))

    def same_document(b, h, q_idx, kv_idx):
        return docs[q_idx] == docs[kv_idx]

    block_mask = create_block_mask(same_document, None, None, N, N, device="cpu")

    class Flex(torch.nn.Module):
        def forward(self, q, k, v, score_mod=None):
            return flex_attention(q, k, v, block_mask=None if score_mod else block_mask, score_mod=score_mod)

    q = torch.randn(1, 2, N, 8)
    _, after, example_inputs = _captured(Flex(), q=q, k=q, v=q)
    (target, site), = _sites(after)
    assert target is masked_sdpa and site.mask_mod.startswith("mask_mod_") and len(site.mask_buffers) == 1
    with torch.no_grad():
        torch.testing.assert_close(after(*example_inputs)[0], Flex()(q, q, q), rtol=0, atol=1e-6)
    _, after, _ = _captured(Flex(), q=q, k=q, v=q, score_mod=_double)  # a score_mod: left as flex_attention
    assert not _sites(after) and any("score_mod" in why for _, why in after.meta["burst_masks"]["flex"])


def _double(score, b, h, q_idx, kv_idx):
    return score * 2


class _Chunked(torch.nn.Module):
    """Llama 4's chunked causal mask as HF's masking_utils spells it (index broadcasting): keys in the query's
    chunk of `size` tokens, counted from each row's left padding, causal, not padding. kv_size other than
    size makes the two sides disagree: not a chunk atom."""

    def __init__(self, size, kv_size=None):
        super().__init__()
        self.size, self.kv_size = size, kv_size or size

    def forward(self, q, attention_mask):
        padding = attention_mask.bool()
        left = (attention_mask.cumsum(dim=-1) == torch.zeros_like(attention_mask)).sum(dim=-1)
        b = torch.arange(q.shape[0])[:, None, None, None]
        qi, ki = torch.arange(N)[None, None, :, None], torch.arange(N)[None, None, None, :]
        keep = ((ki - left[b]) // self.kv_size == (qi - left[b]) // self.size) & (ki <= qi) & padding[b, ki]
        return torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=keep)


def test_llama4_chunks_become_document_ids():
    q = torch.randn(2, 2, N, 8)
    before, after, example_inputs = _captured(_Chunked(5), q=q, attention_mask=PADDED)
    ((target, site),) = _sites(after)
    assert target is masked_sdpa and site.is_causal and site.document_ids is not None and site.key_padding is not None
    docs = site.document_ids.meta["example_value"]
    assert docs.shape == (2, N) and not docs.is_floating_point()
    _same_outputs(before, after, example_inputs)


def test_chunks_of_two_sizes_stay_materialised():
    q = torch.randn(2, 2, N, 8)
    before, after, example_inputs = _captured(_Chunked(5, kv_size=4), q=q, attention_mask=PADDED)
    assert len(after.meta["burst_masks"]["materialised"]) == 1 and not after.meta["burst_masks"]["recognised"]
    _same_outputs(before, after, example_inputs)
