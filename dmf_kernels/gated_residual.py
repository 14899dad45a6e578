"""gated_residual: out = x + gate * y (the adaLN-Zero residual of a DiT block)."""
import torch

from ._library import dual_inputs, make_duals, needs_grad, ops


class _GatedResidualBase(torch.autograd.Function):
    """No jvp: the class torch.compile traces (see _library.dual_inputs)."""

    @staticmethod
    def forward(x, gate, y):
        return ops.gated_residual_fwd(x, gate, y)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, gate, y = inputs
        ctx.save_for_backward(gate, y)
        ctx.save_for_forward(gate, y)

    @staticmethod
    def backward(ctx, grad_out):
        gate, y = ctx.saved_tensors
        dgate, dy = ops.gated_residual_bwd(grad_out, gate, y)
        return grad_out, dgate, dy


class GatedResidualFunction(_GatedResidualBase):
    @staticmethod
    def jvp(ctx, x_dot, gate_dot, y_dot):
        gate, y = ctx.saved_tensors
        return ops.gated_residual_tangent(x_dot, gate, gate_dot, y, y_dot)


class GatedResidualDualFunction(torch.autograd.Function):
    @staticmethod
    def forward(x, x_dot, gate, gate_dot, y, y_dot):
        return ops.gated_residual_jvp(x, x_dot, gate, gate_dot, y, y_dot)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, gate, _, y, _ = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(gate, y)

    @staticmethod
    def backward(ctx, grad_out, _grad_out_dot):
        gate, y = ctx.saved_tensors
        dgate, dy = ops.gated_residual_bwd(grad_out, gate, y)
        return grad_out, None, dgate, None, dy, None


def gated_residual(x, gate, y):
    """out = x + gate * y.

    Args:
        x, y: (..., D), same shape and dtype.
        gate: (D,), (B, D) (per sample, broadcast over tokens), (B, 1, D) or x's shape.
    Returns:
        out: (..., D), differentiable, correct under torch.func.jvp / forward_ad.
    """
    dual = dual_inputs(x, gate, y)
    if dual is not None:  # forward-mode AD: primal and tangent in one pass
        (x, gate, y), (xd, gd, yd) = dual
        out, out_dot = gated_residual_dual(x, xd, gate, gd, y, yd)
        return make_duals((out,), (out_dot,), "gated_residual", (x, gate, y))[0]
    if not needs_grad(x, gate, y):
        return ops.gated_residual_fwd(x, gate, y)
    fn = _GatedResidualBase if torch.compiler.is_compiling() else GatedResidualFunction
    return fn.apply(x, gate, y)


def gated_residual_dual(x, x_dot, gate, gate_dot, y, y_dot):
    """(out, out_dot) in one pass; out differentiable, out_dot not recorded; None tangents are zero."""
    if not needs_grad(x, gate, y):
        return ops.gated_residual_jvp(x, x_dot, gate, gate_dot, y, y_dot)
    out, out_dot = GatedResidualDualFunction.apply(x, x_dot, gate, gate_dot, y, y_dot)
    return out, out_dot
