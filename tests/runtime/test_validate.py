"""Bad input in one process: a BurstInputError that names the fix, before any compute."""
import pytest
import torch

import burstc


def qkv(*shape, dtype=torch.float32):
    return tuple(torch.randn(*shape, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize("kwargs, tensors, message", [
    (dict(attn_mask=torch.ones(4, 4, dtype=torch.bool)), qkv(1, 2, 4, 8), "attn_mask must be a 4-D"),
    (dict(attn_mask=torch.ones(1, 1, 4, 5, dtype=torch.bool)), qkv(1, 2, 4, 8), r"\[B\|1, H\|1, 4, 4\]"),
    (dict(key_padding_mask=torch.ones(1, 5, dtype=torch.bool)), qkv(1, 2, 4, 8), "covers 5 tokens"),
    (dict(key_padding_mask=torch.ones(3, 4, dtype=torch.bool)), qkv(2, 2, 4, 8), r"\[batch, seq_len\]"),
    (dict(document_ids=torch.ones(1, 4)), qkv(1, 2, 4, 8), "must be integers"),
    (dict(document_ids=torch.zeros(1, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 4])), qkv(1, 2, 4, 8),
     "not both"),
    (dict(cu_seqlens=torch.tensor([0, 3])), qkv(1, 2, 4, 8), "end at the sequence length 4"),
    (dict(window=(2.5, 0)), qkv(1, 2, 4, 8), r"window must be \(left, right\)"),
    (dict(dropout_p=0.1), qkv(1, 2, 4, 8), "dropout_p=0.0"),
    (dict(layout="spiral"), qkv(1, 2, 4, 8), "contiguous, zigzag, striped"),
    (dict(backward="sideways"), qkv(1, 2, 4, 8), "query_ring, kv_ring"),
    (dict(kernel="gpu"), qkv(1, 2, 4, 8), "choose one of auto, cpu, reference, triton"),
    (dict(), (torch.randn(2, 4, 8), ) * 3, "4-D tensor"),
    (dict(), (torch.randn(1, 4, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)), "enable_gqa=True"),
    (dict(enable_gqa=True), (torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)), "multiple"),
    (dict(), (torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)), "same tokens"),
    (dict(), (torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8).double(), torch.randn(1, 2, 4, 8)), "one floating dtype"),
    (dict(virtual_world_size=0), qkv(1, 2, 4, 8), "virtual_world_size must be"),
    (dict(kernel="cpu"), qkv(1, 2, 4, 8, dtype=torch.float64)[:2] + (torch.randn(1, 2, 4, 8, dtype=torch.float64),), None),
])
def test_bad_input_names_the_fix(kwargs, tensors, message):
    if message is None:  # control case: valid input runs
        burstc.burst_attention(*tensors, **kwargs)
        return
    with pytest.raises(burstc.BurstInputError, match=message):
        burstc.burst_attention(*tensors, **kwargs)


def test_environment_sets_the_defaults(monkeypatch):
    monkeypatch.setenv("BURST_LAYOUT", "spiral")
    with pytest.raises(burstc.BurstInputError, match="unknown layout 'spiral'"):
        burstc.burst_attention(*qkv(1, 2, 4, 8))
    monkeypatch.setenv("BURST_TIMEOUT_S", "7.5")
    assert burstc.BurstConfig.from_env().timeout_s == 7.5
