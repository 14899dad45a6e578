"""dmf-kernels: fused kernels for forward-mode JVP through diffusion transformers.

Differentiable ops (backward and forward-mode AD through fused kernels):
    adaln_modulate, gated_residual_adaln, gated_residual, rms_norm, gelu_tanh, attention
Explicit dual-stream API (primal + tangent in one pass): dmf_kernels.jvp.*
DiT modules with a dual-stream forward: dmf_kernels.nn
Whole models: dmf_kernels.model_jvp (the drop-in for torch.func.jvp), dmf_kernels.patch
Raw ops: torch.ops.dmf_kernels.<op>_{fwd,bwd,jvp,tangent} (C++), attention_{fwd,bwd,jvp} (Triton / PyTorch),
    gelu_tanh_jvp (Triton / aten)
"""
from . import jvp, nn, reference
from ._library import RAW_OPS, build_info
from ._model_jvp import model_jvp
from .adaln import adaln_modulate, gated_residual_adaln
from .attention import attention
from .gated_residual import gated_residual
from .gelu import gelu_tanh
from .patch import patch
from .rms_norm import rms_norm

__version__ = "0.1.0"

__all__ = [
    "adaln_modulate",
    "attention",
    "gated_residual_adaln",
    "gated_residual",
    "gelu_tanh",
    "rms_norm",
    "model_jvp",
    "patch",
    "nn",
    "jvp",
    "reference",
    "build_info",
    "RAW_OPS",
]
