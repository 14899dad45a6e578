"""gelu_tanh: forward, backward and one-pass JVP against float64 eager references; the dual
API, opcheck, compile, bad input, NaN. The Triton kernel runs on CUDA here and under the
interpreter in test_gelu_triton.py."""
import pytest
import torch
import torch.nn.functional as F

import dmf_kernels as dk
from conftest import LOW_PRECISION, assert_f64, check_fwd_bwd_f64, check_jvp_f64, check_three_way, rand

SHAPES = [(2, 17, 72), (1, 257, 4 * 1152), (3, 4099), (1,), (2, 1, 288)]


def ref_gelu(a):
    return F.gelu(a, approximate="tanh")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gelu_f64(device, shape):
    a = rand(*shape, device=device, scale=3.0, offset=0.2, seed=1)
    check_fwd_bwd_f64(dk.gelu_tanh, ref_gelu, [a], ["a"])
    check_jvp_f64(dk.gelu_tanh, ref_gelu, [a], [rand(*shape, device=device, seed=2)])


def test_gelu_dual_f64(device):
    a, ad = rand(2, 17, 72, device=device, scale=3.0, seed=3), rand(2, 17, 72, device=device, seed=4)
    r_out, r_tan = torch.func.jvp(ref_gelu, (a,), (ad,))
    a_leaf = a.clone().requires_grad_()
    out, tan = dk.jvp.gelu_tanh(a_leaf, ad)
    assert_f64(out, r_out, "g")
    assert_f64(tan, r_tan, "g_dot")
    assert out.requires_grad and not tan.requires_grad
    w = rand(*a.shape, device=device, seed=5)
    (g,) = torch.autograd.grad((out * w).sum(), a_leaf)
    a_ref = a.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad((ref_gelu(a_ref) * w).sum(), a_ref)
    assert_f64(g, g_ref, "grad through the dual primal")
    out, tan = dk.jvp.gelu_tanh(a, None)
    assert tan is None  # a zero tangent is skipped, not computed
    assert_f64(out, r_out)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_gelu_three_way(device, dtype):
    a = rand(4, 33, 288, device=device, scale=3.0, seed=6)
    check_three_way(dk.gelu_tanh, ref_gelu, [a], [rand(*a.shape, device=device, seed=7)], dtype, ["a"])


def test_gelu_opcheck(device):
    a, ad = rand(3, 5, 40, device=device, dtype=torch.float32, seed=8), rand(3, 5, 40, device=device,
                                                                               dtype=torch.float32, seed=9)
    torch.library.opcheck(torch.ops.dmf_kernels.gelu_tanh_jvp.default, (a, ad))
    torch.library.opcheck(torch.ops.dmf_kernels.gelu_tanh_jvp.default, (a, None))


def test_gelu_raw_op_autograd(device):
    # torch.compile differentiates the raw op: g backpropagates, g_dot refuses.
    a = rand(3, 40, device=device, seed=15).requires_grad_()
    ad = rand(3, 40, device=device, seed=16)
    g, gd = torch.ops.dmf_kernels.gelu_tanh_jvp(a, ad)
    (grad,) = torch.autograd.grad(g.sum(), a)
    a_ref = a.detach().clone().requires_grad_()
    (grad_ref,) = torch.autograd.grad(ref_gelu(a_ref).sum(), a_ref)
    assert_f64(grad, grad_ref)
    g, gd = torch.ops.dmf_kernels.gelu_tanh_jvp(a, ad)
    with pytest.raises(RuntimeError, match="g_dot is not differentiable"):
        gd.sum().backward()


def test_gelu_compile_jvp(device):
    torch._dynamo.reset()
    a, ad = rand(2, 9, 48, device=device, dtype=torch.float32, seed=10), rand(2, 9, 48, device=device,
                                                                                dtype=torch.float32, seed=11)
    run = torch.compile(lambda x, t: torch.func.jvp(dk.gelu_tanh, (x,), (t,)), fullgraph=True)
    out, tan = run(a, ad)
    r_out, r_tan = torch.func.jvp(ref_gelu, (a,), (ad,))
    torch.testing.assert_close(out, r_out)
    torch.testing.assert_close(tan, r_tan)  # a dropped custom tangent would be zero here


def test_gelu_bad_input(device):
    a = rand(2, 8, device=device, dtype=torch.float32, seed=12)
    with pytest.raises(ValueError, match=r"a_dot must have a's shape \(2, 8\)"):
        dk.jvp.gelu_tanh(a, rand(2, 9, device=device, dtype=torch.float32))
    with pytest.raises(TypeError, match=r"a_dot must have a's dtype"):
        dk.jvp.gelu_tanh(a, rand(2, 8, device=device, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"float16, bfloat16, float32 or float64"):
        torch.ops.dmf_kernels.gelu_tanh_jvp(torch.ones(3, dtype=torch.int32, device=device), None)


def test_gelu_nan_in_nan_out(device):
    a = rand(3, 16, device=device, dtype=torch.float32, seed=13)
    a[1, 3] = float("nan")
    out, tan = dk.jvp.gelu_tanh(a, torch.ones_like(a))
    assert torch.isnan(out[1, 3]) and torch.isnan(tan[1, 3])
    assert torch.isfinite(out[0]).all() and torch.isfinite(tan[0]).all()


def test_gelu_tangent_not_differentiable():
    a = rand(2, 8, dtype=torch.float64, seed=14).requires_grad_()
    out, tan = torch.func.jvp(dk.gelu_tanh, (a,), (torch.ones_like(a),))
    with pytest.raises(RuntimeError, match="gradients through forward-mode tangents are not supported"):
        (out * tan).sum().backward()
