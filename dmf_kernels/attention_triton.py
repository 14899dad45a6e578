"""Launchers of the Triton attention kernels (attention_kernels.py: forward and JVP,
attention_kernels_bwd.py: backward): tile / warp tables per kernel, head dim and
architecture, argument specialisation (ALIGN8, masks, dot precision), grids, and the
test-only output poisoning.

Layout (B, H, N, D) like F.scaled_dot_product_attention, any strides (a permuted view of a
fused qkv projection is read in place). q and kv lengths may differ; any N >= 1 (tails
are masked). Head dims 16..128 are split into a power-of-two part and a remainder padded
to at least 16 (72 = 64 + 16 with 8 masked, 80 = 64 + 16, 96 = 64 + 32): a head dim of 72
costs 80 columns of work instead of the 128 a power-of-two pad would.
"""
import contextlib

import torch
import triton

from .attention_kernels import _attn_fwd_kernel, _attn_jvp_kernel
from .attention_kernels_bwd import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_preprocess_kernel


def head_split(head_dim):
    """(D0, D1): D0 the largest power of two <= head_dim, D1 the remainder padded to a
    power of two >= 16 (tl.dot needs K >= 16), or 0."""
    d0 = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - d0
    d1 = 0 if rest == 0 else max(16, triton.next_power_of_2(rest))
    return d0, d1


# ---------------------------------------------------------------- launchers


# Rotary embedding: each rotated tile costs its pair-partner tile and two fp32 table tiles in
# registers (242-255 registers where the plain kernels use 150-240). Where the plain tiles
# then spill (inspect_kernels.py's "+rope" rows, triton 3.6), more warps or smaller tiles:
# (kind, head_dim, sm80) -> (BLOCK_M, BLOCK_N, num_warps).
_ROPE_TILES = {
    ("jvp", 96, False): (64, 32, 8),  # 4 warps spill 24 bytes
    ("bwd_dkdv", 72, False): (64, 64, 8), ("bwd_dkdv", 80, False): (64, 64, 8),  # 4 warps: 264-276 bytes
    ("fwd", 128, True): (64, 64, 8),  # 4 warps: 12 bytes
    ("jvp", 128, True): (32, 32, 8),  # 64x32 w8: 668 bytes
    ("bwd_dkdv", 72, True): (16, 32, 4), ("bwd_dkdv", 80, True): (16, 32, 4),  # 16x64: 24-36 bytes
    ("bwd_dkdv", 96, True): (16, 32, 4),  # 16x64: 324 bytes
    ("bwd_dq", 96, True): (64, 32, 8),  # 64x32 w4: 96 bytes
    ("bwd_dq", 128, True): (32, 64, 8),  # 64x64 w8: 232 bytes
}


def _default_blocks(kind, head_dim, interpret, capability=(9, 0), rope=False):
    """(BLOCK_M, BLOCK_N, num_warps) per kernel, head dim and architecture: the largest tiles
    that compile without spills for 16-bit inputs (benchmarks/results/inspect_sm_*.md,
    triton 3.6; `make inspect` fails CI if one starts to spill)."""
    if interpret:  # the CPU interpreter's cost grows with tile size: small tiles, few programs
        return 16, 16, 4
    sm80 = capability[0] < 9  # mma.sync instead of wgmma: accumulators stay in registers
    if rope and (kind, head_dim, sm80) in _ROPE_TILES:
        return _ROPE_TILES[(kind, head_dim, sm80)]
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


def _blocks(kind, q, rope, block_m, block_n, num_warps):
    """(BLOCK_M, BLOCK_N, num_warps): the ones given, the rest _default_blocks' for q's head
    dim and device."""
    default = _default_blocks(kind, q.shape[-1], _interpreting(), _capability(q), rope is not None)
    return tuple(x or d for x, d in zip((block_m, block_n, num_warps), default))


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


def _rope_args(rope, q):
    """(COS, SIN, ROPE) kernel arguments: rope = (cos, sin), tables (N, D) of any float dtype,
    as fp32 contiguous copies on q's device; None gives placeholders that are never read."""
    if rope is None:
        return q, q, False
    return (*(t.to(device=q.device, dtype=torch.float32).contiguous() for t in rope), True)


def _mask_args(mask, q, NK):
    """((M, smb, smh, smm, smn), MASK) kernel arguments: mask an additive bias with 4 dims
    broadcastable to (B, H, NQ, NK) (attention_mask.bias), read through stride-0 broadcasts;
    MASK 2 for a key-padding bias (B, 1, 1, NK), 1 otherwise, 0 (placeholders) without."""
    from .attention_mask import keys_only

    if mask is None:
        return (q, 0, 0, 0, 0), 0
    B, H, NQ = q.shape[:3]
    full = mask.expand(B, H, NQ, NK)
    return (full, *full.stride()), 2 if keys_only(mask) else 1


def attention_fwd(q, k, v, scale, block_m=None, block_n=None, num_warps=None, num_stages=2, rope=None, mask=None):
    """o (B, H, NQ, D) like q, contiguous; lse (B, H, NQ) float32. rope = (cos, sin): q and k
    rotated (rotary embedding, tables (N, D), NQ = NK = N) before the scores. mask: an
    additive bias (_mask_args). k and v may have fewer heads than q (GQA: H a multiple)."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    d0, d1 = head_split(D)
    bm, bn, num_warps = _blocks("fwd", q, rope, block_m, block_n, num_warps)
    o = _empty(B, H, NQ, D, device=q.device, dtype=q.dtype)
    lse = _empty(B, H, NQ, device=q.device, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse
    grid = _grid(triton.cdiv(NQ, bm), B * H)
    *rope_ptrs, has_rope = _rope_args(rope, q)
    (m, *m_strides), has_mask = _mask_args(mask, q, NK)
    with _device(q):
        _attn_fwd_kernel[grid](
            q, k, v, o, lse, *rope_ptrs, m, *_strides(q), *_strides(k), *_strides(v), *_strides(o), *m_strides,
            H, NQ, NK, scale, ALIGN8=_align8(q, k, v, o), HEAD_D=D, D0=d0, D1=max(d1, 16), HAS_D1=d1 > 0,
            BLOCK_M=bm, BLOCK_N=bn, MASK_N=NK % bn != 0, D1_FULL=_d1_full(D),
            DOT_PRECISION=_precision(q.dtype), ROPE=has_rope, MASK=has_mask, GROUP=H // k.shape[1],
            num_warps=num_warps, num_stages=num_stages,
        )
    return o, lse


def attention_jvp(q, k, v, q_dot, k_dot, v_dot, scale, block_m=None, block_n=None, num_warps=None, num_stages=2,
                  rope=None, mask=None):
    """One pass: o, o_dot (B, H, NQ, D) contiguous, lse (B, H, NQ) float32. A None tangent is
    zero and its products are skipped. rope = (cos, sin): q, k, q_dot, k_dot rotated; mask
    and GQA as attention_fwd's."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    d0, d1 = head_split(D)
    bm, bn, num_warps = _blocks("jvp", q, rope, block_m, block_n, num_warps)
    o = _empty(B, H, NQ, D, device=q.device, dtype=q.dtype)
    o_dot = _empty(B, H, NQ, D, device=q.device, dtype=q.dtype)
    lse = _empty(B, H, NQ, device=q.device, dtype=torch.float32)
    if o.numel() == 0:
        return o, o_dot, lse
    qd, kd, vd = (t if t is not None else q for t in (q_dot, k_dot, v_dot))  # placeholders, never read
    grid = _grid(triton.cdiv(NQ, bm), B * H)
    *rope_ptrs, has_rope = _rope_args(rope, q)
    (m, *m_strides), has_mask = _mask_args(mask, q, NK)
    with _device(q):
        _attn_jvp_kernel[grid](
            q, k, v, qd, kd, vd, o, o_dot, lse, *rope_ptrs, m,
            *_strides(q), *_strides(k), *_strides(v), *_strides(qd), *_strides(kd), *_strides(vd), *_strides(o),
            *m_strides, H, NQ, NK, scale,
            HAS_QD=q_dot is not None, HAS_KD=k_dot is not None, HAS_VD=v_dot is not None,
            ALIGN8=_align8(q, k, v, qd, kd, vd, o), HEAD_D=D, D0=d0, D1=max(d1, 16), HAS_D1=d1 > 0, BLOCK_M=bm,
            BLOCK_N=bn, MASK_N=NK % bn != 0, D1_FULL=_d1_full(D), DOT_PRECISION=_precision(q.dtype),
            FP16_GUARD=q.dtype == torch.float16, ROPE=has_rope, MASK=has_mask, GROUP=H // k.shape[1],
            num_warps=num_warps, num_stages=num_stages,
        )
    return o, o_dot, lse


def attention_bwd(do, q, k, v, o, lse, scale, block_m=None, block_n=None, num_warps=None, num_stages=2,
                  dq_blocks=None, rope=None, mask=None):
    """dq, dk, dv, contiguous, from the saved o and lse (no N x N storage). The dK/dV and dQ
    kernels have their own default tiles (_default_blocks "bwd_dkdv", "bwd_dq"); block_m,
    block_n, num_warps given here override both, dq_blocks = (BLOCK_M, BLOCK_N, num_warps)
    the dQ kernel's alone (benchmarks/tune_attention.py tunes the two separately). rope =
    (cos, sin): the forward's rotation; dq and dk are with respect to the unrotated q and k.
    mask: the forward's. GQA: dk, dv (B, Hkv, NK, D) sum over the group of query heads."""
    B, H, NQ, D = q.shape
    HKV, NK = k.shape[1], k.shape[2]
    d0, d1 = head_split(D)
    kv_cfg, q_cfg = (_blocks(kind, q, rope, block_m, block_n, num_warps) for kind in ("bwd_dkdv", "bwd_dq"))
    if dq_blocks is not None:
        q_cfg = tuple(dq_blocks)
    dq = _empty(B, H, NQ, D, device=q.device, dtype=q.dtype)
    dk = _empty(B, HKV, NK, D, device=q.device, dtype=q.dtype)
    dv = _empty(B, HKV, NK, D, device=q.device, dtype=q.dtype)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = _empty(B, H, NQ, device=q.device, dtype=torch.float32)
    bd = triton.next_power_of_2(D)
    align8 = _align8(q, k, v, o, do, dq)
    with _device(q):
        _attn_bwd_preprocess_kernel[_grid(triton.cdiv(NQ, q_cfg[0]), B * H)](
            o, do, delta, *_strides(o), *_strides(do), H, NQ, ALIGN8=align8, HEAD_D=D, BLOCK_D=bd, BLOCK_M=q_cfg[0])
    *rope_ptrs, has_rope = _rope_args(rope, q)
    (m, *m_strides), has_mask = _mask_args(mask, q, NK)
    common = dict(ALIGN8=align8, HEAD_D=D, D0=d0, D1=max(d1, 16), HAS_D1=d1 > 0, DOT_PRECISION=_precision(q.dtype),
                  D1_FULL=_d1_full(D), ROPE=has_rope, MASK=has_mask, GROUP=H // HKV, num_stages=num_stages)
    with _device(q):
        bm, bn, nw = kv_cfg
        _attn_bwd_dkdv_kernel[_grid(triton.cdiv(NK, bn), B * HKV)](
            q, k, v, do, lse, delta, dk, dv, *rope_ptrs, m,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *m_strides,
            H, NQ, NK, scale, BLOCK_M=bm, BLOCK_N=bn, MASK_M=NQ % bm != 0, num_warps=nw, **common)
        bm, bn, nw = q_cfg
        _attn_bwd_dq_kernel[_grid(triton.cdiv(NQ, bm), B * H)](
            q, k, v, do, lse, delta, dq, *rope_ptrs, m,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq), *m_strides,
            H, NQ, NK, scale, BLOCK_M=bm, BLOCK_N=bn, MASK_N=NK % bn != 0, num_warps=nw, **common)
    return dq, dk, dv

