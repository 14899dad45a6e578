"""rms_norm: RMSNorm with a learnable scale, as used for qk-norm in DiT/DMF attention."""
import torch

from ._library import dual_inputs, make_duals, needs_grad, ops


class _RMSNormBase(torch.autograd.Function):
    """(x, weight, eps) -> (out, rstd); no jvp (traced by torch.compile)."""

    @staticmethod
    def forward(x, weight, eps):
        return ops.rms_norm_fwd(x, weight, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _ = inputs
        _, rstd = output
        ctx.mark_non_differentiable(rstd)
        ctx.save_for_backward(x, weight, rstd)
        ctx.save_for_forward(x, weight, rstd)

    @staticmethod
    def backward(ctx, grad_out, _grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = ops.rms_norm_bwd(grad_out, x, weight, rstd)
        return dx, dweight, None


class RMSNormFunction(_RMSNormBase):
    @staticmethod
    def jvp(ctx, x_dot, weight_dot, _eps_dot):
        x, weight, rstd = ctx.saved_tensors
        return ops.rms_norm_tangent(x, x_dot, weight, weight_dot, rstd), None


class RMSNormDualFunction(torch.autograd.Function):
    @staticmethod
    def forward(x, x_dot, weight, weight_dot, eps):
        return ops.rms_norm_jvp(x, x_dot, weight, weight_dot, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, weight, _, _ = inputs
        _, out_dot, rstd = output
        ctx.mark_non_differentiable(out_dot, rstd)
        ctx.save_for_backward(x, weight, rstd)

    @staticmethod
    def backward(ctx, grad_out, _g_out_dot, _g_rstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = ops.rms_norm_bwd(grad_out, x, weight, rstd)
        return dx, None, dweight, None, None


def rms_norm(x, weight, eps: float = 1e-6):
    """out = x / sqrt(mean(x^2) + eps) * weight, over the last dim.

    Args:
        x: (..., D), e.g. q or k of shape (B, H, N, head_dim); any leading shape.
        weight: (D,), same dtype as x.
    Returns:
        out: (..., D), differentiable, correct under torch.func.jvp / forward_ad.
    """
    dual = dual_inputs(x, weight)
    if dual is not None:  # forward-mode AD: primal and tangent in one pass
        (x, weight), (x_dot, weight_dot) = dual
        out, out_dot = rms_norm_dual(x, x_dot, weight, weight_dot, eps)
        return make_duals((out,), (out_dot,), "rms_norm", (x, weight))[0]
    if not needs_grad(x, weight):
        return ops.rms_norm_fwd(x, weight, eps)[0]
    fn = _RMSNormBase if torch.compiler.is_compiling() else RMSNormFunction
    return fn.apply(x, weight, eps)[0]


def rms_norm_dual(x, x_dot, weight, weight_dot=None, eps: float = 1e-6):
    """(out, out_dot) in one pass; out differentiable, out_dot not recorded; None tangents are zero."""
    if not needs_grad(x, weight):
        out, out_dot, _ = ops.rms_norm_jvp(x, x_dot, weight, weight_dot, eps)
        return out, out_dot
    out, out_dot, _ = RMSNormDualFunction.apply(x, x_dot, weight, weight_dot, eps)
    return out, out_dot
