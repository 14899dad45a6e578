"""Tile helpers of the Triton attention kernels (attention_kernels.py: forward and JVP,
attention_kernels_bwd.py: backward). Triton inlines them, so the machine code is that of the
formulas written out in place.

Tiles: (B, H, N, D) layout with any strides; a head dim is a power-of-two block of columns
(D0) plus a padded remainder (D1), see head_split in attention_triton.py. A tile is read as
[rows, cols] (_load_rows) or transposed, [cols, rows] (_load_cols, for K^T and V^T); TRANS
picks between them in the helpers that do both.

Rotary embedding (ROPE constexpr, off: no code): q, k, q_dot, k_dot tiles are rotated right
after loading (_load_rope, _load_rope_with), rope(x) = x * cos + rotate_half(x) * sin on
interleaved pairs, with the pair partners read again at columns cols ^ 1 (the same cache
lines) and the (N, D) fp32 tables tiled by row block. Both blocks D0, D1 start at even
columns, so a pair never straddles them. Gradients are rotated back by the transpose
(_unrope).
"""
import triton
import triton.language as tl


@triton.jit
def _program_ids(H):
    # (bh, the sequence block, b, h) of a program on the (B * H, blocks) grid.
    bh = tl.program_id(0)
    return bh, tl.program_id(1), bh // H, bh % H


@triton.jit
def _query_program(H, NQ, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr,
                   D1: tl.constexpr):
    # The set-up of a program that owns a block of queries (forward, JVP, dQ): bh, b, the query
    # head h and the kv head it reads (GQA: h // GROUP), its query rows and their mask, the
    # key offsets of a key block, the columns of the head-dim blocks D0 and D1.
    bh, pid_m, b, h = _program_ids(H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return (bh, b, h, h // GROUP, offs_m, offs_m < NQ, tl.arange(0, BLOCK_N), tl.arange(0, D0),
            D0 + tl.arange(0, D1))


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
def _head(X, b, h, sb, sh, sn, ALIGN8: tl.constexpr):
    # (the base pointer of head (b, h) of a (B, H, N, D) tensor X, its row stride under ALIGN8):
    # the set-up every kernel does per tensor.
    return X + _bh_offset(b, h, sb, sh, ALIGN8), _div8(sn, ALIGN8)


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
def _load_tile(base, rows, stride_row, cols, stride_col, row_mask, HEAD_D: tl.constexpr, MASK_ROWS: tl.constexpr,
               COLS_FULL: tl.constexpr, TRANS: tl.constexpr):
    # _load_rows' [rows, cols] tile or, with TRANS, _load_cols' [cols, rows] one.
    if TRANS:
        return _load_cols(base, rows, stride_row, cols, stride_col, row_mask, HEAD_D, MASK_ROWS, COLS_FULL)
    else:
        return _load_rows(base, rows, stride_row, cols, stride_col, row_mask, HEAD_D, MASK_ROWS, COLS_FULL)


@triton.jit
def _store_rows(base, value, rows, stride_row, cols, stride_col, row_mask, HEAD_D: tl.constexpr):
    mask = row_mask[:, None] & (cols[None, :] < HEAD_D)
    tl.store(base + rows[:, None] * stride_row + cols[None, :] * stride_col, value, mask=mask)


@triton.jit
def _rope_tables(COS, SIN, rows, cols, row_mask, HEAD_D: tl.constexpr, MASK_ROWS: tl.constexpr,
                 COLS_FULL: tl.constexpr, TRANS: tl.constexpr):
    # Tiles of the rotary tables (N, HEAD_D), fp32 and contiguous: cos, and sin with
    # rotate_half's sign folded in (-sin on even columns, +sin on odd ones), laid out like
    # _load_tile's.
    sign = tl.where((cols % 2) == 0, -1.0, 1.0)
    c = _load_tile(COS, rows, HEAD_D, cols, 1, row_mask, HEAD_D, MASK_ROWS, COLS_FULL, TRANS)
    s = _load_tile(SIN, rows, HEAD_D, cols, 1, row_mask, HEAD_D, MASK_ROWS, COLS_FULL, TRANS)
    if TRANS:
        s = s * sign[:, None]
    else:
        s = s * sign[None, :]
    return c, s


@triton.jit
def _rope(x, partner, c, s):
    # rope(x) = x * cos + rotate_half(x) * sin on interleaved pairs (x0, x1) -> (-x1, x0) of a
    # loaded tile, given the tile of pair partners (the same rows, columns cols ^ 1: read
    # again, an L1/L2 hit, instead of shuffling registers) and _rope_tables' tiles. fp32 math,
    # rounded to x's dtype for the tensor-core products.
    return (x.to(tl.float32) * c + partner.to(tl.float32) * s).to(x.dtype)


@triton.jit
def _rope_partner(x, base, rows, stride_row, cols, stride_col, row_mask, c, s, HEAD_D: tl.constexpr,
                  MASK_ROWS: tl.constexpr, COLS_FULL: tl.constexpr, TRANS: tl.constexpr):
    # _rope of the loaded tile x of base with its pair partners read from base.
    return _rope(x, _load_tile(base, rows, stride_row, cols ^ 1, stride_col, row_mask, HEAD_D, MASK_ROWS, COLS_FULL,
                               TRANS), c, s)


@triton.jit
def _load_rope(base, rows, stride_row, cols, stride_col, row_mask, COS, SIN, HEAD_D: tl.constexpr,
               ROPE: tl.constexpr, MASK_ROWS: tl.constexpr = True, COLS_FULL: tl.constexpr = False,
               TRANS: tl.constexpr = False):
    # A tile like _load_tile's (defaults: _load_rows'), rotated under ROPE. Returns (tile, c, s):
    # the table tiles that rotated it, for tangent tiles at the same rows and columns
    # (_load_rope_with), 0 without ROPE (unused, and no code).
    x = _load_tile(base, rows, stride_row, cols, stride_col, row_mask, HEAD_D, MASK_ROWS, COLS_FULL, TRANS)
    c = 0.0
    s = 0.0
    if ROPE:
        c, s = _rope_tables(COS, SIN, rows, cols, row_mask, HEAD_D, MASK_ROWS, COLS_FULL, TRANS)
        x = _rope_partner(x, base, rows, stride_row, cols, stride_col, row_mask, c, s, HEAD_D, MASK_ROWS, COLS_FULL,
                          TRANS)
    return x, c, s


@triton.jit
def _load_rope_with(base, rows, stride_row, cols, stride_col, row_mask, c, s, HEAD_D: tl.constexpr,
                    ROPE: tl.constexpr, MASK_ROWS: tl.constexpr = True, COLS_FULL: tl.constexpr = False,
                    TRANS: tl.constexpr = False):
    # _load_rope with the table tiles c, s it returned for the same rows and columns.
    x = _load_tile(base, rows, stride_row, cols, stride_col, row_mask, HEAD_D, MASK_ROWS, COLS_FULL, TRANS)
    if ROPE:
        x = _rope_partner(x, base, rows, stride_row, cols, stride_col, row_mask, c, s, HEAD_D, MASK_ROWS, COLS_FULL,
                          TRANS)
    return x


@triton.jit
def _unrope(g, COS, SIN, rows, cols, row_mask, HEAD_D: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    # The transpose of _rope for an fp32 gradient tile [ROWS, COLS] (an accumulator, with no
    # copy in memory to re-read) of rows `rows` and columns `cols`: dx = g * cos + swap(g * s),
    # swap exchanging the two columns of each pair, done in registers.
    c, s = _rope_tables(COS, SIN, rows, cols, row_mask, HEAD_D, True, False, False)
    a, b = tl.split(tl.reshape(g * s, [ROWS, COLS // 2, 2]))
    return g * c + tl.reshape(tl.join(b, a), [ROWS, COLS])


# ---------------------------------------------------------------- masks (attention_mask.py)
# MASK: 0 none (no code), 1 an additive fp32-convertible bias tile per (b, h) with strides
# (smm, smn) over (query, key), 2 a key-padding bias: one vector over the keys per batch
# (smm = 0), read once per key block. Out-of-range keys and queries read -inf.

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _mask_base(M, b, h, smb, smh, MASK: tl.constexpr):
    # The bias of batch b, query head h (a placeholder pointer without MASK).
    if MASK:
        return M + b.to(tl.int64) * smb + h.to(tl.int64) * smh
    else:
        return M


@triton.jit
def _load_bias(base, q_rows, k_cols, smm, smn, q_ok, k_ok, MASK: tl.constexpr, TRANS: tl.constexpr = False):
    # The bias of queries q_rows and keys k_cols in fp32: [queries, keys], or with TRANS
    # [keys, queries] (the dK/dV kernel's transposed scores). Key-padding: [1, keys] / [keys, 1].
    if MASK == 2:
        bias = tl.load(base + k_cols * smn, mask=k_ok, other=float("-inf")).to(tl.float32)
        if TRANS:
            return bias[:, None]
        else:
            return bias[None, :]
    else:
        # int64 offsets: a dense bias of NQ x NK elements passes 2^31 at N = 46341 (int32 would wrap)
        q_rows, k_cols = q_rows.to(tl.int64), k_cols.to(tl.int64)
        if TRANS:
            ptrs = base + q_rows[None, :] * smm + k_cols[:, None] * smn
            return tl.load(ptrs, mask=q_ok[None, :] & k_ok[:, None], other=float("-inf")).to(tl.float32)
        else:
            ptrs = base + q_rows[:, None] * smm + k_cols[None, :] * smn
            return tl.load(ptrs, mask=q_ok[:, None] & k_ok[None, :], other=float("-inf")).to(tl.float32)


@triton.jit
def _softmax_step(s, m_i, qk_scale, scale2, bias_base, offs_m, n, smm, smn, m_mask, n_mask, MASK: tl.constexpr,
                  MASK_N: tl.constexpr):
    # One key block of the online softmax from the raw products s = q k^T: (m_new, alpha, p)
    # with p = exp(s - m_new) unnormalised and alpha the rescale of the past.
    # Unmasked: in log2 units (one multiply per score), tails -inf. Masked: natural units
    # (s * scale + bias: scaling a bias of -3.4e38, finfo.min, by log2(e) would overflow to
    # -inf and turn a row padded that way into a fully masked one, where the reference is
    # uniform), and a row with no key so far (m = -inf) keeps p = alpha = 0, not NaN.
    if MASK:
        s = s * qk_scale + _load_bias(bias_base, offs_m, n, smm, smn, m_mask, n_mask, MASK)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2((m_i - m_use) * LOG2E)
        p = tl.math.exp2((s - m_use[:, None]) * LOG2E)
    else:
        if MASK_N:
            s = tl.where(n_mask[None, :], s * scale2, float("-inf"))
        else:
            s = s * scale2
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
    return m_new, alpha, p


@triton.jit
def _softmax_end(m_i, l_i, MASK: tl.constexpr):
    # (lse in natural units, the divisor of the accumulators). A fully masked row (l = 0):
    # lse +inf, so the backward's exp(s - lse) is 0 for it, and divisor 1 (zeros, not NaN).
    if MASK:
        empty = l_i == 0.0
        return tl.where(empty, float("inf"), m_i + tl.log(l_i)), tl.where(empty, 1.0, l_i)
    else:
        return (m_i + tl.math.log2(l_i)) * 0.6931471805599453, l_i
