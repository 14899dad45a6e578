"""adaln_modulate and gated_residual_adaln: forward, backward and JVP against float64
eager references, low precision, layouts, compile, bad input."""
import pytest
import torch

import dmf_kernels as dk
from dmf_kernels import reference as ref
from conftest import (LOW_PRECISION, assert_f64, check_fwd_bwd_f64, check_jvp_f64, check_three_way, mod_param,
                      rand)

ops = torch.ops.dmf_kernels

# (B, N, D): the odd sizes the guide asks for (D = 72, 1152, 4099; N = 1, 17, 257).
SHAPES = [(2, 1, 72), (3, 17, 72), (2, 257, 72), (2, 17, 1152), (1, 257, 1152), (2, 1, 4099), (2, 17, 4099)]
FORMS = ["BD", "B1D", "BND", "D"]


def adaln_inputs(B, N, D, form, device, dtype=torch.float64):
    x = rand(B, N, D, device=device, dtype=dtype, scale=2.0, offset=0.7, seed=1)
    shift = mod_param(form, B, N, D, device, dtype, seed=2)
    scale = mod_param(form, B, N, D, device, dtype, seed=3)
    return [x, shift, scale]


def residual_inputs(B, N, D, form, device, gate_form=None, dtype=torch.float64):
    x = rand(B, N, D, device=device, dtype=dtype, scale=2.0, offset=0.7, seed=1)
    gate = mod_param(gate_form or form, B, N, D, device, dtype, seed=4)
    y = rand(B, N, D, device=device, dtype=dtype, seed=5)
    shift = mod_param(form, B, N, D, device, dtype, seed=2)
    scale = mod_param(form, B, N, D, device, dtype, seed=3)
    return [x, gate, y, shift, scale]


def tangents_for(inputs, seed=50):
    return [rand(*t.shape, device=t.device, dtype=t.dtype, seed=seed + i) for i, t in enumerate(inputs)]


# ------------------------------------------------------------------ adaln_modulate


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
def test_adaln_modulate_f64(device, shape, form):
    inputs = adaln_inputs(*shape, form, device)
    check_fwd_bwd_f64(dk.adaln_modulate, ref.adaln_modulate, inputs, ["x", "shift", "scale"])
    check_jvp_f64(dk.adaln_modulate, ref.adaln_modulate, inputs, tangents_for(inputs))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("form", ["BD", "BND"])
@pytest.mark.parametrize("with_tangent", ["all", "x_only", "mod_only", "none"])
def test_adaln_modulate_dual_f64(device, shape, form, with_tangent):
    x, shift, scale = adaln_inputs(*shape, form, device)
    xd, shd, scd = tangents_for([x, shift, scale])
    if with_tangent == "x_only":
        shd = scd = None
    elif with_tangent == "mod_only":
        xd = None
    elif with_tangent == "none":
        xd = shd = scd = None
    zero = lambda t, like: torch.zeros_like(like) if t is None else t  # noqa: E731
    ref_out, ref_tan = torch.func.jvp(ref.adaln_modulate, (x, shift, scale),
                                      (zero(xd, x), zero(shd, shift), zero(scd, scale)))
    xs, sh, sc = (t.clone().requires_grad_() for t in (x, shift, scale))
    out, tan = dk.jvp.adaln_modulate(xs, xd, sh, shd, sc, scd)
    assert_f64(out, ref_out, "dual primal")
    assert_f64(tan, ref_tan, "dual tangent")
    assert not tan.requires_grad, "the tangent must not be recorded in autograd"
    g = rand(*out.shape, device=device, seed=9)
    grads = torch.autograd.grad(out, (xs, sh, sc), g)
    xr, shr, scr = (t.clone().requires_grad_() for t in (x, shift, scale))
    ref_grads = torch.autograd.grad(ref.adaln_modulate(xr, shr, scr), (xr, shr, scr), g)
    for a, b, n in zip(grads, ref_grads, ["x", "shift", "scale"]):
        assert_f64(a, b, f"dual grad of {n}")


def test_adaln_modulate_gradcheck(device):
    inputs = [t.requires_grad_() for t in adaln_inputs(2, 5, 12, "BD", device)]
    assert torch.autograd.gradcheck(dk.adaln_modulate, inputs)
    assert torch.autograd.gradcheck(dk.adaln_modulate, inputs, check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, check_batched_grad=False)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", [(2, 17, 72), (2, 257, 1152), (1, 17, 4099)], ids=str)
def test_adaln_modulate_low_precision(device, dtype, shape):
    inputs = adaln_inputs(*shape, "BD", device)
    check_three_way(dk.adaln_modulate, ref.adaln_modulate, inputs, tangents_for(inputs), dtype,
                    ["x", "shift", "scale"])


def test_adaln_modulate_leading_shapes(device):
    # Any leading shape: 2-D (rows, D) with per-row params, and 4-D with (B, D) params.
    x2 = rand(7, 40, device=device, offset=1.0, seed=1)
    p2 = [rand(7, 40, device=device, seed=s) for s in (2, 3)]
    check_fwd_bwd_f64(dk.adaln_modulate, ref.adaln_modulate, [x2, *p2], ["x", "shift", "scale"])
    x4 = rand(2, 3, 5, 24, device=device, offset=1.0, seed=1)
    p4 = [rand(2, 24, device=device, seed=s) for s in (2, 3)]
    check_fwd_bwd_f64(dk.adaln_modulate, ref.adaln_modulate, [x4, *p4], ["x", "shift", "scale"])
    check_jvp_f64(dk.adaln_modulate, ref.adaln_modulate, [x4, *p4], tangents_for([x4, *p4]))


def test_adaln_modulate_strided_inputs(device):
    # x as a transposed view; shift/scale as chunks of a fused (B, 6D) adaLN projection.
    B, N, D = 2, 9, 48
    x = rand(B, D, N, device=device, offset=0.5, seed=1).transpose(1, 2)
    c = rand(B, 6 * D, device=device, seed=2)
    shift, scale = c.chunk(6, dim=1)[:2]
    assert not x.is_contiguous() and not shift.is_contiguous()
    check_fwd_bwd_f64(dk.adaln_modulate, ref.adaln_modulate, [x, shift, scale], ["x", "shift", "scale"])
    xd = rand(B, D, N, device=device, seed=3).transpose(1, 2)
    out, tan = dk.jvp.adaln_modulate(x, xd, shift.unsqueeze(1), None, scale.unsqueeze(1), None)
    r_out, r_tan = torch.func.jvp(ref.adaln_modulate, (x, shift, scale),
                                  (xd, torch.zeros_like(shift), torch.zeros_like(scale)))
    assert_f64(out, r_out)
    assert_f64(tan, r_tan)


def test_adaln_modulate_deterministic(device):
    x, shift, scale = (t.requires_grad_() for t in adaln_inputs(4, 300, 64, "BD", device, dtype=torch.float32))
    g = rand(4, 300, 64, device=device, dtype=torch.float32, seed=3)
    first = torch.autograd.grad(dk.adaln_modulate(x, shift, scale), (x, shift, scale), g)
    for _ in range(3):
        again = torch.autograd.grad(dk.adaln_modulate(x, shift, scale), (x, shift, scale), g)
        for a, b in zip(first, again):
            assert torch.equal(a, b), "backward is not bitwise reproducible"


def test_adaln_modulate_large_d(device):
    x, shift, scale = adaln_inputs(1, 3, 16384, "BD", device)
    check_fwd_bwd_f64(dk.adaln_modulate, ref.adaln_modulate, [x, shift, scale], ["x", "shift", "scale"])


# ------------------------------------------------------------------ gated_residual_adaln

RES_NAMES = ["x", "gate", "y", "shift", "scale"]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("form,gate_form", [("BD", "BD"), ("B1D", "B1D"), ("BND", "BND"), ("BD", "BND"),
                                            ("BND", "BD"), ("D", "BD")])
def test_gated_residual_adaln_f64(device, shape, form, gate_form):
    inputs = residual_inputs(*shape, form, device, gate_form)
    check_fwd_bwd_f64(dk.gated_residual_adaln, ref.gated_residual_adaln, inputs, RES_NAMES)
    check_jvp_f64(dk.gated_residual_adaln, ref.gated_residual_adaln, inputs, tangents_for(inputs))


@pytest.mark.parametrize("shape", [(2, 17, 72), (2, 1, 4099)], ids=str)
@pytest.mark.parametrize("present", ["all", "x", "gate", "y", "mod", "none"])
def test_gated_residual_adaln_dual_f64(device, shape, present):
    prim = residual_inputs(*shape, "BD", device)
    tans = tangents_for(prim)
    keep = {"all": range(5), "x": [0], "gate": [1], "y": [2], "mod": [3, 4], "none": []}[present]
    given = [t if i in keep else None for i, t in enumerate(tans)]
    full = [t if i in keep else torch.zeros_like(t) for i, t in enumerate(tans)]
    (r_xo, r_h), (r_xod, r_hd) = torch.func.jvp(ref.gated_residual_adaln, tuple(prim), tuple(full))
    xs = [t.clone().requires_grad_() for t in prim]
    args = [a for pair in zip(xs, given) for a in pair]
    x_out, x_out_dot, h, h_dot = dk.jvp.gated_residual_adaln(*args)
    for a, b, n in [(x_out, r_xo, "x_out"), (x_out_dot, r_xod, "x_out_dot"), (h, r_h, "h"), (h_dot, r_hd, "h_dot")]:
        assert_f64(a, b, n)
    assert not x_out_dot.requires_grad and not h_dot.requires_grad
    g1, g2 = rand(*h.shape, device=device, seed=11), rand(*h.shape, device=device, seed=12)
    grads = torch.autograd.grad((x_out, h), xs, (g1, g2))
    xr = [t.clone().requires_grad_() for t in prim]
    ref_grads = torch.autograd.grad(ref.gated_residual_adaln(*xr), xr, (g1, g2))
    for a, b, n in zip(grads, ref_grads, RES_NAMES):
        assert_f64(a, b, f"dual grad of {n}")


def test_gated_residual_adaln_gradcheck(device):
    inputs = [t.requires_grad_() for t in residual_inputs(2, 4, 10, "BD", device)]
    assert torch.autograd.gradcheck(dk.gated_residual_adaln, inputs)
    assert torch.autograd.gradcheck(dk.gated_residual_adaln, inputs, check_forward_ad=True,
                                    check_backward_ad=False, check_undefined_grad=False, check_batched_grad=False)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", [(2, 17, 72), (2, 257, 1152)], ids=str)
def test_gated_residual_adaln_low_precision(device, dtype, shape):
    inputs = residual_inputs(*shape, "BD", device)
    check_three_way(dk.gated_residual_adaln, ref.gated_residual_adaln, inputs, tangents_for(inputs), dtype,
                    RES_NAMES)


def test_gated_residual_adaln_only_h_used(device):
    # Backward when only h feeds the loss (x_out's gradient is None -> zeros).
    inputs = [t.requires_grad_() for t in residual_inputs(2, 5, 16, "BD", device)]
    _, h = dk.gated_residual_adaln(*inputs)
    grads = torch.autograd.grad(h.sum(), inputs)
    xr = [t.detach().clone().requires_grad_() for t in inputs]
    ref_grads = torch.autograd.grad(ref.gated_residual_adaln(*xr)[1].sum(), xr)
    for a, b in zip(grads, ref_grads):
        assert_f64(a, b)
