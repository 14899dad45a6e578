"""Non-causal scaled dot-product attention with a one-pass forward-mode JVP.

    torch.ops.dmf_kernels.attention_{fwd,jvp,bwd}   custom ops (fake kernels for torch.compile):
                                                    Triton kernels on CUDA (attention_triton.py),
                                                    the blockwise PyTorch path on CPU and for
                                                    float64 (attention_cpu.py)
    attention(q, k, v, scale, rope_cos, rope_sin, attn_mask, enable_gqa)
                                                    public, declared with _op.Op like every op;
                                                    under forward-mode AD (torch.func.jvp,
                                                    forward_ad, jacfwd, also compiled) it runs the
                                                    one-pass jvp kernel, never a primal kernel
                                                    followed by a separate tangent kernel
    dmf_kernels.jvp.attention(q, k, v, q_dot, k_dot, v_dot, scale, rope_cos, rope_sin, attn_mask,
                              enable_gqa)   explicit jvp form

Rotary position embedding (rope_cos, rope_sin: (N, D) tables, LightningDiT's
VisionRotaryEmbeddingFast): q and k are rotated inside the kernels, rope(t) = t * cos +
rotate_half(t) * sin on interleaved pairs (x0, x1) -> (-x1, x0). The tables are constants
(params of the op, like scale): no tangent, no gradient; q_dot and k_dot rotate with them.
So is the mask (attention_mask.py). A tangent or requires_grad on a table or the mask raises
(_constants) in every entry point, instead of being silently dropped.

Edge cases: NaN in q, k, v or the tables gives NaN where softmax(q k^T * scale) v does (the
CPU path's aten kernel turns a NaN query row into zeros, so non-finite scores take the
blockwise path there); a fully masked row (every key masked with -inf / False) gives zeros
in the output, tangent and gradients. Empty inputs (B, H or NQ = 0; NK = 0 only with
NQ = 0) return empty outputs without launching anything (_empty).
"""
import math
from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import attention_cpu, attention_mask
from ._extension import triton_interpreter
from ._forward_ad import check_tangent
from ._op import Op

MAX_TRITON_HEAD_DIM = 128
MIN_TRITON_HEAD_DIM = 16
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _use_triton(q: Tensor) -> bool:
    # float64 always takes the blockwise PyTorch path (exact checks); CPU tensors too,
    # except under TRITON_INTERPRET=1 where the Triton kernels run on the CPU (tests) --
    # but not bf16 ones: the interpreter computes garbage for tl.dot on bf16 operands.
    if q.dtype == torch.float64:
        return False
    if q.is_cuda:
        return True
    return q.dtype != torch.bfloat16 and triton_interpreter()


def _triton():
    from . import attention_triton

    return attention_triton


def _check(q, k, v, tangents=(), op="attention", attn_mask=None, enable_gqa=False):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must have shape (B, H, N, D), got {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected q's dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device}, expected q's device {q.device}")
    B, H, NQ, D = q.shape
    attention_mask.check_heads(q, k, v, enable_gqa, op)
    if k.shape[3] != D:
        raise ValueError(f"{op}: k's head dim {k.shape[3]} differs from q's {D}")
    if v.shape[3] != D:
        raise ValueError(f"{op}: v's head dim {v.shape[3]} differs from q's {D} (a different value head dim "
                         "is not supported)")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: k and v must have the same sequence length, got {k.shape[2]} and {v.shape[2]}")
    if k.shape[2] == 0 and NQ > 0:
        raise ValueError(f"{op}: k and v have no keys (sequence length 0) for {NQ} queries")
    if D == 0:
        raise ValueError(f"{op}: head dim must be positive")
    if _use_triton(q) and not MIN_TRITON_HEAD_DIM <= D <= MAX_TRITON_HEAD_DIM:
        raise ValueError(f"{op}: head dim {D} is outside the supported range {MIN_TRITON_HEAD_DIM}.."
                         f"{MAX_TRITON_HEAD_DIM} of the Triton kernels")
    attention_mask.check_mask(attn_mask, q, k, op)
    for name, t, primal in tangents:
        check_tangent(op, name, t, primal)


def _check_rope(q, k, rope_cos, rope_sin, op):
    """Whether rotary embedding is on; raises on bad tables."""
    if rope_cos is None and rope_sin is None:
        return False
    if rope_cos is None or rope_sin is None:
        given, missing = ("rope_cos", "rope_sin") if rope_sin is None else ("rope_sin", "rope_cos")
        raise ValueError(f"{op}: {given} given without {missing}; rotary embedding needs both tables")
    B, H, NQ, D = q.shape
    if k.shape[2] != NQ:
        raise ValueError(f"{op}: rotary embedding (rope_cos, rope_sin) needs self-attention, NQ == NK; got "
                         f"NQ = {NQ}, NK = {k.shape[2]}")
    if D % 2:
        raise ValueError(f"{op}: rotary embedding needs an even head dim (it rotates pairs of columns), got D = {D}")
    for name, t in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor or None, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
        if tuple(t.shape) != (NQ, D):
            raise ValueError(f"{op}: {name} must have shape (N, D) = {(NQ, D)}, got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device}, expected q's device {q.device}")
    return True


def _rope(q, k, rope_cos, rope_sin, op):
    """The tables as the chosen path takes them: (cos, sin) for Triton (which converts them
    to fp32 itself), attention_cpu.rope_tables for the PyTorch path; None without rope."""
    if not _check_rope(q, k, rope_cos, rope_sin, op):
        return None
    if _use_triton(q):
        return rope_cos, rope_sin
    return attention_cpu.rope_tables(rope_cos, rope_sin, _stat_dtype(q), q.device)


def _run(op, q, k, rope_cos, rope_sin, attn_mask, *args):
    """op(*args, rope=..., mask=...) of the Triton launchers (attention_triton) or the PyTorch
    path (attention_cpu), the tables checked and converted for it (_rope), the mask as the
    additive bias both take (attention_mask.bias); empty inputs get their empty (or, for dk
    and dv, zero) results here, without a launch."""
    rope = _rope(q, k, rope_cos, rope_sin, op)
    if q.numel() == 0:
        return _empty(op, q, k, args[3 if op == "attention_bwd" else 2])
    mask = None if attn_mask is None else attention_mask.bias(attn_mask, _stat_dtype(q))
    return getattr(_triton() if _use_triton(q) else attention_cpu, op)(*args, rope=rope, mask=mask)


def _empty(op, q, k, v):
    """The results for an empty q (B, H or NQ = 0): o, o_dot (B, H, NQ, D) and lse empty; the
    gradients dq empty and dk, dv zero (no query attends to the keys), shaped like k and v."""
    B, H, NQ, _ = q.shape
    o = q.new_empty(B, H, NQ, v.shape[-1])
    lse = q.new_empty(B, H, NQ, dtype=_stat_dtype(q))
    if op == "attention_fwd":
        return o, lse
    if op == "attention_jvp":
        return o, torch.empty_like(o), lse
    return q.new_empty(q.shape), torch.zeros_like(k, memory_format=torch.contiguous_format), \
        torch.zeros_like(v, memory_format=torch.contiguous_format)


def _stat_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fake_o_lse(q, k, v, rope_cos, rope_sin, op, attn_mask=None, enable_gqa=False):
    """The fake kernels' o (B, H, NQ, Dv) and lse (B, H, NQ), after the rope checks."""
    _check(q, k, v, op=op, attn_mask=attn_mask, enable_gqa=enable_gqa)
    _check_rope(q, k, rope_cos, rope_sin, op)
    B, H, NQ, D = q.shape
    return q.new_empty(B, H, NQ, v.shape[-1]), q.new_empty(B, H, NQ, dtype=_stat_dtype(q))


# ---------------------------------------------------------------- custom ops


@torch.library.custom_op("dmf_kernels::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, rope_cos: Optional[Tensor] = None,
                   rope_sin: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                   enable_gqa: bool = False) -> tuple[Tensor, Tensor]:
    """o (B, H, NQ, D), lse (B, H, NQ) in fp32 (fp64 for fp64; +inf for a fully masked row)."""
    _check(q, k, v, op="attention_fwd", attn_mask=attn_mask, enable_gqa=enable_gqa)
    return _run("attention_fwd", q, k, rope_cos, rope_sin, attn_mask, q, k, v, scale)


@_attention_fwd.register_fake
def _(q, k, v, scale, rope_cos=None, rope_sin=None, attn_mask=None, enable_gqa=False):
    return _fake_o_lse(q, k, v, rope_cos, rope_sin, "attention_fwd", attn_mask, enable_gqa)


@torch.library.custom_op("dmf_kernels::attention_jvp", mutates_args=())
def _attention_jvp(q: Tensor, k: Tensor, v: Tensor, q_dot: Optional[Tensor], k_dot: Optional[Tensor],
                  v_dot: Optional[Tensor], scale: float, rope_cos: Optional[Tensor] = None,
                  rope_sin: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                  enable_gqa: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """o, o_dot, lse in one pass; None tangents are zero."""
    _check(q, k, v, (("q_dot", q_dot, q), ("k_dot", k_dot, k), ("v_dot", v_dot, v)), op="attention_jvp",
           attn_mask=attn_mask, enable_gqa=enable_gqa)
    return _run("attention_jvp", q, k, rope_cos, rope_sin, attn_mask, q, k, v, q_dot, k_dot, v_dot, scale)


@_attention_jvp.register_fake
def _(q, k, v, q_dot, k_dot, v_dot, scale, rope_cos=None, rope_sin=None, attn_mask=None, enable_gqa=False):
    o, lse = _fake_o_lse(q, k, v, rope_cos, rope_sin, "attention_jvp", attn_mask, enable_gqa)
    return o, torch.empty_like(o), lse


@torch.library.custom_op("dmf_kernels::attention_bwd", mutates_args=())
def _attention_bwd(grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float,
                   rope_cos: Optional[Tensor] = None, rope_sin: Optional[Tensor] = None,
                   attn_mask: Optional[Tensor] = None, enable_gqa: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv from the saved o and lse (with rope: w.r.t. the unrotated q and k; with GQA
    dk, dv sum over each group of query heads)."""
    _check(q, k, v, op="attention_bwd", attn_mask=attn_mask, enable_gqa=enable_gqa)
    if grad_o.shape != o.shape:
        raise ValueError(f"attention_bwd: grad_o must have o's shape {tuple(o.shape)}, got {tuple(grad_o.shape)}")
    return _run("attention_bwd", q, k, rope_cos, rope_sin, attn_mask, grad_o, q, k, v, o, lse, scale)


@_attention_bwd.register_fake
def _(grad_o, q, k, v, o, lse, scale, rope_cos=None, rope_sin=None, attn_mask=None, enable_gqa=False):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_backward(s, g):
    dq, dk, dv = torch.ops.dmf_kernels.attention_bwd(g.o, s.q, s.k, s.v, s.o, s.lse, s.scale, s.rope_cos, s.rope_sin,
                                                     s.attn_mask, s.enable_gqa)
    return dict(q=dq, k=dk, v=dv)


def _constants(params):
    """The tables (and the mask) are constants of the op: a forward-mode tangent on one, or a
    gradient it would need, is not computed, so either raises, naming the argument. Runs in
    every entry point (resolve: eager and dual calls, the jvp form, compiled)."""
    named = dict(zip(_CONSTANTS, params))
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):  # before the dispatcher's own cast error
            raise TypeError(f"attention: {name} must be a Tensor or None, got {type(t).__name__}")
        if fwAD.unpack_dual(t).tangent is not None:
            raise RuntimeError(
                f"attention: {name} carries a forward-mode tangent, but rope_cos, rope_sin and attn_mask are "
                f"constants of the op (no tangent, no gradient); pass {name} outside torch.func.jvp's primals / "
                "without make_dual")
        if t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                f"attention: {name} requires grad, but rope_cos, rope_sin and attn_mask are constants of the op "
                f"(no gradient is computed for them); pass {name}.detach()")


_CONSTANTS = ("rope_cos", "rope_sin", "attn_mask")


def _resolve(primals, params):
    """The params as the raw ops take them: the default scale 1 / sqrt(D), the constants
    checked (_constants), a boolean mask that masks nothing dropped (the unmasked kernels run),
    enable_gqa a bool."""
    scale, rope_cos, rope_sin, attn_mask, enable_gqa = params
    _constants((rope_cos, rope_sin, attn_mask))
    if scale is None:
        q = primals[0]
        if not isinstance(q, Tensor):
            raise TypeError(f"attention: q must be a Tensor, got {type(q).__name__}")
        scale = 1.0 / math.sqrt(q.shape[-1])
    return float(scale), rope_cos, rope_sin, attention_mask.drop_all_true(attn_mask), bool(enable_gqa)


attention = Op(
    "attention", fwd=torch.ops.dmf_kernels.attention_fwd, jvp=torch.ops.dmf_kernels.attention_jvp,
    bwd=torch.ops.dmf_kernels.attention_bwd, inputs=("q", "k", "v"),
    params=dict(scale=None, rope_cos=None, rope_sin=None, attn_mask=None, enable_gqa=False), outputs=("o",),
    stats=("lse",), saved=("q", "k", "v", "o", "lse", "scale", "rope_cos", "rope_sin", "attn_mask", "enable_gqa"),
    backward=_attention_backward, resolve=_resolve,
    doc="""Non-causal attention, softmax(scale * q k^T) v, like F.scaled_dot_product_attention;
    with rotary tables softmax(scale * rope(q) rope(k)^T) v.

    Args:
        q: (B, H, NQ, D); k, v: (B, H, NK, D) (Hkv heads with enable_gqa). Any strides
            (e.g. permuted views of a fused qkv projection). float16 / bfloat16 / float32 (Triton on CUDA, fp32 accumulation),
            float64 (blockwise PyTorch path). D in 16..128 on CUDA (72, 80, 96 included).
        scale: defaults to 1 / sqrt(D).
        rope_cos, rope_sin: rotary position embedding tables (N, D), both or neither, any float
            dtype (used in fp32; fp64 for fp64 inputs), self-attention only (NQ = NK = N), D
            even. rope(t) = t * cos + rotate_half(t) * sin with rotate_half on interleaved
            pairs (x0, x1) -> (-x1, x0), as LightningDiT's VisionRotaryEmbeddingFast; applied
            to q and k inside the kernels (and to q_dot, k_dot). Constants: no gradient, no
            tangent.
        attn_mask: broadcastable to (B, H, NQ, NK), as F.scaled_dot_product_attention's:
            boolean (True = attend) or an additive float mask (q's dtype or float32). A
            constant (no gradient, no tangent). A fully masked row gives zeros (output,
            tangent, gradients), not NaN. A key-padding mask (B, 1, 1, NK) takes a fast path;
            an all-True boolean mask is dropped (the unmasked kernels run). Known limit: a
            row masked everywhere by a huge finite bias (finfo.min) gets the reference's
            uniform output and tangent but not its gradients (the scores vanish in rounding
            next to the bias, so the backward's exp(s - lse) is 1 per key, not 1 / NK).
        enable_gqa: grouped-query attention, as SDPA's: k, v (B, Hkv, NK, D) with H a
            multiple g of Hkv; query head h reads kv head h // g (no copy of k, v in the
            Triton kernels); dk, dv sum over each group. Without it the heads must match.
    Returns:
        o: (B, H, NQ, D), contiguous. Differentiable (backward kernels, no N x N storage).
        Under torch.func.jvp / forward_ad / jacfwd, eager or compiled, the tangent comes
        from the one-pass jvp kernel.
    """).fn
