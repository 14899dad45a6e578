"""Attention on the CPU (and for float64 on any device), memory O(N * block) instead of the
O(N^2) of the math path.

- Forward and backward of the primal: aten's CPU flash-attention kernels, which return and
  accept the same natural-log logsumexp as ours (measured at B=8, H=6, N=256, D=64, fp32 on
  2 cores: 4.7/11.3 ms fwd/bwd against 9.4/24.5 ms for our blockwise matmuls). Their fp16
  forward and their fp16/bf16 backward are slow, so those run in fp32 on upcast copies
  (2 cores, torch 2.13, bf16 backward at B=128, H=3, N=16, D=64 (the digits model under
  autocast): 12.2 -> 4.1 ms; fp16 backward at B=8, H=6, N=256: 91 -> 14 ms; fp16 forward
  10.3 -> 6.3 ms), which also halves the gradients' error against float64.
- The one-pass JVP (no aten counterpart): one block of queries at a time in plain PyTorch,
  with the same formulas as the Triton kernel (each block sees all keys, so its softmax is
  exact; no online rescaling is needed). Its lse feeds the flash backward.
The blockwise forward/backward stay as the float64 path on CUDA tensors (aten's flash
kernel is CPU-only) and as the reference the tests compare the flash path with. Computation
is in fp32 for fp16/bf16 inputs (fp64 for fp64).
- Rotary embedding (rope = rope_tables(...)): q and k (and q_dot, k_dot) are rotated once at
  the top, in the compute dtype, and the paths above run on the rotated tensors; the JVP
  folds the scale into the query blocks' tables. The backward recomputes the rotation and
  rotates dq, dk back at the end (the transpose, rope_back). Plain tensor code inside the
  custom ops: no autograd nodes.
- Masks (attention_mask.bias: an additive bias, 4-D, in the compute dtype) go to aten's
  kernels as attn_mask and are added to the blockwise scores; a fully masked row (lse of
  -inf) is zero with lse +inf there. Grouped-query attention folds the query heads of a
  group into the query axis (attention_mask.fold): the same attention with g * NQ queries,
  whose dk and dv are the group's sums."""
import torch

from .attention_mask import fold, fold_bias, unfold

# Rows per query block: bounds the [B, H, block, NK] score tiles (about 3 live at once).
DEFAULT_BLOCK = 128


def _acc(t):
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocks(nq, block):
    block = block or DEFAULT_BLOCK
    return [(i, min(i + block, nq)) for i in range(0, nq, block)]


def _flash_ok(q, k, mask=None):
    """aten's CPU flash kernels: CPU tensors only; an empty query or batch is handled here,
    and so are non-finite scores: aten's forward turns a query row with a NaN into zeros
    (and lse 0), where softmax(q k^T) v gives NaN, so q or k with a NaN or inf, or a mask
    with a NaN or +inf, take the blockwise path (one pass over q and k, against the N^2 of
    the attention)."""
    if q.device.type != "cpu" or q.numel() == 0:
        return False
    finite = torch.isfinite(q).all() & torch.isfinite(k).all()
    if mask is not None:
        finite &= (mask < float("inf")).all()  # -inf masks a key; NaN and +inf are not finite scores
    return bool(finite)


def _dead_rows_inf(lse, mask):
    """aten's flash forward gives a fully masked row lse = 0; every other path (blockwise,
    Triton) and the raw op's contract give +inf, which keeps exp(s - lse) = 0 in any backward."""
    if mask is None:
        return lse
    dead = (mask == float("-inf")).all(-1)  # (B or 1, H or 1, NQ or 1): the bias's own shape, no expansion
    return lse.masked_fill(dead, float("inf")) if bool(dead.any()) else lse


def _upcast(*ts):
    return [t.float() for t in ts]


def rope_tables(cos, sin, dtype, device):
    """The rotation as complex tables (a, b) in the compute dtype: with z = x0 + i x1 per pair,
    rope(x) = x * cos + rotate_half(x) * sin is z -> a z + b conj(z) with
    a = ((c0 + c1) + i (s0 + s1)) / 2, b = ((c0 - c1) + i (s1 - s0)) / 2 (c, s the table
    entries of the pair). b is None when it
    is zero, as for LightningDiT's tables (one angle per pair): then one complex product, a
    third of the elementwise passes of the real formula (1.2 against 3.5 ms per
    (8, 12, 256, 64) fp32 tensor, one thread)."""
    c, s = (t.to(device=device, dtype=dtype).unflatten(-1, (-1, 2)) for t in (cos, sin))
    (c0, c1), (s0, s1) = c.unbind(-1), s.unbind(-1)
    a = torch.complex((c0 + c1) / 2, (s0 + s1) / 2)
    b = torch.complex((c0 - c1) / 2, (s1 - s0) / 2)
    return a, (b if bool(b.any()) else None)


def _pairs(x):
    """x (..., D) as complex pairs (..., D / 2), a view when the strides allow it."""
    x = x.unflatten(-1, (-1, 2))
    try:
        return torch.view_as_complex(x)
    except RuntimeError:  # odd strides or storage offset
        return torch.view_as_complex(x.contiguous())


def rope_apply(x, tables, out=None):
    """rope(x) in x's dtype (fp32 / fp64), tables broadcast over x's leading dims; written
    into `out` (a real (..., D) tensor or strided slice of one) when given."""
    a, b = tables
    z = _pairs(x)
    r = torch.mul(z, a, out=None if out is None else _pairs(out))
    if b is not None:  # conj_physical: a lazy conj() view lost its conjugation inside compiled graphs
        r.addcmul_(z.conj_physical(), b)
    return torch.view_as_real(r).flatten(-2) if out is None else out


def rope_back(g, tables):
    """The transpose of rope_apply (dx = g * cos - rotate_half(g * sin) generalised): with u
    the pairs of g, conj(a) u + b conj(u) (z -> b conj(z) is its own adjoint)."""
    a, b = tables
    u = _pairs(g)
    r = u * a.conj_physical()
    if b is not None:
        r.addcmul_(u.conj_physical(), b)
    return torch.view_as_real(r).flatten(-2)


def _rows(mask, i, j):
    # The bias of query rows i:j (all of a bias that does not vary with the query).
    return mask if mask.shape[2] == 1 else mask[:, :, i:j]


def _grouped(q, k, mask):
    """(H, Hkv, the bias for the folded queries) of grouped-query attention; None when q and
    k have the same heads."""
    B, H, NQ = q.shape[:3]
    hkv = k.shape[1]
    if H == hkv:
        return None
    return H, hkv, None if mask is None else fold_bias(mask, B, H, hkv, NQ)


def attention_fwd(q, k, v, scale, block=None, rope=None, mask=None):
    """o (B, H, NQ, D) contiguous, lse (B, H, NQ) in fp32 (fp64 for fp64)."""
    if rope is not None:
        o, lse = attention_fwd(rope_apply(_acc(q), rope), rope_apply(_acc(k), rope), _acc(v), scale, block, mask=mask)
        return o.to(q.dtype), lse
    group = _grouped(q, k, mask)
    if group is not None:
        H, hkv, folded = group
        o, lse = attention_fwd(fold(q, hkv), k, v, scale, block, mask=folded)
        return unfold(o, H), unfold(lse, H)
    if block is None and _flash_ok(q, k, mask):
        if q.dtype == torch.float16 or (mask is not None and q.dtype == torch.bfloat16):
            # aten's fp16 kernel is slower than fp32 (module docstring); its masks are q's dtype
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*_upcast(q, k, v), scale=scale,
                                                                                attn_mask=mask)
            return o.to(q.dtype).contiguous(), _dead_rows_inf(lse, mask).contiguous()
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale, attn_mask=mask)
        return o.contiguous(), _dead_rows_inf(lse.to(_stat_dtype(q.dtype)), mask).contiguous()
    return attention_fwd_blockwise(q, k, v, scale, block, mask)


def attention_fwd_blockwise(q, k, v, scale, block=None, mask=None):
    B, H, NQ, D = q.shape
    o = torch.empty(B, H, NQ, v.shape[-1], device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, NQ, device=q.device, dtype=_stat_dtype(q.dtype))
    kt, va = _acc(k).transpose(-1, -2), _acc(v)
    for i, j in _blocks(NQ, block):
        s = (_acc(q[:, :, i:j]) @ kt) * scale
        if mask is not None:
            s = s + _rows(mask, i, j)
        lse_b = torch.logsumexp(s, -1)
        if mask is not None:  # a fully masked row: p = exp(-inf - inf) = 0, not NaN
            lse_b = lse_b.masked_fill(lse_b == float("-inf"), float("inf"))
        o[:, :, i:j] = torch.exp(s - lse_b[..., None]) @ va
        lse[:, :, i:j] = lse_b
    return o, lse


def attention_jvp(q, k, v, q_dot, k_dot, v_dot, scale, block=None, rope=None, mask=None):
    """o, o_dot, lse with S_dot = c (Q_dot K^T + Q K_dot^T), P = softmax(S),
    O_dot = P V_dot + (P * S_dot) V - rowsum(P * S_dot) O. None tangents are zero.

    Per query block: the scale is folded into the (small) q blocks; S_dot is ONE matmul of
    [c Q_dot | c Q] against [K | K_dot]; softmax, P * S_dot and the sums run in place on the
    two block-sized score tiles; P V_dot accumulates into the output GEMM (baddbmm). At
    B=8, H=6, N=256, D=64 fp32 on 2 cores this took the JVP from 32.8 to 19.1 ms."""
    group = _grouped(q, k, mask)
    if group is not None:
        H, hkv, folded = group
        dtype = q.dtype
        if rope is not None:  # the tables index query positions, which the fold interleaves: rotate first
            q, k, q_dot, k_dot = (None if t is None else rope_apply(_acc(t), rope) for t in (q, k, q_dot, k_dot))
            v, v_dot = _acc(v), None if v_dot is None else _acc(v_dot)
        o, o_dot, lse = attention_jvp(fold(q, hkv), k, v, None if q_dot is None else fold(q_dot, hkv), k_dot, v_dot,
                                      scale, block, mask=folded)
        return unfold(o, H).to(dtype), unfold(o_dot, H).to(dtype), unfold(lse, H)
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    o = torch.empty(B, H, NQ, v.shape[-1], device=q.device, dtype=q.dtype)
    o_dot = torch.empty_like(o)
    lse = torch.empty(B, H, NQ, device=q.device, dtype=_stat_dtype(q.dtype))
    BH = B * H
    cdt = _stat_dtype(q.dtype)
    both = q_dot is not None and k_dot is not None
    if rope is not None:  # the scale goes into the query blocks' tables
        qtab = tuple(None if t is None else t * scale for t in rope)

    def keys(t, out=None):  # (rotated) K or K_dot, (BH, NK, D), into out when given
        t = _acc(t).reshape(BH, NK, D)
        if rope is not None:
            return rope_apply(t, rope, out)
        return t if out is None else out.copy_(t)

    def query_rows(t, i, j, out=None):  # scale * (rotated) rows i:j of q or q_dot, (BH, j - i, D)
        t = _acc(t[:, :, i:j]).reshape(BH, j - i, D)
        if rope is None:
            return torch.mul(t, scale, out=out)
        return rope_apply(t, (qtab[0][i:j], None if qtab[1] is None else qtab[1][i:j]), out)

    if both:  # [K | K_dot], written in place (no concatenation copy)
        kbuf = torch.empty(BH, NK, 2 * D, device=q.device, dtype=cdt)
        ka = keys(k, kbuf[..., :D])
        keys(k_dot, kbuf[..., D:])
        kk = kbuf.transpose(1, 2)
    else:
        ka = keys(k)
        kk = ka.transpose(1, 2) if k_dot is None else keys(k_dot).transpose(1, 2)
    va = _acc(v).reshape(BH, NK, D)
    kt = ka.transpose(1, 2)
    vda = None if v_dot is None else _acc(v_dot).reshape(BH, NK, D)
    for i, j in _blocks(NQ, block):
        if both:  # [c Q_dot | c Q], written in place
            lhs = torch.empty(BH, j - i, 2 * D, device=q.device, dtype=cdt)
            query_rows(q_dot, i, j, lhs[..., :D])
            qb = query_rows(q, i, j, lhs[..., D:])
        else:
            qb = query_rows(q, i, j)
        s = torch.bmm(qb, kt)                                   # (BH, bq, NK) scaled scores
        if mask is not None:
            s.view(B, H, j - i, NK).add_(_rows(mask, i, j))
        m = s.amax(-1, keepdim=True)
        if mask is not None:  # a fully masked row: p = 0 (not exp(-inf + inf) = NaN), lse +inf
            m.masked_fill_(m == float("-inf"), 0.0)
        p = s.sub_(m).exp_()                                    # in place: s is not needed again
        l = p.sum(-1, keepdim=True)
        dead = None if mask is None else l == 0
        p.div_(l if dead is None else l.masked_fill(dead, 1.0))
        ob = torch.bmm(p, va)
        if q_dot is None and k_dot is None:
            odb = torch.zeros_like(ob)
        else:
            if not both:
                lhs = qb if q_dot is None else query_rows(q_dot, i, j)
            t = torch.bmm(lhs, kk).mul_(p)                      # P * S_dot
            odb = torch.bmm(t, va).sub_(t.sum(-1, keepdim=True) * ob)
        if vda is not None:
            odb = torch.baddbmm(odb, p, vda)
        o[:, :, i:j] = ob.view(B, H, j - i, D)
        o_dot[:, :, i:j] = odb.view(B, H, j - i, D)
        lse_b = m + l.log()
        lse[:, :, i:j] = (lse_b if dead is None else lse_b.masked_fill_(dead, float("inf"))).view(B, H, j - i)
    return o, o_dot, lse


def attention_bwd(do, q, k, v, o, lse, scale, block=None, rope=None, mask=None):
    """dq, dk, dv (contiguous) from the saved o and lse; under GQA dk, dv (B, Hkv, NK, D)."""
    if rope is not None:
        dq, dk, dv = attention_bwd(_acc(do), rope_apply(_acc(q), rope), rope_apply(_acc(k), rope), _acc(v), _acc(o),
                                   lse, scale, block, mask=mask)
        return rope_back(dq, rope).to(q.dtype), rope_back(dk, rope).to(k.dtype), dv.to(v.dtype)
    group = _grouped(q, k, mask)
    if group is not None:
        H, hkv, folded = group
        dq, dk, dv = attention_bwd(fold(do, hkv), fold(q, hkv), k, v, fold(o, hkv), fold(lse, hkv), scale, block,
                                   mask=folded)
        return unfold(dq, H), dk, dv
    if block is None and _flash_ok(q, k, mask):
        low = q.dtype in (torch.float16, torch.bfloat16)   # fp32 is faster and more exact (docstring)
        args = _upcast(do, q, k, v, o) if low else (do, q, k, v, o)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *args, lse.to(_stat_dtype(q.dtype)), 0.0, False, attn_mask=mask, scale=scale)
        return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()
    return attention_bwd_blockwise(do, q, k, v, o, lse, scale, block, mask)


def attention_bwd_blockwise(do, q, k, v, o, lse, scale, block=None, mask=None):
    """dq, dk, dv from the saved o and lse, recomputing P one query block at a time."""
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    ka, va = _acc(k), _acc(v)
    dk = torch.zeros(ka.shape, device=k.device, dtype=ka.dtype)
    dv = torch.zeros(va.shape, device=v.device, dtype=va.dtype)
    for i, j in _blocks(q.shape[2], block):
        qb, dob, ob = _acc(q[:, :, i:j]), _acc(do[:, :, i:j]), _acc(o[:, :, i:j])
        s = (qb @ ka.transpose(-1, -2)) * scale
        if mask is not None:
            s = s + _rows(mask, i, j)
        p = torch.exp(s - lse[:, :, i:j, None].to(qb.dtype))
        dv += p.transpose(-1, -2) @ dob
        dp = dob @ va.transpose(-1, -2)
        ds = p * (dp - (dob * ob).sum(-1, keepdim=True))
        dq[:, :, i:j] = (ds @ ka) * scale
        dk += (ds.transpose(-1, -2) @ qb) * scale
    return dq, dk.to(k.dtype), dv.to(v.dtype)
