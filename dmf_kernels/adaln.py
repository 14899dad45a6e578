"""adaLN modulation ops of a DiT block: adaln_modulate and gated_residual_adaln.

Layers, as in the rest of the package:
    torch.ops.dmf_kernels.<op>_{fwd,bwd,jvp,tangent}   compiled ops (csrc/)
    <Op>Function                                       autograd.Function: backward + jvp
    <Op>DualFunction                                   primal and tangent in one kernel pass
    <op>(...)                                          public, differentiable
    dmf_kernels.jvp.<op>(...)                          public, explicit dual stream

Modulation parameters (shift, scale, gate) have shape (D,), (B, D) (per sample, broadcast
over tokens, the DiT convention), (B, 1, D), or x's full shape; see csrc/ops.cpp.
"""
import torch

from ._library import dual_inputs, make_duals, needs_grad, ops


class _AdaLNModulateBase(torch.autograd.Function):
    """(x, shift, scale, eps) -> (out, mean, rstd); mean and rstd are not differentiable.
    No jvp: this is the class torch.compile traces (see _library.dual_inputs)."""

    @staticmethod
    def forward(x, shift, scale, eps):
        return ops.adaln_modulate_fwd(x, shift, scale, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, scale, _ = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.save_for_forward(x, scale, mean, rstd)

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, scale, mean, rstd = ctx.saved_tensors
        dx, dshift, dscale = ops.adaln_modulate_bwd(grad_out, x, scale, mean, rstd)
        return dx, dshift, dscale, None


class AdaLNModulateFunction(_AdaLNModulateBase):
    """Eager: backward plus a jvp from the saved statistics."""

    @staticmethod
    def jvp(ctx, x_dot, shift_dot, scale_dot, _eps_dot):
        # Tangent only, from the statistics the forward saved: one pass over x and x_dot.
        x, scale, mean, rstd = ctx.saved_tensors
        return ops.adaln_modulate_tangent(x, x_dot, shift_dot, scale, scale_dot, mean, rstd), None, None


class AdaLNModulateDualFunction(torch.autograd.Function):
    """(x, x_dot, shift, shift_dot, scale, scale_dot, eps) -> (out, out_dot, mean, rstd) in one
    kernel pass. out is differentiable w.r.t. x, shift, scale; out_dot is not recorded."""

    @staticmethod
    def forward(x, x_dot, shift, shift_dot, scale, scale_dot, eps):
        return ops.adaln_modulate_jvp(x, x_dot, shift, shift_dot, scale, scale_dot, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, _, _, scale, _, _ = inputs
        _, out_dot, mean, rstd = output
        ctx.mark_non_differentiable(out_dot, mean, rstd)
        ctx.save_for_backward(x, scale, mean, rstd)

    @staticmethod
    def backward(ctx, grad_out, _g_out_dot, _g_mean, _g_rstd):
        x, scale, mean, rstd = ctx.saved_tensors
        dx, dshift, dscale = ops.adaln_modulate_bwd(grad_out, x, scale, mean, rstd)
        return dx, None, dshift, None, dscale, None, None


class _GatedResidualAdaLNBase(torch.autograd.Function):
    """(x, gate, y, shift, scale, eps) -> (x_out, h, mean, rstd); no jvp (traced by torch.compile)."""

    @staticmethod
    def forward(x, gate, y, shift, scale, eps):
        return ops.gated_residual_adaln_fwd(x, gate, y, shift, scale, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, gate, y, _, scale, _ = inputs
        x_out, _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x_out, gate, y, scale, mean, rstd)
        ctx.save_for_forward(x_out, gate, y, scale, mean, rstd)

    @staticmethod
    def backward(ctx, grad_x_out, grad_h, _grad_mean, _grad_rstd):
        x_out, gate, y, scale, mean, rstd = ctx.saved_tensors
        dx, dgate, dy, dshift, dscale = ops.gated_residual_adaln_bwd(
            grad_x_out, grad_h, x_out, gate, y, scale, mean, rstd
        )
        return dx, dgate, dy, dshift, dscale, None


class GatedResidualAdaLNFunction(_GatedResidualAdaLNBase):
    @staticmethod
    def jvp(ctx, x_dot, gate_dot, y_dot, shift_dot, scale_dot, _eps_dot):
        x_out, gate, y, scale, mean, rstd = ctx.saved_tensors
        x_out_dot, h_dot = ops.gated_residual_adaln_tangent(
            x_out, x_dot, gate, gate_dot, y, y_dot, shift_dot, scale, scale_dot, mean, rstd
        )
        return x_out_dot, h_dot, None, None


class GatedResidualAdaLNDualFunction(torch.autograd.Function):
    """Primal and tangent of gated_residual_adaln in one kernel pass."""

    @staticmethod
    def forward(x, x_dot, gate, gate_dot, y, y_dot, shift, shift_dot, scale, scale_dot, eps):
        return ops.gated_residual_adaln_jvp(x, x_dot, gate, gate_dot, y, y_dot, shift, shift_dot, scale, scale_dot, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, gate, _, y, _, _, _, scale, _, _ = inputs
        x_out, x_out_dot, _, h_dot, mean, rstd = output
        ctx.mark_non_differentiable(x_out_dot, h_dot, mean, rstd)
        ctx.save_for_backward(x_out, gate, y, scale, mean, rstd)

    @staticmethod
    def backward(ctx, grad_x_out, _g_xod, grad_h, _g_hd, _g_mean, _g_rstd):
        x_out, gate, y, scale, mean, rstd = ctx.saved_tensors
        dx, dgate, dy, dshift, dscale = ops.gated_residual_adaln_bwd(
            grad_x_out, grad_h, x_out, gate, y, scale, mean, rstd
        )
        return dx, None, dgate, None, dy, None, dshift, None, dscale, None, None


def adaln_modulate(x, shift, scale, eps: float = 1e-6):
    """LayerNorm (no affine) over the last dim, then adaLN modulation.

    out = LayerNorm(x) * (1 + scale) + shift

    Args:
        x: (..., D) float16 / bfloat16 / float32 / float64. Statistics in fp32 (fp64 for fp64).
        shift, scale: (D,), (B, D), (B, 1, D) or x's shape; same dtype and device as x,
            shift and scale of one shape.
        eps: added to the variance inside the square root.
    Returns:
        out: (..., D), like x. Differentiable, and correct under torch.func.jvp and
        torch.autograd.forward_ad (tangent from one fused pass).
    """
    dual = dual_inputs(x, shift, scale)
    if dual is not None:  # forward-mode AD: primal and tangent in one pass
        (x, shift, scale), (x_dot, shift_dot, scale_dot) = dual
        out, out_dot = adaln_modulate_dual(x, x_dot, shift, shift_dot, scale, scale_dot, eps)
        return make_duals((out,), (out_dot,), "adaln_modulate", (x, shift, scale))[0]
    if not needs_grad(x, shift, scale):
        return ops.adaln_modulate_fwd(x, shift, scale, eps)[0]
    if torch.compiler.is_compiling():  # Dynamo refuses Functions that define jvp
        return _AdaLNModulateBase.apply(x, shift, scale, eps)[0]
    return AdaLNModulateFunction.apply(x, shift, scale, eps)[0]


def gated_residual_adaln(x, gate, y, shift, scale, eps: float = 1e-6):
    """Gated residual, then LayerNorm and adaLN modulation of the result, in one pass.

    x_out = x + gate * y
    h     = LayerNorm(x_out) * (1 + scale) + shift

    The fusion between the two halves of a DiT block (attention residual, then norm2) and
    between block i and block i+1 (MLP residual, then norm1).

    Args:
        x, y: (..., D), same shape and dtype.
        gate, shift, scale: (D,), (B, D), (B, 1, D) or x's shape (shift and scale alike).
    Returns:
        (x_out, h): both (..., D), both differentiable.
    """
    dual = dual_inputs(x, gate, y, shift, scale)
    if dual is not None:  # forward-mode AD: primal and tangent in one pass
        (x, gate, y, shift, scale), (xd, gd, yd, shd, scd) = dual
        x_out, x_out_dot, h, h_dot = gated_residual_adaln_dual(x, xd, gate, gd, y, yd, shift, shd, scale, scd, eps)
        return make_duals((x_out, h), (x_out_dot, h_dot), "gated_residual_adaln", (x, gate, y, shift, scale))
    if not needs_grad(x, gate, y, shift, scale):
        x_out, h, _, _ = ops.gated_residual_adaln_fwd(x, gate, y, shift, scale, eps)
        return x_out, h
    fn = _GatedResidualAdaLNBase if torch.compiler.is_compiling() else GatedResidualAdaLNFunction
    x_out, h, _, _ = fn.apply(x, gate, y, shift, scale, eps)
    return x_out, h


def adaln_modulate_dual(x, x_dot, shift, shift_dot, scale, scale_dot, eps: float = 1e-6):
    """adaln_modulate and its tangent in one kernel pass.

    Args:
        x: (..., D); x_dot: tangent of x, same shape, or None (zero).
        shift, scale: as in adaln_modulate; shift_dot, scale_dot: their tangents or None.
    Returns:
        (out, out_dot): out differentiable w.r.t. x, shift, scale; out_dot a plain tensor
        (tangents are treated as constants: no gradient flows into x_dot, shift_dot, scale_dot).
    """
    if not needs_grad(x, shift, scale):
        out, out_dot, _, _ = ops.adaln_modulate_jvp(x, x_dot, shift, shift_dot, scale, scale_dot, eps)
        return out, out_dot
    out, out_dot, _, _ = AdaLNModulateDualFunction.apply(x, x_dot, shift, shift_dot, scale, scale_dot, eps)
    return out, out_dot


def gated_residual_adaln_dual(x, x_dot, gate, gate_dot, y, y_dot, shift, shift_dot, scale, scale_dot,
                              eps: float = 1e-6):
    """gated_residual_adaln and its tangents in one kernel pass.

    Returns:
        (x_out, x_out_dot, h, h_dot): x_out and h differentiable; the tangents not recorded.
        Any tangent argument may be None (zero); the kernel skips that work.
    """
    args = (x, x_dot, gate, gate_dot, y, y_dot, shift, shift_dot, scale, scale_dot, eps)
    if not needs_grad(x, gate, y, shift, scale):
        x_out, x_out_dot, h, h_dot, _, _ = ops.gated_residual_adaln_jvp(*args)
    else:
        x_out, x_out_dot, h, h_dot, _, _ = GatedResidualAdaLNDualFunction.apply(*args)
    return x_out, x_out_dot, h, h_dot
