"""Explicit dual-stream API: each function takes primals and tangents and returns
(primal outputs, tangent outputs) from ONE kernel pass.

The primal outputs stay differentiable (backward through the compiled backward kernels);
the tangent outputs are plain tensors, not recorded in autograd, which is what MeanFlow /
DMF training wants for du/dt (it is detached). A tangent given as None means zero and
skips that work (in DMF's decoder blocks the conditioning tangent is always zero).
"""
from .adaln import adaln_modulate_dual as adaln_modulate
from .attention import attention_dual as attention
from .adaln import gated_residual_adaln_dual as gated_residual_adaln
from .gated_residual import gated_residual_dual as gated_residual
from .gelu import gelu_tanh_dual as gelu_tanh
from .rms_norm import rms_norm_dual as rms_norm

__all__ = ["adaln_modulate", "attention", "gated_residual_adaln", "gated_residual", "gelu_tanh", "rms_norm"]
