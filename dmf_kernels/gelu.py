"""gelu_tanh: GELU with the tanh approximation (DiT's MLP activation), with its tangent in
one pass.

    g(a)     = 0.5 a (1 + T),  T = tanh(k (a + 0.044715 a^3)),  k = sqrt(2 / pi)
    g_dot    = g'(a) a_dot,    g'(a) = 0.5 (1 + T) + 0.5 a (1 - T^2) k (1 + 3 * 0.044715 a^2)

Layers:
    _gelu_tanh_jvp_kernel                    Triton (CUDA): reads a and a_dot once, writes g and g_dot
    torch.ops.dmf_kernels.gelu_tanh_jvp      custom op; on CPU aten's vectorised gelu and
                                             gelu_backward (g_dot = gelu_backward(a_dot, a))
    GeluTanhDualFunction                     g differentiable (aten's gelu_backward), g_dot not recorded
    gelu_tanh(a)                             public; forward-mode AD runs the one-pass kernel
    dmf_kernels.jvp.gelu_tanh(a, a_dot)      explicit dual stream

The primal forward and backward are aten's (already one fused pass each); only the dual
needs a kernel of ours: eager forward-mode AD runs gelu, then 6 elementwise kernels for g'(a),
each reading or writing a full (B, N, 4D) tensor.
"""
import os
from typing import Optional

import torch
from torch import Tensor

from ._library import dual_inputs, make_duals, needs_grad

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _use_triton(a: Tensor) -> bool:
    if a.dtype == torch.float64:
        return False
    return a.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(a, a_dot, op):
    if not isinstance(a, Tensor):
        raise TypeError(f"{op}: a must be a Tensor, got {type(a).__name__}")
    if a.dtype not in _DTYPES:
        raise TypeError(f"{op}: a must be float16, bfloat16, float32 or float64, got {a.dtype}")
    if a_dot is not None:
        if a_dot.shape != a.shape:
            raise ValueError(f"{op}: a_dot must have a's shape {tuple(a.shape)}, got {tuple(a_dot.shape)}")
        if a_dot.dtype != a.dtype or a_dot.device != a.device:
            raise TypeError(f"{op}: a_dot must have a's dtype and device ({a.dtype}, {a.device}), "
                            f"got ({a_dot.dtype}, {a_dot.device})")


def _triton_jvp(a, a_dot):
    from .gelu_triton import gelu_tanh_jvp

    return gelu_tanh_jvp(a, a_dot)


@torch.library.custom_op("dmf_kernels::gelu_tanh_jvp", mutates_args=())
def gelu_tanh_jvp(a: Tensor, a_dot: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(g, g_dot), both contiguous with a's shape; a None tangent gives a zero g_dot."""
    _check(a, a_dot, "gelu_tanh_jvp")
    if a_dot is None:
        g = torch.nn.functional.gelu(a, approximate="tanh").contiguous()
        return g, torch.zeros_like(g)
    if _use_triton(a):
        return _triton_jvp(a, a_dot)
    g = torch.nn.functional.gelu(a, approximate="tanh").contiguous()
    return g, torch.ops.aten.gelu_backward(a_dot, a, approximate="tanh").contiguous()


@gelu_tanh_jvp.register_fake
def _(a, a_dot):
    return a.new_empty(a.shape), a.new_empty(a.shape)


def _gelu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.set_materialize_grads(False)


def _gelu_backward(ctx, grad_g, grad_g_dot):
    if grad_g_dot is not None and not torch.compiler.is_compiling():
        raise RuntimeError("dmf_kernels::gelu_tanh_jvp: g_dot is not differentiable (only g is)")
    if grad_g is None:
        return None, None
    (a,) = ctx.saved_tensors
    return torch.ops.aten.gelu_backward(grad_g, a, approximate="tanh"), None


torch.library.register_autograd("dmf_kernels::gelu_tanh_jvp", _gelu_backward, setup_context=_gelu_setup)


class GeluTanhDualFunction(torch.autograd.Function):
    """(a, a_dot) -> (g, g_dot) in one pass; g differentiable w.r.t. a, g_dot not recorded.
    Saves only a (what aten's own gelu saves)."""

    @staticmethod
    def forward(a, a_dot):
        return torch.ops.dmf_kernels.gelu_tanh_jvp(a, a_dot)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad_g, _grad_g_dot):
        (a,) = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(grad_g, a, approximate="tanh"), None


def gelu_tanh(a: Tensor) -> Tensor:
    """GELU, tanh approximation (F.gelu(a, approximate="tanh")).

    Args:
        a: any shape; float16 / bfloat16 / float32 / float64.
    Returns:
        g: like a. Differentiable; under torch.func.jvp / forward_ad (eager or compiled) the
        tangent comes from the one-pass dual kernel.
    """
    dual = dual_inputs(a)
    if dual is not None:
        (a,), (a_dot,) = dual
        g, g_dot = gelu_tanh_dual(a, a_dot)
        return make_duals((g,), (g_dot,), "gelu_tanh", (a,))[0]
    return torch.nn.functional.gelu(a, approximate="tanh")


def gelu_tanh_dual(a: Tensor, a_dot: Optional[Tensor]):
    """(g, g_dot) in one pass; g differentiable, g_dot not recorded; a None a_dot is zero
    and gives g_dot = None (nothing computed)."""
    if a_dot is None:
        return gelu_tanh(a), None
    if not needs_grad(a):
        return torch.ops.dmf_kernels.gelu_tanh_jvp(a, a_dot)
    return GeluTanhDualFunction.apply(a, a_dot)
