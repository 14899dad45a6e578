"""Non-causal scaled dot-product attention with a one-pass forward-mode JVP.

    torch.ops.dmf_kernels.attention_{fwd,jvp,bwd}   custom ops (fake kernels for torch.compile):
                                                    Triton kernels on CUDA (attention_triton.py),
                                                    the blockwise PyTorch path on CPU and for
                                                    float64 (attention_cpu.py)
    attention(q, k, v, scale)                       public, declared with _op.Op like every op;
                                                    under forward-mode AD (torch.func.jvp,
                                                    forward_ad, jacfwd, also compiled) it runs the
                                                    one-pass jvp kernel, never a primal kernel
                                                    followed by a separate tangent kernel
    dmf_kernels.jvp.attention(q, k, v, q_dot, k_dot, v_dot, scale)   explicit jvp form
"""
import math
from typing import Optional

import torch
from torch import Tensor

from . import attention_cpu
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


def _check(q, k, v, tangents=(), op="attention"):
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
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H):
        raise ValueError(f"{op}: q, k, v must share batch and heads (B, H) = {(B, H)}; got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
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
    for name, t, primal in tangents:
        check_tangent(op, name, t, primal)


def _stat_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- custom ops


@torch.library.custom_op("dmf_kernels::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """o (B, H, NQ, D), lse (B, H, NQ) in fp32 (fp64 for fp64)."""
    _check(q, k, v, op="attention_fwd")
    if _use_triton(q):
        return _triton().attention_fwd(q, k, v, scale)
    return attention_cpu.attention_fwd(q, k, v, scale)


@_attention_fwd.register_fake
def _(q, k, v, scale):
    B, H, NQ, D = q.shape
    return q.new_empty(B, H, NQ, v.shape[-1]), q.new_empty(B, H, NQ, dtype=_stat_dtype(q))


@torch.library.custom_op("dmf_kernels::attention_jvp", mutates_args=())
def _attention_jvp(q: Tensor, k: Tensor, v: Tensor, q_dot: Optional[Tensor], k_dot: Optional[Tensor],
                  v_dot: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """o, o_dot, lse in one pass; None tangents are zero."""
    _check(q, k, v, (("q_dot", q_dot, q), ("k_dot", k_dot, k), ("v_dot", v_dot, v)), op="attention_jvp")
    if _use_triton(q):
        return _triton().attention_jvp(q, k, v, q_dot, k_dot, v_dot, scale)
    return attention_cpu.attention_jvp(q, k, v, q_dot, k_dot, v_dot, scale)


@_attention_jvp.register_fake
def _(q, k, v, q_dot, k_dot, v_dot, scale):
    B, H, NQ, D = q.shape
    o = q.new_empty(B, H, NQ, v.shape[-1])
    return o, torch.empty_like(o), q.new_empty(B, H, NQ, dtype=_stat_dtype(q))


@torch.library.custom_op("dmf_kernels::attention_bwd", mutates_args=())
def _attention_bwd(grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                  scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv from the saved o and lse."""
    _check(q, k, v, op="attention_bwd")
    if grad_o.shape != o.shape:
        raise ValueError(f"attention_bwd: grad_o must have o's shape {tuple(o.shape)}, got {tuple(grad_o.shape)}")
    if _use_triton(q):
        return _triton().attention_bwd(grad_o, q, k, v, o, lse, scale)
    return attention_cpu.attention_bwd(grad_o, q, k, v, o, lse, scale)


@_attention_bwd.register_fake
def _(grad_o, q, k, v, o, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_backward(s, g):
    dq, dk, dv = torch.ops.dmf_kernels.attention_bwd(g.o, s.q, s.k, s.v, s.o, s.lse, s.scale)
    return dict(q=dq, k=dk, v=dv)


def _default_scale(primals, params):
    (scale,) = params
    if scale is None:
        q = primals[0]
        if not isinstance(q, Tensor):
            raise TypeError(f"attention: q must be a Tensor, got {type(q).__name__}")
        return (1.0 / math.sqrt(q.shape[-1]),)
    return (float(scale),)


attention = Op(
    "attention", fwd=torch.ops.dmf_kernels.attention_fwd, jvp=torch.ops.dmf_kernels.attention_jvp,
    bwd=torch.ops.dmf_kernels.attention_bwd, inputs=("q", "k", "v"), params=dict(scale=None), outputs=("o",),
    stats=("lse",), saved=("q", "k", "v", "o", "lse", "scale"), backward=_attention_backward,
    resolve=_default_scale,
    doc="""Non-causal attention, softmax(scale * q k^T) v, like F.scaled_dot_product_attention.

    Args:
        q: (B, H, NQ, D); k, v: (B, H, NK, D). Any strides (e.g. permuted views of a fused
            qkv projection). float16 / bfloat16 / float32 (Triton on CUDA, fp32 accumulation),
            float64 (blockwise PyTorch path). D in 16..128 on CUDA (72, 80, 96 included).
        scale: defaults to 1 / sqrt(D).
    Returns:
        o: (B, H, NQ, D), contiguous. Differentiable (backward kernels, no N x N storage).
        Under torch.func.jvp / forward_ad / jacfwd, eager or compiled, the tangent comes
        from the one-pass jvp kernel.
    """).fn
