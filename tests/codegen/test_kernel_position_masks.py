"""The Triton kernels' in-kernel mask (MASK "positions": positions, window, documents, key padding) under
TRITON_INTERPRET, against float64 torch and against the "bool" kernels on the materialised descriptor.

Set up like test_kernel_masks.py: random inputs, GQA (4 query heads on 2 key/value heads), q_len != k_len,
lengths that are not multiples of the interpreter's tiles (forward/dq 32 x 16, dkdv 16 x 32), the masked
item at row offsets after an unmasked item or into a fresh state. Each item is described by global
positions under an AttentionMask; the truth is `AttentionMask.evaluate` of the same positions. Positions
come contiguous or in two non-adjacent segments in either order (zigzag-like), so the kernels' tile
proofs cannot rely on sorted positions; cases hold fully hidden rows and fully hidden tiles."""
import math
import zlib

import pytest
import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from burstc.codegen import cache
from burstc.runtime.kernels.base import QueryBundle, WorkItem
from burstc.runtime.kernels.tile_mask import PositionMask
from burstc.runtime.kernels.triton import TritonKernel
from burstc.schedule.masks import AttentionMask
from tests.codegen.test_kernel_masks import (ATOL, B, GRAD_TOL, H, H_KV, K_LEN, MASKED, Q_LEN, UNMASKED,
                                             assert_close, assert_hidden_item_adds_nothing, global_bias, random,
                                             reference)

pytestmark = pytest.mark.usefixtures("interpret")

KERNEL = TritonKernel()
INTERPRETED = cache.kernel_module(interpret=True)  # the kernels' helpers, for a probe of _visible_range
N = 200  # the global sequence the positions index


def segments(*ranges):
    """int64 positions: the given (start, stop) ranges one after the other."""
    return torch.cat([torch.arange(start, stop) for start, stop in ranges])


def random_documents(generator):
    """[B, N] document ids with random boundaries, different per batch row."""
    rows = []
    for _ in range(B):
        cuts = torch.randperm(N - 1, generator=generator)[:9].add(1).sort().values
        starts = torch.zeros(N, dtype=torch.int64)
        starts[cuts] = 1
        rows.append(starts.cumsum(0))
    return torch.stack(rows)


def per_batch_padding(generator):
    """[B, N] bool key padding (True = real key): batch 0 random, batch 1 without positions 100..150."""
    padding = torch.rand(B, N, generator=generator) > 0.3
    padding[1, 100:150] = False
    return padding


def make_case(name, generator):
    """(AttentionMask, q_pos [37], k_pos [45]) of a named case."""
    contiguous = segments((60, 97)), segments((20, 65))
    zigzag = segments((30, 48), (130, 149)), segments((125, 150), (25, 45))  # keys in descending segments
    if name == "causal_window":  # rows from q = 77 on see no key; key tile 0 (k < 36) is hidden from all
        return AttentionMask(causal=True, window=(12, None)), *contiguous
    if name == "window_both_sides":
        return AttentionMask(window=(5, 7)), *zigzag
    if name == "documents":
        return AttentionMask(document_ids=random_documents(generator)), segments((10, 28), (150, 169)), \
            segments((160, 180), (0, 25))
    if name == "key_padding":
        # batch 1: keys 0..31 all padding (a hidden key tile of every kernel's tiling)
        return AttentionMask(key_padding=per_batch_padding(generator)), segments((0, 37)), \
            segments((110, 145), (80, 90))
    if name == "combined":
        mask = AttentionMask(causal=True, window=(40, 3), key_padding=per_batch_padding(generator),
                             document_ids=random_documents(generator))
        return mask, *zigzag
    raise ValueError(name)


def bias_of(visible):
    """[B, H, 37, 45] float64 additive bias of an evaluated mask (-inf = hidden)."""
    bias = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, -math.inf)
    return bias.expand(B, H, *visible.shape[-2:])


def run(kernel, q, k, v, dout, items, scale, grads):
    """(out, lse, dq, dk, dv - their starting values) of a Triton kernel on items (item, mask)."""
    state = kernel.forward_init(q)
    for item, mask in items:
        kernel.forward_step(state, q, k, v, item, scale, mask=mask)
    assert not (state.m.isnan().any() or state.l.isnan().any() or state.acc.isnan().any())
    out, lse = kernel.forward_finalize(state)
    bundle = QueryBundle(q=q, dout=dout, lse=grads["lse"], delta=grads["delta"])
    dq, dk, dv = (grads[name].clone() for name in ("dq", "dk", "dv"))
    for item, mask in items:
        kernel.backward_step(bundle, k, v, item, scale, dq, dk, dv, mask=mask)
    return out, lse, dq - grads["dq"], dk - grads["dk"], dv - grads["dv"]


CASES = [  # (case, dtype, state before the masked item, head dim)
    ("causal_window", torch.float32, "fresh", 64),
    ("window_both_sides", torch.float32, "after_unmasked", 80),
    ("documents", torch.float32, "fresh", 64),
    ("key_padding", torch.float32, "after_unmasked", 64),
    ("combined", torch.float32, "fresh", 64),
    ("combined", torch.float16, "after_unmasked", 64),
]


@pytest.mark.parametrize("case,dtype,before,head_dim", CASES)
def test_position_mask_forward_and_backward(case, dtype, before, head_dim):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((case, dtype, before, head_dim)).encode()))
    mask, q_pos, k_pos = make_case(case, gen)
    described = PositionMask.of(mask, q_pos, k_pos)
    truth = mask.evaluate(q_pos, k_pos)
    assert torch.equal(described.materialize(), truth)
    assert (~truth).any() and truth.any()

    q = random(B, H, Q_LEN, head_dim, dtype=dtype, generator=gen)
    k, v = (random(B, H_KV, K_LEN, head_dim, dtype=dtype, generator=gen) for _ in range(2))
    dout = random(B, H, Q_LEN, head_dim, dtype=dtype, generator=gen)
    scale = head_dim ** -0.5
    before_items = [(UNMASKED, None)] if before == "after_unmasked" else []
    out_ref, lse_ref, dq_ref, dk_ref, dv_ref = reference(
        q, k, v, dout, global_bias(before_items + [(MASKED, bias_of(truth))]), scale)
    dead = lse_ref == -math.inf
    assert (~dead).any()
    grads = dict(lse=lse_ref.float(), delta=(out_ref * dout.double()).sum(-1).float(),
                 dq=random(*q.shape, generator=gen), dk=random(*k.shape, generator=gen),
                 dv=random(*k.shape, generator=gen))

    got = run(KERNEL, q, k, v, dout, before_items + [(MASKED, described)], scale, grads)
    out, lse, dq, dk, dv = got
    assert_close(out, out_ref, ATOL[dtype], "out")
    assert_close(lse, lse_ref, ATOL[dtype] if dtype == torch.float32 else 1e-4, "lse")
    assert torch.all(out[dead] == 0) and torch.all(lse[dead] == -math.inf)
    assert_close(dq, dq_ref, GRAD_TOL[dtype], "dq")
    assert_close(dk, dk_ref, GRAD_TOL[dtype], "dk")
    assert_close(dv, dv_ref, GRAD_TOL[dtype], "dv")
    assert torch.all(dq[dead] == 0)  # rows that saw nothing get exactly nothing

    # the same tiles in the same order as the "bool" kernels on the materialised mask: the same numbers
    as_bool = run(KERNEL, q, k, v, dout, before_items + [(MASKED, described.materialize())], scale, grads)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, as_bool):
        assert torch.equal(a, b), name


def test_fully_hidden_item_leaves_the_state_as_it_was():
    """Keys all outside the queries' window: no tile is visited, state and gradients stay as they were."""
    q, k, v = random(1, 4, 37, 64), random(1, 2, 45, 64), random(1, 2, 45, 64)
    hidden = PositionMask.of(AttentionMask(window=(3, 3)), segments((100, 137)), segments((0, 45)))
    assert_hidden_item_adds_nothing(q, k, v, WorkItem(0, 37, 0, 45, False), hidden)


def test_position_mask_arguments_are_checked():
    q, k, v = random(2, 4, 10, 64), random(2, 2, 12, 64), random(2, 2, 12, 64)
    state = KERNEL.forward_init(q)
    item = WorkItem(0, 10, 0, 12, False)
    window = PositionMask(torch.arange(10, dtype=torch.int32), torch.arange(12, dtype=torch.int32), 2, 0)
    with pytest.raises(ValueError, match="does not describe"):
        KERNEL.forward_step(state, q, k, v, WorkItem(0, 10, 0, 11, False), 0.1, mask=window)
    with pytest.raises(ValueError, match="causal"):
        KERNEL.forward_step(state, q, k, v, WorkItem(0, 10, 0, 12, True), 0.1, mask=window)
    with pytest.raises(TypeError, match="int32"):
        KERNEL.forward_step(state, q, k, v, item, 0.1,
                            mask=PositionMask(torch.arange(10), torch.arange(12, dtype=torch.int32)))
    with pytest.raises(ValueError, match="both q_docs and k_docs"):
        KERNEL.forward_step(state, q, k, v, item, 0.1,
                            mask=PositionMask(window.q_pos, window.k_pos, q_docs=torch.zeros(1, 10, dtype=torch.int32)))
    with pytest.raises(ValueError, match="broadcast"):
        KERNEL.forward_step(state, q, k, v, item, 0.1,
                            mask=PositionMask(window.q_pos, window.k_pos, k_valid=torch.ones(3, 12, dtype=torch.bool)))
    assert torch.all(state.m == -math.inf)  # nothing ran


def probe_visible_range(out_ptr, q_pos_ptr, k_pos_ptr, left, right, q_doc_ptr, k_doc_ptr, stride_qdocb,
                        stride_kdocb, k_valid_ptr, stride_kvb, q_len, k_len, FIXED: tl.constexpr,
                        SCAN: tl.constexpr, DOCS: tl.constexpr, PAD: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """(run interpreted) out[b, program] = the [lo, hi) of _visible_range for a program's fixed rows."""
    program, b = tl.program_id(0), tl.program_id(1)
    mask = INTERPRETED._item_mask(b, 0, (None, None, None, None, None),
                                  (q_pos_ptr, k_pos_ptr, left, right, q_doc_ptr, k_doc_ptr, stride_qdocb,
                                   stride_kdocb, k_valid_ptr, stride_kvb), "positions", DOCS, PAD)
    fixed = program * FIXED + tl.arange(0, FIXED)
    if KEYS_FIRST:
        lo, hi = INTERPRETED._visible_range(mask, fixed, k_len, q_len, SCAN, "positions", DOCS, PAD, True)
    else:
        lo, hi = INTERPRETED._visible_range(mask, fixed, q_len, k_len, SCAN, "positions", DOCS, PAD, False)
    base = out_ptr + (b * tl.num_programs(0) + program) * 2
    tl.store(base, lo)
    tl.store(base + 1, hi)


def visible_ranges(described, fixed_block, scan_block, keys_first):
    """[B, programs, 2]: the [lo, hi) _visible_range gives each program (fixed query rows, or keys if
    keys_first)."""
    q_len, k_len = described.shape
    fixed_len = k_len if keys_first else q_len
    programs = -(-fixed_len // fixed_block)
    out = torch.empty(B, programs, 2, dtype=torch.int32)
    docs = (described.q_docs.expand(B, -1).contiguous(), described.k_docs.expand(B, -1).contiguous(), q_len, k_len) \
        if described.q_docs is not None else (None,) * 4
    valid = (described.k_valid.expand(B, -1).contiguous().view(torch.uint8), k_len) \
        if described.k_valid is not None else (None,) * 2
    probe = InterpretedFunction(probe_visible_range)
    with cache.stdlib_mode(interpret=True):
        probe[(programs, B)](out, described.q_pos, described.k_pos, described.left, described.right, *docs, *valid,
                             q_len, k_len, FIXED=fixed_block, SCAN=scan_block, DOCS=described.q_docs is not None,
                             PAD=described.k_valid is not None, KEYS_FIRST=keys_first)
    return out


@pytest.mark.parametrize("case", ["causal_window", "window_both_sides", "documents", "key_padding", "combined"])
@pytest.mark.parametrize("keys_first", [False, True], ids=["query_rows", "key_rows"])
def test_visible_range_holds_every_visible_tile(case, keys_first):
    """The tiles a program visits, proven from position and document bounds whatever the order of the
    positions, hold every visible pair; for a window on contiguous positions they are exactly the tiles
    from the first to the last visible one (hidden leading and trailing tiles are skipped)."""
    mask, q_pos, k_pos = make_case(case, torch.Generator().manual_seed(zlib.crc32(case.encode())))
    described = PositionMask.of(mask, q_pos, k_pos)
    fixed_block, scan_block = 32, 16  # the interpreter's tiles: forward/dq 32 rows x 16 keys, dkdv 32 keys x 16 rows
    ranges = visible_ranges(described, fixed_block, scan_block, keys_first)
    visible = described.materialize().expand(B, 1, -1, -1)[:, 0]  # [B, q_len, k_len]
    if keys_first:
        visible = visible.transpose(1, 2)  # [B, fixed keys, scanned queries]
    tiles = -(-visible.shape[2] // scan_block)
    skipped = 0
    for b in range(B):
        for program, (lo, hi) in enumerate(ranges[b].tolist()):
            seen = visible[b, program * fixed_block:(program + 1) * fixed_block].any(0).nonzero().flatten()
            skipped += tiles - max(0, -(-(hi - lo) // scan_block))
            if len(seen) == 0:
                assert lo >= hi, (b, program, lo, hi)
                continue
            first = seen.min().item() // scan_block * scan_block
            last = seen.max().item() // scan_block * scan_block
            assert lo <= first and last < hi, (b, program, lo, hi, first, last)
            if case == "causal_window":
                assert (lo, hi) == (first, last + scan_block), (b, program)
    assert skipped > 0  # the bounds do skip tiles
