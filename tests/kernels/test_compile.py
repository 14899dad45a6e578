"""torch.compile(fullgraph=True) of every op: forward, backward, and forward-mode AD
(torch.func.jvp and torch.autograd.forward_ad) matched against eager. Custom JVPs can be
silently dropped under compile (pytorch issue 192985), so tangents are compared, never
just checked for presence."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import dmf_kernels as dk
from conftest import rand

B, N, D = 2, 5, 24


def cases(device):
    r = lambda *s, seed: rand(*s, device=device, dtype=torch.float32, seed=seed)  # noqa: E731
    x, y = r(B, N, D, seed=1), r(B, N, D, seed=2)
    return {
        "adaln_modulate": (dk.adaln_modulate, [x, r(B, D, seed=3), r(B, D, seed=4)]),
        "gated_residual_adaln": (dk.gated_residual_adaln, [x, r(B, 1, D, seed=5), y, r(B, D, seed=3), r(B, D, seed=4)]),
        "gated_residual": (dk.gated_residual, [x, r(B, D, seed=5), y]),
        "rms_norm": (dk.rms_norm, [x, r(D, seed=6)]),
        "rms_adaln_modulate": (dk.rms_adaln_modulate, [x, r(B, D, seed=3), r(B, D, seed=4), r(D, seed=5)]),
        "rms_adaln_modulate_wo_shift": (lambda x, sc, w: dk.rms_adaln_modulate(x, None, sc, w),
                                        [x, r(B, D, seed=4), r(D, seed=5)]),
        "gated_residual_rms_adaln": (dk.gated_residual_rms_adaln,
                                     [x, r(B, 1, D, seed=6), y, r(B, D, seed=3), r(B, D, seed=4), r(D, seed=5)]),
        "gated_residual_rms_adaln_bare": (lambda x, g, y, sc: dk.gated_residual_rms_adaln(x, g, y, None, sc),
                                          [x, r(B, 1, D, seed=6), y, r(B, D, seed=4)]),
    }


NAMES = ["adaln_modulate", "gated_residual_adaln", "gated_residual", "rms_norm", "rms_adaln_modulate",
         "rms_adaln_modulate_wo_shift", "gated_residual_rms_adaln", "gated_residual_rms_adaln_bare"]


def as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def close(a, b):
    for u, v in zip(as_tuple(a), as_tuple(b)):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield


@pytest.mark.parametrize("name", NAMES)
def test_compile_forward_backward(device, name):
    fn, inputs = cases(device)[name]
    compiled = torch.compile(fn, fullgraph=True)
    xs = [t.clone().requires_grad_() for t in inputs]
    xe = [t.clone().requires_grad_() for t in inputs]
    out, ref = compiled(*xs), fn(*xe)
    close(out, ref)
    w = [rand(*o.shape, device=device, dtype=o.dtype, seed=9 + i) for i, o in enumerate(as_tuple(ref))]
    close(torch.autograd.grad(as_tuple(out), xs, w), torch.autograd.grad(as_tuple(ref), xe, w))


@pytest.mark.parametrize("name", NAMES)
def test_compile_func_jvp(device, name):
    fn, inputs = cases(device)[name]
    tangents = [rand(*t.shape, device=device, dtype=t.dtype, seed=30 + i) for i, t in enumerate(inputs)]

    def run(*args):
        k = len(args) // 2
        return torch.func.jvp(fn, args[:k], args[k:])

    out, tan = torch.compile(run, fullgraph=True)(*inputs, *tangents)
    ref_out, ref_tan = run(*inputs, *tangents)
    close(out, ref_out)
    close(tan, ref_tan)
    assert all(t.abs().max() > 0 for t in as_tuple(tan))


@pytest.mark.parametrize("name", NAMES)
def test_compile_forward_ad(device, name):
    fn, inputs = cases(device)[name]
    x_dot = rand(*inputs[0].shape, device=device, dtype=inputs[0].dtype, seed=40)

    def run(x, x_dot, *rest):
        with fwAD.dual_level():
            outs = as_tuple(fn(fwAD.make_dual(x, x_dot), *rest))
            return tuple(fwAD.unpack_dual(o).tangent for o in outs)

    tan = torch.compile(run, fullgraph=True)(inputs[0], x_dot, *inputs[1:])
    ref = run(inputs[0], x_dot, *inputs[1:])
    assert all(t is not None for t in tan), "compiled forward-mode AD dropped the tangent"
    close(tan, ref)


def test_compile_jvp_primal_is_differentiable(device):
    # MeanFlow's pattern: u, du_dt = jvp(f, ...); loss(u).backward(), compiled.
    fn, inputs = cases(device)["gated_residual_adaln"]
    tangents = [rand(*t.shape, device=device, dtype=t.dtype, seed=50 + i) for i, t in enumerate(inputs)]

    def step(*args):
        k = len(args) // 2
        (x_out, h), (_, h_dot) = torch.func.jvp(fn, args[:k], args[k:])
        return (h * h_dot.detach()).sum() + x_out.sum()

    xs = [t.clone().requires_grad_() for t in inputs]
    xe = [t.clone().requires_grad_() for t in inputs]
    torch.compile(step, fullgraph=True)(*xs, *tangents).backward()
    step(*xe, *tangents).backward()
    close([t.grad for t in xs], [t.grad for t in xe])


def test_compile_dual_api(device):
    fn, (x, shift, scale) = dk.jvp.adaln_modulate, cases(device)["adaln_modulate"][1]
    x_dot = rand(*x.shape, device=device, dtype=x.dtype, seed=60)
    compiled = torch.compile(lambda *a: fn(*a), fullgraph=True)
    close(compiled(x, x_dot, shift, None, scale, None), fn(x, x_dot, shift, None, scale, None))


# ---------------------------------------------------------------- attention with rotary tables (issue 15)


def test_compile_attention_rope(device):
    q, k, v, qd, kd, vd = (rand(1, 2, 17, 16, device=device, dtype=torch.float32, seed=70 + i) for i in range(6))
    cos, sin = rand(17, 16, device=device, dtype=torch.float32, seed=80), rand(17, 16, device=device, seed=81)
    fn = lambda a, b, c, cs, sn: dk.attention(a, b, c, None, cs, sn)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    xe = [t.clone().requires_grad_() for t in (q, k, v)]
    out, ref = compiled(*xs, cos, sin), fn(*xe, cos, sin)
    close(out, ref)
    w = rand(*ref.shape, device=device, dtype=ref.dtype, seed=82)
    close(torch.autograd.grad(out, xs, w), torch.autograd.grad(ref, xe, w))

    def func_jvp(a, b, c, ad, bd, cd, cs, sn):
        return torch.func.jvp(lambda x, y, z: fn(x, y, z, cs, sn), (a, b, c), (ad, bd, cd))

    def forward_ad(a, b, c, ad, bd, cd, cs, sn):
        with fwAD.dual_level():
            o = fn(fwAD.make_dual(a, ad), fwAD.make_dual(b, bd), fwAD.make_dual(c, cd), cs, sn)
            return fwAD.unpack_dual(o).tangent

    args = (q, k, v, qd, kd, vd, cos, sin)
    (o, t), (eo, et) = torch.compile(func_jvp, fullgraph=True)(*args), func_jvp(*args)
    close(o, eo)
    close(t, et)
    close(torch.compile(forward_ad, fullgraph=True)(*args), et)
    assert et.abs().max() > 0
    # the rotation is on: the tangent differs from attention without tables
    assert (et - torch.func.jvp(dk.attention, (q, k, v), (qd, kd, vd))[1]).abs().max() > 1e-3


def test_compile_attention_rope_jvp_primal_is_differentiable(device):
    # MeanFlow's pattern with rotary tables: the tables are saved for the backward as tensors
    q, k, v, qd, kd, vd = (rand(1, 2, 17, 16, device=device, dtype=torch.float32, seed=90 + i) for i in range(6))
    cos, sin = rand(17, 16, device=device, dtype=torch.float32, seed=96), rand(17, 16, device=device, seed=97)

    def step(a, b, c):
        o, t = torch.func.jvp(lambda x, y, z: dk.attention(x, y, z, None, cos, sin), (a, b, c), (qd, kd, vd))
        return (o * t.detach()).sum()

    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    xe = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.compile(step, fullgraph=True)(*xs).backward()
    step(*xe).backward()
    close([t.grad for t in xs], [t.grad for t in xe])


def test_compile_rms_adaln_jvp_form(device):
    torch._dynamo.reset()
    x, shift, scale, w = cases(device)["rms_adaln_modulate"][1]
    x_dot, w_dot = rand(*x.shape, device=device, dtype=x.dtype, seed=60), rand(*w.shape, device=device,
                                                                                   dtype=x.dtype, seed=61)
    fn = lambda x, xd, sc, w, wd: dk.jvp.rms_adaln_modulate(x=x, x_dot=xd, shift=None, scale=sc,  # noqa: E731
                                                            weight=w, weight_dot=wd)
    close(torch.compile(fn, fullgraph=True)(x, x_dot, scale, w, w_dot), fn(x, x_dot, scale, w, w_dot))
