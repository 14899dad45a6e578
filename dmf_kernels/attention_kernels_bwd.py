"""Triton kernels of the attention backward: delta = rowsum(O * dO), then dK/dV (one key
block per program) and dQ (one query block per program), from the saved O and lse (no
N x N storage). Tile helpers in attention_tiles.py; launchers in attention_triton.py.

ROPE (rotary embedding, NQ = NK): q and k tiles are rotated after loading like in the
forward, so the products give the gradients of the rotated q and k; dQ and dK are rotated
back (the transpose of the rotation, _unrope) before they are stored.

MASK (attention_tiles.py): the bias is added to the recomputed scores; a fully masked row has
lse = +inf (the forward's), so its probabilities, and with them its gradients, are 0.
GROUP (GQA): a dK/dV program owns a key block of one kv head and loops over the GROUP query
heads that read it, so the group's sum is accumulated in registers (no atomics, no copy);
the dQ kernel reads kv head h // GROUP."""
import triton
import triton.language as tl

from .attention_tiles import (_head, _load_bias, _load_cols, _load_rope, _load_rows, _mask_base, _program_ids,
                              _query_program, _store_rows, _unrope)


@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA, sob, soh, son, sod, sdob, sdoh, sdon, sdod, H, NQ,
                                ALIGN8: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                                BLOCK_M: tl.constexpr):
    # delta = rowsum(O * dO), the softmax-backward correction.
    bh, pid_m, b, h = _program_ids(H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < NQ
    o_base, son = _head(O, b, h, sob, soh, son, ALIGN8)
    do_base, sdon = _head(DO, b, h, sdob, sdoh, sdon, ALIGN8)
    o = _load_rows(o_base, offs_m, son, d, sod, m_mask, HEAD_D).to(tl.float32)
    do = _load_rows(do_base, offs_m, sdon, d, sdod, m_mask, HEAD_D).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * NQ + offs_m, tl.sum(o * do, 1), mask=m_mask)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, COS, SIN, M,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
    sdkb, sdkh, sdkn, sdkd, smb, smh, smm, smn,
    H, NQ, NK, qk_scale,
    ALIGN8: tl.constexpr, HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, MASK_M: tl.constexpr, D1_FULL: tl.constexpr,
    ROPE: tl.constexpr, MASK: tl.constexpr, GROUP: tl.constexpr,
):
    # One key block of one kv head per program; loops over the query heads of its group and
    # all their query blocks. Works on transposed scores sT = K Q^T so dk and dv accumulate
    # as [BLOCK_N, D] without transposes.
    bhk, pid_n, b, hk = _program_ids(H // GROUP)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    d0 = tl.arange(0, D0)
    d1 = D0 + tl.arange(0, D1)
    n_mask = offs_n < NK
    k_base, skn = _head(K, b, hk, skb, skh, skn, ALIGN8)
    v_base, svn = _head(V, b, hk, svb, svh, svn, ALIGN8)
    k0, rc, rs = _load_rope(k_base, offs_n, skn, d0, skd, n_mask, COS, SIN, HEAD_D, ROPE)
    v0 = _load_rows(v_base, offs_n, svn, d0, svd, n_mask, HEAD_D)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    if HAS_D1:
        k1, rc, rs = _load_rope(k_base, offs_n, skn, d1, skd, n_mask, COS, SIN, HEAD_D, ROPE)
        v1 = _load_rows(v_base, offs_n, svn, d1, svd, n_mask, HEAD_D)
        dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    for j in range(GROUP):  # the query heads reading kv head hk (one iteration without GQA)
        h = hk * GROUP + j
        q_base, sqn8 = _head(Q, b, h, sqb, sqh, sqn, ALIGN8)
        do_base, sdon8 = _head(DO, b, h, sdob, sdoh, sdon, ALIGN8)
        m_base = _mask_base(M, b, h, smb, smh, MASK)
        bh = b * H + h
        for start_m in range(0, NQ, BLOCK_M):
            m = start_m + offs_m
            m_mask = m < NQ
            qT0, tc, ts = _load_rope(q_base, m, sqn8, d0, sqd, m_mask, COS, SIN, HEAD_D, ROPE, MASK_M, True, True)
            doT0 = _load_cols(do_base, m, sdon8, d0, sdod, m_mask, HEAD_D, MASK_M, True)
            sT = tl.dot(k0, qT0, input_precision=DOT_PRECISION)
            dpT = tl.dot(v0, doT0, input_precision=DOT_PRECISION)
            if HAS_D1:
                qT1, tc, ts = _load_rope(q_base, m, sqn8, d1, sqd, m_mask, COS, SIN, HEAD_D, ROPE, MASK_M, D1_FULL, True)
                doT1 = _load_cols(do_base, m, sdon8, d1, sdod, m_mask, HEAD_D, MASK_M, D1_FULL)
                sT += tl.dot(k1, qT1, input_precision=DOT_PRECISION)
                dpT += tl.dot(v1, doT1, input_precision=DOT_PRECISION)
            lse = tl.load(LSE + bh.to(tl.int64) * NQ + m, mask=m_mask, other=0.0)
            delta = tl.load(DELTA + bh.to(tl.int64) * NQ + m, mask=m_mask, other=0.0)
            sT = sT * qk_scale
            if MASK:
                sT += _load_bias(m_base, m, offs_n, smm, smn, m_mask, n_mask, MASK, True)
            if MASK_M:
                pT = tl.where(m_mask[None, :], tl.exp(sT - lse[None, :]), 0.0)
            else:
                pT = tl.exp(sT - lse[None, :])
            dsT = pT * (dpT - delta[None, :])
            dv0 = tl.dot(pT.to(v0.dtype), tl.trans(doT0), dv0, input_precision=DOT_PRECISION)
            dk0 = tl.dot(dsT.to(k0.dtype), tl.trans(qT0), dk0, input_precision=DOT_PRECISION)
            if HAS_D1:
                dv1 = tl.dot(pT.to(v1.dtype), tl.trans(doT1), dv1, input_precision=DOT_PRECISION)
                dk1 = tl.dot(dsT.to(k1.dtype), tl.trans(qT1), dk1, input_precision=DOT_PRECISION)
    if ROPE:
        dk0 = _unrope(dk0, COS, SIN, offs_n, d0, n_mask, HEAD_D, BLOCK_N, D0)
        if HAS_D1:
            dk1 = _unrope(dk1, COS, SIN, offs_n, d1, n_mask, HEAD_D, BLOCK_N, D1)
    dk_base, sdkn = _head(DK, b, hk, sdkb, sdkh, sdkn, ALIGN8)  # DK and DV share strides (both allocated contiguous)
    dv_base, sdkn = _head(DV, b, hk, sdkb, sdkh, sdkn, ALIGN8)
    _store_rows(dk_base, (dk0 * qk_scale).to(DK.dtype.element_ty), offs_n, sdkn, d0, sdkd, n_mask, HEAD_D)
    _store_rows(dv_base, dv0.to(DV.dtype.element_ty), offs_n, sdkn, d0, sdkd, n_mask, HEAD_D)
    if HAS_D1:
        _store_rows(dk_base, (dk1 * qk_scale).to(DK.dtype.element_ty), offs_n, sdkn, d1, sdkd, n_mask, HEAD_D)
        _store_rows(dv_base, dv1.to(DV.dtype.element_ty), offs_n, sdkn, d1, sdkd, n_mask, HEAD_D)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, COS, SIN, M,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
    sdqb, sdqh, sdqn, sdqd, smb, smh, smm, smn,
    H, NQ, NK, qk_scale,
    ALIGN8: tl.constexpr, HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, MASK_N: tl.constexpr, D1_FULL: tl.constexpr,
    ROPE: tl.constexpr, MASK: tl.constexpr, GROUP: tl.constexpr,
):
    bh, b, h, hk, offs_m, m_mask, offs_n, d0, d1 = _query_program(H, NQ, GROUP, BLOCK_M, BLOCK_N, D0, D1)
    k_base, skn = _head(K, b, hk, skb, skh, skn, ALIGN8)
    v_base, svn = _head(V, b, hk, svb, svh, svn, ALIGN8)
    q_base, sqn = _head(Q, b, h, sqb, sqh, sqn, ALIGN8)
    do_base, sdon = _head(DO, b, h, sdob, sdoh, sdon, ALIGN8)
    m_base = _mask_base(M, b, h, smb, smh, MASK)
    q0, rc, rs = _load_rope(q_base, offs_m, sqn, d0, sqd, m_mask, COS, SIN, HEAD_D, ROPE)
    do0 = _load_rows(do_base, offs_m, sdon, d0, sdod, m_mask, HEAD_D)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if HAS_D1:
        q1, rc, rs = _load_rope(q_base, offs_m, sqn, d1, sqd, m_mask, COS, SIN, HEAD_D, ROPE)
        do1 = _load_rows(do_base, offs_m, sdon, d1, sdod, m_mask, HEAD_D)
        dq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    lse = tl.load(LSE + bh.to(tl.int64) * NQ + offs_m, mask=m_mask, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * NQ + offs_m, mask=m_mask, other=0.0)
    for start_n in range(0, NK, BLOCK_N):
        n = start_n + offs_n
        n_mask = n < NK
        kT0, tc, ts = _load_rope(k_base, n, skn, d0, skd, n_mask, COS, SIN, HEAD_D, ROPE, MASK_N, True, True)
        s = tl.dot(q0, kT0, input_precision=DOT_PRECISION)
        dp = tl.dot(do0, _load_cols(v_base, n, svn, d0, svd, n_mask, HEAD_D, MASK_N, True),
                    input_precision=DOT_PRECISION)
        if HAS_D1:
            kT1, tc, ts = _load_rope(k_base, n, skn, d1, skd, n_mask, COS, SIN, HEAD_D, ROPE, MASK_N, D1_FULL, True)
            s += tl.dot(q1, kT1, input_precision=DOT_PRECISION)
            dp += tl.dot(do1, _load_cols(v_base, n, svn, d1, svd, n_mask, HEAD_D, MASK_N, D1_FULL),
                         input_precision=DOT_PRECISION)
        s = s * qk_scale
        if MASK:
            s += _load_bias(m_base, offs_m, n, smm, smn, m_mask, n_mask, MASK)
        if MASK_N:
            p = tl.where(n_mask[None, :], tl.exp(s - lse[:, None]), 0.0)
        else:
            p = tl.exp(s - lse[:, None])
        ds = (p * (dp - delta[:, None])).to(q0.dtype)
        dq0 = tl.dot(ds, tl.trans(kT0), dq0, input_precision=DOT_PRECISION)
        if HAS_D1:
            dq1 = tl.dot(ds, tl.trans(kT1), dq1, input_precision=DOT_PRECISION)
    if ROPE:
        dq0 = _unrope(dq0, COS, SIN, offs_m, d0, m_mask, HEAD_D, BLOCK_M, D0)
        if HAS_D1:
            dq1 = _unrope(dq1, COS, SIN, offs_m, d1, m_mask, HEAD_D, BLOCK_M, D1)
    dq_base, sdqn = _head(DQ, b, h, sdqb, sdqh, sdqn, ALIGN8)
    _store_rows(dq_base, (dq0 * qk_scale).to(DQ.dtype.element_ty), offs_m, sdqn, d0, sdqd, m_mask, HEAD_D)
    if HAS_D1:
        _store_rows(dq_base, (dq1 * qk_scale).to(DQ.dtype.element_ty), offs_m, sdqn, d1, sdqd, m_mask, HEAD_D)

