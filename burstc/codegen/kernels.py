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

MASK (forward_step, backward_dkdv, backward_dq) is the item's generic tile mask: "none" (the item is
full or CAUSAL), "bool" (a uint8 view of a boolean mask, nonzero = visible) or "bias" (a floating
additive bias on the scaled scores, -inf = hidden). The mask covers exactly the item's rectangle and
is read through its own strides (mask_ptr, stride_mb, stride_mh, stride_mq, stride_mk; 0 strides for
broadcast batch/head dims); with MASK == "none" these arguments are None and the kernels compile to
the code they had before masks existed. Each program first scans its strip of the mask for the first
and last tile with a visible entry and runs its loops over that range only: leading and trailing
tiles the mask hides entirely (windows, padding, documents) cost one mask read and no dot product,
and the loops stay free of branches (which would keep Triton from pipelining their K/V loads). A
query row that sees no visible key of an item leaves its running state as it was (m = -inf and
l = 0 while empty); its backward lse is -inf and it gets zero gradients.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


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
def _mask_tile(mask_ptr, b, h, stride_mb, stride_mh, rows, cols, n_rows, n_cols, stride_r, stride_c,
               MASK: tl.constexpr):
    """The item mask of batch b, query head h on a [rows, cols] tile (query x key, or key x query with the
    strides swapped): MASK "bool" gives visible (bool), "bias" the bias as stored (natural-log units, its
    own dtype until it is added: fewer registers). Entries outside the item's rectangle are hidden
    (False / -inf)."""
    base = mask_ptr + b * stride_mb + h * stride_mh
    ptrs = base + rows[:, None] * stride_r + cols[None, :] * stride_c
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    if MASK == "bool":
        tile = tl.load(ptrs, mask=inside, other=0) != 0
    else:
        tile = tl.load(ptrs, mask=inside, other=float("-inf"))
    return tile


@triton.jit
def _visible_range(mask_ptr, b, h, stride_mb, stride_mh, rows, n_rows, n_cols, stride_r, stride_c,
                   BLOCK: tl.constexpr, MASK: tl.constexpr):
    """[first, last): the tiles of BLOCK columns (keys, or queries with the strides swapped) from the first to
    the last one where the mask shows the given rows anything; empty (first >= last) if it shows nothing."""
    first = n_cols
    last = 0
    for start in range(0, n_cols, BLOCK):
        user = _mask_tile(mask_ptr, b, h, stride_mb, stride_mh, rows, start + tl.arange(0, BLOCK), n_rows, n_cols,
                          stride_r, stride_c, MASK)
        if MASK == "bool":
            seen = tl.max(tl.max(user.to(tl.int32), 1), 0) != 0
        else:
            seen = tl.max(tl.max(user, 1), 0) > float("-inf")
        first = tl.where(seen, tl.minimum(first, start), first)
        last = tl.where(seen, start + BLOCK, last)
    return first, last


@triton.jit
def _fold_key_tiles(acc, m_i, l_i, q, rows, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
                    k_len, lo, hi, qk_scale, mask_ptr, b, h, stride_mb, stride_mh, stride_mq, stride_mk, q_len,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, MASKED: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax of q over key tiles [lo, hi): the updated (acc, m, l); MASKED: bounds and causal mask;
    MASK: the item mask (mask_ptr, b, h, its strides, q_len)."""
    cols = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, keys, cols, k_len, stride_kl, stride_kd, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_tile(v_base, keys, cols, k_len, stride_vl, stride_vd, HEAD_DIM, BLOCK_D, MASKED)
        if MASK != "none":  # loaded ahead of the dot (fewer registers than after it)
            user = _mask_tile(mask_ptr, b, h, stride_mb, stride_mh, rows, keys, q_len, k_len, stride_mq, stride_mk,
                              MASK)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASK != "none":
            if MASK == "bool":
                s = tl.where(user, s, float("-inf"))
            else:
                s = s + user.to(tl.float32) * LOG2E
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
                  k_len, lo, hi, qk_scale, mask_ptr, b, h, stride_mb, stride_mh, stride_mq, stride_mk, q_len,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, MASKED: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr):
    """dq += dS K over key tiles [lo, hi) (unscaled), dS = P * (dO V^T - D); MASKED applies bounds and causal mask,
    MASK the item mask."""
    cols = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, keys, cols, k_len, stride_kl, stride_kd, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_tile(v_base, keys, cols, k_len, stride_vl, stride_vd, HEAD_DIM, BLOCK_D, MASKED)
        if MASK != "none":  # loaded ahead of the dot (fewer registers than after it)
            user = _mask_tile(mask_ptr, b, h, stride_mb, stride_mh, rows, keys, q_len, k_len, stride_mq, stride_mk,
                              MASK)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASK != "none":
            # hidden entries get P = 0, also in rows with lse2 = +inf (rows that saw no key)
            if MASK == "bool":
                p = tl.where(user, tl.math.exp2(s - lse2[:, None]), 0.0)
            else:
                p = tl.math.exp2(s + user.to(tl.float32) * LOG2E - lse2[:, None])
        else:
            p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            visible = keys[None, :] < k_len
            if CAUSAL:
                visible = visible & (keys[None, :] <= rows[:, None])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _dkdv_query_tiles(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base,
                      stride_ql, stride_qd, stride_dol, stride_dod, stride_ll, stride_dl,
                      q_len, lo, hi, qk_scale, mask_ptr, b, h, stride_mb, stride_mh, stride_mq, stride_mk, k_len,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                      MASKED: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr):
    """dv += P^T dO, dk += dS^T Q (unscaled) over query tiles [lo, hi) of one head; MASKED: causal mask;
    MASK: the item mask of head h."""
    cols = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base, rows, cols, q_len, stride_ql, stride_qd, HEAD_DIM, BLOCK_D, True)
        do = _load_tile(do_base, rows, cols, q_len, stride_dol, stride_dod, HEAD_DIM, BLOCK_D, True)
        lse2 = _base2_lse(lse_base, rows, q_len, stride_ll)
        delta = tl.load(delta_base + rows * stride_dl, mask=rows < q_len, other=0.0)
        if MASK != "none":  # the mask tile transposed: [keys, rows], loaded ahead of the dot
            user_t = _mask_tile(mask_ptr, b, h, stride_mb, stride_mh, keys, rows, k_len, q_len, stride_mk, stride_mq,
                                MASK)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        if MASK != "none":
            if MASK == "bool":
                p_t = tl.where(user_t, tl.math.exp2(s_t - lse2[None, :]), 0.0)
            else:
                p_t = tl.math.exp2(s_t + user_t.to(tl.float32) * LOG2E - lse2[None, :])
        else:
            p_t = tl.math.exp2(s_t - lse2[None, :])
        if MASKED:
            p_t = tl.where(keys[:, None] <= rows[None, :], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
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
    n_heads, q_len, k_len, scale,
    mask_ptr, stride_mb, stride_mh, stride_mq, stride_mk,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr,
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
    clean_end, end = _key_range(first_row, k_len, BLOCK_M, BLOCK_N, CAUSAL)
    lo = 0
    if MASK != "none":  # (never CAUSAL) only the key tiles from the first to the last the mask shows anything of
        lo, hi = _visible_range(mask_ptr, b, h, stride_mb, stride_mh, rows, q_len, k_len, stride_mq, stride_mk,
                                BLOCK_N, MASK)
        clean_end = tl.maximum(tl.minimum(clean_end, hi), lo)
        end = tl.minimum(end, hi)
    acc, m_i, l_i = _fold_key_tiles(acc, m_i, l_i, q, rows, k_base, v_base, stride_kl, stride_kd,
                                    stride_vl, stride_vd, k_len, lo, clean_end, qk_scale,
                                    mask_ptr, b, h, stride_mb, stride_mh, stride_mq, stride_mk, q_len,
                                    HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, False, MASK, PRECISION)
    acc, m_i, l_i = _fold_key_tiles(acc, m_i, l_i, q, rows, k_base, v_base, stride_kl, stride_kd,
                                    stride_vl, stride_vd, k_len, clean_end, end, qk_scale,
                                    mask_ptr, b, h, stride_mb, stride_mh, stride_mq, stride_mk, q_len,
                                    HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, True, MASK, PRECISION)

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
    n_kv_heads, q_len, k_len, scale,
    mask_ptr, stride_mb, stride_mh, stride_mq, stride_mk,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr,
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
    for g in range(GROUP):
        h = kv_h * GROUP + g
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_dob + h * stride_doh
        lse_base = lse_ptr + b * stride_lb + h * stride_lh
        delta_base = delta_ptr + b * stride_db + h * stride_dh
        if MASK == "none":
            dk, dv = _dkdv_query_tiles(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base,
                                       stride_ql, stride_qd, stride_dol, stride_dod, stride_ll, stride_dl,
                                       q_len, lo, clean_start, qk_scale,
                                       mask_ptr, b, h, stride_mb, stride_mh, stride_mq, stride_mk, k_len,
                                       HEAD_DIM, BLOCK_D, BLOCK_M, True, MASK, PRECISION)
            dk, dv = _dkdv_query_tiles(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base,
                                       stride_ql, stride_qd, stride_dol, stride_dod, stride_ll, stride_dl,
                                       q_len, clean_start, q_len, qk_scale,
                                       mask_ptr, b, h, stride_mb, stride_mh, stride_mq, stride_mk, k_len,
                                       HEAD_DIM, BLOCK_D, BLOCK_M, False, MASK, PRECISION)
        else:  # (never CAUSAL) the query tiles from the first to the last the head's mask shows this key tile to
            q_lo, q_hi = _visible_range(mask_ptr, b, h, stride_mb, stride_mh, keys, k_len, q_len, stride_mk,
                                        stride_mq, BLOCK_M, MASK)
            dk, dv = _dkdv_query_tiles(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base,
                                       stride_ql, stride_qd, stride_dol, stride_dod, stride_ll, stride_dl,
                                       q_len, q_lo, q_hi, qk_scale,
                                       mask_ptr, b, h, stride_mb, stride_mh, stride_mq, stride_mk, k_len,
                                       HEAD_DIM, BLOCK_D, BLOCK_M, False, MASK, PRECISION)

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
    n_heads, q_len, k_len, scale,
    mask_ptr, stride_mb, stride_mh, stride_mq, stride_mk,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr,
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
    clean_end, end = _key_range(first_row, k_len, BLOCK_M, BLOCK_N, CAUSAL)
    lo = 0
    if MASK != "none":  # as in forward_step_kernel
        lo, hi = _visible_range(mask_ptr, b, h, stride_mb, stride_mh, rows, q_len, k_len, stride_mq, stride_mk,
                                BLOCK_N, MASK)
        clean_end = tl.maximum(tl.minimum(clean_end, hi), lo)
        end = tl.minimum(end, hi)
    dq = _dq_key_tiles(dq, q, do, lse2, delta, rows, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
                       k_len, lo, clean_end, qk_scale, mask_ptr, b, h, stride_mb, stride_mh, stride_mq, stride_mk,
                       q_len, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, False, MASK, PRECISION)
    dq = _dq_key_tiles(dq, q, do, lse2, delta, rows, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
                       k_len, clean_end, end, qk_scale, mask_ptr, b, h, stride_mb, stride_mh, stride_mq, stride_mk,
                       q_len, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, True, MASK, PRECISION)

    _add_into_tile(dq_ptr + b * stride_dqb + h * stride_dqh, dq * scale, rows, cols, q_len,
                   stride_dql, stride_dqd, HEAD_DIM)
