"""dmf_kernels.patch(model) for a diffusers model (a diffusers ModelMixin), in place.

What it does:
    attention   every attention module (diffusers' Attention, or AttentionModuleMixin) whose
                processor dispatches through dispatch_attention_fn gets `_attention_backend =
                "dmf_kernels"` (our backend in diffusers' registry, _diffusers.py): this model only,
                not the process-wide default that model.set_attention_backend also changes. A
                processor that calls F.scaled_dot_product_attention itself (DiT, PixArt, SD3)
                gets the subclass that sends that call to our op. Other processors: left alone.
    modules     swapped for our fused ops (their class becomes a subclass with our forward, as
                patch does for DiT blocks):
                  RMSNorm (diffusers', with or without weight, no bias),
                  torch.nn.RMSNorm (Flux's and Wan's qk-norms)              -> rms_norm
                  AdaLayerNormZero / AdaLayerNormZeroSingle with a LayerNorm without affine
                                                                            -> adaln_modulate
                  AdaLayerNormContinuous with a LayerNorm without affine or
                  an RMSNorm (weight or not)                                -> adaln_modulate /
                                                                               rms_adaln_modulate
                  activations.GELU(approximate="tanh"), nn.GELU(approximate="tanh")
                                                                            -> gelu_tanh
                  activations.SwiGLU (FeedForward's "swiglu")               -> swiglu
                Each falls back to its own forward for a call our op cannot take (mixed dtypes).
    left alone  (listed in the report) FP32LayerNorm and LayerNorms with affine parameters, exact
                GELU, and whatever a block computes inline in its own forward (Wan's, PixArt's and
                SD3's LayerNorm + modulate, RoPE applied to q and k): plain torch code, correct
                under forward-mode AD, only not fused.
Parameters, buffers and state_dict keys never change. Each swapped module is checked first: its
own forward and ours run on one small random input and must agree, else it is left alone.
"""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _diffusers
from ._patch_rules import SELF_CHECK_TOL, object_from_state
from .gelu import gelu_tanh
from .norm_mod import adaln_modulate, rms_adaln_modulate
from .rms_norm import rms_norm
from .swiglu import swiglu

# diffusers' RMSNorm computes mean(x^2) in float32 whatever x's dtype: for a float64 model its
# output agrees with ours (float64 statistics) to about float32 precision only.
_FP32_STATS_TOL = 1e-5


def _base(self):
    return type(self).__mro__[1]


def _same_dtype(*ts):
    return all(t is None or t.dtype == ts[0].dtype for t in ts)


# ------------------------------------------------------------------ our forwards, one per kind

def _rms_norm_forward(self, hidden_states):
    # diffusers' RMSNorm and torch.nn.RMSNorm (whose eps=None means finfo(dtype).eps)
    w = self.weight
    if not _same_dtype(hidden_states, w):
        return _base(self).forward(self, hidden_states)
    if w is None:
        w = torch.ones(hidden_states.shape[-1], dtype=hidden_states.dtype, device=hidden_states.device)
    eps = self.eps if self.eps is not None else torch.finfo(hidden_states.dtype).eps
    return rms_norm(hidden_states, w, eps=eps)


def _ada_zero_forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    if self.emb is not None:
        emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    emb = self.linear(self.silu(emb))
    if not _same_dtype(x, emb):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        return self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None], gate_msa, shift_mlp, scale_mlp, gate_mlp
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
    x = adaln_modulate(x, shift_msa[:, None], scale_msa[:, None], eps=self.norm.eps)
    return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


def _ada_zero_single_forward(self, x, emb=None):
    emb = self.linear(self.silu(emb))
    shift_msa, scale_msa, gate_msa = emb.chunk(3, dim=1)
    if not _same_dtype(x, emb):
        return self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None], gate_msa
    return adaln_modulate(x, shift_msa[:, None], scale_msa[:, None], eps=self.norm.eps), gate_msa


def _ada_continuous_forward(self, x, conditioning_embedding):
    emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
    scale, shift = torch.chunk(emb, 2, dim=1)
    if isinstance(self.norm, nn.LayerNorm):
        return adaln_modulate(x, shift[:, None], scale[:, None], eps=self.norm.eps)
    w = self.norm.weight
    if not _same_dtype(x, w):
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]
    return rms_adaln_modulate(x, shift[:, None], scale[:, None], w, eps=self.norm.eps)


def _gelu_proj_forward(self, hidden_states):
    return gelu_tanh(self.proj(hidden_states))


def _gelu_forward(self, input):
    return gelu_tanh(input)


def _swiglu_forward(self, hidden_states):
    # diffusers' SwiGLU is value * silu(gate) with [value, gate] = proj(x).chunk(2); our swiglu
    # takes silu of the first half: the projection's two row blocks swapped (a copy of the weight,
    # not of the activations; the parameter itself is unchanged and gets its gradient through it)
    w, b = self.proj.weight, self.proj.bias
    h = w.shape[0] // 2
    w = torch.cat([w[h:], w[:h]])
    b = None if b is None else torch.cat([b[h:], b[:h]])
    return swiglu(F.linear(hidden_states, w, b))


_FORWARDS = {"rms_norm": _rms_norm_forward, "torch_rms_norm": _rms_norm_forward,
             "ada_norm_zero": _ada_zero_forward,
             "ada_norm_zero_single": _ada_zero_single_forward, "ada_norm_continuous": _ada_continuous_forward,
             "gelu_proj": _gelu_proj_forward, "gelu_tanh": _gelu_forward, "swiglu": _swiglu_forward}
KINDS = tuple(_FORWARDS) + ("attention_backend", "attention_sdpa")

# ------------------------------------------------------------------ patched classes (pickle, deepcopy)

_CLASSES = {}


def _reduce(self, protocol):
    return _rebuild, (_base(self), self._dmf_kernels_patched, self.__getstate__())


def _rebuild(base, kind, state):
    obj = object_from_state(base, state)
    obj.__class__ = _class(base, kind)
    return obj


def _class(base, kind):
    if (base, kind) not in _CLASSES:
        _CLASSES[base, kind] = type(base.__name__, (base,), dict(
            forward=_FORWARDS[kind], _dmf_kernels_patched=kind, __reduce_ex__=_reduce,
            __module__=base.__module__, __qualname__=base.__qualname__))
    return _CLASSES[base, kind]


# ------------------------------------------------------------------ recognition

def _plain_layernorm(norm):
    return type(norm) is nn.LayerNorm and not norm.elementwise_affine and len(norm.normalized_shape) == 1


def _rms_reason(m):
    if len(m.dim) != 1:
        return f"normalizes over {tuple(m.dim)}; only the last dim is fused"
    if m.bias is not None:
        return "has a bias; our rms_norm has none"
    return None


def _kind(m, d):
    """(kind, None) for a module we swap, (None, reason) for one we recognise but leave alone,
    (None, None) for everything else. d: the diffusers classes."""
    t = type(m)
    if getattr(t, "_dmf_kernels_patched", None):
        return None, None
    if t is d.RMSNorm:
        why = _rms_reason(m)
        return ("rms_norm", None) if not why else (None, why)
    if t is nn.RMSNorm:
        if len(m.normalized_shape) != 1:
            return None, f"normalizes over {tuple(m.normalized_shape)}; only the last dim is fused"
        return "torch_rms_norm", None
    if t in (d.AdaLayerNormZero, d.AdaLayerNormZeroSingle):
        if not _plain_layernorm(m.norm):
            return None, f"its norm is {m.norm!r}; fused: LayerNorm without affine (FP32LayerNorm upcasts)"
        return ("ada_norm_zero" if t is d.AdaLayerNormZero else "ada_norm_zero_single"), None
    if t is d.AdaLayerNormContinuous:
        if _plain_layernorm(m.norm) or (type(m.norm) is d.RMSNorm and not _rms_reason(m.norm)):
            return "ada_norm_continuous", None
        return None, f"its norm is {m.norm!r}; fused: LayerNorm without affine or RMSNorm"
    if t is d.GELU:
        return ("gelu_proj", None) if m.approximate == "tanh" else (None, "exact GELU; fused: approximate='tanh'")
    if t is d.SwiGLU:
        return ("swiglu", None) if type(m.activation) is nn.SiLU else (None, f"activation {m.activation!r}")
    if t is nn.GELU:
        return ("gelu_tanh", None) if m.approximate == "tanh" else (None, "exact GELU; fused: approximate='tanh'")
    if t is d.FP32LayerNorm or (isinstance(m, nn.LayerNorm) and m.elementwise_affine):
        return None, f"{t.__name__} (affine or float32-upcast LayerNorm): not fused, stays torch code"
    return None, None


def _check_inputs(m, kind, rnd):
    if kind == "rms_norm":
        return (rnd(2, 3, m.dim[0]),)
    if kind == "torch_rms_norm":
        return (rnd(2, 3, m.normalized_shape[0]),)
    if kind in ("ada_norm_zero", "ada_norm_zero_single"):
        dim = m.linear.in_features
        if kind == "ada_norm_zero" and m.emb is not None:
            return rnd(2, 3, dim), torch.tensor([1.0, 500.0]), torch.tensor([0, 1]), rnd(1).dtype
        if kind == "ada_norm_zero":
            return rnd(2, 3, dim), None, None, None, rnd(2, dim)
        return rnd(2, 3, dim), rnd(2, dim)
    if kind == "ada_norm_continuous":
        return rnd(2, 3, m.linear.out_features // 2), rnd(2, m.linear.in_features)
    if kind in ("gelu_proj", "swiglu"):
        return (rnd(2, 3, m.proj.in_features),)
    return (rnd(2, 3, 8),)


def _self_check(m, kind):
    """None when the module's own forward and ours agree on a random input, else why not."""
    p = next(m.parameters(), None)
    dtype = p.dtype if p is not None else torch.float32
    device = p.device if p is not None else torch.device("cpu")
    if device.type == "meta":
        return None
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)  # noqa: E731
    args = _check_inputs(m, kind, rnd)
    base, training = type(m), m.training
    m.eval()  # DiT's label embedding drops labels at random in training
    try:
        with torch.no_grad():
            ref = base.forward(m, *args)
            m.__class__ = _class(base, kind)
            ours = m.forward(*args)
    except Exception as e:
        return f"self-check failed to run: {type(e).__name__}: {e}"
    finally:
        m.__class__ = base
        m.train(training)
    ref, ours = (ref, ours) if isinstance(ref, tuple) else ((ref,), (ours,))
    tol = SELF_CHECK_TOL.get(dtype, 1e-4)
    if dtype == torch.float64 and (kind == "rms_norm" or (kind == "ada_norm_continuous" and not
                                                          isinstance(m.norm, nn.LayerNorm))):
        tol = _FP32_STATS_TOL
    for r, o in zip(ref, ours):
        err = (o.double() - r.double()).abs().max().item()
        if not err <= tol * max(r.double().abs().max().item(), 1.0):
            return f"its own forward and ours differ on a random input (max error {err:.3g}); not patched"
    return None


# ------------------------------------------------------------------ patch

def is_diffusers_model(model):
    # A model built from diffusers means diffusers is imported already: no import (seconds) here.
    modeling_utils = sys.modules.get("diffusers.models.modeling_utils")
    return modeling_utils is not None and isinstance(model, modeling_utils.ModelMixin)


def _attention_modules(model):
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    for name, m in model.named_modules():
        if isinstance(m, (Attention, AttentionModuleMixin)) and getattr(m, "processor", None) is not None:
            yield name, m


def patch_diffusers(model, report):
    """Fills `report` (patch.PatchReport); see the module docstring."""
    from diffusers.models import activations, normalization

    class d:  # noqa: N801 - the diffusers classes recognised
        RMSNorm, AdaLayerNormZero, AdaLayerNormZeroSingle = (normalization.RMSNorm, normalization.AdaLayerNormZero,
                                                             normalization.AdaLayerNormZeroSingle)
        AdaLayerNormContinuous, FP32LayerNorm, GELU = (normalization.AdaLayerNormContinuous,
                                                       normalization.FP32LayerNorm, activations.GELU)
        SwiGLU = activations.SwiGLU

    member = _diffusers.register()
    for name, m in _attention_modules(model):
        proc = m.processor
        if hasattr(proc, "_attention_backend"):
            if getattr(proc, "_parallel_config", None) is not None:
                report.skipped[name] = "context parallelism is set; our backend does not support it"
                continue
            proc._attention_backend = member
            report.patched[name] = "attention_backend"
        elif getattr(type(proc), "_dmf_kernels_patched", None):
            report.patched[name] = "attention_sdpa"
        elif _diffusers.uses_sdpa_directly(proc):
            proc.__class__ = _diffusers.processor_class(type(proc))
            report.patched[name] = "attention_sdpa"
        else:
            report.skipped[name] = f"processor {type(proc).__name__} neither dispatches nor calls " \
                                   "F.scaled_dot_product_attention"
            continue
        m._dmf_kernels_patched = report.patched[name]  # dmf_kernels.model_jvp looks for it
    # Submodules of a swapped module (an AdaLayerNormContinuous's RMSNorm) are still swapped on
    # their own: they are called from our forward only in the fallback path, where theirs is right.
    for name, m in model.named_modules():
        kind, why = _kind(m, d)
        if kind is None:
            if why:
                report.skipped[name] = why
            continue
        why = _self_check(m, kind)
        if why:
            report.skipped[name] = why
            continue
        m.__class__ = _class(type(m), kind)
        report.patched[name] = kind
    return report
