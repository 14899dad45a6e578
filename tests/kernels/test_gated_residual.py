"""gated_residual: forward, backward and JVP against float64 eager references."""
import pytest
import torch

import dmf_kernels as dk
from dmf_kernels import reference as ref
from conftest import LOW_PRECISION, assert_f64, check_fwd_bwd_f64, check_jvp_f64, check_three_way, mod_param, rand

SHAPES = [(2, 1, 72), (3, 17, 72), (2, 257, 72), (2, 17, 1152), (2, 17, 4099)]
NAMES = ["x", "gate", "y"]


def inputs_for(B, N, D, form, device, dtype=torch.float64):
    return [rand(B, N, D, device=device, dtype=dtype, seed=1), mod_param(form, B, N, D, device, dtype, seed=2),
            rand(B, N, D, device=device, dtype=dtype, seed=3)]


def tangents_for(inputs):
    return [rand(*t.shape, device=t.device, dtype=t.dtype, seed=60 + i) for i, t in enumerate(inputs)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("form", ["BD", "B1D", "BND", "D"])
def test_gated_residual_f64(device, shape, form):
    inputs = inputs_for(*shape, form, device)
    check_fwd_bwd_f64(dk.gated_residual, ref.gated_residual, inputs, NAMES)
    check_jvp_f64(dk.gated_residual, ref.gated_residual, inputs, tangents_for(inputs))


@pytest.mark.parametrize("present", ["all", "x", "gate", "y", "none"])
def test_gated_residual_dual_f64(device, present):
    prim = inputs_for(2, 17, 72, "BD", device)
    tans = tangents_for(prim)
    keep = {"all": [0, 1, 2], "x": [0], "gate": [1], "y": [2], "none": []}[present]
    given = [t if i in keep else None for i, t in enumerate(tans)]
    full = [t if i in keep else torch.zeros_like(t) for i, t in enumerate(tans)]
    r_out, r_tan = torch.func.jvp(ref.gated_residual, tuple(prim), tuple(full))
    xs = [t.clone().requires_grad_() for t in prim]
    out, tan = dk.jvp.gated_residual(xs[0], given[0], xs[1], given[1], xs[2], given[2])
    assert_f64(out, r_out)
    assert_f64(tan, r_tan)
    assert not tan.requires_grad
    g = rand(*out.shape, device=device, seed=5)
    xr = [t.clone().requires_grad_() for t in prim]
    for a, b in zip(torch.autograd.grad(out, xs, g), torch.autograd.grad(ref.gated_residual(*xr), xr, g)):
        assert_f64(a, b)


def test_gated_residual_gradcheck(device):
    inputs = [t.requires_grad_() for t in inputs_for(2, 3, 8, "BD", device)]
    assert torch.autograd.gradcheck(dk.gated_residual, inputs)
    assert torch.autograd.gradcheck(dk.gated_residual, inputs, check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, check_batched_grad=False)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_gated_residual_low_precision(device, dtype):
    inputs = inputs_for(2, 257, 1152, "BD", device)
    check_three_way(dk.gated_residual, ref.gated_residual, inputs, tangents_for(inputs), dtype, NAMES)
