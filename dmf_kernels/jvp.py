"""Explicit jvp forms: each function takes primals and tangents and returns the primal outputs,
each followed by its tangent, from ONE kernel pass (e.g. `(out, out_dot)`).

The primal outputs stay differentiable (backward through the compiled backward kernels);
the tangent outputs are plain tensors, not recorded in autograd, which is what MeanFlow /
DMF training wants for du/dt (it is detached). A tangent given as None means zero and
skips that work (in DMF's decoder blocks the conditioning tangent is always zero).
Each is also reachable as `dmf_kernels.<op>.jvp`.
"""
from .attention import attention as _attention
from .gated_residual import gated_residual as _gated_residual
from .gelu import gelu_tanh as _gelu_tanh
from .norm_mod import adaln_modulate as _adaln_modulate, gated_residual_adaln as _gated_residual_adaln
from .rms_norm import rms_norm as _rms_norm
from .norm_mod import rms_adaln_modulate as _rms_adaln_modulate, gated_residual_rms_adaln as _gated_residual_rms_adaln
from .rope import rope as _rope
from .swiglu import swiglu as _swiglu

adaln_modulate = _adaln_modulate.jvp
attention = _attention.jvp
gated_residual_adaln = _gated_residual_adaln.jvp
gated_residual = _gated_residual.jvp
gelu_tanh = _gelu_tanh.jvp
rms_norm = _rms_norm.jvp
rms_adaln_modulate = _rms_adaln_modulate.jvp
gated_residual_rms_adaln = _gated_residual_rms_adaln.jvp
rope = _rope.jvp
swiglu = _swiglu.jvp

__all__ = ["adaln_modulate", "attention", "gated_residual_adaln", "gated_residual", "gelu_tanh", "rms_norm",
           "rms_adaln_modulate", "gated_residual_rms_adaln", "rope", "swiglu"]
