"""PositionMask (tile_mask.py): the item descriptor equals AttentionMask.evaluate, and a ring on the Triton
kernels (under TRITON_INTERPRET, several virtual ranks in one process) hands its masked items to the
kernels as descriptors (MASK "positions", no evaluated tile) and equals single-device SDPA in float64."""
import pytest
import torch

import burstc
from burstc.runtime.kernels.reference import ReferenceKernel
from burstc.runtime.kernels.tile_mask import UNBOUNDED, PositionMask, as_tile, position_form
from burstc.runtime.kernels.triton import TritonKernel
from burstc.schedule.masks import AttentionMask, documents_from_cu_seqlens
from tests.runtime.reference import dense_mask, max_errors, random_qkv, sdpa_masked_with_grads

B, N = 2, 60


def masks(generator):
    padding = torch.rand(B, N, generator=generator) > 0.3
    padding[1, 20:45] = False
    docs = torch.stack([documents_from_cu_seqlens(torch.tensor(cu), N)[0]
                        for cu in ([0, 7, 30, 31, 60], [0, 25, 60])])
    return {
        "causal_window": AttentionMask(causal=True, window=(9, None)),
        "window_both_sides": AttentionMask(window=(4, 6)),
        "window_ahead_only": AttentionMask(window=(-2, 5)),
        "causal_negative_right": AttentionMask(causal=True, window=(None, -3)),
        "documents_int64_ids": AttentionMask(document_ids=docs * 10 ** 12 - 7),
        "key_padding": AttentionMask(key_padding=padding),
        "combined": AttentionMask(causal=True, window=(20, 2), key_padding=padding, document_ids=docs),
    }


@pytest.mark.parametrize("name", ["causal_window", "window_both_sides", "window_ahead_only", "causal_negative_right",
                                  "documents_int64_ids", "key_padding", "combined"])
def test_descriptor_materializes_what_the_mask_evaluates(name):
    gen = torch.Generator().manual_seed(7)
    mask = masks(gen)[name]
    for q_pos, k_pos in [(torch.arange(10, 40), torch.arange(0, 60)),
                         (torch.randperm(N, generator=gen)[:23], torch.randperm(N, generator=gen)[:31]),
                         (torch.cat([torch.arange(0, 8), torch.arange(50, 60)]), torch.arange(59, 20, -1))]:
        described = PositionMask.of(mask, q_pos, k_pos)
        assert described.q_pos.dtype == torch.int32 and described.shape == (len(q_pos), len(k_pos))
        want = mask.evaluate(q_pos, k_pos)
        got = described.materialize()
        assert got.dtype == torch.bool and got.shape == want.shape and torch.equal(got, want), name
        assert torch.equal(as_tile(described), want)


def test_descriptor_bounds_and_fallbacks():
    assert PositionMask.of(AttentionMask(mask_mod=lambda b, h, q, k: q >= k), torch.arange(4), torch.arange(4)) is None
    assert PositionMask.of(AttentionMask(dense=torch.ones(1, 1, 4, 4, dtype=torch.bool)),
                           torch.arange(4), torch.arange(4)) is None
    described = PositionMask.of(AttentionMask(window=(10 ** 12, None)), torch.arange(3), torch.arange(3))
    assert (described.left, described.right) == (UNBOUNDED, UNBOUNDED)
    assert PositionMask.of(AttentionMask(causal=True, window=(3, 7)), torch.arange(3), torch.arange(3)).right == 0
    prepared = position_form(AttentionMask(document_ids=torch.tensor([[5, 5, 2 ** 40]])))
    assert prepared.document_ids.dtype == torch.int32 and position_form(prepared) is prepared
    tile = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    assert as_tile(tile) is tile and as_tile(None) is None


def counting_launches(monkeypatch):
    """The mask class of every Triton kernel launch from now on (a list that fills as they run)."""
    launched = []
    launch = TritonKernel._launch

    def counted(spec, grid, *args):
        launched.append(spec.mask_class)
        launch(spec, grid, *args)

    monkeypatch.setattr(TritonKernel, "_launch", staticmethod(counted))
    return launched


RING_CASES = [  # (world, layout, backward scheme, burst_attention mask arguments, the positions class)
    (2, "contiguous", "kv_ring", dict(causal=True, window=(5, 0)), "pos"),
    (3, "zigzag", "query_ring", dict(causal=True, documents=True, key_padding=True), "pos+docs+pad"),
    (2, "striped", "kv_ring", dict(window=(7, 3), documents=True), "pos+docs"),
]


@pytest.mark.parametrize("world,layout,backward,kwargs,position_class", RING_CASES)
def test_ring_hands_the_triton_kernel_descriptors(world, layout, backward, kwargs, position_class, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("BURST_MASK_TILE", "16")  # several tiles per chunk: full, partial and skipped ones
    b, n = 2, 45
    gen = torch.Generator().manual_seed(world)
    docs = torch.stack([torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
                        for lengths in ([10, 20, 15], [4, 30, 11])])
    padding = torch.rand(b, n, generator=gen) > 0.2
    padding[1, :12] = False
    call = {key: value for key, value in kwargs.items() if key in ("causal", "window")}
    dense = dict(call)
    if kwargs.get("documents"):
        call["document_ids"] = dense["document_ids"] = docs
    if kwargs.get("key_padding"):
        call["key_padding_mask"] = dense["key_padding"] = padding
    q, k, v, dout = random_qkv(b, 4, 2, n, 16, torch.float32, seed=world)
    launched = counting_launches(monkeypatch)
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    out = burstc.burst_attention(qq, kk, vv, enable_gqa=True, virtual_world_size=world, layout=layout,
                                 backward=backward, kernel="triton", **call)
    grads = torch.autograd.grad(out, (qq, kk, vv), dout)
    want = sdpa_masked_with_grads(q, k, v, dout, dense_mask(b, n, **dense))
    assert max_errors((out,) + grads, want)[0] <= 1e-5
    assert launched.count(position_class) >= 3  # forward, dkdv and dq of at least one masked item
    assert not {"bool", "bias"} & set(launched)  # no evaluated tile reached the kernels


def test_other_kernels_and_materialised_masks_keep_tiles(monkeypatch):
    """A kernel that does not take descriptors gets tiles; so does the Triton kernel for an attn_mask."""
    from burstc.runtime import ring

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    handed = []
    tiles_call = ring._MaskTiles.__call__

    def recording(self, q_rank, k_rank, item):
        mask = tiles_call(self, q_rank, k_rank, item)
        handed.append(type(mask).__name__)
        return mask

    monkeypatch.setattr(ring._MaskTiles, "__call__", recording)
    q, k, v, dout = random_qkv(1, 2, 2, 24, 16, torch.float64, seed=1)
    burstc.burst_attention(q, k, v, causal=True, window=(4, 0), virtual_world_size=2, kernel="reference")
    assert "Tensor" in handed and "PositionMask" not in handed
    assert not getattr(ReferenceKernel(), "takes_position_masks", False)

    handed.clear()
    attn_mask = torch.rand(1, 1, 24, 24, generator=torch.Generator().manual_seed(2)) > 0.3
    launched = counting_launches(monkeypatch)
    q, k, v, dout = random_qkv(1, 2, 2, 24, 16, torch.float32, seed=2)
    got = burstc.burst_attention(q, k, v, attn_mask=attn_mask, virtual_world_size=2, kernel="triton")
    want = sdpa_masked_with_grads(q, k, v, dout, attn_mask)[0]
    assert (got.double() - want).abs().max() <= 1e-5
    assert "PositionMask" not in handed and "bool" in launched
