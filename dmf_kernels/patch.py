"""dmf_kernels.patch(model): our fused forward (and jvp forward) for the DiT blocks of
an existing facebookresearch/DiT-, SiT/REPA- or official-DMF-style model, in place.

What is recognised, by attribute structure (not by class name, so a user's copy of these
codebases is recognised too), including hustvl/LightningDiT's blocks in every flag combination:
    block        norm1, attn, norm2, mlp, adaLN_modulation = Sequential(SiLU, Linear(D, 6D)), or
                 Linear(D, 4D) with `wo_shift = True`; norm1/norm2 LayerNorm without affine
                 parameters or an RMSNorm with a (D,) `weight`; forward(x, c) or
                 forward(x, c, feat_rope)
    attention    qkv = Linear(D, 3D), proj = Linear(D, D), num_heads; q_norm/k_norm absent,
                 Identity, an RMSNorm with a `scale` (the official DMF's) or a `weight`
                 (LightningDiT's) of shape (head_dim,), or LayerNorm(head_dim) with weight and
                 bias; attn_drop/proj_drop absent or with p = 0; forward(x) or forward(x, rope)
    mlp          fc1, act = GELU(approximate="tanh"), fc2; drop1/drop2 p = 0; norm absent or
                 Identity. Or SwiGLU: w12 = Linear(D, 2H), w3 = Linear(H, D) (LightningDiT's)
    final layer  norm_final (LayerNorm without affine or RMSNorm with weight), linear,
                 adaLN_modulation = Sequential(SiLU, Linear(D, 2D)); forward(x, c)
    rope         a module with `freqs_cos`, `freqs_sin` buffers of shape (N, head_dim) computing
                 t * freqs_cos + rotate_half(t) * freqs_sin (LightningDiT's
                 VisionRotaryEmbeddingFast): not changed, only checked, so that the patched
                 attention rotates q and k with its tables inside the attention kernels
Each recognised module's class becomes a subclass of its own class with our `forward` and
`forward_jvp` (isinstance, parameters, buffers and state_dict keys are unchanged; the model
still deep-copies and pickles). Before a module is patched, its own forward and ours run on
one small random input and must agree. Anything that looks like one of these but differs
(LayerNorm qk-norm, exact GELU, dropout, affine norms, extra submodules or parameters, a
different formula, forward hooks on the submodules our forward bypasses) is left alone and
reported, never guessed at; the attention and MLP of a block left alone keep their own forward
too, so a patched model always runs as before. `@torch.compile` decorators on the original
forwards do not matter (the self-check runs the undecorated function; patched modules run
ours); other modules with a decorated forward (LightningDiT's embedders) run it undecorated,
because forward-mode AD does not go through torch.compile (listed in the report). Hooks on the patched modules themselves still run. The patched model keeps
working under plain torch.func.jvp / forward_ad (then with the one-pass JVP attention and no
N x N matrices) and runs its jvp pass under dmf_kernels.model_jvp.
"""
import inspect
from dataclasses import dataclass, field
from types import FunctionType

import torch
import torch.nn as nn

from . import nn as dnn

__all__ = ["patch", "PatchReport"]


@dataclass
class PatchReport:
    """What patch() did: module name -> kind for the patched ones, name -> reason for the
    modules that looked like a DiT part but were left alone, and the modules whose
    `@torch.compile`d forward now runs undecorated."""

    patched: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    uncompiled: list = field(default_factory=list)

    def count(self, kind):
        return sum(1 for k in self.patched.values() if k == kind)

    def __str__(self):
        kinds = ("block", "attention", "mlp", "swiglu_mlp", "rms_norm", "layer_norm", "final_layer", "rope")
        lines = ["dmf_kernels.patch: patched " + ", ".join(f"{self.count(k)} {k}" for k in kinds)]
        for name, why in self.skipped.items():
            lines.append(f"  left alone: {name or '<root>'}: {why}")
        if self.uncompiled:
            lines.append(f"  @torch.compile removed (forward-mode AD does not go through it): {', '.join(self.uncompiled)}")
        return "\n".join(lines)


_PATCHED_CLASSES = {}


def _patched_class(base, kind):
    """A subclass of the module's own class with our methods: isinstance, parameters, buffers
    and state_dict are unchanged, and (unlike methods bound on the instance) it pickles: the
    instance reduces to (its original class, its state), re-patched on load."""
    key = (base, kind)
    if key not in _PATCHED_CLASSES:
        methods = {"forward": _undecorated(base.forward)} if kind == "uncompiled" else _methods(kind)
        ns = dict(methods, _dmf_kernels_patched=kind, __reduce_ex__=_reduce_patched,
                  __module__=base.__module__, __qualname__=base.__qualname__)
        _PATCHED_CLASSES[key] = type(base.__name__, (base,), ns)
    return _PATCHED_CLASSES[key]


def _reduce_patched(self, protocol):
    base = type(self).__mro__[1]
    return _rebuild_patched, (base, self._dmf_kernels_patched, self.__getstate__())


def _rebuild_patched(base, kind, state):
    obj = base.__new__(base)
    if hasattr(obj, "__setstate__"):
        obj.__setstate__(state)
    else:
        obj.__dict__.update(state)
    obj.__class__ = _patched_class(base, kind)
    return obj


def _bind(module, kind):
    module.__class__ = _patched_class(type(module), kind)


def _unpatch(module):
    """Puts a patched module back to its own class (and an attention's qk-norms and head_dim)."""
    undo = module.__dict__.pop("_dmf_kernels_undo", None)
    module.__class__ = type(module).__mro__[1]
    if undo is not None:
        undo()


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


def _is_rms(m, dim):
    """An RMSNorm with a (dim,) `scale` (official DMF) or `weight` (LightningDiT, Llama), a float
    eps and no bias (the self-check confirms the formula)."""
    if m is None or "rmsnorm" not in type(m).__name__.lower():
        return False
    w = getattr(m, "scale", None)
    w = w if isinstance(w, nn.Parameter) else getattr(m, "weight", None)
    return isinstance(w, nn.Parameter) and tuple(w.shape) == (dim,) and isinstance(getattr(m, "eps", None), float) \
        and not isinstance(getattr(m, "bias", None), nn.Parameter)


def _rms_like(m, head_dim):
    """'identity', 'rms' (patchable RMSNorm), 'layer' (LayerNorm with weight and bias) or a reason."""
    if m is None or isinstance(m, nn.Identity):
        return "identity"
    if _is_rms(m, head_dim):
        return "rms"
    if type(m) is nn.LayerNorm and m.elementwise_affine and m.bias is not None and \
            tuple(m.normalized_shape) == (head_dim,):
        return "layer"
    return (f"qk-norm {type(m).__name__} is not an RMSNorm with a ({head_dim},) `scale` or `weight` and a float eps, "
            f"nor LayerNorm({head_dim}) with weight and bias")


def _block_norm_reason(m, dim, name):
    if isinstance(m, nn.LayerNorm):
        return _plain_layernorm(m, dim, name)
    if _is_rms(m, dim):
        return None
    return f"{name} is {m!r}; expected LayerNorm({dim}, elementwise_affine=False) or an RMSNorm with a ({dim},) weight"


def _attention_reason(m):
    qkv, proj, heads = getattr(m, "qkv", None), getattr(m, "proj", None), getattr(m, "num_heads", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(heads, int):
        return "no qkv Linear or num_heads"
    dim = qkv.in_features
    if not _linear(qkv, dim, 3 * dim) or not _linear(proj, dim, dim) or dim % heads:
        return f"qkv/proj are not Linear({dim}, {3 * dim}) / Linear({dim}, {dim}) with {heads} heads"
    for n in ("q_norm", "k_norm"):
        kind = _rms_like(getattr(m, n, None), dim // heads)
        if kind not in ("identity", "rms", "layer"):
            return kind
    return _no_dropout(m, "attn_drop", "proj_drop")


def _mlp_reason(m):
    fc1, act, fc2 = getattr(m, "fc1", None), getattr(m, "act", None), getattr(m, "fc2", None)
    if not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear) or fc1.out_features != fc2.in_features:
        return "fc1/fc2 are not chained Linears"
    if not (isinstance(act, nn.GELU) and act.approximate == "tanh"):
        return f"act is {act!r}; only GELU(approximate='tanh') is fused"
    norm = getattr(m, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        return f"norm is {norm!r}; expected Identity"
    return _no_dropout(m, "drop1", "drop2", "drop")


def _swiglu_reason(m):
    w12, w3 = getattr(m, "w12", None), getattr(m, "w3", None)
    if not isinstance(w12, nn.Linear) or not isinstance(w3, nn.Linear) or w12.out_features != 2 * w3.in_features:
        return "w12/w3 are not Linear(D, 2H) / Linear(H, D)"
    return None


def _block_reason(m, patched_children):
    attn, mlp, ada = getattr(m, "attn", None), getattr(m, "mlp", None), getattr(m, "adaLN_modulation", None)
    qkv = getattr(attn, "qkv", None)
    if not isinstance(qkv, nn.Linear):
        return "attn has no qkv Linear"
    dim = qkv.in_features
    wo_shift = getattr(m, "wo_shift", False) is True
    for why in (_block_norm_reason(getattr(m, "norm1", None), dim, "norm1"),
                _block_norm_reason(getattr(m, "norm2", None), dim, "norm2"), _adaln(ada, dim, 4 if wo_shift else 6)):
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
    return _block_norm_reason(getattr(m, "norm_final", None), dim, "norm_final") or \
        _adaln(getattr(m, "adaLN_modulation", None), dim, 2)


# Submodules each kind may have (anything else, e.g. timm's scale-norm `norm` in attention,
# is an operation our forward would drop) and whether direct parameters are allowed (none:
# BEiT-style q_bias / v_bias would be dropped too).
_CHILDREN = {
    "attention": {"qkv", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop"},
    "mlp": {"fc1", "act", "drop1", "norm", "fc2", "drop2", "drop"},
    "swiglu_mlp": {"w12", "w3"},
    "block": {"norm1", "attn", "norm2", "mlp", "adaLN_modulation"},
    "final_layer": {"norm_final", "linear", "adaLN_modulation"},
}


def _structure_reason(m, kind):
    extra = sorted(set(dict(m.named_children())) - _CHILDREN[kind])
    if extra:
        return f"unexpected submodules {extra} (our forward would skip them)"
    params = [n for n, _ in m.named_parameters(recurse=False)]
    if params:
        return f"unexpected parameters {params} (our forward would skip them)"
    return None


def _hooks_reason(m):
    # Our forward calls F.linear and the fused ops directly, so hooks on the submodules it
    # bypasses would not run (legacy weight_norm and pruning recompute weights in pre-hooks).
    for name, sub in m.named_modules():
        if name and (sub._forward_pre_hooks or sub._forward_hooks):
            return f"{name} has forward hooks, which the fused forward would bypass"
    return None


_SELF_CHECK_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 6e-2}


def _undecorated(fn):
    """The function under a `@torch.compile` decorator (LightningDiT compiles its forwards): the
    self-check compares formulas, and compiling a copy of every block on the CPU would take minutes."""
    return getattr(fn, "_torchdynamo_orig_callable", fn)


def _takes_second_input(fn, n_inputs):
    """Whether forward(self, *inputs) also takes a rope argument after its n_inputs inputs."""
    try:
        return len(inspect.signature(_undecorated(fn)).parameters) > n_inputs + 1
    except (TypeError, ValueError):
        return False


def _self_check_reason(m, kind, original_forward, rope=None):
    """Runs the module's own forward and ours on one small random input (no grad) and refuses
    the patch when they differ: structure alone cannot tell e.g. a (1 + scale) RMSNorm from a
    scale RMSNorm. Relative tolerance per dtype; a wrong formula is off by O(1). With `rope` (a
    checked rotary embedding of the model) attention and blocks whose forward takes it are
    checked with it too, on its N tokens."""
    p = next(m.parameters(), None)
    if p is None or p.device.type == "meta":
        return None
    original_forward = _undecorated(original_forward)
    dtype, device = p.dtype, p.device
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)  # noqa
    if kind == "rms_norm":
        calls = [(rnd(2, 3, dnn.rms_gain(m).shape[0]),)]
    elif kind == "layer_norm":
        calls = [(rnd(2, 3, m.normalized_shape[0]),)]
    elif kind == "mlp":
        calls = [(rnd(2, 3, m.fc1.in_features),)]
    elif kind == "swiglu_mlp":
        calls = [(rnd(2, 3, m.w12.in_features),)]
    elif kind == "attention":
        calls = [(rnd(2, 5, m.qkv.in_features),)]
        if rope is not None and _takes_second_input(original_forward, 1):
            calls.append((rnd(2, rope.freqs_cos.shape[0], m.qkv.in_features), rope))
    else:
        dim = m.attn.qkv.in_features if kind == "block" else m.linear.in_features
        calls = [(rnd(2, 5, dim), rnd(2, dim))]
        if kind == "block" and rope is not None and _takes_second_input(original_forward, 2):
            calls.append((rnd(2, rope.freqs_cos.shape[0], dim), rnd(2, dim), rope))
    base = type(m)
    for args in calls:
        with torch.no_grad():
            try:
                try:
                    ref = original_forward(m, *args)
                except RuntimeError:
                    if kind not in ("block", "final_layer"):
                        raise
                    args = (args[0], args[1][:, None], *args[2:])  # a (B, 1, D) conditioning (the official DMF's)
                    ref = original_forward(m, *args)
                m.__class__ = _patched_class(base, kind)
                ours = m.forward(*args)
            except Exception as e:  # e.g. a forward with a different signature
                return f"self-check failed to run: {type(e).__name__}: {e}"
            finally:
                m.__class__ = base
        err = (ours.double() - ref.double()).abs().max().item()
        scale = max(ref.double().abs().max().item(), 1.0)
        if not err <= _SELF_CHECK_TOL.get(dtype, 1e-4) * scale:
            what = " with the model's rotary embedding" if len(args) > (1 if kind == "attention" else 2) else ""
            return f"its own forward and ours differ on a random input{what} (max error {err:.3g}); not patched"
    return None


def _rope_reason(m):
    """A rotary embedding module (freqs_cos, freqs_sin buffers) must compute LightningDiT's
    t * cos + rotate_half(t) * sin (interleaved pairs) with those tables; checked on a random input."""
    cos, sin = getattr(m, "freqs_cos", None), getattr(m, "freqs_sin", None)
    if not (isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor) and cos.dim() == 2
            and cos.shape == sin.shape and cos.shape[1] % 2 == 0):
        return "freqs_cos / freqs_sin are not two (N, head_dim) tables with an even head_dim"
    g = torch.Generator(device="cpu").manual_seed(0)
    t = torch.randn(2, 2, *cos.shape, generator=g).to(device=cos.device, dtype=cos.dtype)
    pairs = t.double().reshape(*t.shape[:-1], -1, 2)
    rot = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).reshape(t.shape)
    ref = t.double() * cos.double() + rot * sin.double()
    with torch.no_grad():
        try:
            out = _undecorated(type(m).forward)(m, t)
        except Exception as e:
            return f"self-check failed to run: {type(e).__name__}: {e}"
    err = (out.double() - ref).abs().max().item()
    if not err <= _SELF_CHECK_TOL.get(cos.dtype, 1e-4) * max(ref.abs().max().item(), 1.0):
        return f"its forward is not t * freqs_cos + rotate_half(t) * freqs_sin (max error {err:.3g})"
    return None


def _looks_like(m):
    has = lambda *names: all(hasattr(m, n) for n in names)  # noqa: E731
    if has("norm1", "attn", "norm2", "mlp", "adaLN_modulation"):
        return "block"
    if has("qkv", "proj"):
        return "attention"
    if has("fc1", "fc2"):
        return "mlp"
    if has("w12", "w3"):
        return "swiglu_mlp"
    if has("norm_final", "linear", "adaLN_modulation"):
        return "final_layer"
    return None


_CLASSES = {"rms_norm": dnn.RMSNorm, "layer_norm": dnn.LayerNorm, "attention": dnn.Attention, "mlp": dnn.Mlp,
            "swiglu_mlp": dnn.SwiGLUFFN, "block": dnn.DiTBlock, "final_layer": dnn.FinalLayer}


def _methods(kind):
    """Every method our class of this kind defines or inherits from dmf_kernels.nn (not from
    nn.Module), so a helper method added there reaches patched models without a list to keep."""
    cls = _CLASSES[kind]
    mro = cls.__mro__[:cls.__mro__.index(nn.Module)]
    return {k: v for c in reversed(mro) for k, v in vars(c).items()
            if not (k.startswith("__") and k.endswith("__")) and isinstance(v, (FunctionType, staticmethod))}


def _prepare_attention(name, m, report, rope=None):
    """Patches q_norm / k_norm first (the attention's self-check runs through them) and gives m a
    head_dim. Returns (reason or None, undo): undo puts m, its norms and the report back as they
    were, for when a norm's or the attention's own self-check fails (a module left alone must
    stay exactly as it was)."""
    state, modules, rebound = dict(m.__dict__), dict(m._modules), []

    def undo():
        for norm, cls, key in rebound:
            norm.__class__ = cls
            report.patched.pop(key, None)
        m.__dict__.clear()
        m.__dict__.update(state)
        m._modules.clear()
        m._modules.update(modules)

    for n in ("q_norm", "k_norm"):
        norm = getattr(m, n, None)
        if norm is None:
            setattr(m, n, nn.Identity())
        elif not isinstance(norm, (nn.Identity, dnn.JvpModule)) and not getattr(norm, "_dmf_kernels_patched", None):
            kind = "layer_norm" if isinstance(norm, nn.LayerNorm) else "rms_norm"
            why = _self_check_reason(norm, kind, type(norm).forward)
            if why:
                undo()
                return f"{n}: {why}", undo
            rebound.append((norm, type(norm), f"{name}.{n}"))
            _bind(norm, kind)
            report.patched[f"{name}.{n}"] = kind
    if not hasattr(m, "head_dim"):
        m.head_dim = m.qkv.in_features // m.num_heads
    return None, undo


def patch(model: nn.Module) -> PatchReport:
    """Swaps in our fused forward and jvp forward for the DiT parts of `model`, in place.

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
    # Rotary embeddings first: the attention and block self-checks run with them. One that is
    # not LightningDiT's rotation leaves every attention alone (our attention would rotate q
    # and k with its tables instead of calling it).
    ropes, bad_rope = [], None
    for name, m in model.named_modules():
        if hasattr(m, "freqs_cos") and hasattr(m, "freqs_sin"):
            why = _rope_reason(m)
            if why:
                report.skipped[name] = why
                bad_rope = bad_rope or name
            else:
                m._dmf_kernels_rope_checked = True
                report.patched[name] = "rope"
                ropes.append(m)
    rope = ropes[0] if len(ropes) == 1 else None
    # children before parents: a block is patched only when its attention and MLP were
    for kind in ("attention", "mlp", "swiglu_mlp", "block", "final_layer"):
        for name, m, k in candidates:
            if k != kind:
                continue
            if isinstance(m, dnn.JvpModule):  # built from dmf_kernels.nn: nothing to change
                report.patched[name] = kind
                done.add(m)
                continue
            if kind == "attention" and bad_rope is not None:
                report.skipped[name] = f"the model's rotary embedding {bad_rope} is not recognised"
                continue
            why = {"attention": _attention_reason, "mlp": _mlp_reason, "swiglu_mlp": _swiglu_reason,
                   "final_layer": _final_reason}[kind](m) if kind != "block" else _block_reason(m, done)
            why = why or _structure_reason(m, kind) or _hooks_reason(m)
            undo = None
            if not why and kind == "attention":
                why, undo = _prepare_attention(name, m, report)
            if not why:
                why = _self_check_reason(m, kind, type(m).forward, rope)
                if why and undo is not None:
                    undo()
            if why:
                report.skipped[name] = why
                continue
            _bind(m, kind)
            report.patched[name] = kind
            done.add(m)
            if kind == "attention":
                m._dmf_kernels_undo = undo
    # The attention and MLP of a block left alone keep their own forward: the block's own forward
    # calls them with its own arguments (e.g. LightningDiT's rope=), which ours might not take.
    for name, m, k in candidates:
        if k == "block" and name in report.skipped:
            for child_name in ("attn", "mlp"):
                child = getattr(m, child_name, None)
                if child is not None and child in done and not isinstance(child, dnn.JvpModule):
                    _unpatch(child)
                    done.discard(child)
                    key = f"{name}.{child_name}" if name else child_name
                    report.patched.pop(key, None)
                    report.skipped[key] = f"its block {name or '<root>'} was left alone"
    for m in done:
        m.__dict__.pop("_dmf_kernels_undo", None)
    # Forward-mode AD does not go through torch.compile'd functions (PyTorch raises "You must
    # implement the jvp function"): other modules whose forward is decorated (LightningDiT's
    # timestep and label embedders) run their undecorated forward, the same formula.
    for name, m in model.named_modules():
        if m not in done and not getattr(type(m), "_dmf_kernels_patched", None) and \
                hasattr(type(m).forward, "_torchdynamo_orig_callable"):
            _bind(m, "uncompiled")
            report.uncompiled.append(name)
    if not report.patched:
        detail = "; ".join(f"{n or '<root>'}: {w}" for n, w in report.skipped.items()) or \
            "no module has the attributes of a DiT block (norm1, attn, norm2, mlp, adaLN_modulation), " \
            "attention (qkv, proj), MLP (fc1, fc2) or final layer (norm_final, linear, adaLN_modulation)"
        raise ValueError(f"patch: recognised nothing to patch in {type(model).__name__}: {detail}")
    return report
