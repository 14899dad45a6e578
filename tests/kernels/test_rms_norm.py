"""rms_norm (qk-norm): forward, backward and JVP against float64 eager references."""
import pytest
import torch

import dmf_kernels as dk
from dmf_kernels import reference as ref
from conftest import LOW_PRECISION, assert_f64, check_fwd_bwd_f64, check_jvp_f64, check_three_way, rand

# q/k layouts: (B, H, N, head_dim) with the DiT head dims, plus the odd sizes.
SHAPES = [(2, 3, 17, 72), (1, 2, 257, 64), (2, 1, 1, 72), (2, 5, 1152), (3, 4099), (1, 16384)]
NAMES = ["x", "weight"]


def inputs_for(shape, device, dtype=torch.float64):
    return [rand(*shape, device=device, dtype=dtype, scale=2.0, offset=0.3, seed=1),
            rand(shape[-1], device=device, dtype=dtype, scale=0.2, offset=1.0, seed=2)]


def tangents_for(inputs):
    return [rand(*t.shape, device=t.device, dtype=t.dtype, seed=70 + i) for i, t in enumerate(inputs)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_f64(device, shape):
    inputs = inputs_for(shape, device)
    check_fwd_bwd_f64(dk.rms_norm, ref.rms_norm, inputs, NAMES)
    check_jvp_f64(dk.rms_norm, ref.rms_norm, inputs, tangents_for(inputs))


@pytest.mark.parametrize("present", ["all", "x", "weight", "none"])
def test_rms_norm_dual_f64(device, present):
    x, w = inputs_for((2, 3, 17, 72), device)
    xd, wd = tangents_for([x, w])
    xd = xd if present in ("all", "x") else None
    wd = wd if present in ("all", "weight") else None
    r_out, r_tan = torch.func.jvp(ref.rms_norm, (x, w), (torch.zeros_like(x) if xd is None else xd,
                                                        torch.zeros_like(w) if wd is None else wd))
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    out, tan = dk.jvp.rms_norm(xs, xd, ws, wd)
    assert_f64(out, r_out)
    assert_f64(tan, r_tan)
    assert not tan.requires_grad
    g = rand(*out.shape, device=device, seed=5)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    for a, b in zip(torch.autograd.grad(out, (xs, ws), g), torch.autograd.grad(ref.rms_norm(xr, wr), (xr, wr), g)):
        assert_f64(a, b)


def test_rms_norm_gradcheck(device):
    inputs = [t.requires_grad_() for t in inputs_for((2, 3, 8), device)]
    assert torch.autograd.gradcheck(dk.rms_norm, inputs)
    assert torch.autograd.gradcheck(dk.rms_norm, inputs, check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, check_batched_grad=False)


def test_rms_norm_strided_qk(device):
    # q as the permuted view of a fused qkv projection: (B, N, 3, H, Dh) -> (B, H, N, Dh).
    qkv = rand(2, 17, 3, 4, 72, device=device, seed=1)
    q = qkv[:, :, 0].permute(0, 2, 1, 3)
    assert not q.is_contiguous()
    check_fwd_bwd_f64(dk.rms_norm, ref.rms_norm, [q, rand(72, device=device, seed=2)], NAMES)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", [(2, 4, 257, 72), (4, 1152)], ids=str)
def test_rms_norm_low_precision(device, dtype, shape):
    inputs = inputs_for(shape, device)
    check_three_way(dk.rms_norm, ref.rms_norm, inputs, tangents_for(inputs), dtype, NAMES)
