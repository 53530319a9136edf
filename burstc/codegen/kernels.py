"""The fused attention kernels of burstc: one @triton.jit kernel per stage of a ring step.

Tensors are [B, H, L, d] views with arbitrary strides; a WorkItem's rows arrive as views of the
item's rows (a pointer offset), so inside a kernel row 0 is the item's first row. Query head h reads
K/V head h // GROUP (GQA without repeated K/V). CAUSAL is the top-left mask of the item's rectangle:
query row t sees key rows 0..t; rows at or beyond k_len see every key.

Units: scores are kept in base 2 inside the kernels (S * scale * log2(e)), so the running maximum
`m` of the forward state is in base-2 units in every step. Everything that leaves the kernels in the
runtime's currency is natural-log: finalise writes lse = ln(2) * (m + log2(l)), and the backward
kernels take the natural-log global lse and convert it on load.

Head dims that are not a power of two (80, 96) run in a BLOCK_D = next power of two tile with the
extra columns masked on every load and store.

MASK (forward_step, backward_dkdv, backward_dq) is the item's generic mask: "none" (the item is
full or CAUSAL), "bool" (a uint8 view of a boolean mask, nonzero = visible), "bias" (a floating
additive bias on the scaled scores, -inf = hidden) or "positions" (no tile: visibility computed from
the item's global positions, see runtime/kernels/tile_mask.py). A tile mask covers exactly the item's
rectangle and is read through its own strides (mask_ptr, stride_mb, stride_mh, stride_mq, stride_mk;
0 strides for broadcast batch/head dims). A positions mask reads int32 positions q_pos_ptr [q_len]
and k_pos_ptr [k_len] and the window (key k visible from query q iff
q - window_left <= k <= q + window_right); with DOCS, int32 document ids (q_doc_ptr, k_doc_ptr; batch strides
stride_qdocb, stride_kdocb) that must be equal; with PAD, uint8 key validity (k_valid_ptr,
stride_kvb). Arguments a variant does not read are None, so with MASK == "none" the kernels compile
to the code they had before masks existed. Mask kinds differ only in how a tile's visibility (bool,
positions) or bias is produced (`_mask_tile`) and how a tile is found hidden (`_visible_range`); the
loops are one code path. Each program first scans its strip for the first and last tile where the mask may show
something (`_visible_range`: a tile mask's entries, or for positions a proof from the min/max of the
tile's positions and document ids and whether it holds a real key, valid for positions in any
order) and runs its loops over that range only: leading and trailing tiles the mask hides entirely
(windows, padding, documents) cost one cheap read and no dot product, and the loops stay free of
branches (which would keep Triton from pipelining their K/V loads); a hidden tile inside the range
is computed with P = 0. A query row that sees no visible key of an item leaves its running state as
it was (m = -inf and l = 0 while empty); its backward lse is -inf and it gets zero gradients.

SOFTCAP (the same three kernels) soft-caps the scores, S' = softcap * tanh(S / softcap) with S = scale *
q.k (Gemma 2), before any mask and before the online softmax's maximum: the loops take qk_scale = scale /
softcap to the tanh argument and scale its tanh by softcap in base 2 (`_soft_cap`). The backward kernels
recompute P = exp(S' - lse) and multiply dS by dS'/dS = 1 - tanh(S / softcap)^2. The cap is the runtime
float `softcap`; without SOFTCAP it is None and the kernels compile to the code they had before.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
UNBOUNDED = tl.constexpr(2 ** 30)  # tile_mask.UNBOUNDED: above every position
INT32_MAX = tl.constexpr(2 ** 31 - 1)


# ----------------------------------------------------------------------------------------------
# helpers


@triton.jit
def _load_tile(base, rows, cols, n_rows, stride_l, stride_d,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a [rows, BLOCK_D] tile of an [L, d] slice: zeros for rows >= n_rows (if CHECK_ROWS) and cols >= HEAD_DIM."""
    ptrs = base + rows[:, None] * stride_l + cols[None, :] * stride_d
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _store_tile(base, tile, rows, cols, n_rows, stride_l, stride_d, HEAD_DIM: tl.constexpr):
    """Store a [rows, BLOCK_D] tile into an [L, d] slice, skipping rows >= n_rows and cols >= HEAD_DIM."""
    ptrs = base + rows[:, None] * stride_l + cols[None, :] * stride_d
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM))


@triton.jit
def _add_into_tile(base, tile, rows, cols, n_rows, stride_l, stride_d, HEAD_DIM: tl.constexpr):
    """base[rows, cols] += tile (fp32 read-modify-write of the caller's accumulator; one program owns the rows)."""
    ptrs = base + rows[:, None] * stride_l + cols[None, :] * stride_d
    mask = (rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM)
    old = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, old + tile, mask=mask)


@triton.jit
def _key_range(first_row, k_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """For the query tile starting at first_row: (end of key tiles needing no mask, end of keys to visit)."""
    if CAUSAL:
        # key j is visible to every row of the tile iff j <= first_row
        clean_end = tl.minimum(first_row + 1, k_len) // BLOCK_N * BLOCK_N
        end = tl.minimum(first_row + BLOCK_M, k_len)
    else:
        clean_end = k_len // BLOCK_N * BLOCK_N
        end = k_len
    return clean_end, end


@triton.jit
def _base2_lse(lse_base, rows, n_rows, stride_l):
    """The natural-log lse of rows in base-2 units; +inf for padding rows and rows that saw no key, so P = 0 there."""
    lse = tl.load(lse_base + rows * stride_l, mask=rows < n_rows, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _soft_cap(x, softcap):
    """(softcap * tanh(x) in base-2 units, tanh(x)) of x = S / softcap; tanh from exp2(-2|x|), which neither
    overflows nor loses precision for large |x|."""
    e = tl.math.exp2(tl.abs(x) * (-2.0 * LOG2E))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(x < 0.0, -t, t)
    return t * (softcap * LOG2E), t


@triton.jit
def _offset(ptr, index, stride, PRESENT: tl.constexpr):
    """ptr + index * stride, or ptr (None) where the tensor is absent."""
    if PRESENT:
        return ptr + index * stride
    else:
        return ptr


@triton.jit
def _item_mask(b, h, tile_args, position_args, MASK: tl.constexpr, DOCS: tl.constexpr, PAD: tl.constexpr):
    """The item mask of batch b, query head h, as the tuple _mask_tile and _visible_range read. MASK "bool" /
    "bias": (its [q_len, k_len] plane, row stride, key stride) from tile_args (mask_ptr, stride_mb, stride_mh,
    stride_mq, stride_mk). "positions": (q_pos_ptr, k_pos_ptr, window_left, window_right, batch b's row of
    q_doc, k_doc and k_valid) from position_args (q_pos_ptr, k_pos_ptr, window_left, window_right, q_doc_ptr,
    k_doc_ptr, stride_qdocb, stride_kdocb, k_valid_ptr, stride_kvb); a row is None where DOCS / PAD are off."""
    if MASK == "positions":
        mask = (position_args[0], position_args[1], position_args[2], position_args[3],
                _offset(position_args[4], b, position_args[6], DOCS),
                _offset(position_args[5], b, position_args[7], DOCS),
                _offset(position_args[8], b, position_args[9], PAD))
    else:  # (built in one expression: a None local would not compile)
        mask = (_offset(_offset(tile_args[0], b, tile_args[1], MASK != "none"), h, tile_args[2], MASK != "none"),
                tile_args[3], tile_args[4])
    return mask


@triton.jit
def _oriented(of_queries, of_keys, KEYS_FIRST: tl.constexpr):
    """Per-query and per-key vectors broadcast to a [queries, keys] tile, or [keys, queries] if KEYS_FIRST."""
    if KEYS_FIRST:
        along_queries = of_queries[None, :]
        along_keys = of_keys[:, None]
    else:
        along_queries = of_queries[:, None]
        along_keys = of_keys[None, :]
    return along_queries, along_keys


@triton.jit
def _position_tile(mask, queries, keys, q_len, k_len, DOCS: tl.constexpr, PAD: tl.constexpr,
                   KEYS_FIRST: tl.constexpr):
    """visible (bool) of a MASK "positions" item on queries x keys: inside the item, within the window
    (q - left <= k <= q + right), same document (DOCS) and a real key (PAD)."""
    q_inside = queries < q_len
    k_live = keys < k_len
    q_pos = tl.load(mask[0] + queries, mask=q_inside, other=0)
    k_pos = tl.load(mask[1] + keys, mask=k_live, other=0)
    if PAD:
        k_live = k_live & (tl.load(mask[6] + keys, mask=k_live, other=0) != 0)
    # per query, the window's first and last key (no int32 overflow: positions < UNBOUNDED, |bounds| <= it)
    first_at, k_at = _oriented(tl.where(q_inside, q_pos - mask[2], UNBOUNDED), k_pos, KEYS_FIRST)
    last_at, k_ok = _oriented(q_pos + mask[3], k_live, KEYS_FIRST)
    visible = k_ok & (k_at >= first_at) & (k_at <= last_at)
    if DOCS:
        q_doc, k_doc = _oriented(tl.load(mask[4] + queries, mask=q_inside, other=0),
                                 tl.load(mask[5] + keys, mask=k_live, other=0), KEYS_FIRST)
        visible = visible & (q_doc == k_doc)
    return visible


@triton.jit
def _mask_tile(mask, queries, keys, q_len, k_len, MASK: tl.constexpr, DOCS: tl.constexpr, PAD: tl.constexpr,
               KEYS_FIRST: tl.constexpr):
    """The item mask (_item_mask) on a [queries, keys] tile, [keys, queries] if KEYS_FIRST: MASK "bool" and
    "positions" give visible (bool), "bias" the bias as stored (natural-log units, its own dtype until it is
    added: fewer registers). Entries outside the item's rectangle are hidden (False / -inf)."""
    if MASK == "positions":
        tile = _position_tile(mask, queries, keys, q_len, k_len, DOCS, PAD, KEYS_FIRST)
    else:
        if KEYS_FIRST:
            tile_rows, n_rows, stride_r, tile_cols, n_cols, stride_c = keys, k_len, mask[2], queries, q_len, mask[1]
        else:
            tile_rows, n_rows, stride_r, tile_cols, n_cols, stride_c = queries, q_len, mask[1], keys, k_len, mask[2]
        ptrs = mask[0] + tile_rows[:, None] * stride_r + tile_cols[None, :] * stride_c
        inside = (tile_rows[:, None] < n_rows) & (tile_cols[None, :] < n_cols)
        if MASK == "bool":
            tile = tl.load(ptrs, mask=inside, other=0) != 0
        else:
            tile = tl.load(ptrs, mask=inside, other=float("-inf"))
    return tile


@triton.jit
def _position_bounds(mask, index, n, DOCS: tl.constexpr, PAD: tl.constexpr, KEYS: tl.constexpr):
    """(any, smallest and largest position, smallest and largest document id) of the live entries of
    queries (or KEYS) `index` of a MASK "positions" item: inside the item and, keys under PAD, real.
    Without a live entry the bounds are meaningless and `any` is False."""
    live = index < n
    if KEYS:
        positions = mask[1]
        docs = mask[5]
        if PAD:
            live = live & (tl.load(mask[6] + index, mask=live, other=0) != 0)
    else:
        positions = mask[0]
        docs = mask[4]
    at = tl.load(positions + index, mask=live, other=0)
    lo = tl.min(tl.where(live, at, UNBOUNDED), 0)
    hi = tl.max(tl.where(live, at, -UNBOUNDED), 0)
    doc_lo = lo
    doc_hi = hi
    if DOCS:
        doc = tl.load(docs + index, mask=live, other=0)
        doc_lo = tl.min(tl.where(live, doc, INT32_MAX), 0)
        doc_hi = tl.max(tl.where(live, doc, -INT32_MAX), 0)
    return tl.max(live.to(tl.int32), 0) != 0, lo, hi, doc_lo, doc_hi


@triton.jit
def _bounds_meet(mask, q_bounds, k_bounds, DOCS: tl.constexpr):
    """Whether a block of queries and one of keys (_position_bounds) may hold a visible pair; False only
    when proven from the bounds (valid for positions in any order): no live entry, every key left of
    the window (largest k < smallest q - left) or right of it, or disjoint document id ranges."""
    meet = q_bounds[0] & k_bounds[0]
    meet = meet & (k_bounds[2] - q_bounds[1] >= -mask[2]) & (k_bounds[1] - q_bounds[2] <= mask[3])
    if DOCS:
        meet = meet & (q_bounds[3] <= k_bounds[4]) & (k_bounds[3] <= q_bounds[4])
    return meet


@triton.jit
def _visible_range(mask, fixed, n_fixed, n_scan, BLOCK: tl.constexpr, MASK: tl.constexpr, DOCS: tl.constexpr,
                   PAD: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """[first, last): the tiles of BLOCK scanned rows (keys for a program's fixed query rows, or queries for
    its fixed keys if KEYS_FIRST) from the first to the last one where the mask may show the fixed rows
    anything; empty (first >= last) if it shows nothing. A tile mask is read; positions are bounded."""
    first = n_scan
    last = 0
    if MASK == "positions":
        fixed_bounds = _position_bounds(mask, fixed, n_fixed, DOCS, PAD, KEYS_FIRST)
    for start in range(0, n_scan, BLOCK):
        scan = start + tl.arange(0, BLOCK)
        if MASK == "positions":
            scan_bounds = _position_bounds(mask, scan, n_scan, DOCS, PAD, not KEYS_FIRST)
            if KEYS_FIRST:
                seen = _bounds_meet(mask, scan_bounds, fixed_bounds, DOCS)
            else:
                seen = _bounds_meet(mask, fixed_bounds, scan_bounds, DOCS)
        else:
            if KEYS_FIRST:
                user = _mask_tile(mask, scan, fixed, n_scan, n_fixed, MASK, DOCS, PAD, True)
            else:
                user = _mask_tile(mask, fixed, scan, n_fixed, n_scan, MASK, DOCS, PAD, False)
            if MASK == "bool":
                seen = tl.max(tl.max(user.to(tl.int32), 1), 0) != 0
            else:
                seen = tl.max(tl.max(user, 1), 0) > float("-inf")
        first = tl.where(seen, tl.minimum(first, start), first)
        last = tl.where(seen, start + BLOCK, last)
    return first, last


@triton.jit
def _fold_key_tiles(acc, m_i, l_i, q, rows, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
                    k_len, lo, hi, qk_scale, softcap, mask, q_len,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, MASKED: tl.constexpr, MASK: tl.constexpr, DOCS: tl.constexpr,
                    PAD: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax of q over key tiles [lo, hi): the updated (acc, m, l); MASKED: bounds and causal mask;
    MASK: the item mask (_item_mask, q_len); SOFTCAP: scores capped by softcap (qk_scale = scale / softcap)."""
    cols = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, keys, cols, k_len, stride_kl, stride_kd, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_tile(v_base, keys, cols, k_len, stride_vl, stride_vd, HEAD_DIM, BLOCK_D, MASKED)
        if MASK != "none":  # loaded ahead of the dot (fewer registers than after it)
            user = _mask_tile(mask, rows, keys, q_len, k_len, MASK, DOCS, PAD, False)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if SOFTCAP:
            s, _ = _soft_cap(s, softcap)
        if MASK != "none":
            if MASK == "bias":
                s = s + user.to(tl.float32) * LOG2E
            else:
                s = tl.where(user, s, float("-inf"))
        if MASKED:
            visible = keys[None, :] < k_len
            if CAUSAL:
                visible = visible & (keys[None, :] <= rows[:, None])
            s = tl.where(visible, s, float("-inf"))
        # A row whose keys are all hidden keeps (acc, m, l): p = 0, and alpha = 1 if it saw a key before,
        # else alpha = 0 on acc = l = 0. A row that has seen no key yet keeps m = -inf; exponentiate it
        # against 0, not -inf - -inf.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _dq_key_tiles(dq, q, do, lse2, delta, rows, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
                  k_len, lo, hi, qk_scale, softcap, mask, q_len,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, MASKED: tl.constexpr, MASK: tl.constexpr, DOCS: tl.constexpr,
                  PAD: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """dq += dS K over key tiles [lo, hi) (unscaled), dS = P * (dO V^T - D); MASKED applies bounds and causal mask,
    MASK the item mask, SOFTCAP the cap (P of the capped scores, dS times 1 - tanh^2)."""
    cols = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, keys, cols, k_len, stride_kl, stride_kd, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_tile(v_base, keys, cols, k_len, stride_vl, stride_vd, HEAD_DIM, BLOCK_D, MASKED)
        if MASK != "none":  # loaded ahead of the dot (fewer registers than after it)
            user = _mask_tile(mask, rows, keys, q_len, k_len, MASK, DOCS, PAD, False)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if SOFTCAP:
            s, t = _soft_cap(s, softcap)
        if MASK != "none":
            # hidden entries get P = 0, also in rows with lse2 = +inf (rows that saw no key)
            if MASK == "bias":
                p = tl.math.exp2(s + user.to(tl.float32) * LOG2E - lse2[:, None])
            else:
                p = tl.where(user, tl.math.exp2(s - lse2[:, None]), 0.0)
        else:
            p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            visible = keys[None, :] < k_len
            if CAUSAL:
                visible = visible & (keys[None, :] <= rows[:, None])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _dkdv_query_tiles(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base,
                      stride_ql, stride_qd, stride_dol, stride_dod, stride_ll, stride_dl,
                      q_len, lo, hi, qk_scale, softcap, mask, k_len,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                      MASKED: tl.constexpr, MASK: tl.constexpr, DOCS: tl.constexpr, PAD: tl.constexpr,
                      SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """dv += P^T dO, dk += dS^T Q (unscaled) over query tiles [lo, hi) of one head; MASKED: causal mask;
    MASK: the item mask of that head (_item_mask); SOFTCAP: as in _dq_key_tiles."""
    cols = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base, rows, cols, q_len, stride_ql, stride_qd, HEAD_DIM, BLOCK_D, True)
        do = _load_tile(do_base, rows, cols, q_len, stride_dol, stride_dod, HEAD_DIM, BLOCK_D, True)
        lse2 = _base2_lse(lse_base, rows, q_len, stride_ll)
        delta = tl.load(delta_base + rows * stride_dl, mask=rows < q_len, other=0.0)
        if MASK != "none":  # the mask tile transposed: [keys, rows], loaded ahead of the dot
            user_t = _mask_tile(mask, rows, keys, q_len, k_len, MASK, DOCS, PAD, True)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        if SOFTCAP:
            s_t, t_t = _soft_cap(s_t, softcap)
        if MASK != "none":
            if MASK == "bias":
                p_t = tl.math.exp2(s_t + user_t.to(tl.float32) * LOG2E - lse2[None, :])
            else:
                p_t = tl.where(user_t, tl.math.exp2(s_t - lse2[None, :]), 0.0)
        else:
            p_t = tl.math.exp2(s_t - lse2[None, :])
        if MASKED:
            p_t = tl.where(keys[:, None] <= rows[None, :], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


# ----------------------------------------------------------------------------------------------
# kernels


@triton.jit
def forward_step_kernel(
    q_ptr, k_ptr, v_ptr, acc_ptr, m_ptr, l_ptr,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ab, stride_ah, stride_al, stride_ad,
    stride_sb, stride_sh, stride_sl,
    n_heads, q_len, k_len, scale, softcap,
    mask_ptr, stride_mb, stride_mh, stride_mq, stride_mk,
    q_pos_ptr, k_pos_ptr, window_left, window_right,
    q_doc_ptr, k_doc_ptr, stride_qdocb, stride_kdocb, k_valid_ptr, stride_kvb,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, DOCS: tl.constexpr, PAD: tl.constexpr,
    SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
):
    """Forward step: attend one item and merge it into its rows' running fp32 state (acc, m in base 2, l)."""
    row_block = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = (batch_head // n_heads).to(tl.int64)
    h = (batch_head % n_heads).to(tl.int64)
    kv_h = h // GROUP
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    v_base = v_ptr + b * stride_vb + kv_h * stride_vh
    acc_base = acc_ptr + b * stride_ab + h * stride_ah
    m_base = m_ptr + b * stride_sb + h * stride_sh
    l_base = l_ptr + b * stride_sb + h * stride_sh

    first_row = row_block * BLOCK_M
    rows = first_row + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    q = _load_tile(q_base, rows, cols, q_len, stride_ql, stride_qd, HEAD_DIM, BLOCK_D, True)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    qk_scale = scale * LOG2E
    if SOFTCAP:  # the loops take S / softcap to the tanh
        qk_scale = scale / softcap
    mask = _item_mask(b, h, (mask_ptr, stride_mb, stride_mh, stride_mq, stride_mk),
                      (q_pos_ptr, k_pos_ptr, window_left, window_right, q_doc_ptr, k_doc_ptr, stride_qdocb,
                       stride_kdocb, k_valid_ptr, stride_kvb), MASK, DOCS, PAD)
    clean_end, end = _key_range(first_row, k_len, BLOCK_M, BLOCK_N, CAUSAL)
    lo = 0
    if MASK != "none":  # (never CAUSAL) only the key tiles from the first to the last the mask shows anything of
        lo, hi = _visible_range(mask, rows, q_len, k_len, BLOCK_N, MASK, DOCS, PAD, False)
        clean_end = tl.maximum(tl.minimum(clean_end, hi), lo)
        end = tl.minimum(end, hi)
    acc, m_i, l_i = _fold_key_tiles(acc, m_i, l_i, q, rows, k_base, v_base, stride_kl, stride_kd,
                                    stride_vl, stride_vd, k_len, lo, clean_end, qk_scale, softcap, mask, q_len,
                                    HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, False, MASK, DOCS, PAD, SOFTCAP, PRECISION)
    acc, m_i, l_i = _fold_key_tiles(acc, m_i, l_i, q, rows, k_base, v_base, stride_kl, stride_kd,
                                    stride_vl, stride_vd, k_len, clean_end, end, qk_scale, softcap, mask, q_len,
                                    HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, True, MASK, DOCS, PAD, SOFTCAP, PRECISION)

    # the cross-step merge: fold this item's partial state into the stored state of earlier steps
    # (loaded only now, so it does not occupy registers during the loop)
    acc_old = _load_tile(acc_base, rows, cols, q_len, stride_al, stride_ad, HEAD_DIM, BLOCK_D, True)
    m_old = tl.load(m_base + rows * stride_sl, mask=rows < q_len, other=float("-inf"))
    l_old = tl.load(l_base + rows * stride_sl, mask=rows < q_len, other=0.0)
    m_new = tl.maximum(m_old, m_i)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha_old = tl.math.exp2(m_old - m_ref)
    alpha = tl.math.exp2(m_i - m_ref)
    acc = acc_old * alpha_old[:, None] + acc * alpha[:, None]
    _store_tile(acc_base, acc, rows, cols, q_len, stride_al, stride_ad, HEAD_DIM)
    tl.store(m_base + rows * stride_sl, m_new, mask=rows < q_len)
    tl.store(l_base + rows * stride_sl, l_old * alpha_old + l_i * alpha, mask=rows < q_len)


@triton.jit
def finalize_kernel(
    acc_ptr, m_ptr, l_ptr, out_ptr, lse_ptr,
    stride_ab, stride_ah, stride_al, stride_ad,
    stride_sb, stride_sh, stride_sl,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_lb, stride_lh, stride_ll,
    n_heads, seq_len,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Finalise: O = acc / l (O's dtype), lse = ln 2 * (m + log2 l) (fp32); rows that saw nothing: O = 0, lse = -inf."""
    row_block = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = (batch_head // n_heads).to(tl.int64)
    h = (batch_head % n_heads).to(tl.int64)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)

    acc = _load_tile(acc_ptr + b * stride_ab + h * stride_ah, rows, cols, seq_len, stride_al, stride_ad,
                     HEAD_DIM, BLOCK_D, True)
    m_i = tl.load(m_ptr + b * stride_sb + h * stride_sh + rows * stride_sl, mask=rows < seq_len, other=0.0)
    l_i = tl.load(l_ptr + b * stride_sb + h * stride_sh + rows * stride_sl, mask=rows < seq_len, other=0.0)
    seen = l_i > 0.0
    inv_l = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))

    _store_tile(out_ptr + b * stride_ob + h * stride_oh, acc * inv_l[:, None], rows, cols, seq_len,
                stride_ol, stride_od, HEAD_DIM)
    tl.store(lse_ptr + b * stride_lb + h * stride_lh + rows * stride_ll, lse, mask=rows < seq_len)


@triton.jit
def delta_kernel(
    out_ptr, do_ptr, delta_ptr,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_db, stride_dh, stride_dl,
    n_heads, seq_len,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Backward preprocess: D = rowsum(dO * O) in fp32."""
    row_block = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = (batch_head // n_heads).to(tl.int64)
    h = (batch_head % n_heads).to(tl.int64)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    out = _load_tile(out_ptr + b * stride_ob + h * stride_oh, rows, cols, seq_len, stride_ol, stride_od,
                     HEAD_DIM, BLOCK_D, True)
    do = _load_tile(do_ptr + b * stride_dob + h * stride_doh, rows, cols, seq_len, stride_dol, stride_dod,
                    HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(out.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + b * stride_db + h * stride_dh + rows * stride_dl, delta, mask=rows < seq_len)


@triton.jit
def backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_lb, stride_lh, stride_ll,
    stride_db, stride_dh, stride_dl,
    stride_dkb, stride_dkh, stride_dkl, stride_dkd,
    stride_dvb, stride_dvh, stride_dvl, stride_dvd,
    n_kv_heads, q_len, k_len, scale, softcap,
    mask_ptr, stride_mb, stride_mh, stride_mq, stride_mk,
    q_pos_ptr, k_pos_ptr, window_left, window_right,
    q_doc_ptr, k_doc_ptr, stride_qdocb, stride_kdocb, k_valid_ptr, stride_kvb,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, DOCS: tl.constexpr, PAD: tl.constexpr,
    SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
):
    """KV-stationary backward: one K/V tile gets dK += scale dS^T Q, dV += P^T dO over its GQA heads' item rows."""
    col_block = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = (batch_head // n_kv_heads).to(tl.int64)
    kv_h = (batch_head % n_kv_heads).to(tl.int64)
    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    v_base = v_ptr + b * stride_vb + kv_h * stride_vh

    first_key = col_block * BLOCK_N
    keys = first_key + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    k = _load_tile(k_base, keys, cols, k_len, stride_kl, stride_kd, HEAD_DIM, BLOCK_D, True)
    v = _load_tile(v_base, keys, cols, k_len, stride_vl, stride_vd, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query tiles that see the key tile: all of them, or under CAUSAL those with a row >= first_key,
    # of which the ones with every row >= the tile's last key need no mask.
    if CAUSAL:
        lo = first_key // BLOCK_M * BLOCK_M
        clean_start = tl.minimum(tl.cdiv(first_key + BLOCK_N - 1, BLOCK_M) * BLOCK_M, q_len)
    else:
        lo = 0
        clean_start = 0
    qk_scale = scale * LOG2E
    if SOFTCAP:  # the loops take S / softcap to the tanh
        qk_scale = scale / softcap
    for g in range(GROUP):
        h = kv_h * GROUP + g
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_dob + h * stride_doh
        lse_base = lse_ptr + b * stride_lb + h * stride_lh
        delta_base = delta_ptr + b * stride_db + h * stride_dh
        mask = _item_mask(b, h, (mask_ptr, stride_mb, stride_mh, stride_mq, stride_mk),
                          (q_pos_ptr, k_pos_ptr, window_left, window_right, q_doc_ptr, k_doc_ptr, stride_qdocb,
                           stride_kdocb, k_valid_ptr, stride_kvb), MASK, DOCS, PAD)
        if MASK == "none":
            dk, dv = _dkdv_query_tiles(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base,
                                       stride_ql, stride_qd, stride_dol, stride_dod, stride_ll, stride_dl,
                                       q_len, lo, clean_start, qk_scale, softcap, mask, k_len,
                                       HEAD_DIM, BLOCK_D, BLOCK_M, True, MASK, DOCS, PAD, SOFTCAP, PRECISION)
            dk, dv = _dkdv_query_tiles(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base,
                                       stride_ql, stride_qd, stride_dol, stride_dod, stride_ll, stride_dl,
                                       q_len, clean_start, q_len, qk_scale, softcap, mask, k_len,
                                       HEAD_DIM, BLOCK_D, BLOCK_M, False, MASK, DOCS, PAD, SOFTCAP, PRECISION)
        else:  # (never CAUSAL) the query tiles from the first to the last the head's mask shows this key tile to
            q_lo, q_hi = _visible_range(mask, keys, k_len, q_len, BLOCK_M, MASK, DOCS, PAD, True)
            dk, dv = _dkdv_query_tiles(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base,
                                       stride_ql, stride_qd, stride_dol, stride_dod, stride_ll, stride_dl,
                                       q_len, q_lo, q_hi, qk_scale, softcap, mask, k_len,
                                       HEAD_DIM, BLOCK_D, BLOCK_M, False, MASK, DOCS, PAD, SOFTCAP, PRECISION)

    _add_into_tile(dk_ptr + b * stride_dkb + kv_h * stride_dkh, dk * scale, keys, cols, k_len,
                   stride_dkl, stride_dkd, HEAD_DIM)
    _add_into_tile(dv_ptr + b * stride_dvb + kv_h * stride_dvh, dv, keys, cols, k_len,
                   stride_dvl, stride_dvd, HEAD_DIM)


@triton.jit
def backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_lb, stride_lh, stride_ll,
    stride_db, stride_dh, stride_dl,
    stride_dqb, stride_dqh, stride_dql, stride_dqd,
    n_heads, q_len, k_len, scale, softcap,
    mask_ptr, stride_mb, stride_mh, stride_mq, stride_mk,
    q_pos_ptr, k_pos_ptr, window_left, window_right,
    q_doc_ptr, k_doc_ptr, stride_qdocb, stride_kdocb, k_valid_ptr, stride_kvb,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, DOCS: tl.constexpr, PAD: tl.constexpr,
    SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ backward: one Q tile gets dQ += scale dS K over the item's keys, dS = P * (dO V^T - D), P = exp(S - lse)."""
    row_block = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = (batch_head // n_heads).to(tl.int64)
    h = (batch_head % n_heads).to(tl.int64)
    kv_h = h // GROUP
    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    v_base = v_ptr + b * stride_vb + kv_h * stride_vh

    first_row = row_block * BLOCK_M
    rows = first_row + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    q = _load_tile(q_ptr + b * stride_qb + h * stride_qh, rows, cols, q_len, stride_ql, stride_qd,
                   HEAD_DIM, BLOCK_D, True)
    do = _load_tile(do_ptr + b * stride_dob + h * stride_doh, rows, cols, q_len, stride_dol, stride_dod,
                    HEAD_DIM, BLOCK_D, True)
    lse2 = _base2_lse(lse_ptr + b * stride_lb + h * stride_lh, rows, q_len, stride_ll)
    delta = tl.load(delta_ptr + b * stride_db + h * stride_dh + rows * stride_dl, mask=rows < q_len, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    qk_scale = scale * LOG2E
    if SOFTCAP:  # the loops take S / softcap to the tanh
        qk_scale = scale / softcap
    mask = _item_mask(b, h, (mask_ptr, stride_mb, stride_mh, stride_mq, stride_mk),
                      (q_pos_ptr, k_pos_ptr, window_left, window_right, q_doc_ptr, k_doc_ptr, stride_qdocb,
                       stride_kdocb, k_valid_ptr, stride_kvb), MASK, DOCS, PAD)
    clean_end, end = _key_range(first_row, k_len, BLOCK_M, BLOCK_N, CAUSAL)
    lo = 0
    if MASK != "none":  # as in forward_step_kernel
        lo, hi = _visible_range(mask, rows, q_len, k_len, BLOCK_N, MASK, DOCS, PAD, False)
        clean_end = tl.maximum(tl.minimum(clean_end, hi), lo)
        end = tl.minimum(end, hi)
    dq = _dq_key_tiles(dq, q, do, lse2, delta, rows, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
                       k_len, lo, clean_end, qk_scale, softcap, mask, q_len,
                       HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, False, MASK, DOCS, PAD, SOFTCAP, PRECISION)
    dq = _dq_key_tiles(dq, q, do, lse2, delta, rows, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
                       k_len, clean_end, end, qk_scale, softcap, mask, q_len,
                       HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, True, MASK, DOCS, PAD, SOFTCAP, PRECISION)

    _add_into_tile(dq_ptr + b * stride_dqb + h * stride_dqh, dq * scale, rows, cols, q_len,
                   stride_dql, stride_dqd, HEAD_DIM)
