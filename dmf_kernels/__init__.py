"""dmf-kernels: fused kernels for forward-mode JVP through diffusion transformers.

Differentiable ops (backward and forward-mode AD through fused kernels):
    adaln_modulate, gated_residual_adaln, gated_residual, rms_norm, gelu_tanh, attention,
    rms_adaln_modulate, gated_residual_rms_adaln, swiglu, rope
Explicit jvp forms (primal + tangent in one pass): dmf_kernels.jvp.<op>, also dmf_kernels.<op>.jvp
DiT modules with a jvp forward: dmf_kernels.nn
Whole models: dmf_kernels.model_jvp (the drop-in for torch.func.jvp), dmf_kernels.patch,
    dmf_kernels.fsdp_forward_ad (a hand-written forward_ad block around FSDP2-sharded modules)
Raw ops: torch.ops.dmf_kernels.<op>_{fwd,bwd,jvp} (C++: RAW_OPS), attention_{fwd,bwd,jvp} (Triton / PyTorch),
    gelu_tanh_jvp (Triton / aten). Each op is declared once with dmf_kernels._op.Op.
"""
from . import _op
from ._extension import build_info
from ._fsdp import fsdp_forward_ad
from ._model_jvp import model_jvp
from .attention import attention
from .gated_residual import gated_residual
from .gelu import gelu_tanh
from .norm_mod import adaln_modulate, gated_residual_adaln, gated_residual_rms_adaln, rms_adaln_modulate
from .rms_norm import rms_norm
from .rope import rope
from .swiglu import swiglu
from . import jvp, nn, reference  # noqa: E402  (after the ops they wrap)
from .patch import patch

RAW_OPS = tuple(_op.CPP_OPS)

__version__ = "0.1.0"

__all__ = [
    "adaln_modulate",
    "attention",
    "gated_residual_adaln",
    "gated_residual",
    "gelu_tanh",
    "rms_norm",
    "model_jvp",
    "fsdp_forward_ad",
    "patch",
    "nn",
    "jvp",
    "reference",
    "build_info",
    "RAW_OPS",
    "rms_adaln_modulate",
    "gated_residual_rms_adaln",
    "rope",
    "swiglu",
]
