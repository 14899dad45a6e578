"""What dmf_kernels.patch recognises, by attribute structure: one `*_reason(module)` per kind
(None when it looks patchable, else why not), the rotary-embedding check, and the module kinds.
The formula itself is confirmed by patch's self-check on a random input."""
import torch
import torch.nn as nn

SELF_CHECK_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 6e-2}

def linear(m, d_in, d_out):
    return isinstance(m, nn.Linear) and m.in_features == d_in and m.out_features == d_out


def no_dropout(module, *names):
    for n in names:
        d = getattr(module, n, None)
        if d is not None and not (isinstance(d, nn.Dropout) and d.p == 0) and not isinstance(d, nn.Identity):
            return f"{n} is {d!r}; dropout is not supported (p must be 0)"
    return None


def plain_layernorm(m, dim, name):
    if not isinstance(m, nn.LayerNorm) or m.elementwise_affine or tuple(m.normalized_shape) != (dim,):
        return f"{name} is {m!r}; expected LayerNorm({dim}, elementwise_affine=False)"
    return None


def adaln(m, dim, n, name="adaLN_modulation"):
    if not (isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[0], nn.SiLU) and linear(m[1], dim, n * dim)):
        return f"{name} is not Sequential(SiLU, Linear({dim}, {n * dim}))"
    return None


def is_rms(m, dim):
    """An RMSNorm with a (dim,) `scale` (official DMF) or `weight` (LightningDiT, Llama), a float
    eps and no bias (the self-check confirms the formula)."""
    if m is None or "rmsnorm" not in type(m).__name__.lower():
        return False
    w = getattr(m, "scale", None)
    w = w if isinstance(w, nn.Parameter) else getattr(m, "weight", None)
    return isinstance(w, nn.Parameter) and tuple(w.shape) == (dim,) and isinstance(getattr(m, "eps", None), float) \
        and not isinstance(getattr(m, "bias", None), nn.Parameter)


def rms_like(m, head_dim):
    """'identity', 'rms' (patchable RMSNorm), 'layer' (LayerNorm with weight and bias) or a reason."""
    if m is None or isinstance(m, nn.Identity):
        return "identity"
    if is_rms(m, head_dim):
        return "rms"
    if type(m) is nn.LayerNorm and m.elementwise_affine and m.bias is not None and \
            tuple(m.normalized_shape) == (head_dim,):
        return "layer"
    return (f"qk-norm {type(m).__name__} is not an RMSNorm with a ({head_dim},) `scale` or `weight` and a float eps, "
            f"nor LayerNorm({head_dim}) with weight and bias")


def block_norm_reason(m, dim, name):
    if isinstance(m, nn.LayerNorm):
        return plain_layernorm(m, dim, name)
    if is_rms(m, dim):
        return None
    return f"{name} is {m!r}; expected LayerNorm({dim}, elementwise_affine=False) or an RMSNorm with a ({dim},) weight"


def attention_reason(m):
    qkv, proj, heads = getattr(m, "qkv", None), getattr(m, "proj", None), getattr(m, "num_heads", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(heads, int):
        return "no qkv Linear or num_heads"
    dim = qkv.in_features
    if not linear(qkv, dim, 3 * dim) or not linear(proj, dim, dim) or dim % heads:
        return f"qkv/proj are not Linear({dim}, {3 * dim}) / Linear({dim}, {dim}) with {heads} heads"
    for n in ("q_norm", "k_norm"):
        kind = rms_like(getattr(m, n, None), dim // heads)
        if kind not in ("identity", "rms", "layer"):
            return kind
    return no_dropout(m, "attn_drop", "proj_drop")


def mlp_reason(m):
    fc1, act, fc2 = getattr(m, "fc1", None), getattr(m, "act", None), getattr(m, "fc2", None)
    if not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear) or fc1.out_features != fc2.in_features:
        return "fc1/fc2 are not chained Linears"
    if not (isinstance(act, nn.GELU) and act.approximate == "tanh"):
        return f"act is {act!r}; only GELU(approximate='tanh') is fused"
    norm = getattr(m, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        return f"norm is {norm!r}; expected Identity"
    return no_dropout(m, "drop1", "drop2", "drop")


def swiglu_reason(m):
    w12, w3 = getattr(m, "w12", None), getattr(m, "w3", None)
    if not isinstance(w12, nn.Linear) or not isinstance(w3, nn.Linear) or w12.out_features != 2 * w3.in_features:
        return "w12/w3 are not Linear(D, 2H) / Linear(H, D)"
    return None


def block_reason(m, patched_children):
    attn, mlp, ada = getattr(m, "attn", None), getattr(m, "mlp", None), getattr(m, "adaLN_modulation", None)
    qkv = getattr(attn, "qkv", None)
    if not isinstance(qkv, nn.Linear):
        return "attn has no qkv Linear"
    dim = qkv.in_features
    wo_shift = getattr(m, "wo_shift", False) is True
    for why in (block_norm_reason(getattr(m, "norm1", None), dim, "norm1"),
                block_norm_reason(getattr(m, "norm2", None), dim, "norm2"), adaln(ada, dim, 4 if wo_shift else 6)):
        if why:
            return why
    if attn not in patched_children or mlp not in patched_children:
        return "its attn or mlp could not be patched"
    return None


def final_reason(m):
    lin = getattr(m, "linear", None)
    if not isinstance(lin, nn.Linear):
        return "linear is not a Linear"
    dim = lin.in_features
    return block_norm_reason(getattr(m, "norm_final", None), dim, "norm_final") or \
        adaln(getattr(m, "adaLN_modulation", None), dim, 2)


# Submodules each kind may have (anything else, e.g. timm's scale-norm `norm` in attention,
# is an operation our forward would drop) and whether direct parameters are allowed (none:
# BEiT-style q_bias / v_bias would be dropped too).
CHILDREN = {
    "attention": {"qkv", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop"},
    "mlp": {"fc1", "act", "drop1", "norm", "fc2", "drop2", "drop"},
    "swiglu_mlp": {"w12", "w3"},
    "block": {"norm1", "attn", "norm2", "mlp", "adaLN_modulation"},
    "final_layer": {"norm_final", "linear", "adaLN_modulation"},
}


def structure_reason(m, kind):
    extra = sorted(set(dict(m.named_children())) - CHILDREN[kind])
    if extra:
        return f"unexpected submodules {extra} (our forward would skip them)"
    params = [n for n, _ in m.named_parameters(recurse=False)]
    if params:
        return f"unexpected parameters {params} (our forward would skip them)"
    return None


def instance_forward_reason(m):
    """A forward set on the instance (a wrapper's `module.forward = ...`) would shadow the patched
    class's forward: nn.Module.__call__ looks it up on the instance first."""
    if "forward" in vars(m):
        return "its forward is set on the instance (it would shadow ours)"
    return None


def hooks_reason(m):
    # Our forward calls F.linear and the fused ops directly, so hooks on the submodules it
    # bypasses would not run (legacy weight_norm and pruning recompute weights in pre-hooks).
    for name, sub in m.named_modules():
        if name and (sub._forward_pre_hooks or sub._forward_hooks):
            return f"{name} has forward hooks, which the fused forward would bypass"
    return None


def undecorated(fn):
    """The function under a `@torch.compile` decorator (LightningDiT compiles its forwards): the
    self-check compares formulas, and compiling a copy of every block on the CPU would take minutes."""
    return getattr(fn, "_torchdynamo_orig_callable", fn)


def rope_reason(m):
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
            out = undecorated(type(m).forward)(m, t)
        except Exception as e:
            return f"self-check failed to run: {type(e).__name__}: {e}"
    err = (out.double() - ref).abs().max().item()
    if not err <= SELF_CHECK_TOL.get(cos.dtype, 1e-4) * max(ref.abs().max().item(), 1.0):
        return f"its forward is not t * freqs_cos + rotate_half(t) * freqs_sin (max error {err:.3g})"
    return None


def looks_like(m):
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


def object_from_state(base, state):
    """A `base` instance with a pickled patched module's state, before its patched class is
    set: what unpickling a patched module runs (patch.py and _patch_diffusers.py)."""
    obj = base.__new__(base)
    if hasattr(obj, "__setstate__"):
        obj.__setstate__(state)
    else:
        obj.__dict__.update(state)
    return obj
