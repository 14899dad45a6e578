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
def _al(s0, s1, s2, DIV8: tl.constexpr):
    # Triton marks an integer argument divisible only when it is a multiple of 16; a row
    # stride of 72 (DiT-XL/2's head dim) or a fused-qkv head stride never is, and then every
    # load is scalar and nothing is pipelined with cp.async. When the launcher has checked
    # that these strides are multiples of 8 (DIV8), s // 8 * 8 is the same value with the
    # divisibility visible to the compiler: 16-byte vector loads in bf16/fp16. Measured on
    # the sm_90a JVP kernel at D=72: 160 scalar ld.global.b16 and 0 cp.async before.
    if DIV8:
        return s0 // 8 * 8, s1 // 8 * 8, s2 // 8 * 8
    else:
        return s0, s1, s2


@triton.jit
def _program(NQ, H, BLOCK_M: tl.constexpr):
    # A 1-D grid (query blocks fastest, so consecutive programs share K/V in L2): the second
    # grid axis of CUDA stops at 65535, i.e. B * H <= 65535 (B = 4096 at H = 16). Batch and
    # head indices are int64 so that b * stride_b cannot overflow (fused qkv at B = 256,
    # N = 4096, H = 16, D = 72 has (B - 1) * stride_b > 2^31).
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(NQ, BLOCK_M)
    pid_m = pid % n_blocks
    bh = (pid // n_blocks).to(tl.int64)
    return pid_m, bh, bh // H, bh % H


@triton.jit
def _load_rows(base, rows, stride_row, cols, stride_col, row_mask, HEAD_D: tl.constexpr):
    # A [rows, cols] tile of a (N, D) matrix; masked rows and columns >= HEAD_D read 0.
    mask = row_mask[:, None] & (cols[None, :] < HEAD_D)
    return tl.load(base + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0)


@triton.jit
def _load_cols(base, rows, stride_row, cols, stride_col, row_mask, HEAD_D: tl.constexpr):
    # The transposed tile [cols, rows] of a (N, D) matrix, for K^T and V^T.
    mask = row_mask[None, :] & (cols[:, None] < HEAD_D)
    return tl.load(base + rows[None, :] * stride_row + cols[:, None] * stride_col, mask=mask, other=0.0)


@triton.jit
def _store_rows(base, value, rows, stride_row, cols, stride_col, row_mask, HEAD_D: tl.constexpr):
    mask = row_mask[:, None] & (cols[None, :] < HEAD_D)
    tl.store(base + rows[:, None] * stride_row + cols[None, :] * stride_col, value, mask=mask)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    H, NQ, NK, qk_scale,
    HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, STRIDE_DIV8: tl.constexpr,
):
    pid_m, bh, b, h = _program(NQ, H, BLOCK_M)
    sqb, sqh, sqn = _al(sqb, sqh, sqn, STRIDE_DIV8)
    skb, skh, skn = _al(skb, skh, skn, STRIDE_DIV8)
    svb, svh, svn = _al(svb, svh, svn, STRIDE_DIV8)
    sob, soh, son = _al(sob, soh, son, STRIDE_DIV8)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d0 = tl.arange(0, D0)
    m_mask = offs_m < NQ
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
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
        s = tl.dot(q0, _load_cols(k_base, n, skn, d0, skd, n_mask, HEAD_D), input_precision=DOT_PRECISION)
        if HAS_D1:
            s += tl.dot(q1, _load_cols(k_base, n, skn, d1, skd, n_mask, HEAD_D), input_precision=DOT_PRECISION)
        s = tl.where(n_mask[None, :], s * scale2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v0 = _load_rows(v_base, n, svn, d0, svd, n_mask, HEAD_D)
        acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None], input_precision=DOT_PRECISION)
        if HAS_D1:
            v1 = _load_rows(v_base, n, svn, d1, svd, n_mask, HEAD_D)
            acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    o_base = O + b * sob + h * soh
    _store_rows(o_base, (acc0 / l_i[:, None]).to(O.dtype.element_ty), offs_m, son, d0, sod, m_mask, HEAD_D)
    if HAS_D1:
        _store_rows(o_base, (acc1 / l_i[:, None]).to(O.dtype.element_ty), offs_m, son, d1, sod, m_mask, HEAD_D)
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + bh * NQ + offs_m, lse, mask=m_mask)


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
    HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, FP16_GUARD: tl.constexpr,
    STRIDE_DIV8: tl.constexpr,
):
    pid_m, bh, b, h = _program(NQ, H, BLOCK_M)
    sqb, sqh, sqn = _al(sqb, sqh, sqn, STRIDE_DIV8)
    skb, skh, skn = _al(skb, skh, skn, STRIDE_DIV8)
    svb, svh, svn = _al(svb, svh, svn, STRIDE_DIV8)
    sqdb, sqdh, sqdn = _al(sqdb, sqdh, sqdn, STRIDE_DIV8)
    skdb, skdh, skdn = _al(skdb, skdh, skdn, STRIDE_DIV8)
    svdb, svdh, svdn = _al(svdb, svdh, svdn, STRIDE_DIV8)
    sob, soh, son = _al(sob, soh, son, STRIDE_DIV8)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d0 = tl.arange(0, D0)
    d1 = D0 + tl.arange(0, D1)
    m_mask = offs_m < NQ
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    qd_base = QD + b * sqdb + h * sqdh
    kd_base = KD + b * skdb + h * skdh
    vd_base = VD + b * svdb + h * svdh
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
        k0 = _load_cols(k_base, n, skn, d0, skd, n_mask, HEAD_D)
        s = tl.dot(q0, k0, input_precision=DOT_PRECISION)
        sd = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if HAS_QD:
            sd += tl.dot(qd0, k0, input_precision=DOT_PRECISION)
        if HAS_KD:
            sd += tl.dot(q0, _load_cols(kd_base, n, skdn, d0, skdd, n_mask, HEAD_D), input_precision=DOT_PRECISION)
        if HAS_D1:
            k1 = _load_cols(k_base, n, skn, d1, skd, n_mask, HEAD_D)
            s += tl.dot(q1, k1, input_precision=DOT_PRECISION)
            if HAS_QD:
                sd += tl.dot(qd1, k1, input_precision=DOT_PRECISION)
            if HAS_KD:
                sd += tl.dot(q1, _load_cols(kd_base, n, skdn, d1, skdd, n_mask, HEAD_D),
                             input_precision=DOT_PRECISION)
        s = tl.where(n_mask[None, :], s * scale2, float("-inf"))
        sd = tl.where(n_mask[None, :], sd * qk_scale, 0.0)  # S_dot
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_new = l_i * alpha + tl.sum(p, 1)
        c_new = (alpha * l_i * c_i + tl.sum(p * sd, 1)) / l_new
        dc = (c_new - c_i)[:, None]
        t = p * (sd - c_new[:, None])  # centred p * (S_dot - mu): small even for one-hot p
        v0 = _load_rows(v_base, n, svn, d0, svd, n_mask, HEAD_D)
        pv = p.to(v0.dtype)
        acc_o0 = acc_o0 * alpha[:, None]
        acc_t0 = acc_t0 * alpha[:, None] - dc * acc_o0  # re-centre the past keys on c_new
        acc_o0 = tl.dot(pv, v0, acc_o0, input_precision=DOT_PRECISION)
        acc_t0 += _guarded_dot(t, v0, FP16_GUARD, DOT_PRECISION)
        if HAS_VD:
            acc_t0 = tl.dot(pv, _load_rows(vd_base, n, svdn, d0, svdd, n_mask, HEAD_D), acc_t0,
                            input_precision=DOT_PRECISION)
        if HAS_D1:
            v1 = _load_rows(v_base, n, svn, d1, svd, n_mask, HEAD_D)
            acc_o1 = acc_o1 * alpha[:, None]
            acc_t1 = acc_t1 * alpha[:, None] - dc * acc_o1
            acc_o1 = tl.dot(pv, v1, acc_o1, input_precision=DOT_PRECISION)
            acc_t1 += _guarded_dot(t, v1, FP16_GUARD, DOT_PRECISION)
            if HAS_VD:
                acc_t1 = tl.dot(pv, _load_rows(vd_base, n, svdn, d1, svdd, n_mask, HEAD_D), acc_t1,
                                input_precision=DOT_PRECISION)
        m_i = m_new
        l_i = l_new
        c_i = c_new
    # sum(p (S_dot - mu)) = 0 at the final centre, so O_dot = acc_t / l.
    inv_l = 1.0 / l_i
    o_base = O + b * sob + h * soh  # O and OD share strides (both allocated contiguous)
    od_base = OD + b * sob + h * soh
    _store_rows(o_base, (acc_o0 * inv_l[:, None]).to(O.dtype.element_ty), offs_m, son, d0, sod, m_mask, HEAD_D)
    _store_rows(od_base, (acc_t0 * inv_l[:, None]).to(OD.dtype.element_ty), offs_m, son, d0, sod, m_mask, HEAD_D)
    if HAS_D1:
        _store_rows(o_base, (acc_o1 * inv_l[:, None]).to(O.dtype.element_ty), offs_m, son, d1, sod, m_mask, HEAD_D)
        _store_rows(od_base, (acc_t1 * inv_l[:, None]).to(OD.dtype.element_ty), offs_m, son, d1, sod, m_mask,
                    HEAD_D)
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + bh * NQ + offs_m, lse, mask=m_mask)


@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA, sob, soh, son, sod, sdob, sdoh, sdon, sdod, H, NQ,
                                HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                                STRIDE_DIV8: tl.constexpr):
    # delta = rowsum(O * dO), the softmax-backward correction.
    pid_m, bh, b, h = _program(NQ, H, BLOCK_M)
    sob, soh, son = _al(sob, soh, son, STRIDE_DIV8)
    sdob, sdoh, sdon = _al(sdob, sdoh, sdon, STRIDE_DIV8)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < NQ
    o = _load_rows(O + b * sob + h * soh, offs_m, son, d, sod, m_mask, HEAD_D).to(tl.float32)
    do = _load_rows(DO + b * sdob + h * sdoh, offs_m, sdon, d, sdod, m_mask, HEAD_D).to(tl.float32)
    tl.store(DELTA + bh * NQ + offs_m, tl.sum(o * do, 1), mask=m_mask)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
    sdkb, sdkh, sdkn, sdkd,
    H, NQ, NK, qk_scale,
    HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, STRIDE_DIV8: tl.constexpr,
):
    # One key block per program; loops over all query blocks. Works on transposed scores
    # sT = K Q^T so dk and dv accumulate as [BLOCK_N, D] without transposes.
    pid_n, bh, b, h = _program(NK, H, BLOCK_N)
    sqb, sqh, sqn = _al(sqb, sqh, sqn, STRIDE_DIV8)
    skb, skh, skn = _al(skb, skh, skn, STRIDE_DIV8)
    svb, svh, svn = _al(svb, svh, svn, STRIDE_DIV8)
    sdob, sdoh, sdon = _al(sdob, sdoh, sdon, STRIDE_DIV8)
    sdkb, sdkh, sdkn = _al(sdkb, sdkh, sdkn, STRIDE_DIV8)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    d0 = tl.arange(0, D0)
    d1 = D0 + tl.arange(0, D1)
    n_mask = offs_n < NK
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    k0 = _load_rows(K + b * skb + h * skh, offs_n, skn, d0, skd, n_mask, HEAD_D)
    v0 = _load_rows(V + b * svb + h * svh, offs_n, svn, d0, svd, n_mask, HEAD_D)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    if HAS_D1:
        k1 = _load_rows(K + b * skb + h * skh, offs_n, skn, d1, skd, n_mask, HEAD_D)
        v1 = _load_rows(V + b * svb + h * svh, offs_n, svn, d1, svd, n_mask, HEAD_D)
        dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    for start_m in range(0, NQ, BLOCK_M):
        m = start_m + offs_m
        m_mask = m < NQ
        qT0 = _load_cols(q_base, m, sqn, d0, sqd, m_mask, HEAD_D)
        doT0 = _load_cols(do_base, m, sdon, d0, sdod, m_mask, HEAD_D)
        sT = tl.dot(k0, qT0, input_precision=DOT_PRECISION)
        dpT = tl.dot(v0, doT0, input_precision=DOT_PRECISION)
        if HAS_D1:
            qT1 = _load_cols(q_base, m, sqn, d1, sqd, m_mask, HEAD_D)
            doT1 = _load_cols(do_base, m, sdon, d1, sdod, m_mask, HEAD_D)
            sT += tl.dot(k1, qT1, input_precision=DOT_PRECISION)
            dpT += tl.dot(v1, doT1, input_precision=DOT_PRECISION)
        lse = tl.load(LSE + bh * NQ + m, mask=m_mask, other=0.0)
        delta = tl.load(DELTA + bh * NQ + m, mask=m_mask, other=0.0)
        pT = tl.where(m_mask[None, :], tl.exp(sT * qk_scale - lse[None, :]), 0.0)
        dsT = pT * (dpT - delta[None, :])
        dv0 = tl.dot(pT.to(v0.dtype), tl.trans(doT0), dv0, input_precision=DOT_PRECISION)
        dk0 = tl.dot(dsT.to(k0.dtype), tl.trans(qT0), dk0, input_precision=DOT_PRECISION)
        if HAS_D1:
            dv1 = tl.dot(pT.to(v1.dtype), tl.trans(doT1), dv1, input_precision=DOT_PRECISION)
            dk1 = tl.dot(dsT.to(k1.dtype), tl.trans(qT1), dk1, input_precision=DOT_PRECISION)
    dk_base = DK + b * sdkb + h * sdkh  # DK and DV share strides (both allocated contiguous)
    dv_base = DV + b * sdkb + h * sdkh
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
    HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, STRIDE_DIV8: tl.constexpr,
):
    pid_m, bh, b, h = _program(NQ, H, BLOCK_M)
    sqb, sqh, sqn = _al(sqb, sqh, sqn, STRIDE_DIV8)
    skb, skh, skn = _al(skb, skh, skn, STRIDE_DIV8)
    svb, svh, svn = _al(svb, svh, svn, STRIDE_DIV8)
    sdob, sdoh, sdon = _al(sdob, sdoh, sdon, STRIDE_DIV8)
    sdqb, sdqh, sdqn = _al(sdqb, sdqh, sdqn, STRIDE_DIV8)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d0 = tl.arange(0, D0)
    d1 = D0 + tl.arange(0, D1)
    m_mask = offs_m < NQ
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    q0 = _load_rows(Q + b * sqb + h * sqh, offs_m, sqn, d0, sqd, m_mask, HEAD_D)
    do0 = _load_rows(DO + b * sdob + h * sdoh, offs_m, sdon, d0, sdod, m_mask, HEAD_D)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if HAS_D1:
        q1 = _load_rows(Q + b * sqb + h * sqh, offs_m, sqn, d1, sqd, m_mask, HEAD_D)
        do1 = _load_rows(DO + b * sdob + h * sdoh, offs_m, sdon, d1, sdod, m_mask, HEAD_D)
        dq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    lse = tl.load(LSE + bh * NQ + offs_m, mask=m_mask, other=0.0)
    delta = tl.load(DELTA + bh * NQ + offs_m, mask=m_mask, other=0.0)
    for start_n in range(0, NK, BLOCK_N):
        n = start_n + offs_n
        n_mask = n < NK
        kT0 = _load_cols(k_base, n, skn, d0, skd, n_mask, HEAD_D)
        s = tl.dot(q0, kT0, input_precision=DOT_PRECISION)
        dp = tl.dot(do0, _load_cols(v_base, n, svn, d0, svd, n_mask, HEAD_D), input_precision=DOT_PRECISION)
        if HAS_D1:
            kT1 = _load_cols(k_base, n, skn, d1, skd, n_mask, HEAD_D)
            s += tl.dot(q1, kT1, input_precision=DOT_PRECISION)
            dp += tl.dot(do1, _load_cols(v_base, n, svn, d1, svd, n_mask, HEAD_D), input_precision=DOT_PRECISION)
        p = tl.where(n_mask[None, :], tl.exp(s * qk_scale - lse[:, None]), 0.0)
        ds = (p * (dp - delta[:, None])).to(q0.dtype)
        dq0 = tl.dot(ds, tl.trans(kT0), dq0, input_precision=DOT_PRECISION)
        if HAS_D1:
            dq1 = tl.dot(ds, tl.trans(kT1), dq1, input_precision=DOT_PRECISION)
    dq_base = DQ + b * sdqb + h * sdqh
    _store_rows(dq_base, (dq0 * qk_scale).to(DQ.dtype.element_ty), offs_m, sdqn, d0, sdqd, m_mask, HEAD_D)
    if HAS_D1:
        _store_rows(dq_base, (dq1 * qk_scale).to(DQ.dtype.element_ty), offs_m, sdqn, d1, sdqd, m_mask, HEAD_D)


# ---------------------------------------------------------------- launchers
#
# Each launcher builds its launches as plans (kernel, grid, args, options) and runs them; the
# kernel inspection tool (benchmarks/inspect_kernels.py) compiles exactly the same plans for
# sm_90a / sm_80 from meta tensors, so what it reports is what a GPU would run.


class Launch:
    def __init__(self, kernel, grid, args, options):
        self.kernel, self.grid, self.args, self.options = kernel, grid, args, options

    def run(self):
        self.kernel[self.grid](*self.args, **self.options)


def _default_config(kind, head_dim, interpret, arch=90):
    """(BLOCK_M, BLOCK_N, num_warps), chosen from the sm_90a/sm_80 machine code
    (benchmarks/inspect_kernels.py: no spills, cp.async pipelining, tensor cores) until a GPU
    sweep (benchmarks/tune_attention.py) says better. `arch`: 90 for Hopper and newer, 80 for
    Ampere (mma.sync needs more registers than wgmma for the same tile)."""
    if interpret:  # the CPU interpreter's cost grows with tile size: small tiles, few programs
        return 16, 16, 4
    if arch < 90:
        if kind == "jvp":  # 64x32x4: 16-64 bytes of spills at D = 80/96; 32x32x4 still 28 (bf16, 96)
            return (32, 32, 8) if head_dim > 72 else (64, 32, 4)
        if kind == "bwd":  # dq: 28 bytes spilled at 64x64 (fp16, D = 64), 60 at 32x64 (D = 96);
            return (32, 32, 4) if head_dim > 80 else (32, 64, 4)  # dkdv spills in every tile tried
        if head_dim > 80:  # 64x64x4 spilled 8 bytes at D = 96
            return 64, 32, 4
    if kind == "jvp":
        # two [BLOCK_M, D] accumulators plus Q and Q_dot in registers: at D = 128 with 4 warps
        # the fp16 kernel spilled 32 bytes (255 registers); 8 warps halve the per-thread tile.
        return 64, 32, 8 if head_dim > 96 else 4
    if kind == "bwd":
        # dK and dV accumulators: 4 warps spilled 24 (D = 96) and 96 bytes (D = 128) in dkdv.
        return 64, 64, 8 if head_dim > 80 else 4
    bm = 128 if head_dim <= 64 else 64
    return bm, 64, 8 if bm >= 128 else 4  # a 128-row tile wants 8 warps


def _interpreting():
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _precision(dtype):
    """tl.dot input precision. fp16/bf16 products are exact in fp32 accumulation. fp32 follows
    torch.get_float32_matmul_precision(): "highest" (PyTorch's default) -> "ieee" (exact fp32,
    no tensor cores), "high" -> "tf32x3" (three TF32 products, about fp32 accuracy, on tensor
    cores), "medium" -> "tf32"."""
    if dtype != torch.float32:
        return "tf32"  # ignored for fp16/bf16 operands
    return {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}[torch.get_float32_matmul_precision()]


def _strides(t):
    return tuple(t.stride())


def _div8(*tensors):
    """Whether every non-last stride is a multiple of 8 and every last stride is 1: then the
    kernels may round the strides to show their divisibility (see _al)."""
    return all(t.stride(-1) == 1 and all(st % 8 == 0 for st in t.stride()[:-1]) for t in tensors)


def _grid(n, block, B, H):
    programs = triton.cdiv(n, block) * B * H
    if programs >= 2**31:
        raise ValueError(f"attention: {programs} programs exceed the CUDA grid limit 2^31 - 1 "
                         f"(B={B}, H={H}, N={n}, block={block})")
    return (programs,)


# Tests set this: outputs are filled with NaN before each launch, so elements a kernel
# fails to write show up instead of passing by luck.
POISON_OUTPUTS = False


def _empty(*shape, device, dtype):
    t = torch.empty(*shape, device=device, dtype=dtype)
    return t.fill_(float("nan")) if POISON_OUTPUTS and t.device.type != "meta" else t


def _device(t):
    # Launch on the inputs' GPU, not the current one (multi-GPU processes).
    import contextlib

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _arch(t):
    if t.is_cuda:
        major, minor = torch.cuda.get_device_capability(t.device)
        return major * 10 + minor
    return 90


def plan_fwd(q, k, v, scale, o, lse, block_m=None, block_n=None, num_warps=None, num_stages=2, arch=None):
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    d0, d1 = head_split(D)
    bm, bn, w = _default_config("fwd", D, _interpreting(), arch or _arch(q))
    bm, bn, num_warps = block_m or bm, block_n or bn, num_warps or w
    return [Launch(_attn_fwd_kernel, _grid(NQ, bm, B, H),
                   (q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o), H, NQ, NK, scale),
                   dict(HEAD_D=D, D0=d0, D1=max(d1, 16), HAS_D1=d1 > 0, BLOCK_M=bm, BLOCK_N=bn,
                        DOT_PRECISION=_precision(q.dtype), STRIDE_DIV8=_div8(q, k, v, o),
                        num_warps=num_warps, num_stages=num_stages))]


def plan_jvp(q, k, v, q_dot, k_dot, v_dot, scale, o, o_dot, lse, block_m=None, block_n=None, num_warps=None,
             num_stages=2, arch=None):
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    d0, d1 = head_split(D)
    bm, bn, w = _default_config("jvp", D, _interpreting(), arch or _arch(q))
    bm, bn, num_warps = block_m or bm, block_n or bn, num_warps or w
    qd, kd, vd = (t if t is not None else q for t in (q_dot, k_dot, v_dot))  # placeholders, never read
    return [Launch(_attn_jvp_kernel, _grid(NQ, bm, B, H),
                   (q, k, v, qd, kd, vd, o, o_dot, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(qd),
                    *_strides(kd), *_strides(vd), *_strides(o), H, NQ, NK, scale),
                   dict(HAS_QD=q_dot is not None, HAS_KD=k_dot is not None, HAS_VD=v_dot is not None,
                        HEAD_D=D, D0=d0, D1=max(d1, 16), HAS_D1=d1 > 0, BLOCK_M=bm, BLOCK_N=bn,
                        DOT_PRECISION=_precision(q.dtype), FP16_GUARD=q.dtype == torch.float16,
                        STRIDE_DIV8=_div8(q, k, v, qd, kd, vd, o), num_warps=num_warps, num_stages=num_stages))]


def plan_bwd(do, q, k, v, o, lse, scale, dq, dk, dv, delta, block_m=None, block_n=None, num_warps=None,
             num_stages=2, arch=None):
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    d0, d1 = head_split(D)
    bm, bn, w = _default_config("bwd", D, _interpreting(), arch or _arch(q))
    bm, bn, num_warps = block_m or bm, block_n or bn, num_warps or w
    div8 = _div8(q, k, v, do, o, dq, dk)
    common = dict(HEAD_D=D, D0=d0, D1=max(d1, 16), HAS_D1=d1 > 0, BLOCK_M=bm, BLOCK_N=bn,
                  DOT_PRECISION=_precision(q.dtype), STRIDE_DIV8=div8, num_warps=num_warps, num_stages=num_stages)
    return [
        Launch(_attn_bwd_preprocess_kernel, _grid(NQ, bm, B, H),
               (o, do, delta, *_strides(o), *_strides(do), H, NQ),
               dict(HEAD_D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_M=bm, STRIDE_DIV8=div8)),
        Launch(_attn_bwd_dkdv_kernel, _grid(NK, bn, B, H),
               (q, k, v, do, lse, delta, dk, dv, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
                *_strides(dk), H, NQ, NK, scale), common),
        Launch(_attn_bwd_dq_kernel, _grid(NQ, bm, B, H),
               (q, k, v, do, lse, delta, dq, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
                *_strides(dq), H, NQ, NK, scale), common),
    ]


def attention_fwd(q, k, v, scale, **config):
    """o (B, H, NQ, D) like q, contiguous; lse (B, H, NQ) float32."""
    B, H, NQ, D = q.shape
    o = _empty(B, H, NQ, D, device=q.device, dtype=q.dtype)
    lse = _empty(B, H, NQ, device=q.device, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse
    with _device(q):
        for launch in plan_fwd(q, k, v, scale, o, lse, **config):
            launch.run()
    return o, lse


def attention_jvp(q, k, v, q_dot, k_dot, v_dot, scale, **config):
    """One pass: o, o_dot (B, H, NQ, D) contiguous, lse (B, H, NQ) float32. A None tangent is
    zero and its products are skipped."""
    B, H, NQ, D = q.shape
    o = _empty(B, H, NQ, D, device=q.device, dtype=q.dtype)
    o_dot = _empty(B, H, NQ, D, device=q.device, dtype=q.dtype)
    lse = _empty(B, H, NQ, device=q.device, dtype=torch.float32)
    if o.numel() == 0:
        return o, o_dot, lse
    with _device(q):
        for launch in plan_jvp(q, k, v, q_dot, k_dot, v_dot, scale, o, o_dot, lse, **config):
            launch.run()
    return o, o_dot, lse


def attention_bwd(do, q, k, v, o, lse, scale, **config):
    """dq, dk, dv, contiguous, from the saved o and lse (no N x N storage)."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    dq = _empty(B, H, NQ, D, device=q.device, dtype=q.dtype)
    dk = _empty(B, H, NK, D, device=q.device, dtype=q.dtype)
    dv = _empty(B, H, NK, D, device=q.device, dtype=q.dtype)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = _empty(B, H, NQ, device=q.device, dtype=torch.float32)
    with _device(q):
        for launch in plan_bwd(do, q, k, v, o, lse, scale, dq, dk, dv, delta, **config):
            launch.run()
    return dq, dk, dv
