"""The first-call proof: recognised descriptors are checked against the model's own mask code on sampled
tiles, and a site whose descriptors are wrong runs the model's code instead (exact, loud)."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import burstc.passes.masks as mask_pass
from burstc.runtime.mask_proof import disagreement, sampled_positions
from burstc.schedule.masks import AttentionMask

N = 40


class _WindowAttention(torch.nn.Module):
    """Sliding-window causal attention whose mask the model builds from index comparisons."""

    def __init__(self, window=5):
        super().__init__()
        torch.manual_seed(0)
        self.window, self.qkv = window, torch.nn.Linear(16, 48)

    def forward(self, x, padding):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        batch_idx = torch.arange(b)[:, None, None, None]  # the spelling of HF's masking_utils
        q_idx, kv_idx = torch.arange(n)[None, None, :, None], torch.arange(n)[None, None, None, :]
        mask = (kv_idx <= q_idx) & (kv_idx > q_idx - self.window) & padding[batch_idx, kv_idx]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _inputs():
    x = torch.randn(2, N, 16, generator=torch.Generator().manual_seed(1))
    padding = torch.ones(2, N, dtype=torch.bool)
    padding[1, :7] = False
    return x, padding


def _compiled_error(model, options):
    x, padding = _inputs()
    want = model(x, padding)
    counters.clear()
    torch._dynamo.reset()
    got = torch.compile(model, backend="burst", options={"inner": "aot_eager", **options})(x, padding)
    rows = padding[:, None, :, None]  # rows of padding queries see nothing: SDPA gives NaN there
    return (got - want).masked_fill(~rows, 0).abs().max().item(), dict(counters["burst"])


def test_a_correct_recognition_is_proven_once():
    err, burst = _compiled_error(_WindowAttention(), {})
    assert err < 1e-5
    assert burst["masks_recognised"] == 1 and burst.get("mask_proofs") == 1 and not burst.get("mask_proofs_failed")


@pytest.mark.parametrize("broken", ["window dropped", "padding dropped", "causal turned bidirectional"])
def test_an_injected_misrecognition_is_caught_and_runs_the_models_mask(monkeypatch, broken, caplog):
    recognise = mask_pass.recognise

    def wrong(mask, q_len, kv_len, **kwargs):
        found = recognise(mask, q_len, kv_len, **kwargs)
        if broken == "window dropped":
            return dataclasses.replace(found, left=None)
        if broken == "padding dropped":
            return dataclasses.replace(found, padding=None)
        return dataclasses.replace(found, right=None)
    monkeypatch.setattr(mask_pass, "recognise", wrong)
    err, burst = _compiled_error(_WindowAttention(), {"mask_tile": 8})
    assert burst["masks_recognised"] == 1 and burst.get("mask_proofs_failed") == 1, burst
    assert err < 1e-5, (broken, err)
    assert "differs from the model's own mask code" in caplog.text


def test_samples_cover_the_diagonal_the_window_edges_and_every_boundary():
    docs = torch.tensor([[0] * 13 + [1] * 20 + [2] * 967])
    padding = torch.ones(1, 1000, dtype=torch.bool)
    padding[0, 500:] = False
    descriptor = AttentionMask(causal=True, window=(64, None), key_padding=padding, document_ids=docs)
    q, k = sampled_positions(descriptor, 1000)
    assert {0, 999, 12, 13, 32, 33, 499, 500} <= set(q.tolist())
    keys = set(k.tolist())
    for p in q.tolist():
        assert {max(p - 1, 0), p, min(p + 1, 999)} <= keys and (p < 65 or {p - 65, p - 64} <= keys)
    assert len(q) * len(k) < 100_000  # never N x N


def test_a_chunk_predicate_missing_from_the_descriptor_is_found():
    """Llama 4's chunked causal mask described as plain causal: the proof finds a pair it gets wrong."""
    descriptor = AttentionMask(causal=True)

    def chunked(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx // 32 == q_idx // 32)
    where = disagreement(descriptor, chunked, 4096)
    assert where is not None
    _, q, kv = where
    assert kv <= q and kv // 32 != q // 32
    assert disagreement(AttentionMask(causal=True), lambda b, h, q, kv: kv <= q, 4096) is None
