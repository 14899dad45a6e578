"""dmf-kernels: fused kernels for forward-mode JVP through diffusion transformers.

Differentiable ops (backward and forward-mode AD through fused kernels):
    adaln_modulate, gated_residual_adaln, gated_residual, rms_norm, attention
Explicit dual-stream API (primal + tangent in one pass): dmf_kernels.jvp.*
Raw ops: torch.ops.dmf_kernels.<op>_{fwd,bwd,jvp,tangent} (C++), attention_{fwd,bwd,jvp} (Triton / PyTorch)
"""
from . import jvp, reference
from ._library import RAW_OPS, build_info
from .adaln import adaln_modulate, gated_residual_adaln
from .attention import attention
from .gated_residual import gated_residual
from .rms_norm import rms_norm

__version__ = "0.1.0"

__all__ = [
    "adaln_modulate",
    "attention",
    "gated_residual_adaln",
    "gated_residual",
    "rms_norm",
    "jvp",
    "reference",
    "build_info",
    "RAW_OPS",
]
