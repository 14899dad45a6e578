"""Triton kernels of non-causal attention: forward (o, lse) and a one-pass forward-mode JVP
(o, o_dot, lse). Tile loads, stores and the rotary rotation (ROPE): attention_tiles.py;
backward: attention_kernels_bwd.py; launch configuration: attention_triton.py.

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

from .attention_tiles import (_head, _load_rope, _load_rope_with, _load_rows, _mask_base, _query_program, _softmax_end,
                              _softmax_step, _store_rows)

@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, COS, SIN, M,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod, smb, smh, smm, smn,
    H, NQ, NK, qk_scale,
    ALIGN8: tl.constexpr, HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, MASK_N: tl.constexpr, D1_FULL: tl.constexpr,
    ROPE: tl.constexpr, MASK: tl.constexpr, GROUP: tl.constexpr,
):
    # ROPE: q and k tiles rotated after loading (COS, SIN: (N, HEAD_D) fp32 tables, NQ = NK = N).
    # MASK: the bias M (attention_tiles.py); GROUP: query heads per kv head (GQA; 1 without).
    bh, b, h, hk, offs_m, m_mask, offs_n, d0, d1 = _query_program(H, NQ, GROUP, BLOCK_M, BLOCK_N, D0, D1)
    q_base, sqn = _head(Q, b, h, sqb, sqh, sqn, ALIGN8)
    k_base, skn = _head(K, b, hk, skb, skh, skn, ALIGN8)
    v_base, svn = _head(V, b, hk, svb, svh, svn, ALIGN8)
    m_base = _mask_base(M, b, h, smb, smh, MASK)
    q0, rc, rs = _load_rope(q_base, offs_m, sqn, d0, sqd, m_mask, COS, SIN, HEAD_D, ROPE)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if HAS_D1:
        q1, rc, rs = _load_rope(q_base, offs_m, sqn, d1, sqd, m_mask, COS, SIN, HEAD_D, ROPE)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    scale2 = qk_scale * 1.4426950408889634  # exp2 domain
    for start_n in range(0, NK, BLOCK_N):
        n = start_n + offs_n
        n_mask = n < NK
        k0, tc, ts = _load_rope(k_base, n, skn, d0, skd, n_mask, COS, SIN, HEAD_D, ROPE, MASK_N, True, True)
        s = tl.dot(q0, k0, input_precision=DOT_PRECISION)
        if HAS_D1:
            k1, tc, ts = _load_rope(k_base, n, skn, d1, skd, n_mask, COS, SIN, HEAD_D, ROPE, MASK_N, D1_FULL, True)
            s += tl.dot(q1, k1, input_precision=DOT_PRECISION)
        m_new, alpha, p = _softmax_step(s, m_i, qk_scale, scale2, m_base, offs_m, n, smm, smn, m_mask, n_mask, MASK,
                                        MASK_N)
        l_i = l_i * alpha + tl.sum(p, 1)
        v0 = _load_rows(v_base, n, svn, d0, svd, n_mask, HEAD_D, MASK_N, True)
        acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None], input_precision=DOT_PRECISION)
        if HAS_D1:
            v1 = _load_rows(v_base, n, svn, d1, svd, n_mask, HEAD_D, MASK_N, D1_FULL)
            acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    lse, l_i = _softmax_end(m_i, l_i, MASK)
    o_base, son = _head(O, b, h, sob, soh, son, ALIGN8)
    _store_rows(o_base, (acc0 / l_i[:, None]).to(O.dtype.element_ty), offs_m, son, d0, sod, m_mask, HEAD_D)
    if HAS_D1:
        _store_rows(o_base, (acc1 / l_i[:, None]).to(O.dtype.element_ty), offs_m, son, d1, sod, m_mask, HEAD_D)
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
    Q, K, V, QD, KD, VD, O, OD, LSE, COS, SIN, M,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sqdb, sqdh, sqdn, sqdd, skdb, skdh, skdn, skdd, svdb, svdh, svdn, svdd,
    sob, soh, son, sod, smb, smh, smm, smn,
    H, NQ, NK, qk_scale,
    HAS_QD: tl.constexpr, HAS_KD: tl.constexpr, HAS_VD: tl.constexpr,
    ALIGN8: tl.constexpr, HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, MASK_N: tl.constexpr, D1_FULL: tl.constexpr, FP16_GUARD: tl.constexpr,
    ROPE: tl.constexpr, MASK: tl.constexpr, GROUP: tl.constexpr,
):
    # ROPE: q, k, q_dot, k_dot tiles rotated after loading (the rotation is linear with constant
    # tables, so the tangents rotate with the primals and the JVP below is unchanged). MASK,
    # GROUP: as the forward's (the bias has no tangent).
    bh, b, h, hk, offs_m, m_mask, offs_n, d0, d1 = _query_program(H, NQ, GROUP, BLOCK_M, BLOCK_N, D0, D1)
    q_base, sqn = _head(Q, b, h, sqb, sqh, sqn, ALIGN8)
    k_base, skn = _head(K, b, hk, skb, skh, skn, ALIGN8)
    v_base, svn = _head(V, b, hk, svb, svh, svn, ALIGN8)
    qd_base, sqdn = _head(QD, b, h, sqdb, sqdh, sqdn, ALIGN8)
    kd_base, skdn = _head(KD, b, hk, skdb, skdh, skdn, ALIGN8)
    vd_base, svdn = _head(VD, b, hk, svdb, svdh, svdn, ALIGN8)
    m_base = _mask_base(M, b, h, smb, smh, MASK)
    q0, rc, rs = _load_rope(q_base, offs_m, sqn, d0, sqd, m_mask, COS, SIN, HEAD_D, ROPE)
    if HAS_QD:
        qd0 = _load_rope_with(qd_base, offs_m, sqdn, d0, sqdd, m_mask, rc, rs, HEAD_D, ROPE)
    acc_o0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    acc_t0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if HAS_D1:
        q1, rc, rs = _load_rope(q_base, offs_m, sqn, d1, sqd, m_mask, COS, SIN, HEAD_D, ROPE)
        if HAS_QD:
            qd1 = _load_rope_with(qd_base, offs_m, sqdn, d1, sqdd, m_mask, rc, rs, HEAD_D, ROPE)
        acc_o1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
        acc_t1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    c_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running mu = sum(p S_dot) / sum(p): the centre
    scale2 = qk_scale * 1.4426950408889634
    for start_n in range(0, NK, BLOCK_N):
        n = start_n + offs_n
        n_mask = n < NK
        k0, tc, ts = _load_rope(k_base, n, skn, d0, skd, n_mask, COS, SIN, HEAD_D, ROPE, MASK_N, True, True)
        s = tl.dot(q0, k0, input_precision=DOT_PRECISION)
        sd = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if HAS_QD:
            sd += tl.dot(qd0, k0, input_precision=DOT_PRECISION)
        if HAS_KD:
            kd0 = _load_rope_with(kd_base, n, skdn, d0, skdd, n_mask, tc, ts, HEAD_D, ROPE, MASK_N, True, True)
            sd += tl.dot(q0, kd0, input_precision=DOT_PRECISION)
        if HAS_D1:
            k1, tc, ts = _load_rope(k_base, n, skn, d1, skd, n_mask, COS, SIN, HEAD_D, ROPE, MASK_N, D1_FULL, True)
            s += tl.dot(q1, k1, input_precision=DOT_PRECISION)
            if HAS_QD:
                sd += tl.dot(qd1, k1, input_precision=DOT_PRECISION)
            if HAS_KD:
                kd1 = _load_rope_with(kd_base, n, skdn, d1, skdd, n_mask, tc, ts, HEAD_D, ROPE, MASK_N, D1_FULL, True)
                sd += tl.dot(q1, kd1, input_precision=DOT_PRECISION)
        if MASK_N:
            sd = tl.where(n_mask[None, :], sd * qk_scale, 0.0)  # S_dot
        else:
            sd = sd * qk_scale
        m_new, alpha, p = _softmax_step(s, m_i, qk_scale, scale2, m_base, offs_m, n, smm, smn, m_mask, n_mask, MASK,
                                        MASK_N)
        l_new = l_i * alpha + tl.sum(p, 1)
        if MASK:  # no key yet (fully masked so far): c stays 0
            c_new = (alpha * l_i * c_i + tl.sum(p * sd, 1)) / tl.where(l_new == 0.0, 1.0, l_new)
        else:
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
    lse, l_i = _softmax_end(m_i, l_i, MASK)
    inv_l = 1.0 / l_i
    o_base, son = _head(O, b, h, sob, soh, son, ALIGN8)  # O and OD share strides (both allocated contiguous)
    od_base, _ = _head(OD, b, h, sob, soh, son, ALIGN8)
    _store_rows(o_base, (acc_o0 * inv_l[:, None]).to(O.dtype.element_ty), offs_m, son, d0, sod, m_mask, HEAD_D)
    _store_rows(od_base, (acc_t0 * inv_l[:, None]).to(OD.dtype.element_ty), offs_m, son, d0, sod, m_mask, HEAD_D)
    if HAS_D1:
        _store_rows(o_base, (acc_o1 * inv_l[:, None]).to(O.dtype.element_ty), offs_m, son, d1, sod, m_mask, HEAD_D)
        _store_rows(od_base, (acc_t1 * inv_l[:, None]).to(OD.dtype.element_ty), offs_m, son, d1, sod, m_mask,
                    HEAD_D)
    tl.store(LSE + bh.to(tl.int64) * NQ + offs_m, lse, mask=m_mask)

