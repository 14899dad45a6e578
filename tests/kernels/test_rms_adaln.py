"""rms_adaln_modulate and gated_residual_rms_adaln (the RMS kind of the norm_mod family,
LightningDiT's adaLN): forward, backward and JVP against float64 eager references for every
combination of an absent/given shift and weight, parameter layouts, the three-way bound in
fp16/bf16 against LightningDiT's own low-precision computation, compile, NaN, bad input."""
import pytest
import torch

import dmf_kernels as dk
from dmf_kernels import reference as ref
from conftest import (LOW_PRECISION, assert_f64, check_fwd_bwd_f64, check_jvp_f64, check_three_way, mod_param,
                      rand)

ops = torch.ops.dmf_kernels

# (B, N, D): D = 72 (sub-warp teams), 1152 (block per row), 4099 (odd: scalar loads); N = 1, 17.
SHAPES = [(2, 1, 72), (3, 17, 72), (2, 17, 1152), (2, 1, 4099), (1, 17, 4099)]
FORMS = ["BD", "B1D", "BND", "D"]
# (shift given, weight given): LightningDiT uses wo_shift=False/True with its RMSNorm weight.
COMBOS = [(True, True), (True, False), (False, True), (False, False)]
COMBO_IDS = ["shift+weight", "shift", "weight", "neither"]
MOD_NAMES = ["x", "shift", "scale", "weight"]
RES_NAMES = ["x", "gate", "y", "shift", "scale", "weight"]


def mod_inputs(B, N, D, form, device, shift_given, weight_given, dtype=torch.float64):
    x = rand(B, N, D, device=device, dtype=dtype, scale=2.0, offset=0.7, seed=1)
    shift = mod_param(form, B, N, D, device, dtype, seed=2) if shift_given else None
    scale = mod_param(form, B, N, D, device, dtype, seed=3)
    weight = rand(D, device=device, dtype=dtype, scale=0.5, offset=1.0, seed=6) if weight_given else None
    return [x, shift, scale, weight]


def res_inputs(B, N, D, form, device, shift_given, weight_given, gate_form=None, dtype=torch.float64):
    x, shift, scale, weight = mod_inputs(B, N, D, form, device, shift_given, weight_given, dtype)
    gate = mod_param(gate_form or form, B, N, D, device, dtype, seed=4)
    y = rand(B, N, D, device=device, dtype=dtype, seed=5)
    return [x, gate, y, shift, scale, weight]


def present(fn, full, names):
    """fn over the given (non-None) inputs only, those inputs and their names: the shared
    checkers differentiate every argument they pass."""
    mask = [t is not None for t in full]

    def f(*ts):
        it = iter(ts)
        return fn(*[next(it) if m else None for m in mask])

    return f, [t for t in full if t is not None], [n for n, m in zip(names, mask) if m]


def tangents_for(inputs, seed=50):
    return [rand(*t.shape, device=t.device, dtype=t.dtype, seed=seed + i) for i, t in enumerate(inputs)]


def check_all_f64(fn, ref_fn, full, names):
    f, inputs, given = present(fn, full, names)
    r, _, _ = present(ref_fn, full, names)
    check_fwd_bwd_f64(f, r, inputs, given)
    check_jvp_f64(f, r, inputs, tangents_for(inputs))


# ------------------------------------------------------------------ rms_adaln_modulate


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
def test_rms_adaln_modulate_f64(device, shape, combo):
    full = mod_inputs(*shape, "BD", device, *combo)
    check_all_f64(dk.rms_adaln_modulate, ref.rms_adaln_modulate, full, MOD_NAMES)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
def test_rms_adaln_modulate_forms_f64(device, form, combo):
    full = mod_inputs(2, 17, 72, form, device, *combo)
    check_all_f64(dk.rms_adaln_modulate, ref.rms_adaln_modulate, full, MOD_NAMES)


def test_rms_adaln_modulate_large_d_and_eps(device):
    # D = 16384: the CUDA launch with 32 elements per thread; eps given by keyword.
    full = mod_inputs(1, 3, 16384, "BD", device, True, True)
    fn = lambda *a: dk.rms_adaln_modulate(*a, eps=1e-2)  # noqa: E731
    rf = lambda *a: ref.rms_adaln_modulate(*a, eps=1e-2)  # noqa: E731
    check_fwd_bwd_f64(fn, rf, full, MOD_NAMES)


@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
def test_rms_adaln_modulate_gradcheck(device, combo):
    full = [t if t is None else t.requires_grad_() for t in mod_inputs(2, 5, 12, "BD", device, *combo)]
    f, inputs, _ = present(dk.rms_adaln_modulate, full, MOD_NAMES)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, check_batched_grad=False)


@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("tangents", ["all", "x", "params", "weight", "none"])
def test_rms_adaln_modulate_jvp_keywords_f64(device, combo, tangents):
    # The explicit jvp form by keyword (how dmf_kernels.nn calls it), every subset of tangents.
    x, shift, scale, weight = mod_inputs(2, 17, 72, "BD", device, *combo)
    xd, shd, scd, wd = (None if t is None else rand(*t.shape, device=device, seed=60 + i)
                        for i, t in enumerate((x, shift, scale, weight)))
    # letters: x, s(hift), c (scale), w(eight)
    keep = {"all": "xscw", "x": "x", "params": "scw", "weight": "w", "none": ""}[tangents]
    xd, shd, scd, wd = (t if k in keep else None for t, k in zip((xd, shd, scd, wd), "xscw"))
    zero = lambda t, like: None if like is None else (torch.zeros_like(like) if t is None else t)  # noqa: E731
    f, prim, _ = present(ref.rms_adaln_modulate, [x, shift, scale, weight], MOD_NAMES)
    tans = [zero(t, p) for t, p in zip((xd, shd, scd, wd), (x, shift, scale, weight)) if p is not None]
    r_out, r_tan = torch.func.jvp(f, tuple(prim), tuple(tans))
    leaves = [None if t is None else t.clone().requires_grad_() for t in (x, shift, scale, weight)]
    out, out_dot = dk.jvp.rms_adaln_modulate(x=leaves[0], x_dot=xd, shift=leaves[1], shift_dot=shd,
                                             scale=leaves[2], scale_dot=scd, weight=leaves[3], weight_dot=wd)
    assert_f64(out, r_out, "primal")
    assert_f64(out_dot, r_tan, "tangent")
    assert not out_dot.requires_grad
    o2, t2 = dk.rms_adaln_modulate.maybe_jvp(x=x, x_dot=xd, shift=shift, shift_dot=shd, scale=scale,
                                             scale_dot=scd, weight=weight, weight_dot=wd, eps=1e-6)
    assert_f64(o2, r_out, "maybe_jvp primal")
    if all(t is None for t in (xd, shd, scd, wd)):  # e.g. only a weight tangent, and no weight
        assert t2 is None
    else:
        assert_f64(t2, r_tan, "maybe_jvp tangent")
    g = rand(*out.shape, device=device, seed=9)
    given = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, given, g)
    rl = [t.detach().clone().requires_grad_() for t in prim]
    ref_grads = torch.autograd.grad(f(*rl), rl, g)
    for a, b in zip(grads, ref_grads):
        assert_f64(a, b, "grad through the jvp primal")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", [(2, 17, 72), (2, 65, 1152), (1, 17, 4099)], ids=str)
@pytest.mark.parametrize("combo", [(True, True), (False, True), (False, False)], ids=["shift+weight", "weight",
                                                                                      "neither"])
def test_rms_adaln_modulate_low_precision(device, dtype, shape, combo):
    # eager = LightningDiT in `dtype`: RMSNorm in fp32, .type_as(x) * weight, modulate in dtype.
    full = mod_inputs(*shape, "BD", device, *combo)
    f, inputs, names = present(dk.rms_adaln_modulate, full, MOD_NAMES)
    r, _, _ = present(ref.rms_adaln_modulate, full, MOD_NAMES)
    check_three_way(f, r, inputs, tangents_for(inputs), dtype, names)


def test_rms_adaln_modulate_strided_chunks(device):
    # shift/scale as chunks of a fused (B, 6D) adaLN projection, x a transposed view: read in place.
    B, N, D = 2, 9, 48
    x = rand(B, D, N, device=device, offset=0.5, seed=1).transpose(1, 2)
    shift, scale = rand(B, 6 * D, device=device, seed=2).chunk(6, dim=1)[:2]
    w = rand(D, device=device, offset=1.0, seed=3)
    assert not x.is_contiguous() and not shift.is_contiguous()
    check_all_f64(dk.rms_adaln_modulate, ref.rms_adaln_modulate, [x, shift, scale, w], MOD_NAMES)


def test_rms_adaln_modulate_positional_none_shift(device):
    x, _, scale, w = mod_inputs(2, 3, 16, "BD", device, False, True)
    a = dk.rms_adaln_modulate(x, None, scale, w)
    b = dk.rms_adaln_modulate(x, shift=None, scale=scale, weight=w, eps=1e-6)
    c = dk.rms_adaln_modulate(x, None, scale)  # weight defaults to None (ones)
    assert torch.equal(a, b)
    assert_f64(a, ref.rms_adaln_modulate(x, None, scale, w))
    assert_f64(c, ref.rms_adaln_modulate(x, None, scale, torch.ones_like(w)))
    assert_f64(c, ref.rms_adaln_modulate(x, None, scale))


def test_rms_adaln_modulate_stats(device):
    # rstd only: the RMS kind has no mean statistic.
    x, shift, scale, w = mod_inputs(2, 3, 16, "BD", device, True, True)
    out, rstd = ops.rms_adaln_modulate_fwd(x, shift, scale, w, 1e-6)
    assert_f64(rstd, torch.rsqrt(x.pow(2).mean(-1) + 1e-6))


# ------------------------------------------------------------------ gated_residual_rms_adaln


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
def test_gated_residual_rms_adaln_f64(device, shape, combo):
    full = res_inputs(*shape, "BD", device, *combo, gate_form="B1D")
    check_all_f64(dk.gated_residual_rms_adaln, ref.gated_residual_rms_adaln, full, RES_NAMES)


@pytest.mark.parametrize("form,gate_form", [("BD", "BD"), ("B1D", "B1D"), ("BND", "BND"), ("BD", "BND"),
                                            ("BND", "BD"), ("D", "BD")])
@pytest.mark.parametrize("combo", [(True, True), (False, False)], ids=["shift+weight", "neither"])
def test_gated_residual_rms_adaln_forms_f64(device, form, gate_form, combo):
    full = res_inputs(3, 17, 72, form, device, *combo, gate_form=gate_form)
    check_all_f64(dk.gated_residual_rms_adaln, ref.gated_residual_rms_adaln, full, RES_NAMES)


@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
def test_gated_residual_rms_adaln_gradcheck(device, combo):
    full = [t if t is None else t.requires_grad_() for t in res_inputs(2, 4, 10, "BD", device, *combo)]
    f, inputs, _ = present(dk.gated_residual_rms_adaln, full, RES_NAMES)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, check_batched_grad=False)


@pytest.mark.parametrize("tangents", ["all", "x", "gate", "y", "params", "none"])
@pytest.mark.parametrize("combo", [(True, True), (False, True)], ids=["shift+weight", "weight"])
def test_gated_residual_rms_adaln_jvp_keywords_f64(device, tangents, combo):
    full = res_inputs(2, 17, 72, "BD", device, *combo)
    dots = [None if t is None else rand(*t.shape, device=device, seed=70 + i) for i, t in enumerate(full)]
    keep = {"all": RES_NAMES, "x": ["x"], "gate": ["gate"], "y": ["y"], "params": ["shift", "scale", "weight"],
            "none": []}[tangents]
    dots = [d if n in keep else None for d, n in zip(dots, RES_NAMES)]
    f, prim, _ = present(ref.gated_residual_rms_adaln, full, RES_NAMES)
    tans = [torch.zeros_like(p) if d is None else d for p, d in zip(full, dots) if p is not None]
    (r_xo, r_h), (r_xod, r_hd) = torch.func.jvp(f, tuple(prim), tuple(tans))
    kw = {n: v for n, v in zip(RES_NAMES, full)}
    kw.update({f"{n}_dot": d for n, d in zip(RES_NAMES, dots)})
    x_out, x_out_dot, h, h_dot = dk.jvp.gated_residual_rms_adaln(**kw, eps=1e-6)
    for a, b, n in [(x_out, r_xo, "x_out"), (x_out_dot, r_xod, "x_out_dot"), (h, r_h, "h"), (h_dot, r_hd, "h_dot")]:
        assert_f64(a, b, n)
    res = dk.gated_residual_rms_adaln.maybe_jvp(**kw)
    assert_f64(res[2], r_h, "maybe_jvp h")
    if tangents == "none":
        assert res[1] is None and res[3] is None
    else:
        assert_f64(res[3], r_hd, "maybe_jvp h_dot")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", [(2, 17, 72), (2, 65, 1152)], ids=str)
@pytest.mark.parametrize("combo", [(True, True), (False, True)], ids=["shift+weight", "weight"])
def test_gated_residual_rms_adaln_low_precision(device, dtype, shape, combo):
    full = res_inputs(*shape, "BD", device, *combo)
    f, inputs, names = present(dk.gated_residual_rms_adaln, full, RES_NAMES)
    r, _, _ = present(ref.gated_residual_rms_adaln, full, RES_NAMES)
    check_three_way(f, r, inputs, tangents_for(inputs), dtype, names)


def test_gated_residual_rms_adaln_only_h_used(device):
    # Backward when only h feeds the loss (x_out's gradient is None -> zeros).
    full = [t if t is None else t.requires_grad_() for t in res_inputs(2, 5, 16, "BD", device, False, True)]
    f, inputs, _ = present(dk.gated_residual_rms_adaln, full, RES_NAMES)
    r, _, _ = present(ref.gated_residual_rms_adaln, full, RES_NAMES)
    grads = torch.autograd.grad(f(*inputs)[1].sum(), inputs)
    xr = [t.detach().clone().requires_grad_() for t in inputs]
    for a, b in zip(grads, torch.autograd.grad(r(*xr)[1].sum(), xr)):
        assert_f64(a, b)


# ------------------------------------------------------------------ NaN, empty, bad input


@pytest.mark.parametrize("combo", [(True, True), (False, False)], ids=["shift+weight", "neither"])
def test_nan_in_nan_out(device, combo):
    x, shift, scale, w = mod_inputs(2, 3, 72, "BD", device, *combo, dtype=torch.float32)
    x[0, 1, 5] = float("nan")
    out = dk.rms_adaln_modulate(x, shift, scale, w)
    assert out[0, 1].isnan().all(), "a NaN in a row poisons that row's statistic"
    assert torch.isfinite(out[0, 0]).all() and torch.isfinite(out[1]).all()
    _, out_dot = dk.jvp.rms_adaln_modulate(x, torch.ones_like(x), shift, None, scale, None, w, None)
    assert out_dot[0, 1].isnan().all()
    if w is not None:
        w = w.clone()
        w[7] = float("nan")
        out = dk.rms_adaln_modulate(x.nan_to_num(), shift, scale, w)
        assert out[..., 7].isnan().all() and torch.isfinite(out[..., 8]).all()
    _, h = dk.gated_residual_rms_adaln(x, scale, x, shift, scale, w)
    assert h[0, 1].isnan().all()


def test_empty_batch(device):
    x = torch.empty(0, 5, 72, device=device, requires_grad=True)
    p = torch.randn(0, 72, device=device, requires_grad=True)
    w = torch.randn(72, device=device, requires_grad=True)
    out = dk.rms_adaln_modulate(x, p, p, w)
    assert out.shape == x.shape
    gx, gp, gw = torch.autograd.grad(out.sum(), (x, p, w))
    assert gx.shape == x.shape and gw.shape == w.shape and (gw == 0).all()


def test_bad_weight(device):
    x, shift, scale, w = mod_inputs(2, 3, 8, "BD", device, True, True, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"rms_adaln_modulate: weight must have shape \(8,\)"):
        dk.rms_adaln_modulate(x, shift, scale, torch.ones(9, device=device))
    with pytest.raises(RuntimeError, match=r"rms_adaln_modulate: weight must have shape \(8,\)"):
        dk.rms_adaln_modulate(x, shift, scale, torch.ones(1, 8, device=device))
    with pytest.raises(RuntimeError, match=r"rms_adaln_modulate: weight must have dtype Float like x"):
        dk.rms_adaln_modulate(x, shift, scale, w.double())
    with pytest.raises(RuntimeError, match=r"gated_residual_rms_adaln: weight must have shape \(8,\)"):
        dk.gated_residual_rms_adaln(x, scale, x, shift, scale, torch.ones(2, 8, device=device))
    with pytest.raises(RuntimeError, match=r"rms_adaln_modulate_jvp: weight_dot must have shape \(8,\)"):
        dk.jvp.rms_adaln_modulate(x, None, shift, None, scale, None, w, torch.ones(3, device=device))


def test_tangent_without_primal(device):
    x, _, scale, _ = mod_inputs(2, 3, 8, "BD", device, False, False, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"rms_adaln_modulate: shift_dot given without shift"):
        dk.jvp.rms_adaln_modulate(x, None, None, torch.ones_like(scale), scale, None)
    with pytest.raises(ValueError, match=r"gated_residual_rms_adaln: weight_dot given without weight"):
        dk.jvp.gated_residual_rms_adaln(x, None, scale, None, x, None, None, None, scale, None, None,
                                        torch.ones(8, device=device))
    with pytest.raises(RuntimeError, match=r"rms_adaln_modulate_jvp: weight_dot given without weight"):
        ops.rms_adaln_modulate_jvp(x, None, None, None, scale, None, None, torch.ones(8, device=device), 1e-6)
    with pytest.raises(RuntimeError, match=r"rms_adaln_modulate: shift and scale must have the same shape"):
        dk.rms_adaln_modulate(x, scale.unsqueeze(1), scale)
    with pytest.raises(TypeError):
        dk.rms_adaln_modulate(x, scale=scale)  # shift is required (None must be said)
