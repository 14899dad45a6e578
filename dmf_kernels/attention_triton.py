"""Triton kernels of non-causal attention: forward (o, lse), backward (dq, dk, dv) and a
one-pass forward-mode JVP (o, o_dot, lse), with their launchers.

Layout (B, H, N, D) like F.scaled_dot_product_attention, any strides (a permuted view of a
fused qkv projection is read in place). q and kv lengths may differ; any N >= 1 (tails
are masked). Head dims 16..128 are split into a power-of-two part and a remainder padded
to at least 16 (72 = 64 + 16 with 8 masked, 80 = 64 + 16, 96 = 64 + 32): a head dim of 72
costs 80 columns of work instead of the 128 a power-of-two pad would.

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
import contextlib

import torch
import triton
import triton.language as tl


def head_split(head_dim):
    """(D0, D1): D0 the largest power of two <= head_dim, D1 the remainder padded to a
    power of two >= 16 (tl.dot needs K >= 16), or 0."""
    d0 = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - d0
    d1 = 0 if rest == 0 else max(16, triton.next_power_of_2(rest))
    return d0, d1


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
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    H, NQ, NK, qk_scale,
    ALIGN8: tl.constexpr, HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, MASK_N: tl.constexpr, D1_FULL: tl.constexpr,
):
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
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if HAS_D1:
        d1 = D0 + tl.arange(0, D1)
        q1 = _load_rows(q_base, offs_m, sqn, d1, sqd, m_mask, HEAD_D)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    scale2 = qk_scale * 1.4426950408889634  # exp2 domain
    for start_n in range(0, NK, BLOCK_N):
        n = start_n + offs_n
        n_mask = n < NK
        s = tl.dot(q0, _load_cols(k_base, n, skn, d0, skd, n_mask, HEAD_D, MASK_N, True),
                   input_precision=DOT_PRECISION)
        if HAS_D1:
            s += tl.dot(q1, _load_cols(k_base, n, skn, d1, skd, n_mask, HEAD_D, MASK_N, D1_FULL),
                        input_precision=DOT_PRECISION)
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
    Q, K, V, QD, KD, VD, O, OD, LSE,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sqdb, sqdh, sqdn, sqdd, skdb, skdh, skdn, skdd, svdb, svdh, svdn, svdd,
    sob, soh, son, sod,
    H, NQ, NK, qk_scale,
    HAS_QD: tl.constexpr, HAS_KD: tl.constexpr, HAS_VD: tl.constexpr,
    ALIGN8: tl.constexpr, HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, MASK_N: tl.constexpr, D1_FULL: tl.constexpr, FP16_GUARD: tl.constexpr,
):
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
    if HAS_QD:
        qd0 = _load_rows(qd_base, offs_m, sqdn, d0, sqdd, m_mask, HEAD_D)
    acc_o0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    acc_t0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if HAS_D1:
        q1 = _load_rows(q_base, offs_m, sqn, d1, sqd, m_mask, HEAD_D)
        if HAS_QD:
            qd1 = _load_rows(qd_base, offs_m, sqdn, d1, sqdd, m_mask, HEAD_D)
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
        s = tl.dot(q0, k0, input_precision=DOT_PRECISION)
        sd = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if HAS_QD:
            sd += tl.dot(qd0, k0, input_precision=DOT_PRECISION)
        if HAS_KD:
            sd += tl.dot(q0, _load_cols(kd_base, n, skdn, d0, skdd, n_mask, HEAD_D, MASK_N, True),
                         input_precision=DOT_PRECISION)
        if HAS_D1:
            k1 = _load_cols(k_base, n, skn, d1, skd, n_mask, HEAD_D, MASK_N, D1_FULL)
            s += tl.dot(q1, k1, input_precision=DOT_PRECISION)
            if HAS_QD:
                sd += tl.dot(qd1, k1, input_precision=DOT_PRECISION)
            if HAS_KD:
                sd += tl.dot(q1, _load_cols(kd_base, n, skdn, d1, skdd, n_mask, HEAD_D, MASK_N, D1_FULL),
                             input_precision=DOT_PRECISION)
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


@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA, sob, soh, son, sod, sdob, sdoh, sdon, sdod, H, NQ,
                                ALIGN8: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                                BLOCK_M: tl.constexpr):
    # delta = rowsum(O * dO), the softmax-backward correction.
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    son = _div8(son, ALIGN8)
    sdon = _div8(sdon, ALIGN8)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < NQ
    o = _load_rows(O + _bh_offset(b, h, sob, soh, ALIGN8), offs_m, son, d, sod, m_mask, HEAD_D).to(tl.float32)
    do = _load_rows(DO + _bh_offset(b, h, sdob, sdoh, ALIGN8), offs_m, sdon, d, sdod, m_mask, HEAD_D).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * NQ + offs_m, tl.sum(o * do, 1), mask=m_mask)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
    sdkb, sdkh, sdkn, sdkd,
    H, NQ, NK, qk_scale,
    ALIGN8: tl.constexpr, HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, MASK_M: tl.constexpr, D1_FULL: tl.constexpr,
):
    # One key block per program; loops over all query blocks. Works on transposed scores
    # sT = K Q^T so dk and dv accumulate as [BLOCK_N, D] without transposes.
    bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = bh // H
    h = bh % H
    sqn = _div8(sqn, ALIGN8)
    skn = _div8(skn, ALIGN8)
    svn = _div8(svn, ALIGN8)
    sdon = _div8(sdon, ALIGN8)
    sdkn = _div8(sdkn, ALIGN8)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    d0 = tl.arange(0, D0)
    d1 = D0 + tl.arange(0, D1)
    n_mask = offs_n < NK
    q_base = Q + _bh_offset(b, h, sqb, sqh, ALIGN8)
    do_base = DO + _bh_offset(b, h, sdob, sdoh, ALIGN8)
    k0 = _load_rows(K + _bh_offset(b, h, skb, skh, ALIGN8), offs_n, skn, d0, skd, n_mask, HEAD_D)
    v0 = _load_rows(V + _bh_offset(b, h, svb, svh, ALIGN8), offs_n, svn, d0, svd, n_mask, HEAD_D)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    if HAS_D1:
        k1 = _load_rows(K + _bh_offset(b, h, skb, skh, ALIGN8), offs_n, skn, d1, skd, n_mask, HEAD_D)
        v1 = _load_rows(V + _bh_offset(b, h, svb, svh, ALIGN8), offs_n, svn, d1, svd, n_mask, HEAD_D)
        dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    for start_m in range(0, NQ, BLOCK_M):
        m = start_m + offs_m
        m_mask = m < NQ
        qT0 = _load_cols(q_base, m, sqn, d0, sqd, m_mask, HEAD_D, MASK_M, True)
        doT0 = _load_cols(do_base, m, sdon, d0, sdod, m_mask, HEAD_D, MASK_M, True)
        sT = tl.dot(k0, qT0, input_precision=DOT_PRECISION)
        dpT = tl.dot(v0, doT0, input_precision=DOT_PRECISION)
        if HAS_D1:
            qT1 = _load_cols(q_base, m, sqn, d1, sqd, m_mask, HEAD_D, MASK_M, D1_FULL)
            doT1 = _load_cols(do_base, m, sdon, d1, sdod, m_mask, HEAD_D, MASK_M, D1_FULL)
            sT += tl.dot(k1, qT1, input_precision=DOT_PRECISION)
            dpT += tl.dot(v1, doT1, input_precision=DOT_PRECISION)
        lse = tl.load(LSE + bh.to(tl.int64) * NQ + m, mask=m_mask, other=0.0)
        delta = tl.load(DELTA + bh.to(tl.int64) * NQ + m, mask=m_mask, other=0.0)
        if MASK_M:
            pT = tl.where(m_mask[None, :], tl.exp(sT * qk_scale - lse[None, :]), 0.0)
        else:
            pT = tl.exp(sT * qk_scale - lse[None, :])
        dsT = pT * (dpT - delta[None, :])
        dv0 = tl.dot(pT.to(v0.dtype), tl.trans(doT0), dv0, input_precision=DOT_PRECISION)
        dk0 = tl.dot(dsT.to(k0.dtype), tl.trans(qT0), dk0, input_precision=DOT_PRECISION)
        if HAS_D1:
            dv1 = tl.dot(pT.to(v1.dtype), tl.trans(doT1), dv1, input_precision=DOT_PRECISION)
            dk1 = tl.dot(dsT.to(k1.dtype), tl.trans(qT1), dk1, input_precision=DOT_PRECISION)
    dk_base = DK + _bh_offset(b, h, sdkb, sdkh, ALIGN8)  # DK and DV share strides (both allocated contiguous)
    dv_base = DV + _bh_offset(b, h, sdkb, sdkh, ALIGN8)
    _store_rows(dk_base, (dk0 * qk_scale).to(DK.dtype.element_ty), offs_n, sdkn, d0, sdkd, n_mask, HEAD_D)
    _store_rows(dv_base, dv0.to(DV.dtype.element_ty), offs_n, sdkn, d0, sdkd, n_mask, HEAD_D)
    if HAS_D1:
        _store_rows(dk_base, (dk1 * qk_scale).to(DK.dtype.element_ty), offs_n, sdkn, d1, sdkd, n_mask, HEAD_D)
        _store_rows(dv_base, dv1.to(DV.dtype.element_ty), offs_n, sdkn, d1, sdkd, n_mask, HEAD_D)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
    sdqb, sdqh, sdqn, sdqd,
    H, NQ, NK, qk_scale,
    ALIGN8: tl.constexpr, HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, MASK_N: tl.constexpr, D1_FULL: tl.constexpr,
):
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    sqn = _div8(sqn, ALIGN8)
    skn = _div8(skn, ALIGN8)
    svn = _div8(svn, ALIGN8)
    sdon = _div8(sdon, ALIGN8)
    sdqn = _div8(sdqn, ALIGN8)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d0 = tl.arange(0, D0)
    d1 = D0 + tl.arange(0, D1)
    m_mask = offs_m < NQ
    k_base = K + _bh_offset(b, h, skb, skh, ALIGN8)
    v_base = V + _bh_offset(b, h, svb, svh, ALIGN8)
    q0 = _load_rows(Q + _bh_offset(b, h, sqb, sqh, ALIGN8), offs_m, sqn, d0, sqd, m_mask, HEAD_D)
    do0 = _load_rows(DO + _bh_offset(b, h, sdob, sdoh, ALIGN8), offs_m, sdon, d0, sdod, m_mask, HEAD_D)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if HAS_D1:
        q1 = _load_rows(Q + _bh_offset(b, h, sqb, sqh, ALIGN8), offs_m, sqn, d1, sqd, m_mask, HEAD_D)
        do1 = _load_rows(DO + _bh_offset(b, h, sdob, sdoh, ALIGN8), offs_m, sdon, d1, sdod, m_mask, HEAD_D)
        dq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    lse = tl.load(LSE + bh.to(tl.int64) * NQ + offs_m, mask=m_mask, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * NQ + offs_m, mask=m_mask, other=0.0)
    for start_n in range(0, NK, BLOCK_N):
        n = start_n + offs_n
        n_mask = n < NK
        kT0 = _load_cols(k_base, n, skn, d0, skd, n_mask, HEAD_D, MASK_N, True)
        s = tl.dot(q0, kT0, input_precision=DOT_PRECISION)
        dp = tl.dot(do0, _load_cols(v_base, n, svn, d0, svd, n_mask, HEAD_D, MASK_N, True),
                    input_precision=DOT_PRECISION)
        if HAS_D1:
            kT1 = _load_cols(k_base, n, skn, d1, skd, n_mask, HEAD_D, MASK_N, D1_FULL)
            s += tl.dot(q1, kT1, input_precision=DOT_PRECISION)
            dp += tl.dot(do1, _load_cols(v_base, n, svn, d1, svd, n_mask, HEAD_D, MASK_N, D1_FULL),
                         input_precision=DOT_PRECISION)
        if MASK_N:
            p = tl.where(n_mask[None, :], tl.exp(s * qk_scale - lse[:, None]), 0.0)
        else:
            p = tl.exp(s * qk_scale - lse[:, None])
        ds = (p * (dp - delta[:, None])).to(q0.dtype)
        dq0 = tl.dot(ds, tl.trans(kT0), dq0, input_precision=DOT_PRECISION)
        if HAS_D1:
            dq1 = tl.dot(ds, tl.trans(kT1), dq1, input_precision=DOT_PRECISION)
    dq_base = DQ + _bh_offset(b, h, sdqb, sdqh, ALIGN8)
    _store_rows(dq_base, (dq0 * qk_scale).to(DQ.dtype.element_ty), offs_m, sdqn, d0, sdqd, m_mask, HEAD_D)
    if HAS_D1:
        _store_rows(dq_base, (dq1 * qk_scale).to(DQ.dtype.element_ty), offs_m, sdqn, d1, sdqd, m_mask, HEAD_D)


# ---------------------------------------------------------------- launchers


def _default_blocks(kind, head_dim, interpret, capability=(9, 0)):
    """(BLOCK_M, BLOCK_N, num_warps) per kernel, head dim and architecture: the largest tiles
    that compile without spills for 16-bit inputs (benchmarks/results/inspect_sm_*.md,
    triton 3.6; `make inspect` fails CI if one starts to spill)."""
    if interpret:  # the CPU interpreter's cost grows with tile size: small tiles, few programs
        return 16, 16, 4
    sm80 = capability[0] < 9  # mma.sync instead of wgmma: accumulators stay in registers
    if kind == "jvp":
        # Two [BLOCK_M, D] accumulators plus Q and Q_dot in registers: 221 registers at D=72 on
        # sm_90a; at D=128 fp16 4 warps spill 24 bytes, 8 do not. On sm_80, 4 warps spill
        # 12-44 bytes at D=72..128 and 8 warps do not, except fp16 at D=96 (36 bytes: the fp16
        # overflow guard); a 128-query tile with 8 warps is clean there (244 / 255 registers).
        if sm80 and head_dim == 96:
            return 128, 32, 8
        return 64, 32, 8 if head_dim == 128 or (sm80 and head_dim in (72, 80)) else 4
    if kind == "bwd_dkdv":
        # One key block per program (BLOCK_N keys; K, V, dK, dV held for it), query chunks of
        # BLOCK_M. sm_90a: with 4 warps D=96 spills 8 bytes and D=128 40 bytes; 8 warps halve
        # the per-thread share (200 / 211 registers). sm_80 (mma.sync, warps split the rows, so
        # 8 warps do not halve the operands): 64-query chunks spill at D=64..96 (220-760 bytes,
        # and at D=96 ptxas gives up: 32 registers, 15 KB of spills); 16-query chunks are clean
        # at every D (255 registers at D=72..96, 164 at 64); D=128 is clean at 64x64 w8.
        if sm80:
            return (64, 64, 8) if head_dim == 128 else (16, 64, 4)
        return (64, 64, 8) if head_dim > 80 else (64, 64, 4)
    if kind == "bwd_dq":
        # One query block per program, key chunks of BLOCK_N. sm_80: 64x64 w4 spills 36 bytes at
        # D=96; 64x32 w4 is clean at D<=96 (160-255 registers), 64x64 w8 at 128 (170).
        if sm80:
            return (64, 64, 8) if head_dim == 128 else (64, 32, 4)
        return (64, 64, 8) if head_dim > 80 else (64, 64, 4)
    return (128, 64, 8) if head_dim <= 64 else (64, 64, 4)  # a 128-row tile wants 8 warps


def _capability(t):
    # The architecture the kernels will be compiled for (inspect_kernels.py overrides this
    # for meta tensors to compile each target's own launch configuration).
    return torch.cuda.get_device_capability(t.device) if t.is_cuda else (9, 0)


def _interpreting():
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _precision(dtype):
    """tl.dot input precision. 16-bit inputs: native tensor-core products ("tf32" is then
    ignored). fp32 inputs follow torch.get_float32_matmul_precision() like torch.matmul:
    "highest" (PyTorch's default) -> "ieee", exact fp32 FMAs without tensor cores (and the
    JVP kernel spills: ~3 KB at D=72 on sm_90a); "high" -> "tf32x3", three TF32 products
    per product on tensor cores (wgmma), about fp32 accuracy; "medium" -> "tf32"."""
    if dtype != torch.float32:
        return "tf32"
    return {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}.get(torch.get_float32_matmul_precision(), "ieee")


def _d1_full(head_dim):
    """The remainder block of the head dim has no padding (96 = 64 + 32, 80 = 64 + 16; not
    72 = 64 + 16 with 8 masked): its loads need no column mask."""
    d0, d1 = head_split(head_dim)
    return d1 > 0 and d0 + d1 == head_dim


def _align8(*tensors):
    """ALIGN8: every non-last stride of every tensor is a multiple of 8 elements, so the
    kernels may round them (see _div8). A view with, e.g., row stride 75 gets False."""
    return all(s % 8 == 0 for t in tensors for s in t.stride()[:-1])


# CUDA grid limits: x up to 2^31 - 1, y and z up to 65535. B * H goes on x (a DiT at
# B=8192, H=16 passes 65535), the sequence blocks on y.
_MAX_GRID_Y = 65535


def _grid(blocks, bh):
    if blocks > _MAX_GRID_Y:
        raise ValueError(f"attention: {blocks} sequence blocks exceed the grid limit {_MAX_GRID_Y}; "
                         "use a larger block or a shorter sequence")
    if bh > 2**31 - 1:
        raise ValueError(f"attention: B * H = {bh} exceeds the grid limit 2^31 - 1")
    return (bh, blocks)


def _device(t):
    # Launch on the inputs' device, not the current one (multi-GPU).
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _strides(t):
    return tuple(t.stride())


# Tests set this: outputs are filled with NaN before each launch, so elements a kernel
# fails to write show up instead of passing by luck.
POISON_OUTPUTS = False


def _empty(*shape, device, dtype):
    t = torch.empty(*shape, device=device, dtype=dtype)
    return t.fill_(float("nan")) if POISON_OUTPUTS else t


def attention_fwd(q, k, v, scale, block_m=None, block_n=None, num_warps=None, num_stages=2):
    """o (B, H, NQ, D) like q, contiguous; lse (B, H, NQ) float32."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    d0, d1 = head_split(D)
    bm, bn, nw = _default_blocks("fwd", D, _interpreting(), _capability(q))
    bm, bn, num_warps = block_m or bm, block_n or bn, num_warps or nw
    o = _empty(B, H, NQ, D, device=q.device, dtype=q.dtype)
    lse = _empty(B, H, NQ, device=q.device, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse
    grid = _grid(triton.cdiv(NQ, bm), B * H)
    with _device(q):
        _attn_fwd_kernel[grid](
            q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            H, NQ, NK, scale, ALIGN8=_align8(q, k, v, o), HEAD_D=D, D0=d0, D1=max(d1, 16), HAS_D1=d1 > 0,
            BLOCK_M=bm, BLOCK_N=bn, MASK_N=NK % bn != 0, D1_FULL=_d1_full(D),
            DOT_PRECISION=_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
        )
    return o, lse


def attention_jvp(q, k, v, q_dot, k_dot, v_dot, scale, block_m=None, block_n=None, num_warps=None, num_stages=2):
    """One pass: o, o_dot (B, H, NQ, D) contiguous, lse (B, H, NQ) float32. A None tangent is
    zero and its products are skipped."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    d0, d1 = head_split(D)
    bm, bn, nw = _default_blocks("jvp", D, _interpreting(), _capability(q))
    bm, bn, num_warps = block_m or bm, block_n or bn, num_warps or nw
    o = _empty(B, H, NQ, D, device=q.device, dtype=q.dtype)
    o_dot = _empty(B, H, NQ, D, device=q.device, dtype=q.dtype)
    lse = _empty(B, H, NQ, device=q.device, dtype=torch.float32)
    if o.numel() == 0:
        return o, o_dot, lse
    qd, kd, vd = (t if t is not None else q for t in (q_dot, k_dot, v_dot))  # placeholders, never read
    grid = _grid(triton.cdiv(NQ, bm), B * H)
    with _device(q):
        _attn_jvp_kernel[grid](
            q, k, v, qd, kd, vd, o, o_dot, lse,
            *_strides(q), *_strides(k), *_strides(v), *_strides(qd), *_strides(kd), *_strides(vd), *_strides(o),
            H, NQ, NK, scale,
            HAS_QD=q_dot is not None, HAS_KD=k_dot is not None, HAS_VD=v_dot is not None,
            ALIGN8=_align8(q, k, v, qd, kd, vd, o), HEAD_D=D, D0=d0, D1=max(d1, 16), HAS_D1=d1 > 0, BLOCK_M=bm,
            BLOCK_N=bn, MASK_N=NK % bn != 0, D1_FULL=_d1_full(D), DOT_PRECISION=_precision(q.dtype),
            FP16_GUARD=q.dtype == torch.float16,
            num_warps=num_warps, num_stages=num_stages,
        )
    return o, o_dot, lse


def attention_bwd(do, q, k, v, o, lse, scale, block_m=None, block_n=None, num_warps=None, num_stages=2,
                  dq_blocks=None):
    """dq, dk, dv, contiguous, from the saved o and lse (no N x N storage). The dK/dV and dQ
    kernels have their own default tiles (_default_blocks "bwd_dkdv", "bwd_dq"); block_m,
    block_n, num_warps given here override both, dq_blocks = (BLOCK_M, BLOCK_N, num_warps)
    the dQ kernel's alone (benchmarks/tune_attention.py tunes the two separately)."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    d0, d1 = head_split(D)
    cap, interp = _capability(q), _interpreting()
    kv_cfg, q_cfg = (tuple(x or d for x, d in zip((block_m, block_n, num_warps), _default_blocks(kind, D, interp, cap)))
                     for kind in ("bwd_dkdv", "bwd_dq"))
    if dq_blocks is not None:
        q_cfg = tuple(dq_blocks)
    dq = _empty(B, H, NQ, D, device=q.device, dtype=q.dtype)
    dk = _empty(B, H, NK, D, device=q.device, dtype=q.dtype)
    dv = _empty(B, H, NK, D, device=q.device, dtype=q.dtype)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = _empty(B, H, NQ, device=q.device, dtype=torch.float32)
    bd = triton.next_power_of_2(D)
    align8 = _align8(q, k, v, o, do, dq)
    with _device(q):
        _attn_bwd_preprocess_kernel[_grid(triton.cdiv(NQ, q_cfg[0]), B * H)](
            o, do, delta, *_strides(o), *_strides(do), H, NQ, ALIGN8=align8, HEAD_D=D, BLOCK_D=bd, BLOCK_M=q_cfg[0])
    common = dict(ALIGN8=align8, HEAD_D=D, D0=d0, D1=max(d1, 16), HAS_D1=d1 > 0, DOT_PRECISION=_precision(q.dtype),
                  D1_FULL=_d1_full(D), num_stages=num_stages)
    with _device(q):
        bm, bn, nw = kv_cfg
        _attn_bwd_dkdv_kernel[_grid(triton.cdiv(NK, bn), B * H)](
            q, k, v, do, lse, delta, dk, dv, *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk),
            H, NQ, NK, scale, BLOCK_M=bm, BLOCK_N=bn, MASK_M=NQ % bm != 0, num_warps=nw, **common)
        bm, bn, nw = q_cfg
        _attn_bwd_dq_kernel[_grid(triton.cdiv(NQ, bm), B * H)](
            q, k, v, do, lse, delta, dq, *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
            H, NQ, NK, scale, BLOCK_M=bm, BLOCK_N=bn, MASK_N=NK % bn != 0, num_warps=nw, **common)
    return dq, dk, dv

