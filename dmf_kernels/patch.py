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

from . import _fsdp
from . import _patch_diffusers
from . import _patch_rules as rules
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
        extra = tuple(sorted(set(self.patched.values()) - set(kinds)))  # a diffusers model's kinds
        if extra:
            kinds = tuple(k for k in kinds if self.count(k)) + extra
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
        methods = {"forward": rules.undecorated(base.forward)} if kind == "uncompiled" else _methods(kind)
        ns = dict(methods, _dmf_kernels_patched=kind, __reduce_ex__=_reduce_patched,
                  __module__=base.__module__, __qualname__=base.__qualname__)
        _PATCHED_CLASSES[key] = type(base.__name__, (base,), ns)
    return _PATCHED_CLASSES[key]


def _reduce_patched(self, protocol):
    base = type(self).__mro__[1]
    return _rebuild_patched, (base, self._dmf_kernels_patched, self.__getstate__())


def _rebuild_patched(base, kind, state):
    obj = rules.object_from_state(base, state)
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


def _takes_second_input(fn, n_inputs):
    """Whether forward(self, *inputs) also takes a rope argument after its n_inputs inputs."""
    try:
        return len(inspect.signature(rules.undecorated(fn)).parameters) > n_inputs + 1
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
    original_forward = rules.undecorated(original_forward)
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
        if not err <= rules.SELF_CHECK_TOL.get(dtype, 1e-4) * scale:
            what = " with the model's rotary embedding" if len(args) > (1 if kind == "attention" else 2) else ""
            return f"its own forward and ours differ on a random input{what} (max error {err:.3g}); not patched"
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
            official DMFT (see the module docstring for what is recognised), or a diffusers
            transformer (a diffusers ModelMixin: see _patch_diffusers.py).
    Returns:
        PatchReport (print it): what was patched and what was left alone, with the reason.
    Raises:
        TypeError if model is not an nn.Module; ValueError if nothing was recognised.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be an nn.Module, got {type(model).__name__}")
    if _fsdp.fsdp_units([model]):
        # The self-checks call forwards directly (no FSDP hooks: parameters still sharded) and
        # the patched classes would sit above FSDP's own: patch the plain model, then shard it.
        raise ValueError("patch: the model is already sharded by FSDP2 (fully_shard); call dmf_kernels.patch(model) "
                         "before fully_shard (and before torch.compile)")
    report = PatchReport()
    if _patch_diffusers.is_diffusers_model(model):  # see _patch_diffusers.py
        _patch_diffusers.patch_diffusers(model, report)
        if not report.patched:
            raise ValueError(f"patch: recognised nothing to patch in {type(model).__name__}: " +
                             "; ".join(f"{n or '<root>'}: {w}" for n, w in report.skipped.items()))
        return report
    done = set()
    candidates = [(name, m, rules.looks_like(m)) for name, m in model.named_modules()]
    # Rotary embeddings first: the attention and block self-checks run with them. One that is
    # not LightningDiT's rotation leaves every attention alone (our attention would rotate q
    # and k with its tables instead of calling it).
    ropes, bad_rope = [], None
    for name, m in model.named_modules():
        if hasattr(m, "freqs_cos") and hasattr(m, "freqs_sin"):
            why = rules.rope_reason(m)
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
            why = {"attention": rules.attention_reason, "mlp": rules.mlp_reason, "swiglu_mlp": rules.swiglu_reason,
                   "final_layer": rules.final_reason}[kind](m) if kind != "block" else rules.block_reason(m, done)
            why = why or rules.structure_reason(m, kind) or rules.instance_forward_reason(m) or rules.hooks_reason(m)
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
