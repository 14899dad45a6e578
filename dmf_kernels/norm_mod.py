"""The norm_mod family (csrc/ops/norm_mod.cpp, cpu/norm_mod_cpu.cpp, cuda/norm_mod_kernels.cu):
LayerNorm without affine, then adaLN modulation, optionally after a gated residual.

Modulation parameters (shift, scale, gate) have shape (D,), (B, D) (per sample, broadcast over
tokens, the DiT convention), (B, 1, D), or x's full shape; see csrc/ops/common.h. Strided views
(chunks of a fused adaLN projection) are read in place.
"""
from ._extension import ops
from ._op import Op


def _adaln_modulate_backward(s, g):
    dx, dshift, dscale = ops.adaln_modulate_bwd(g.out, s.x, s.scale, s.mean, s.rstd)
    return dict(x=dx, shift=dshift, scale=dscale)


adaln_modulate = Op(
    "adaln_modulate", fwd=ops.adaln_modulate_fwd, jvp=ops.adaln_modulate_jvp, bwd=ops.adaln_modulate_bwd,
    inputs=("x", "shift", "scale"), params=dict(eps=1e-6), outputs=("out",), stats=("mean", "rstd"),
    saved=("x", "scale", "mean", "rstd"), backward=_adaln_modulate_backward, grads_like=("x", "scale", "scale"),
    doc="""LayerNorm (no affine) over the last dim, then adaLN modulation.

    out = LayerNorm(x) * (1 + scale) + shift

    Args:
        x: (..., D) float16 / bfloat16 / float32 / float64. Statistics in fp32 (fp64 for fp64).
        shift, scale: (D,), (B, D), (B, 1, D) or x's shape; same dtype and device as x,
            shift and scale of one shape.
        eps: added to the variance inside the square root.
    Returns:
        out: (..., D), like x. Differentiable, and correct under torch.func.jvp and
        torch.autograd.forward_ad (primal and tangent from one fused pass).
    """).fn


def _gated_residual_adaln_backward(s, g):
    g_x_out = g.x_out if g.x_out is not None else s.x_out.new_zeros(s.x_out.shape)
    g_h = g.h if g.h is not None else s.x_out.new_zeros(s.x_out.shape)
    dx, dgate, dy, dshift, dscale = ops.gated_residual_adaln_bwd(g_x_out, g_h, s.x_out, s.gate, s.y, s.scale,
                                                                 s.mean, s.rstd)
    return dict(x=dx, gate=dgate, y=dy, shift=dshift, scale=dscale)


gated_residual_adaln = Op(
    "gated_residual_adaln", fwd=ops.gated_residual_adaln_fwd, jvp=ops.gated_residual_adaln_jvp,
    bwd=ops.gated_residual_adaln_bwd, inputs=("x", "gate", "y", "shift", "scale"), params=dict(eps=1e-6),
    outputs=("x_out", "h"), stats=("mean", "rstd"), saved=("x_out", "gate", "y", "scale", "mean", "rstd"),
    backward=_gated_residual_adaln_backward, grads_like=("x_out", "gate", "x_out", "scale", "scale"),
    doc="""Gated residual, then LayerNorm and adaLN modulation of the result, in one pass.

    x_out = x + gate * y
    h     = LayerNorm(x_out) * (1 + scale) + shift

    The fusion between the two halves of a DiT block (attention residual, then norm2) and
    between block i and block i+1 (MLP residual, then norm1).

    Args:
        x, y: (..., D), same shape and dtype.
        gate, shift, scale: (D,), (B, D), (B, 1, D) or x's shape (shift and scale alike).
    Returns:
        (x_out, h): both (..., D), both differentiable.
    """).fn


# ------------------------------------------------------------------ the RMS kind (LightningDiT's adaLN)

def _rms_adaln_modulate_backward(s, g):
    dx, dshift, dscale, dweight = ops.rms_adaln_modulate_bwd(g.out, s.x, s.shift, s.scale, s.weight, s.rstd)
    return dict(x=dx, shift=dshift, scale=dscale, weight=dweight)


rms_adaln_modulate = Op(
    "rms_adaln_modulate", fwd=ops.rms_adaln_modulate_fwd, jvp=ops.rms_adaln_modulate_jvp,
    bwd=ops.rms_adaln_modulate_bwd, inputs=("x", "shift", "scale", "weight"), optional=("shift", "weight"),
    params=dict(eps=1e-6), outputs=("out",), stats=("rstd",), saved=("x", "shift", "scale", "weight", "rstd"),
    backward=_rms_adaln_modulate_backward, grads_like=("x", "shift", "scale", "weight"),
    doc="""RMSNorm with an optional weight over the last dim, then adaLN modulation (LightningDiT).

    out = x / sqrt(mean(x^2) + eps) * weight * (1 + scale) + shift

    Args:
        x: (..., D) float16 / bfloat16 / float32 / float64. Statistics in fp32 (fp64 for fp64).
        shift: (D,), (B, D), (B, 1, D) or x's shape, like scale; or None (zero: LightningDiT's
            wo_shift). Pass it explicitly, positionally or as shift=None.
        scale: (D,), (B, D), (B, 1, D) or x's shape; same dtype and device as x. Strided views
            (chunks of a fused adaLN projection) are read in place.
        weight: (D,) like x (the RMSNorm's learned weight), or None (ones).
        eps: added to mean(x^2) inside the square root.
    Returns:
        out: (..., D), like x. Differentiable w.r.t. x, shift, scale and weight (those given),
        and correct under torch.func.jvp and torch.autograd.forward_ad (one fused pass).
    """).fn


def _gated_residual_rms_adaln_backward(s, g):
    g_x_out = g.x_out if g.x_out is not None else s.x_out.new_zeros(s.x_out.shape)
    g_h = g.h if g.h is not None else s.x_out.new_zeros(s.x_out.shape)
    dx, dgate, dy, dshift, dscale, dweight = ops.gated_residual_rms_adaln_bwd(
        g_x_out, g_h, s.x_out, s.gate, s.y, s.shift, s.scale, s.weight, s.rstd)
    return dict(x=dx, gate=dgate, y=dy, shift=dshift, scale=dscale, weight=dweight)


gated_residual_rms_adaln = Op(
    "gated_residual_rms_adaln", fwd=ops.gated_residual_rms_adaln_fwd, jvp=ops.gated_residual_rms_adaln_jvp,
    bwd=ops.gated_residual_rms_adaln_bwd, inputs=("x", "gate", "y", "shift", "scale", "weight"),
    optional=("shift", "weight"), params=dict(eps=1e-6), outputs=("x_out", "h"), stats=("rstd",),
    saved=("x_out", "gate", "y", "shift", "scale", "weight", "rstd"), backward=_gated_residual_rms_adaln_backward,
    grads_like=("x_out", "gate", "x_out", "shift", "scale", "weight"),
    doc="""Gated residual, then RMSNorm (optional weight) and adaLN modulation of the result, in one pass.

    x_out = x + gate * y
    h     = x_out / sqrt(mean(x_out^2) + eps) * weight * (1 + scale) + shift

    The LightningDiT counterpart of gated_residual_adaln (between the halves of a block and
    between blocks).

    Args:
        x, y: (..., D), same shape and dtype.
        gate, scale: (D,), (B, D), (B, 1, D) or x's shape.
        shift: like scale, or None (zero); weight: (D,) or None (ones).
    Returns:
        (x_out, h): both (..., D), both differentiable.
    """).fn
