"""dmf_kernels.patch on real diffusers transformers (tiny configs, random non-zero float64 weights):
the patched model's output, tangent (torch.func.jvp, forward_ad, dmf_kernels.model_jvp) and the
parameter gradients of a MeanFlow-style loss against the unpatched model's, whose JVP runs
under the math SDPA backend (the only PyTorch attention with forward-mode AD)."""
import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel

import dmf_kernels as dk

pytest.importorskip("diffusers", reason="diffusers is not installed (make build installs it: DMF_DEPS)")

from diffusers_models import build  # noqa: E402  (after the skip: it needs diffusers)

# Tolerances relative to the output's size. The float64 models that keep float32 arithmetic in
# diffusers' own code (RMSNorm's mean(x^2), Wan's FP32LayerNorm, Qwen's and Flux's RoPE tables)
# agree to float32 rounding only; ours computes those statistics in float64.
TOL = {"dit": 1e-9, "pixart": 1e-9, "pixart_full_mask": 1e-9, "sd3": 1e-9, "sd3_qk_rms": 1e-5, "flux": 1e-5,
       "wan": 1e-5,
       "qwen_image": 1e-5, "gqa": 1e-5}
NAMES = list(TOL)
def close(a, b, tol, what):
    err = (a - b).abs().max().item()
    scale = max(b.abs().max().item(), 1.0)
    assert err <= tol * scale, f"{what}: max error {err:.3g} (scale {scale:.3g}, tol {tol:g})"
    assert b.abs().max() > 0, f"{what}: the reference is all zeros"


def pair(name, **kw):
    ref, call, x, t = build(name, **kw)
    model = copy.deepcopy(ref)
    report = dk.patch(model)
    return ref, model, call, x, t, report


def ref_jvp(ref, call, x, t, v):
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(lambda x, t: call(ref, x, t), (x, t), (v, torch.ones_like(t)))


_cache = {}


def patched(name):
    if name not in _cache:
        ref, model, call, x, t, report = pair(name)
        v = torch.randn_like(x)
        _cache[name] = ref, model, call, x, t, v, report, ref_jvp(ref, call, x, t, v)
    return _cache[name]


@pytest.mark.parametrize("name", NAMES)
def test_forward_and_tangent_match_unpatched_math_jvp(name):
    ref, model, call, x, t, v, report, (out_ref, dout_ref) = patched(name)
    tol = TOL[name]
    with torch.no_grad():
        close(call(model, x, t), out_ref, tol, "forward")
    out, dout = torch.func.jvp(lambda x, t: call(model, x, t), (x, t), (v, torch.ones_like(t)))
    close(out, out_ref, tol, "torch.func.jvp primal")
    close(dout, dout_ref, tol, "torch.func.jvp tangent")
    with fwAD.dual_level():
        o = call(model, fwAD.make_dual(x, v), fwAD.make_dual(t, torch.ones_like(t)))
        close(fwAD.unpack_dual(o).tangent, dout_ref, tol, "forward_ad tangent")
    out, dout = dk.model_jvp(lambda x, t: call(model, x, t), (x, t), (v, torch.ones_like(t)))
    close(out, out_ref, tol, "model_jvp primal")
    close(dout, dout_ref, tol, "model_jvp tangent")


@pytest.mark.parametrize("name", NAMES)
def test_meanflow_loss_gradients_match(name):
    """loss = |u - stopgrad(v - t du/dt)|^2 (MeanFlow's, with r = 0): the parameter gradients
    flow through the primal of the JVP, the tangent is detached."""
    ref, model, call, x, t, v, report, _ = patched(name)

    def grads(m, jvp):
        m.zero_grad(set_to_none=True)
        u, du = jvp(lambda x, t: call(m, x, t), (x, t), (v, torch.ones_like(t)))
        target = (v - t.view(-1, *[1] * (x.dim() - 1)) * du).detach()
        ((u - target) ** 2).mean().backward()
        return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    with sdpa_kernel(SDPBackend.MATH):
        g_ref = grads(ref, torch.func.jvp)
    for jvp in (torch.func.jvp, dk.model_jvp):
        g = grads(model, jvp)
        assert g.keys() == g_ref.keys()
        flat, flat_ref = torch.cat([g[n].flatten() for n in g]), torch.cat([g_ref[n].flatten() for n in g])
        close(flat, flat_ref, TOL[name], f"parameter gradients ({jvp.__name__})")


@pytest.mark.parametrize("name", NAMES)
def test_patch_keeps_parameters_and_lists_what_it_left(name):
    ref, model, call, x, t, v, report, _ = patched(name)
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert list(sd) == list(sd_ref)
    assert all(torch.equal(sd[k], sd_ref[k]) for k in sd)
    kinds = set(report.patched.values())
    assert kinds & {"attention_backend", "attention_sdpa"}, str(report)
    n_attn = sum(1 for m in model.modules() if hasattr(m, "processor"))
    assert sum(k.startswith("attention") for k in report.patched.values()) == n_attn, str(report)
    assert "gelu_proj" in kinds or "gelu_tanh" in kinds, str(report)
    assert "dmf_kernels.patch: patched" in str(report)
    copy.deepcopy(model)  # patched classes survive a deep copy


def test_patch_swaps_the_expected_kinds():
    assert {"ada_norm_zero", "ada_norm_zero_single", "ada_norm_continuous", "torch_rms_norm", "attention_backend",
            "gelu_proj", "gelu_tanh"} <= set(patched("flux")[6].patched.values())
    assert {"ada_norm_zero", "attention_sdpa", "gelu_proj"} <= set(patched("dit")[6].patched.values())
    assert {"rms_norm", "attention_sdpa"} <= set(patched("sd3_qk_rms")[6].patched.values())
    assert {"rms_norm", "attention_backend", "swiglu", "gelu_proj"} <= set(patched("gqa")[6].patched.values())
    wan = patched("wan")[6]
    assert "attention_backend" in wan.patched.values() and any("FP32LayerNorm" in w for w in wan.skipped.values())


def test_diffusers_own_backend_switches_reach_our_op():
    """model.set_attention_backend("dmf_kernels") and the attention_backend context manager, on an
    unpatched model: torch.func.jvp then goes through (the native CPU backend has no forward AD)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry, attention_backend

    ref, call, x, t = build("flux")
    v = torch.randn_like(x)
    expected = ref_jvp(ref, call, x, t, v)[1]
    dk.patch(copy.deepcopy(ref))  # registers the backend
    old = _AttentionBackendRegistry._active_backend
    try:
        with attention_backend("dmf_kernels"):
            close(torch.func.jvp(lambda x, t: call(ref, x, t), (x, t), (v, torch.ones_like(t)))[1], expected, 1e-5,
                  "attention_backend context")
        ref.set_attention_backend("dmf_kernels")
        close(torch.func.jvp(lambda x, t: call(ref, x, t), (x, t), (v, torch.ones_like(t)))[1], expected, 1e-5,
              "set_attention_backend")
    finally:
        _AttentionBackendRegistry.set_active_backend(old)
