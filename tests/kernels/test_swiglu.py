"""swiglu (LightningDiT's SwiGLUFFN activation): forward, backward and JVP against float64
references, strided rows, low precision, NaN, bad input and torch.compile."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import dmf_kernels as dk
from conftest import LOW_PRECISION, assert_f64, check_fwd_bwd_f64, check_jvp_f64, check_three_way, rand

ops = torch.ops.dmf_kernels


def lightningdit_swiglu(x12):
    # LightningDiT SwiGLUFFN.forward after the fused projection: x12 = self.w12(x);
    # x1, x2 = x12.chunk(2, dim=-1); hidden = F.silu(x1) * x2
    x1, x2 = x12.chunk(2, dim=-1)
    return F.silu(x1) * x2


# (..., 2H) with H = 72, 1152, 4099 (odd: no vector path), one row, one column pair
SHAPES = [(2, 17, 2 * 72), (1, 257, 2 * 72), (2, 3, 2 * 1152), (3, 2 * 4099), (2, 1, 2 * 72), (1, 2)]


def x_for(shape, device, dtype=torch.float64, seed=1):
    return rand(*shape, device=device, dtype=dtype, scale=2.0, offset=0.2, seed=seed)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_swiglu_f64(device, shape):
    x = x_for(shape, device)
    check_fwd_bwd_f64(dk.swiglu, lightningdit_swiglu, [x], ["x"])
    check_jvp_f64(dk.swiglu, lightningdit_swiglu, [x], [rand(*shape, device=device, seed=70)])


def test_swiglu_jvp_forms(device):
    x, xd = x_for((2, 17, 144), device), rand(2, 17, 144, device=device, seed=5)
    r_h, r_hd = torch.func.jvp(lightningdit_swiglu, (x,), (xd,))
    xs = x.clone().requires_grad_()
    for jvp in (dk.jvp.swiglu, dk.swiglu.jvp, dk.swiglu.maybe_jvp):
        h, hd = jvp(xs, xd)
        assert h.shape == hd.shape == (2, 17, 72)
        assert_f64(h, r_h)
        assert_f64(hd, r_hd)
        assert h.requires_grad and not hd.requires_grad
    g = rand(2, 17, 72, device=device, seed=6)
    (dx,) = torch.autograd.grad(dk.jvp.swiglu(xs, xd)[0], xs, g)
    xr = x.clone().requires_grad_()
    assert_f64(dx, torch.autograd.grad(lightningdit_swiglu(xr), xr, g)[0])
    # a None tangent: zeros from .jvp, None from .maybe_jvp, the primal either way
    h, hd = dk.jvp.swiglu(x, None)
    assert_f64(h, r_h)
    assert torch.equal(hd, torch.zeros_like(hd))
    h, hd = dk.swiglu.maybe_jvp(x, None)
    assert_f64(h, r_h)
    assert hd is None
    # the raw jvp op with no tangent writes a zero tangent (not uninitialised memory)
    h, hd = ops.swiglu_jvp(x, None)
    assert_f64(h, r_h)
    assert torch.equal(hd, torch.zeros_like(hd))


def test_swiglu_gradcheck(device):
    x = x_for((2, 3, 10), device).requires_grad_()
    assert torch.autograd.gradcheck(dk.swiglu, (x,))
    assert torch.autograd.gradcheck(dk.swiglu, (x,), check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, check_batched_grad=False)


@pytest.mark.parametrize("view", ["column_slice", "permuted", "three_groups", "unfoldable"])
def test_swiglu_strided_rows(device, view):
    # x12 as a view: the first 2H columns of a wider projection (rows read in place), a
    # permuted (B, N) layout, three strided groups of rows, and a layout that must be copied.
    H = 24
    if view == "column_slice":
        x = x_for((2, 9, 3 * H), device)[..., :2 * H]
    elif view == "permuted":
        x = x_for((9, 2, 2 * H), device).transpose(0, 1)
    elif view == "three_groups":
        x = x_for((3, 4, 5, 3 * H), device).permute(1, 0, 2, 3)[..., H:]
    else:
        x = x_for((2, 2, 3, 4, 3 * H), device).permute(3, 1, 0, 2, 4)[..., :2 * H]
    assert not x.is_contiguous()
    xd = rand(*x.shape[:-1], 3 * H, device=device, seed=8)[..., H:]
    check_fwd_bwd_f64(dk.swiglu, lightningdit_swiglu, [x], ["x"])
    check_jvp_f64(dk.swiglu, lightningdit_swiglu, [x], [xd])


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", [(2, 64, 2 * 1152), (3, 2 * 4099), (4, 17, 2 * 72)], ids=str)
def test_swiglu_low_precision(device, dtype, shape):
    x = x_for(shape, device)
    check_three_way(dk.swiglu, lightningdit_swiglu, [x], [rand(*shape, device=device, seed=71)], dtype, ["x"])


def test_swiglu_nan_propagates(device):
    H = 16
    x = x_for((2, 4, 2 * H), device, dtype=torch.float32)
    x[0, 1, 3] = float("nan")       # in a: h[0, 1, 3]
    x[1, 2, H + 5] = float("nan")   # in b: h[1, 2, 5]
    xd = torch.ones_like(x)
    xd[1, 0, 7] = float("nan")      # in a_dot: h_dot[1, 0, 7]
    h, hd = dk.jvp.swiglu(x, xd)
    bad = torch.zeros(2, 4, H, dtype=torch.bool, device=device)
    bad[0, 1, 3] = bad[1, 2, 5] = True
    assert torch.equal(torch.isnan(h), bad)
    bad_t = bad.clone()
    bad_t[1, 0, 7] = True
    assert torch.equal(torch.isnan(hd), bad_t)
    xs = x.clone().requires_grad_()
    dk.swiglu(xs).sum().backward()
    # d/da = g b silu'(a) is NaN where a or b is; d/db = g silu(a) only where a is
    assert torch.isnan(xs.grad[0, 1, 3]) and torch.isnan(xs.grad[0, 1, H + 3]) and torch.isnan(xs.grad[1, 2, 5])
    assert torch.isfinite(xs.grad[0, 0]).all() and torch.isfinite(xs.grad[1, 3]).all()


def test_swiglu_bad_input(device):
    with pytest.raises(RuntimeError, match=r"swiglu: x's last dim must be even \(the two halves \[a, b\] of 2H\), got 7"):
        dk.swiglu(rand(2, 7, device=device))
    with pytest.raises(RuntimeError, match=r"x must be float16, bfloat16, float32 or float64"):
        dk.swiglu(torch.ones(2, 8, dtype=torch.int32, device=device))
    with pytest.raises(RuntimeError, match=r"at least one dimension"):
        dk.swiglu(torch.tensor(1.0, device=device))
    x = rand(2, 8, device=device)
    with pytest.raises(RuntimeError, match=r"x_dot must have x's shape \[2, 8\], got \[2, 4\]"):
        dk.jvp.swiglu(x, rand(2, 4, device=device))
    with pytest.raises(RuntimeError, match=r"x_dot must have dtype Double like x"):
        dk.jvp.swiglu(x, x.float())
    with pytest.raises(RuntimeError, match=r"grad_h must have shape \[2, 4\] \(x's with the last dim halved\)"):
        ops.swiglu_bwd(rand(2, 8, device=device), x)


def test_swiglu_empty(device):
    x = torch.empty(0, 5, 8, device=device, requires_grad=True)
    h = dk.swiglu(x)
    assert h.shape == (0, 5, 4)
    h.sum().backward()
    assert x.grad.shape == x.shape
    h, hd = dk.jvp.swiglu(x.detach(), torch.empty(0, 5, 8, device=device))
    assert h.shape == hd.shape == (0, 5, 4)


def test_swiglu_fake_shapes():
    x = torch.empty(2, 3, 10, device="meta")
    assert ops.swiglu_fwd(x).shape == (2, 3, 5)
    assert [t.shape for t in ops.swiglu_jvp(x, x)] == [(2, 3, 5)] * 2
    assert ops.swiglu_bwd(torch.empty(2, 3, 5, device="meta"), x).shape == (2, 3, 10)


# ------------------------------------------------------------------ torch.compile (as test_compile.py)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_swiglu_compile_forward_backward(device, fresh_dynamo):
    x = x_for((2, 5, 48), device, dtype=torch.float32)
    xs, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = torch.compile(dk.swiglu, fullgraph=True)(xs), dk.swiglu(xe)
    assert out.shape == (2, 5, 24)
    close(out, ref)
    g = rand(2, 5, 24, device=device, dtype=torch.float32, seed=9)
    close(torch.autograd.grad(out, xs, g)[0], torch.autograd.grad(ref, xe, g)[0])


def test_swiglu_compile_func_jvp(device, fresh_dynamo):
    x = x_for((2, 5, 48), device, dtype=torch.float32)
    xd = rand(2, 5, 48, device=device, dtype=torch.float32, seed=30)

    def run(x, xd):
        return torch.func.jvp(dk.swiglu, (x,), (xd,))

    out, tan = torch.compile(run, fullgraph=True)(x, xd)
    ref_out, ref_tan = torch.func.jvp(lightningdit_swiglu, (x,), (xd,))
    close(out, ref_out)
    close(tan, ref_tan)


def test_swiglu_compile_forward_ad(device, fresh_dynamo):
    x = x_for((2, 5, 48), device, dtype=torch.float32)
    xd = rand(2, 5, 48, device=device, dtype=torch.float32, seed=40)

    def run(x, xd):
        with fwAD.dual_level():
            return fwAD.unpack_dual(dk.swiglu(fwAD.make_dual(x, xd))).tangent

    tan = torch.compile(run, fullgraph=True)(x, xd)
    assert tan is not None, "compiled forward-mode AD dropped the tangent"
    close(tan, torch.func.jvp(lightningdit_swiglu, (x,), (xd,))[1])


def test_swiglu_compile_jvp_form(device, fresh_dynamo):
    # MeanFlow's pattern with the explicit form: the primal differentiable, the tangent detached.
    x = x_for((2, 5, 48), device, dtype=torch.float32)
    xd = rand(2, 5, 48, device=device, dtype=torch.float32, seed=50)

    def step(x, xd):
        h, hd = dk.jvp.swiglu(x, xd)
        return (h * hd).sum()

    xs, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.compile(step, fullgraph=True)(xs, xd).backward()
    step(xe, xd).backward()
    close(xs.grad, xe.grad)
