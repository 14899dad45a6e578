"""dmf_kernels.patch(model): our fused forward (and dual-stream forward) for the DiT blocks of
an existing facebookresearch/DiT-, SiT/REPA- or official-DMF-style model, in place.

What is recognised, by attribute structure (not by class name, so a user's copy of these
codebases is recognised too):
    block        norm1, attn, norm2, mlp, adaLN_modulation = Sequential(SiLU, Linear(D, 6D));
                 norm1/norm2 LayerNorm without affine parameters; forward(x, c)
    attention    qkv = Linear(D, 3D), proj = Linear(D, D), num_heads; q_norm/k_norm absent,
                 Identity, or an RMSNorm with a `scale` of shape (head_dim,) (the official DMF's);
                 attn_drop/proj_drop absent or with p = 0
    mlp          fc1, act = GELU(approximate="tanh"), fc2; drop1/drop2 p = 0; norm absent or Identity
    final layer  norm_final (LayerNorm without affine), linear, adaLN_modulation = Sequential(SiLU,
                 Linear(D, 2D)); forward(x, c)
Each recognised module gets our `forward` and `forward_jvp` as instance methods: parameters,
buffers, state_dict keys, hooks and classes stay as they are; outputs are equal up to
rounding. Anything that looks like one of these but differs (LayerNorm qk-norm, exact GELU,
dropout, affine norms) is left alone and reported, never guessed at. The patched model keeps
working under plain torch.func.jvp / forward_ad (then with the one-pass JVP attention and no
N x N matrices) and runs its dual-stream pass under dmf_kernels.model_jvp.
"""
import types
from dataclasses import dataclass, field

import torch.nn as nn

from . import nn as dnn

__all__ = ["patch", "PatchReport"]


@dataclass
class PatchReport:
    """What patch() did: module name -> kind for the patched ones, name -> reason for the
    modules that looked like a DiT part but were left alone."""

    patched: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)

    def count(self, kind):
        return sum(1 for k in self.patched.values() if k == kind)

    def __str__(self):
        kinds = ("block", "attention", "mlp", "rms_norm", "final_layer")
        lines = ["dmf_kernels.patch: patched " + ", ".join(f"{self.count(k)} {k}" for k in kinds)]
        for name, why in self.skipped.items():
            lines.append(f"  left alone: {name or '<root>'}: {why}")
        return "\n".join(lines)


def _bind(module, kind, methods):
    for name, fn in methods.items():
        setattr(module, name, types.MethodType(fn, module))
    module._dmf_kernels_patched = kind


def _linear(m, d_in, d_out):
    return isinstance(m, nn.Linear) and m.in_features == d_in and m.out_features == d_out


def _no_dropout(module, *names):
    for n in names:
        d = getattr(module, n, None)
        if d is not None and not (isinstance(d, nn.Dropout) and d.p == 0) and not isinstance(d, nn.Identity):
            return f"{n} is {d!r}; dropout is not supported (p must be 0)"
    return None


def _plain_layernorm(m, dim, name):
    if not isinstance(m, nn.LayerNorm) or m.elementwise_affine or tuple(m.normalized_shape) != (dim,):
        return f"{name} is {m!r}; expected LayerNorm({dim}, elementwise_affine=False)"
    return None


def _adaln(m, dim, n, name="adaLN_modulation"):
    if not (isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[0], nn.SiLU) and _linear(m[1], dim, n * dim)):
        return f"{name} is not Sequential(SiLU, Linear({dim}, {n * dim}))"
    return None


def _rms_like(m, head_dim):
    """'identity', 'rms' (patchable RMSNorm) or a reason."""
    if m is None or isinstance(m, nn.Identity):
        return "identity"
    w, eps = getattr(m, "scale", None), getattr(m, "eps", None)
    if "rmsnorm" in type(m).__name__.lower() and isinstance(w, nn.Parameter) and tuple(w.shape) == (head_dim,) \
            and isinstance(eps, float) and not isinstance(getattr(m, "bias", None), nn.Parameter):
        return "rms"
    return f"qk-norm {type(m).__name__} is not an RMSNorm with a ({head_dim},) `scale` and a float eps"


def _attention_reason(m):
    qkv, proj, heads = getattr(m, "qkv", None), getattr(m, "proj", None), getattr(m, "num_heads", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(heads, int):
        return "no qkv Linear or num_heads"
    dim = qkv.in_features
    if not _linear(qkv, dim, 3 * dim) or not _linear(proj, dim, dim) or dim % heads:
        return f"qkv/proj are not Linear({dim}, {3 * dim}) / Linear({dim}, {dim}) with {heads} heads"
    for n in ("q_norm", "k_norm"):
        kind = _rms_like(getattr(m, n, None), dim // heads)
        if kind not in ("identity", "rms"):
            return kind
    return _no_dropout(m, "attn_drop", "proj_drop")


def _mlp_reason(m):
    fc1, act, fc2 = getattr(m, "fc1", None), getattr(m, "act", None), getattr(m, "fc2", None)
    if not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear) or fc1.out_features != fc2.in_features:
        return "fc1/fc2 are not chained Linears"
    if fc1.bias is None or fc2.bias is None:
        return "fc1/fc2 without bias"
    if not (isinstance(act, nn.GELU) and act.approximate == "tanh"):
        return f"act is {act!r}; only GELU(approximate='tanh') is fused"
    norm = getattr(m, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        return f"norm is {norm!r}; expected Identity"
    return _no_dropout(m, "drop1", "drop2", "drop")


def _block_reason(m, patched_children):
    attn, mlp, ada = getattr(m, "attn", None), getattr(m, "mlp", None), getattr(m, "adaLN_modulation", None)
    qkv = getattr(attn, "qkv", None)
    if not isinstance(qkv, nn.Linear):
        return "attn has no qkv Linear"
    dim = qkv.in_features
    for why in (_plain_layernorm(getattr(m, "norm1", None), dim, "norm1"),
                _plain_layernorm(getattr(m, "norm2", None), dim, "norm2"), _adaln(ada, dim, 6)):
        if why:
            return why
    if attn not in patched_children or mlp not in patched_children:
        return "its attn or mlp could not be patched"
    return None


def _final_reason(m):
    lin = getattr(m, "linear", None)
    if not isinstance(lin, nn.Linear):
        return "linear is not a Linear"
    dim = lin.in_features
    return _plain_layernorm(getattr(m, "norm_final", None), dim, "norm_final") or \
        _adaln(getattr(m, "adaLN_modulation", None), dim, 2)


def _looks_like(m):
    has = lambda *names: all(hasattr(m, n) for n in names)  # noqa: E731
    if has("norm1", "attn", "norm2", "mlp", "adaLN_modulation"):
        return "block"
    if has("qkv", "proj"):
        return "attention"
    if has("fc1", "fc2"):
        return "mlp"
    if has("norm_final", "linear", "adaLN_modulation"):
        return "final_layer"
    return None


_METHODS = {
    "rms_norm": dict(forward=dnn.RMSNorm.forward, forward_jvp=dnn.RMSNorm.forward_jvp),
    "attention": dict(forward=dnn.Attention.forward, forward_jvp=dnn.Attention.forward_jvp,
                      _heads=dnn.Attention._heads),
    "mlp": dict(forward=dnn.Mlp.forward, forward_jvp=dnn.Mlp.forward_jvp),
    "block": dict(forward=dnn.DiTBlock.forward, forward_jvp=dnn.DiTBlock.forward_jvp,
                  modulation=dnn.DiTBlock.modulation, modulation_jvp=dnn.DiTBlock.modulation_jvp,
                  body=dnn.DiTBlock.body, body_jvp=dnn.DiTBlock.body_jvp),
    "final_layer": dict(forward=dnn.FinalLayer.forward, forward_jvp=dnn.FinalLayer.forward_jvp,
                        modulation=dnn.FinalLayer.modulation, modulation_jvp=dnn.FinalLayer.modulation_jvp),
}


def _patch_attention(name, m, report):
    for n in ("q_norm", "k_norm"):
        norm = getattr(m, n, None)
        if norm is None:
            setattr(m, n, nn.Identity())
        elif not isinstance(norm, (nn.Identity, dnn.RMSNorm)):
            _bind(norm, "rms_norm", _METHODS["rms_norm"])
            report.patched[f"{name}.{n}"] = "rms_norm"
    if not hasattr(m, "head_dim"):
        m.head_dim = m.qkv.in_features // m.num_heads


def patch(model: nn.Module) -> PatchReport:
    """Swaps in our fused forward and dual-stream forward for the DiT parts of `model`, in place.

    Args:
        model: an nn.Module such as facebookresearch/DiT's DiT, a SiT/REPA model or the
            official DMFT (see the module docstring for what is recognised).
    Returns:
        PatchReport (print it): what was patched and what was left alone, with the reason.
    Raises:
        TypeError if model is not an nn.Module; ValueError if nothing was recognised.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be an nn.Module, got {type(model).__name__}")
    report = PatchReport()
    done = set()
    candidates = [(name, m, _looks_like(m)) for name, m in model.named_modules()]
    # children before parents: a block is patched only when its attention and MLP were
    for kind in ("attention", "mlp", "block", "final_layer"):
        for name, m, k in candidates:
            if k != kind:
                continue
            if isinstance(m, dnn.DualModule):  # built from dmf_kernels.nn: nothing to change
                report.patched[name] = kind
                done.add(m)
                continue
            why = {"attention": _attention_reason, "mlp": _mlp_reason, "final_layer": _final_reason}[kind](m) \
                if kind != "block" else _block_reason(m, done)
            if why:
                report.skipped[name] = why
                continue
            if kind == "attention":
                _patch_attention(name, m, report)
            _bind(m, kind, _METHODS[kind])
            report.patched[name] = kind
            done.add(m)
    if not report.patched:
        detail = "; ".join(f"{n or '<root>'}: {w}" for n, w in report.skipped.items()) or \
            "no module has the attributes of a DiT block (norm1, attn, norm2, mlp, adaLN_modulation), " \
            "attention (qkv, proj), MLP (fc1, fc2) or final layer (norm_final, linear, adaLN_modulation)"
        raise ValueError(f"patch: recognised nothing to patch in {type(model).__name__}: {detail}")
    return report
