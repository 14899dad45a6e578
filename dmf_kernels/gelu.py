"""gelu_tanh: GELU with the tanh approximation (DiT's MLP activation), with its tangent in
one pass.

    g(a)     = 0.5 a (1 + T),  T = tanh(k (a + 0.044715 a^3)),  k = sqrt(2 / pi)
    g_dot    = g'(a) a_dot,    g'(a) = 0.5 (1 + T) + 0.5 a (1 - T^2) k (1 + 3 * 0.044715 a^2)

The primal forward and backward are aten's (already one fused pass each); only the jvp needs a
kernel of ours, the custom op torch.ops.dmf_kernels.gelu_tanh_jvp: Triton on CUDA
(gelu_triton.py), on CPU aten's vectorised gelu and gelu_backward (g_dot = gelu_backward(a_dot, a)).
Eager forward-mode AD would run gelu, then 6 elementwise kernels for g'(a), each reading or
writing a full (B, N, 4D) tensor.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._extension import triton_interpreter
from ._op import Op

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _use_triton(a: Tensor) -> bool:
    if a.dtype == torch.float64:
        return False
    return a.is_cuda or triton_interpreter()


def _check(a, a_dot, op):
    # The raw op's own validation, in the C++ ops' words ("x_dot must have x's shape").
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


@torch.library.custom_op("dmf_kernels::gelu_tanh_jvp", mutates_args=())
def _gelu_tanh_jvp(a: Tensor, a_dot: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(g, g_dot), both contiguous with a's shape; a None tangent gives a zero g_dot."""
    _check(a, a_dot, "gelu_tanh_jvp")
    if a_dot is None:
        g = F.gelu(a, approximate="tanh").contiguous()
        return g, torch.zeros_like(g)
    if _use_triton(a):
        from .gelu_triton import gelu_tanh_jvp

        return gelu_tanh_jvp(a, a_dot)
    g = F.gelu(a, approximate="tanh").contiguous()
    return g, torch.ops.aten.gelu_backward(a_dot, a, approximate="tanh").contiguous()


@_gelu_tanh_jvp.register_fake
def _(a, a_dot):
    return a.new_empty(a.shape), a.new_empty(a.shape)


def _gelu_tanh_backward(s, g):
    return dict(a=torch.ops.aten.gelu_backward(g.g, s.a, approximate="tanh"))


gelu_tanh = Op(
    "gelu_tanh", fwd=lambda a: F.gelu(a, approximate="tanh"), jvp=torch.ops.dmf_kernels.gelu_tanh_jvp,
    inputs=("a",), outputs=("g",), saved=("a",), backward=_gelu_tanh_backward,
    zero_tangents=False,  # dmf_kernels.jvp.gelu_tanh(a, None) -> (g, None): nothing computed
    doc="""GELU, tanh approximation (F.gelu(a, approximate="tanh")).

    Args:
        a: any shape; float16 / bfloat16 / float32 / float64.
    Returns:
        g: like a. Differentiable (aten's gelu backward); under torch.func.jvp / forward_ad (eager
        or compiled) the tangent comes from the one-pass jvp kernel, which saves only a.
    """).fn
