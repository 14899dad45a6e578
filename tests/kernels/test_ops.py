"""Every registered op: torch.library.opcheck, bad input, NaN, empty batches, build info."""
import pytest
import torch

import dmf_kernels as dk
from conftest import rand

ops = torch.ops.dmf_kernels


def raw_op_args(device, dtype=torch.float32, B=2, N=5, D=12):
    r = lambda *s, seed: rand(*s, device=device, dtype=dtype, seed=seed)  # noqa: E731
    x, y, g = r(B, N, D, seed=1), r(B, N, D, seed=2), r(B, N, D, seed=3)
    xd, yd = r(B, N, D, seed=4), r(B, N, D, seed=5)
    sh, sc, gate = r(B, D, seed=6), r(B, D, seed=7), r(B, 1, D, seed=8)
    shd, scd, gated = r(B, D, seed=9), r(B, D, seed=10), r(B, 1, D, seed=11)
    w, wd = r(D, seed=12), r(D, seed=13)
    _, mean, rstd = ops.adaln_modulate_fwd(x, sh, sc, 1e-6)
    xo, _, rmean, rrstd = ops.gated_residual_adaln_fwd(x, gate, y, sh, sc, 1e-6)
    _, qrstd = ops.rms_norm_fwd(x, w, 1e-6)
    _, mrstd = ops.rms_adaln_modulate_fwd(x, sh, sc, w, 1e-6)
    mxo, _, grstd = ops.gated_residual_rms_adaln_fwd(x, gate, y, None, sc, w, 1e-6)
    x2, x2d = r(B, N, 2 * D, seed=14), r(B, N, 2 * D, seed=15)
    cos, sin = r(N, D, seed=16), r(N, D, seed=17)
    return {
        "adaln_modulate_fwd": (x, sh, sc, 1e-6),
        "adaln_modulate_bwd": (g, x, sc, mean, rstd),
        "adaln_modulate_jvp": (x, xd, sh, None, sc, scd, 1e-6),
        "gated_residual_adaln_fwd": (x, gate, y, sh, sc, 1e-6),
        "gated_residual_adaln_bwd": (g, y, xo, gate, y, sc, rmean, rrstd),
        "gated_residual_adaln_jvp": (x, xd, gate, gated, y, None, sh, shd, sc, None, 1e-6),
        "gated_residual_fwd": (x, gate, y),
        "gated_residual_bwd": (g, gate, y),
        "gated_residual_jvp": (x, xd, gate, None, y, yd),
        "rms_norm_fwd": (x, w, 1e-6),
        "rms_norm_bwd": (g, x, w, qrstd),
        "rms_norm_jvp": (x, xd, w, wd, 1e-6),
        # norm_mod, RMS kind: optional shift/weight, both present and absent
        "rms_adaln_modulate_fwd": (x, sh, sc, w, 1e-6),
        "rms_adaln_modulate_bwd": (g, x, sh, sc, w, mrstd),
        "rms_adaln_modulate_jvp": (x, xd, None, None, sc, scd, w, wd, 1e-6),
        "gated_residual_rms_adaln_fwd": (x, gate, y, None, sc, w, 1e-6),
        "gated_residual_rms_adaln_bwd": (g, y, mxo, gate, y, None, sc, None, grstd),
        "gated_residual_rms_adaln_jvp": (x, xd, gate, gated, y, None, sh, shd, sc, None, w, None, 1e-6),
        # swiglu (x of (B, N, 2D) -> h of (B, N, D)), rope ((N, D) tables)
        "swiglu_fwd": (x2, ),
        "swiglu_bwd": (g, x2),
        "swiglu_jvp": (x2, x2d),
        "rope_fwd": (x, cos, sin),
        "rope_bwd": (g, cos, sin),
        "rope_jvp": (x, xd, cos, sin),
    }


def test_every_raw_op_is_covered():
    assert set(raw_op_args("cpu")) == set(dk.RAW_OPS)


@pytest.mark.parametrize("name", dk.RAW_OPS)
def test_opcheck(device, name):
    args = raw_op_args(device)[name]
    torch.library.opcheck(getattr(ops, name).default, args)


@pytest.mark.parametrize("name", dk.RAW_OPS)
def test_opcheck_bf16_noncontiguous_x(device, name):
    args = list(raw_op_args(device, dtype=torch.bfloat16)[name])
    # a non-contiguous view of the first row tensor
    args[0] = args[0].transpose(0, 1).contiguous().transpose(0, 1)
    torch.library.opcheck(getattr(ops, name).default, tuple(args))


@pytest.mark.cuda  # also selected by gpu_check.sh's -m cuda: it checks the build has CUDA kernels
def test_build_info():
    info = dk.build_info()
    assert info["cpu"] is True
    assert isinstance(info["cuda"], bool)
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    if torch.cuda.is_available():
        assert info["cuda"], "a GPU is present but dmf_kernels was built without CUDA kernels"


# ------------------------------------------------------------------ bad input


def test_bad_dtype(device):
    x = torch.ones(2, 3, 4, dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match=r"x must be float16, bfloat16, float32 or float64"):
        dk.adaln_modulate(x, x[:, 0], x[:, 0])


def test_mismatched_dtype(device):
    x = rand(2, 3, 8, device=device, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"shift must have dtype Float like x, got Half"):
        dk.adaln_modulate(x, x[:, 0].half(), x[:, 0])
    with pytest.raises(RuntimeError, match=r"weight must have dtype"):
        dk.rms_norm(x, torch.ones(8, dtype=torch.float64, device=device))


def test_mismatched_device():
    x = rand(2, 3, 8, dtype=torch.float32)
    meta = torch.empty(2, 8, device="meta")
    with pytest.raises(RuntimeError, match=r"must be on x's device|meta"):
        dk.adaln_modulate(x, meta, x[:, 0])


@pytest.mark.parametrize("bad_shape,pattern", [
    ((2, 7), r"shift must have last dimension 8"),
    ((3, 8), r"shift of shape \(B, D\) must have B = 2"),
    ((2, 3, 1, 8), r"shift must have shape \(D,\), \(B, D\), \(B, 1, \.\.\., D\)"),
    ((1, 3, 8), r"does not broadcast over x"),
])
def test_bad_mod_shape(device, bad_shape, pattern):
    x = rand(2, 3, 8, device=device)
    with pytest.raises(RuntimeError, match=pattern):
        dk.adaln_modulate(x, rand(*bad_shape, device=device), rand(*bad_shape, device=device))


def test_bad_row_shapes(device):
    x = rand(2, 3, 8, device=device)
    g = rand(2, 8, device=device)
    with pytest.raises(RuntimeError, match=r"y must have x's shape \[2, 3, 8\], got \[2, 4, 8\]"):
        dk.gated_residual_adaln(x, g, rand(2, 4, 8, device=device), g, g)
    with pytest.raises(RuntimeError, match=r"x_dot must have x's shape"):
        dk.jvp.adaln_modulate(x, rand(2, 3, 9, device=device), g, None, g, None)
    with pytest.raises(RuntimeError, match=r"shift_dot must have the shape of shift"):
        dk.jvp.adaln_modulate(x, None, g, rand(2, 1, 8, device=device), g, None)
    with pytest.raises(RuntimeError, match=r"shift and scale must have the same shape"):
        dk.adaln_modulate(x, g, g.unsqueeze(1))
    with pytest.raises(RuntimeError, match=r"weight must have shape \(8,\)"):
        dk.rms_norm(x, rand(9, device=device))


def test_empty_last_dim_and_scalar(device):
    x = torch.empty(2, 3, 0, device=device)
    with pytest.raises(RuntimeError, match=r"non-empty last dimension"):
        dk.adaln_modulate(x, torch.empty(2, 0, device=device), torch.empty(2, 0, device=device))
    with pytest.raises(RuntimeError, match=r"at least one dimension"):
        dk.rms_norm(torch.tensor(1.0, device=device), torch.ones(1, device=device))


def test_negative_eps(device):
    x = rand(2, 3, 8, device=device)
    with pytest.raises(RuntimeError, match=r"eps must be >= 0"):
        dk.adaln_modulate(x, x[:, 0], x[:, 0], eps=-1.0)


def test_empty_batch(device):
    x = torch.empty(0, 5, 8, device=device, requires_grad=True)
    p = torch.empty(0, 8, device=device, requires_grad=True)
    out = dk.adaln_modulate(x, p, p * 1)
    assert out.shape == (0, 5, 8)
    out.sum().backward()
    assert x.grad.shape == x.shape and p.grad.shape == p.shape
    o, t = dk.jvp.gated_residual_adaln(x.detach(), None, p.detach(), None, x.detach(), None, p.detach(), None,
                                       p.detach(), None)[:2]
    assert o.shape == t.shape == (0, 5, 8)
    q = torch.empty(0, 4, 0 + 3, 8, device=device)
    assert dk.rms_norm(q, torch.ones(8, device=device)).shape == q.shape
    assert dk.gated_residual(x.detach(), p.detach(), x.detach()).shape == x.shape
    # No rows but non-empty parameters: their gradients are zeros, not uninitialised memory.
    w = torch.ones(8, device=device, requires_grad=True)
    dk.rms_norm(q.requires_grad_(), w).sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))
    d = torch.randn(8, device=device, requires_grad=True)
    xe = torch.empty(0, 5, 8, device=device, requires_grad=True)
    x_out, h = dk.gated_residual_adaln(xe, d, xe, d, d)
    (x_out.sum() + h.sum()).backward()
    assert torch.equal(d.grad, torch.zeros_like(d))


def test_nan_propagates(device):
    x = rand(2, 4, 16, device=device, dtype=torch.float32)
    x[0, 1, 3] = float("nan")
    sh, sc = rand(2, 16, device=device, dtype=torch.float32), rand(2, 16, device=device, dtype=torch.float32)
    out, tan = dk.jvp.adaln_modulate(x, torch.ones_like(x), sh, None, sc, None)
    assert torch.isnan(out[0, 1]).all() and torch.isnan(tan[0, 1]).all()
    assert torch.isfinite(out[0, 0]).all() and torch.isfinite(out[1]).all()
    assert torch.isnan(dk.rms_norm(x, torch.ones(16, device=device))[0, 1]).all()
    xo, h = dk.gated_residual_adaln(x, sc, x, sh, sc)
    assert torch.isnan(h[0, 1]).all() and torch.isfinite(h[1]).all()


def test_raw_ops_primal_autograd(device):
    x, sh, sc = (rand(2, 3, 6, device=device, seed=1).requires_grad_(), rand(2, 6, device=device, seed=2).requires_grad_(),
                 rand(2, 6, device=device, seed=3).requires_grad_())
    xd = rand(2, 3, 6, device=device, seed=4)
    assert torch.autograd.gradcheck(lambda a, b, c: ops.adaln_modulate_fwd(a, b, c, 1e-6)[0], (x, sh, sc))
    assert torch.autograd.gradcheck(lambda a, b, c: ops.adaln_modulate_jvp(a, xd, b, None, c, None, 1e-6)[0],
                                    (x, sh, sc))
    y = rand(2, 3, 6, device=device, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, g, b, s, c: ops.gated_residual_adaln_jvp(a, xd, g, None, b, None, s, None, c, None, 1e-6)[2],
        (x, sh, y, sh, sc))
    w = rand(6, device=device, seed=6).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ops.rms_norm_jvp(a, xd, b, None, 1e-6)[0], (x, w))
    assert torch.autograd.gradcheck(lambda a, g, b: ops.gated_residual_fwd(a, g, b), (x, sh, y))


def test_gradient_into_a_tangent_raises(device):
    x, sh, sc = (rand(2, 3, 6, device=device, seed=s).requires_grad_() for s in (1, 2, 3))
    out, out_dot, _, _ = ops.adaln_modulate_jvp(x, torch.ones_like(x), sh[:, 0], None, sc[:, 0], None, 1e-6)
    with pytest.raises(RuntimeError, match=r"output 1 \(a tangent or a statistic\) received a gradient"):
        (out + out_dot).sum().backward()
    _, tan = torch.func.jvp(dk.adaln_modulate, (x, sh[:, 0], sc[:, 0]), (torch.ones_like(x),) + (torch.zeros(2, 6, device=device),) * 2)
    with pytest.raises(RuntimeError, match=r"adaln_modulate: gradients through forward-mode tangents are not"):
        (tan.sum() + x.sum()).backward()


# ------------------------------------------------------------------ attention with rotary tables (issue 15)


@pytest.mark.parametrize("name", ["attention_fwd", "attention_jvp", "attention_bwd"])
def test_opcheck_attention_rope(device, name):
    q, k, v, qd, kd, g = (rand(1, 2, 9, 16, device=device, dtype=torch.float32, seed=s) for s in range(6))
    cos, sin = rand(9, 16, device=device, seed=7), rand(9, 16, device=device, dtype=torch.bfloat16, seed=8)
    o, lse = ops.attention_fwd(q, k, v, 0.25, cos, sin)
    args = {"attention_fwd": (q, k, v, 0.25, cos, sin), "attention_jvp": (q, k, v, qd, kd, None, 0.25, cos, sin),
            "attention_bwd": (g, q, k, v, o, lse, 0.25, cos, sin)}[name]
    torch.library.opcheck(getattr(ops, name).default, args)
