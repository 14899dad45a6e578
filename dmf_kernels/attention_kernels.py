"""Triton kernels of non-causal attention: forward (o, lse) and a one-pass forward-mode JVP
(o, o_dot, lse), and the tile helpers the backward kernels (attention_kernels_bwd.py) share.
Launch configuration: attention_triton.py.

Tiles: (B, H, N, D) layout with any strides; a head dim is a power-of-two block of columns
(D0) plus a padded remainder (D1), see head_split in attention_triton.py.

Rotary embedding (ROPE constexpr, off: no code): q, k, q_dot, k_dot tiles are rotated right
after loading, rope(x) = x * cos + rotate_half(x) * sin on interleaved pairs, with the pair
partners read again at columns cols ^ 1 (the same cache lines) and the (N, D) fp32 tables
tiled by row block. Both blocks D0, D1 start at even columns, so a pair never straddles them.

JVP (../shared/notes/jvp-math.md): O_dot = P V_dot + (P * S_dot) V - mu O with
mu = rowsum(P * S_dot). One pass with online softmax (sCM, appendix F) keeps acc_o = p V
and acc_t, p = exp(S - m_new) unnormalised, alpha = exp(m_old - m_new).

Centred tangent accumulator. Written as O_dot = sum_j P_j (S_dot_j - mu) V_j + P V_dot, the
middle term is a small difference of large ones whenever the softmax is peaked: the
straightforward recurrence (acc_t += (p * S_dot) V, subtract mu O at the end) rounds
p * S_dot to fp16/bf16 for the tensor-core product *before* that cancellation, which
measured here as 12% relative error of O_dot in fp16 on peaked logits. So the kernel keeps
the running estimate c = sum(p S_dot) / sum(p) of mu and accumulates
p * (S_dot - c) V instead; when a key block moves c to c', the past is re-centred exactly
by acc_t -= (c' - c) acc_o (one FMA over the accumulator per block). At the end c = mu, so
O_dot = acc_t / l, and the separate rowsum(p * S_dot) accumulator of the notes is not
needed. p V_dot and the centred term share the rescale: two fp32 [BLOCK_M, D]
accumulators instead of three.

fp16 guard: the centred p * (S_dot - c) is formed in fp32 and must be rounded to the input
dtype for the product with V; with large tangents it can still exceed fp16's 65504. Each
row is divided by max(1, rowmax|.| / 2^14) before rounding and the product multiplied back
(row scaling commutes with the product), so nothing overflows.
"""
import triton
import triton.language as tl


@triton.jit
def _div8(s, ALIGN8: tl.constexpr):
    # Triton marks an integer argument divisible only when it is a multiple of 16, so a row
    # stride of 72 (D = 72, or a fused-qkv head stride) reads as unaligned and every load
    # becomes a scalar 2-byte load with no cp.async (triton 3.6, sm_90a, bf16 JVP: 160
    # ld.global.b16, 0 cp.async, 255 registers). The launcher sets ALIGN8 when every
    # non-last stride is a multiple of 8 elements; rounding under it is then a no-op that
    # tells the compiler so (16-byte vectors for 16-bit dtypes, cp.async back).
    if ALIGN8:
        return s // 8 * 8
    else:
        return s


@triton.jit
def _bh_offset(b, h, stride_b, stride_h, ALIGN8: tl.constexpr):
    # int64: (B - 1) * stride_b passes 2^31 for a fused qkv view at B=256, N=4096, H=16, D=72.
    return b.to(tl.int64) * _div8(stride_b, ALIGN8) + h.to(tl.int64) * _div8(stride_h, ALIGN8)


@triton.jit
def _masked_load(ptrs, row_ok, col_ok, MASK_ROWS: tl.constexpr, COLS_FULL: tl.constexpr):
    # Loads with only the masks that can be false: MASK_ROWS=False when every row is in range
    # (a full tile of an evenly divided loop), COLS_FULL when every column is < HEAD_D.
    if MASK_ROWS:
        if COLS_FULL:
            x = tl.load(ptrs, mask=row_ok, other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok & col_ok, other=0.0)
    else:
        if COLS_FULL:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=col_ok, other=0.0)
    return x


@triton.jit
def _load_rows(base, rows, stride_row, cols, stride_col, row_mask, HEAD_D: tl.constexpr,
               MASK_ROWS: tl.constexpr = True, COLS_FULL: tl.constexpr = False):
    # A [rows, cols] tile of a (N, D) matrix; masked rows and columns >= HEAD_D read 0.
    return _masked_load(base + rows[:, None] * stride_row + cols[None, :] * stride_col, row_mask[:, None],
                        cols[None, :] < HEAD_D, MASK_ROWS, COLS_FULL)


@triton.jit
def _load_cols(base, rows, stride_row, cols, stride_col, row_mask, HEAD_D: tl.constexpr,
               MASK_ROWS: tl.constexpr = True, COLS_FULL: tl.constexpr = False):
    # The transposed tile [cols, rows] of a (N, D) matrix, for K^T and V^T.
    return _masked_load(base + rows[None, :] * stride_row + cols[:, None] * stride_col, row_mask[None, :],
                        cols[:, None] < HEAD_D, MASK_ROWS, COLS_FULL)


@triton.jit
def _store_rows(base, value, rows, stride_row, cols, stride_col, row_mask, HEAD_D: tl.constexpr):
    mask = row_mask[:, None] & (cols[None, :] < HEAD_D)
    tl.store(base + rows[:, None] * stride_row + cols[None, :] * stride_col, value, mask=mask)


@triton.jit
def _rope_tables(COS, SIN, rows, cols, row_mask, HEAD_D: tl.constexpr, MASK_ROWS: tl.constexpr,
                 COLS_FULL: tl.constexpr, TRANS: tl.constexpr):
    # Tiles of the rotary tables (N, HEAD_D), fp32 and contiguous: cos, and sin with
    # rotate_half's sign folded in (-sin on even columns, +sin on odd ones), as [rows, cols]
    # like _load_rows or, with TRANS, [cols, rows] like _load_cols.
    sign = tl.where((cols % 2) == 0, -1.0, 1.0)
    if TRANS:
        c = _load_cols(COS, rows, HEAD_D, cols, 1, row_mask, HEAD_D, MASK_ROWS, COLS_FULL)
        s = _load_cols(SIN, rows, HEAD_D, cols, 1, row_mask, HEAD_D, MASK_ROWS, COLS_FULL) * sign[:, None]
    else:
        c = _load_rows(COS, rows, HEAD_D, cols, 1, row_mask, HEAD_D, MASK_ROWS, COLS_FULL)
        s = _load_rows(SIN, rows, HEAD_D, cols, 1, row_mask, HEAD_D, MASK_ROWS, COLS_FULL) * sign[None, :]
    return c, s


@triton.jit
def _rope(x, partner, c, s):
    # rope(x) = x * cos + rotate_half(x) * sin on interleaved pairs (x0, x1) -> (-x1, x0) of a
    # loaded tile, given the tile of pair partners (the same rows, columns cols ^ 1: read
    # again, an L1/L2 hit, instead of shuffling registers) and _rope_tables' tiles. fp32 math,
    # rounded to x's dtype for the tensor-core products.
    return (x.to(tl.float32) * c + partner.to(tl.float32) * s).to(x.dtype)


@triton.jit
def _rope_back(g, c, s, ROWS: tl.constexpr, COLS: tl.constexpr):
    # The transpose of _rope for an fp32 gradient tile [ROWS, COLS] (an accumulator, with no
    # copy in memory to re-read): dx = g * cos + swap(g * s), swap exchanging the two columns
    # of each pair, done in registers.
    a, b = tl.split(tl.reshape(g * s, [ROWS, COLS // 2, 2]))
    return g * c + tl.reshape(tl.join(b, a), [ROWS, COLS])


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, COS, SIN,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    H, NQ, NK, qk_scale,
    ALIGN8: tl.constexpr, HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, MASK_N: tl.constexpr, D1_FULL: tl.constexpr,
    ROPE: tl.constexpr,
):
    # ROPE: q and k tiles rotated after loading (COS, SIN: (N, HEAD_D) fp32 tables, NQ = NK = N).
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    sqn = _div8(sqn, ALIGN8)
    skn = _div8(skn, ALIGN8)
    svn = _div8(svn, ALIGN8)
    son = _div8(son, ALIGN8)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d0 = tl.arange(0, D0)
    m_mask = offs_m < NQ
    q_base = Q + _bh_offset(b, h, sqb, sqh, ALIGN8)
    k_base = K + _bh_offset(b, h, skb, skh, ALIGN8)
    v_base = V + _bh_offset(b, h, svb, svh, ALIGN8)
    q0 = _load_rows(q_base, offs_m, sqn, d0, sqd, m_mask, HEAD_D)
    if ROPE:
        rc, rs = _rope_tables(COS, SIN, offs_m, d0, m_mask, HEAD_D, True, False, False)
        q0 = _rope(q0, _load_rows(q_base, offs_m, sqn, d0 ^ 1, sqd, m_mask, HEAD_D), rc, rs)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if HAS_D1:
        d1 = D0 + tl.arange(0, D1)
        q1 = _load_rows(q_base, offs_m, sqn, d1, sqd, m_mask, HEAD_D)
        if ROPE:
            rc, rs = _rope_tables(COS, SIN, offs_m, d1, m_mask, HEAD_D, True, False, False)
            q1 = _rope(q1, _load_rows(q_base, offs_m, sqn, d1 ^ 1, sqd, m_mask, HEAD_D), rc, rs)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    scale2 = qk_scale * 1.4426950408889634  # exp2 domain
    for start_n in range(0, NK, BLOCK_N):
        n = start_n + offs_n
        n_mask = n < NK
        k0 = _load_cols(k_base, n, skn, d0, skd, n_mask, HEAD_D, MASK_N, True)
        if ROPE:
            tc, ts = _rope_tables(COS, SIN, n, d0, n_mask, HEAD_D, MASK_N, True, True)
            k0 = _rope(k0, _load_cols(k_base, n, skn, d0 ^ 1, skd, n_mask, HEAD_D, MASK_N, True), tc, ts)
        s = tl.dot(q0, k0, input_precision=DOT_PRECISION)
        if HAS_D1:
            k1 = _load_cols(k_base, n, skn, d1, skd, n_mask, HEAD_D, MASK_N, D1_FULL)
            if ROPE:
                tc, ts = _rope_tables(COS, SIN, n, d1, n_mask, HEAD_D, MASK_N, D1_FULL, True)
                k1 = _rope(k1, _load_cols(k_base, n, skn, d1 ^ 1, skd, n_mask, HEAD_D, MASK_N, D1_FULL), tc, ts)
            s += tl.dot(q1, k1, input_precision=DOT_PRECISION)
        if MASK_N:
            s = tl.where(n_mask[None, :], s * scale2, float("-inf"))
        else:
            s = s * scale2
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v0 = _load_rows(v_base, n, svn, d0, svd, n_mask, HEAD_D, MASK_N, True)
        acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None], input_precision=DOT_PRECISION)
        if HAS_D1:
            v1 = _load_rows(v_base, n, svn, d1, svd, n_mask, HEAD_D, MASK_N, D1_FULL)
            acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    o_base = O + _bh_offset(b, h, sob, soh, ALIGN8)
    _store_rows(o_base, (acc0 / l_i[:, None]).to(O.dtype.element_ty), offs_m, son, d0, sod, m_mask, HEAD_D)
    if HAS_D1:
        _store_rows(o_base, (acc1 / l_i[:, None]).to(O.dtype.element_ty), offs_m, son, d1, sod, m_mask, HEAD_D)
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + bh.to(tl.int64) * NQ + offs_m, lse, mask=m_mask)


@triton.jit
def _guarded_dot(t, v, FP16_GUARD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # (p * S_dot) V with t in fp32; rows rescaled before rounding to fp16 (see module doc).
    if FP16_GUARD:
        r = tl.maximum(tl.max(tl.abs(t), 1) / 16384.0, 1.0)
        return tl.dot((t / r[:, None]).to(v.dtype), v, input_precision=DOT_PRECISION) * r[:, None]
    else:
        return tl.dot(t.to(v.dtype), v, input_precision=DOT_PRECISION)


@triton.jit
def _attn_jvp_kernel(
    Q, K, V, QD, KD, VD, O, OD, LSE, COS, SIN,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sqdb, sqdh, sqdn, sqdd, skdb, skdh, skdn, skdd, svdb, svdh, svdn, svdd,
    sob, soh, son, sod,
    H, NQ, NK, qk_scale,
    HAS_QD: tl.constexpr, HAS_KD: tl.constexpr, HAS_VD: tl.constexpr,
    ALIGN8: tl.constexpr, HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, MASK_N: tl.constexpr, D1_FULL: tl.constexpr, FP16_GUARD: tl.constexpr,
    ROPE: tl.constexpr,
):
    # ROPE: q, k, q_dot, k_dot tiles rotated after loading (the rotation is linear with constant
    # tables, so the tangents rotate with the primals and the JVP below is unchanged).
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    sqn = _div8(sqn, ALIGN8)
    skn = _div8(skn, ALIGN8)
    svn = _div8(svn, ALIGN8)
    sqdn = _div8(sqdn, ALIGN8)
    skdn = _div8(skdn, ALIGN8)
    svdn = _div8(svdn, ALIGN8)
    son = _div8(son, ALIGN8)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d0 = tl.arange(0, D0)
    d1 = D0 + tl.arange(0, D1)
    m_mask = offs_m < NQ
    q_base = Q + _bh_offset(b, h, sqb, sqh, ALIGN8)
    k_base = K + _bh_offset(b, h, skb, skh, ALIGN8)
    v_base = V + _bh_offset(b, h, svb, svh, ALIGN8)
    qd_base = QD + _bh_offset(b, h, sqdb, sqdh, ALIGN8)
    kd_base = KD + _bh_offset(b, h, skdb, skdh, ALIGN8)
    vd_base = VD + _bh_offset(b, h, svdb, svdh, ALIGN8)
    q0 = _load_rows(q_base, offs_m, sqn, d0, sqd, m_mask, HEAD_D)
    if ROPE:
        rc, rs = _rope_tables(COS, SIN, offs_m, d0, m_mask, HEAD_D, True, False, False)
        q0 = _rope(q0, _load_rows(q_base, offs_m, sqn, d0 ^ 1, sqd, m_mask, HEAD_D), rc, rs)
    if HAS_QD:
        qd0 = _load_rows(qd_base, offs_m, sqdn, d0, sqdd, m_mask, HEAD_D)
        if ROPE:
            qd0 = _rope(qd0, _load_rows(qd_base, offs_m, sqdn, d0 ^ 1, sqdd, m_mask, HEAD_D), rc, rs)
    acc_o0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    acc_t0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if HAS_D1:
        q1 = _load_rows(q_base, offs_m, sqn, d1, sqd, m_mask, HEAD_D)
        if ROPE:
            rc, rs = _rope_tables(COS, SIN, offs_m, d1, m_mask, HEAD_D, True, False, False)
            q1 = _rope(q1, _load_rows(q_base, offs_m, sqn, d1 ^ 1, sqd, m_mask, HEAD_D), rc, rs)
        if HAS_QD:
            qd1 = _load_rows(qd_base, offs_m, sqdn, d1, sqdd, m_mask, HEAD_D)
            if ROPE:
                qd1 = _rope(qd1, _load_rows(qd_base, offs_m, sqdn, d1 ^ 1, sqdd, m_mask, HEAD_D), rc, rs)
        acc_o1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
        acc_t1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    c_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running mu = sum(p S_dot) / sum(p): the centre
    scale2 = qk_scale * 1.4426950408889634
    for start_n in range(0, NK, BLOCK_N):
        n = start_n + offs_n
        n_mask = n < NK
        k0 = _load_cols(k_base, n, skn, d0, skd, n_mask, HEAD_D, MASK_N, True)
        if ROPE:
            tc, ts = _rope_tables(COS, SIN, n, d0, n_mask, HEAD_D, MASK_N, True, True)
            k0 = _rope(k0, _load_cols(k_base, n, skn, d0 ^ 1, skd, n_mask, HEAD_D, MASK_N, True), tc, ts)
        s = tl.dot(q0, k0, input_precision=DOT_PRECISION)
        sd = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if HAS_QD:
            sd += tl.dot(qd0, k0, input_precision=DOT_PRECISION)
        if HAS_KD:
            kd0 = _load_cols(kd_base, n, skdn, d0, skdd, n_mask, HEAD_D, MASK_N, True)
            if ROPE:
                kd0 = _rope(kd0, _load_cols(kd_base, n, skdn, d0 ^ 1, skdd, n_mask, HEAD_D, MASK_N, True), tc, ts)
            sd += tl.dot(q0, kd0, input_precision=DOT_PRECISION)
        if HAS_D1:
            k1 = _load_cols(k_base, n, skn, d1, skd, n_mask, HEAD_D, MASK_N, D1_FULL)
            if ROPE:
                tc, ts = _rope_tables(COS, SIN, n, d1, n_mask, HEAD_D, MASK_N, D1_FULL, True)
                k1 = _rope(k1, _load_cols(k_base, n, skn, d1 ^ 1, skd, n_mask, HEAD_D, MASK_N, D1_FULL), tc, ts)
            s += tl.dot(q1, k1, input_precision=DOT_PRECISION)
            if HAS_QD:
                sd += tl.dot(qd1, k1, input_precision=DOT_PRECISION)
            if HAS_KD:
                kd1 = _load_cols(kd_base, n, skdn, d1, skdd, n_mask, HEAD_D, MASK_N, D1_FULL)
                if ROPE:
                    kd1 = _rope(kd1, _load_cols(kd_base, n, skdn, d1 ^ 1, skdd, n_mask, HEAD_D, MASK_N, D1_FULL),
                                tc, ts)
                sd += tl.dot(q1, kd1, input_precision=DOT_PRECISION)
        if MASK_N:
            s = tl.where(n_mask[None, :], s * scale2, float("-inf"))
            sd = tl.where(n_mask[None, :], sd * qk_scale, 0.0)  # S_dot
        else:
            s = s * scale2
            sd = sd * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_new = l_i * alpha + tl.sum(p, 1)
        c_new = (alpha * l_i * c_i + tl.sum(p * sd, 1)) / l_new
        dc = (c_new - c_i)[:, None]
        t = p * (sd - c_new[:, None])  # centred p * (S_dot - mu): small even for one-hot p
        v0 = _load_rows(v_base, n, svn, d0, svd, n_mask, HEAD_D, MASK_N, True)
        pv = p.to(v0.dtype)
        acc_o0 = acc_o0 * alpha[:, None]
        acc_t0 = acc_t0 * alpha[:, None] - dc * acc_o0  # re-centre the past keys on c_new
        acc_o0 = tl.dot(pv, v0, acc_o0, input_precision=DOT_PRECISION)
        acc_t0 += _guarded_dot(t, v0, FP16_GUARD, DOT_PRECISION)
        if HAS_VD:
            acc_t0 = tl.dot(pv, _load_rows(vd_base, n, svdn, d0, svdd, n_mask, HEAD_D, MASK_N, True), acc_t0,
                            input_precision=DOT_PRECISION)
        if HAS_D1:
            v1 = _load_rows(v_base, n, svn, d1, svd, n_mask, HEAD_D, MASK_N, D1_FULL)
            acc_o1 = acc_o1 * alpha[:, None]
            acc_t1 = acc_t1 * alpha[:, None] - dc * acc_o1
            acc_o1 = tl.dot(pv, v1, acc_o1, input_precision=DOT_PRECISION)
            acc_t1 += _guarded_dot(t, v1, FP16_GUARD, DOT_PRECISION)
            if HAS_VD:
                acc_t1 = tl.dot(pv, _load_rows(vd_base, n, svdn, d1, svdd, n_mask, HEAD_D, MASK_N, D1_FULL), acc_t1,
                                input_precision=DOT_PRECISION)
        m_i = m_new
        l_i = l_new
        c_i = c_new
    # sum(p (S_dot - mu)) = 0 at the final centre, so O_dot = acc_t / l.
    inv_l = 1.0 / l_i
    o_base = O + _bh_offset(b, h, sob, soh, ALIGN8)  # O and OD share strides (both allocated contiguous)
    od_base = OD + _bh_offset(b, h, sob, soh, ALIGN8)
    _store_rows(o_base, (acc_o0 * inv_l[:, None]).to(O.dtype.element_ty), offs_m, son, d0, sod, m_mask, HEAD_D)
    _store_rows(od_base, (acc_t0 * inv_l[:, None]).to(OD.dtype.element_ty), offs_m, son, d0, sod, m_mask, HEAD_D)
    if HAS_D1:
        _store_rows(o_base, (acc_o1 * inv_l[:, None]).to(O.dtype.element_ty), offs_m, son, d1, sod, m_mask, HEAD_D)
        _store_rows(od_base, (acc_t1 * inv_l[:, None]).to(OD.dtype.element_ty), offs_m, son, d1, sod, m_mask,
                    HEAD_D)
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + bh.to(tl.int64) * NQ + offs_m, lse, mask=m_mask)

