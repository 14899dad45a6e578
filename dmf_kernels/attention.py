"""Non-causal scaled dot-product attention with a one-pass forward-mode JVP.

Layers:
    torch.ops.dmf_kernels.attention_{fwd,bwd,jvp}   custom ops (fake kernels for torch.compile);
                                                    Triton kernels on CUDA (attention_triton.py),
                                                    the blockwise PyTorch path on CPU and for
                                                    float64 (attention_cpu.py)
    AttentionFunction                               forward + backward
    AttentionDualFunction                           one pass: o and o_dot; backward for o
    attention(q, k, v, scale)                       public; under forward-mode AD (torch.func.jvp,
                                                    forward_ad, jacfwd, also compiled) it runs the
                                                    one-pass JVP kernel, never a primal kernel
                                                    followed by a separate tangent kernel
    dmf_kernels.jvp.attention(q, k, v, q_dot, k_dot, v_dot, scale)   explicit dual stream
"""
import math
import os
from typing import Optional

import torch
from torch import Tensor

from . import attention_cpu
from ._library import dual_inputs, make_duals, needs_grad

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
    return q.dtype != torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


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
        if t is None:
            continue
        if t.shape != primal.shape:
            raise ValueError(f"{op}: {name} must have the shape of its primal {tuple(primal.shape)}, "
                             f"got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"{op}: {name} must have q's dtype and device ({q.dtype}, {q.device}), "
                            f"got ({t.dtype}, {t.device})")


def _stat_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- custom ops


@torch.library.custom_op("dmf_kernels::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """o (B, H, NQ, D), lse (B, H, NQ) in fp32 (fp64 for fp64)."""
    _check(q, k, v, op="attention_fwd")
    if _use_triton(q):
        return _triton().attention_fwd(q, k, v, scale)
    return attention_cpu.attention_fwd(q, k, v, scale)


@attention_fwd.register_fake
def _(q, k, v, scale):
    B, H, NQ, D = q.shape
    return q.new_empty(B, H, NQ, v.shape[-1]), q.new_empty(B, H, NQ, dtype=_stat_dtype(q))


@torch.library.custom_op("dmf_kernels::attention_jvp", mutates_args=())
def attention_jvp(q: Tensor, k: Tensor, v: Tensor, q_dot: Optional[Tensor], k_dot: Optional[Tensor],
                  v_dot: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """o, o_dot, lse in one pass; None tangents are zero."""
    _check(q, k, v, (("q_dot", q_dot, q), ("k_dot", k_dot, k), ("v_dot", v_dot, v)), op="attention_jvp")
    if _use_triton(q):
        return _triton().attention_jvp(q, k, v, q_dot, k_dot, v_dot, scale)
    return attention_cpu.attention_jvp(q, k, v, q_dot, k_dot, v_dot, scale)


@attention_jvp.register_fake
def _(q, k, v, q_dot, k_dot, v_dot, scale):
    B, H, NQ, D = q.shape
    o = q.new_empty(B, H, NQ, v.shape[-1])
    return o, torch.empty_like(o), q.new_empty(B, H, NQ, dtype=_stat_dtype(q))


@torch.library.custom_op("dmf_kernels::attention_bwd", mutates_args=())
def attention_bwd(grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                  scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv from the saved o and lse."""
    _check(q, k, v, op="attention_bwd")
    if grad_o.shape != o.shape:
        raise ValueError(f"attention_bwd: grad_o must have o's shape {tuple(o.shape)}, got {tuple(grad_o.shape)}")
    if _use_triton(q):
        return _triton().attention_bwd(grad_o, q, k, v, o, lse, scale)
    return attention_cpu.attention_bwd(grad_o, q, k, v, o, lse, scale)


@attention_bwd.register_fake
def _(grad_o, q, k, v, o, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# The raw ops' own autograd: o of attention_fwd / attention_jvp backpropagates through
# attention_bwd (torch.compile differentiates the raw ops when it traces forward-mode AD);
# a gradient reaching o_dot or lse, or a second derivative, raises instead of vanishing.
def _primal_setup(ctx, inputs, output):
    q, k, v = inputs[:3]
    ctx.save_for_backward(q, k, v, output[0], output[-1])
    ctx.scale = inputs[-1]
    ctx.n_inputs = len(inputs)
    ctx.set_materialize_grads(False)


def _primal_backward(ctx, grad_o, *other_grads):
    # eager only: under torch.compile every traced output gets a gradient placeholder
    if any(g is not None for g in other_grads) and not torch.compiler.is_compiling():
        raise RuntimeError("dmf_kernels::attention: o_dot and lse are not differentiable (only o is)")
    if grad_o is None:
        return (None,) * ctx.n_inputs
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd(grad_o, q, k, v, o, lse, ctx.scale)
    return (dq, dk, dv) + (None,) * (ctx.n_inputs - 3)


def _no_second_derivative(ctx, *grads):
    raise RuntimeError("dmf_kernels::attention_bwd has no derivative (double backward is not supported)")


torch.library.register_autograd("dmf_kernels::attention_fwd", _primal_backward, setup_context=_primal_setup)
torch.library.register_autograd("dmf_kernels::attention_jvp", _primal_backward, setup_context=_primal_setup)
torch.library.register_autograd("dmf_kernels::attention_bwd", _no_second_derivative)


# ---------------------------------------------------------------- autograd Functions


class AttentionFunction(torch.autograd.Function):
    """(q, k, v, scale) -> (o, lse); lse not differentiable. No jvp on purpose: forward-mode AD
    is routed to AttentionDualFunction by `attention` (one pass instead of two)."""

    @staticmethod
    def forward(q, k, v, scale):
        return torch.ops.dmf_kernels.attention_fwd(q, k, v, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        o, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale

    @staticmethod
    def backward(ctx, grad_o, _grad_lse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.dmf_kernels.attention_bwd(grad_o, q, k, v, o, lse, ctx.scale)
        return dq, dk, dv, None


class AttentionDualFunction(torch.autograd.Function):
    """(q, k, v, q_dot, k_dot, v_dot, scale) -> (o, o_dot, lse) in one kernel pass; o is
    differentiable w.r.t. q, k, v; o_dot is not recorded."""

    @staticmethod
    def forward(q, k, v, q_dot, k_dot, v_dot, scale):
        return torch.ops.dmf_kernels.attention_jvp(q, k, v, q_dot, k_dot, v_dot, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v = inputs[:3]
        o, o_dot, lse = output
        ctx.mark_non_differentiable(o_dot, lse)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = inputs[-1]

    @staticmethod
    def backward(ctx, grad_o, _grad_o_dot, _grad_lse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.dmf_kernels.attention_bwd(grad_o, q, k, v, o, lse, ctx.scale)
        return dq, dk, dv, None, None, None, None


def _scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """Non-causal attention, softmax(scale * q k^T) v, like F.scaled_dot_product_attention.

    Args:
        q: (B, H, NQ, D); k, v: (B, H, NK, D). Any strides (e.g. permuted views of a fused
            qkv projection). float16 / bfloat16 / float32 (Triton on CUDA, fp32 accumulation),
            float64 (blockwise PyTorch path). D in 16..128 on CUDA (72, 80, 96 included).
        scale: defaults to 1 / sqrt(D).
    Returns:
        o: (B, H, NQ, D), contiguous. Differentiable (backward kernels, no N x N storage).
        Under torch.func.jvp / forward_ad / jacfwd, eager or compiled, the tangent comes
        from the one-pass JVP kernel.
    """
    scale = _scale(q, scale)
    dual = dual_inputs(q, k, v)
    if dual is not None:
        (q, k, v), (q_dot, k_dot, v_dot) = dual
        o, o_dot = attention_dual(q, k, v, q_dot, k_dot, v_dot, scale)
        return make_duals((o,), (o_dot,), "attention", (q, k, v))[0]
    _check(q, k, v)
    if not needs_grad(q, k, v):
        return torch.ops.dmf_kernels.attention_fwd(q, k, v, scale)[0]
    return AttentionFunction.apply(q, k, v, scale)[0]


def attention_dual(q, k, v, q_dot=None, k_dot=None, v_dot=None, scale: Optional[float] = None):
    """Attention and its tangent in one pass.

    Args:
        q, k, v: as in `attention`; q_dot, k_dot, v_dot: their tangents (same shapes) or None (zero;
            the kernel skips those products: in DMF's decoder blocks most tangents are nonzero,
            but e.g. a frozen k/v cache has none).
    Returns:
        (o, o_dot): o differentiable w.r.t. q, k, v; o_dot a plain tensor, not recorded in
        autograd (no gradient flows into the tangents).
    """
    scale = _scale(q, scale)
    _check(q, k, v, (("q_dot", q_dot, q), ("k_dot", k_dot, k), ("v_dot", v_dot, v)))
    if not needs_grad(q, k, v):
        o, o_dot, _ = torch.ops.dmf_kernels.attention_jvp(q, k, v, q_dot, k_dot, v_dot, scale)
        return o, o_dot
    o, o_dot, _ = AttentionDualFunction.apply(q, k, v, q_dot, k_dot, v_dot, scale)
    return o, o_dot
