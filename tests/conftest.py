"""Shared test helpers: devices, random inputs, the three-way precision bound.

DMF_KERNELS_CUDA_EMU=<schedule>:<seed> (e.g. priority:1) runs every C++ op on CPU tensors
through the CUDA kernels under the CPU emulation (dmf_kernels.cuda_emu; `make test-cuda-emu`).
"""
import os
import sys

import pytest
import torch

import dmf_kernels


def _import_the_dmf_package():
    """tests/dmf (the dmf package's tests) would shadow the dmf package itself, as a namespace
    package, while tests/ is on sys.path (pytest puts it there for this file): import the real
    one first, so that `import dmf` in every test gets it."""
    here = os.path.dirname(os.path.abspath(__file__))
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    try:
        import dmf  # noqa: F401
    finally:
        sys.path[:] = saved


_import_the_dmf_package()

HAS_CUDA = torch.cuda.is_available()

CUDA_EMU = os.environ.get("DMF_KERNELS_CUDA_EMU", "")
if CUDA_EMU:
    from dmf_kernels import cuda_emu

    _schedule, _, _seed = CUDA_EMU.partition(":")
    cuda_emu.enable(_schedule, int(_seed or 0))


def pytest_report_header(config):
    if CUDA_EMU:
        return f"dmf_kernels C++ ops on CPU tensors: CUDA kernels under the emulation ({CUDA_EMU}, {cuda_emu.library_path()})"


# CUDA variants run whenever a GPU is present and then must pass: a CUDA torch with a
# GPU but an extension built without CUDA kernels is a failure, not a skip.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")]),
]

LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]

# atol of the three-way bound, relative to the reference's max magnitude.
REL_ATOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def rand(*shape, device="cpu", dtype=torch.float64, scale=1.0, offset=0.0, seed=None):
    """Random normal data (never zeros); x-like inputs get an offset to exercise the
    variance computation away from mean 0."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset
    return t.to(device=device, dtype=dtype)


def max_err(a, ref):
    return (a.double() - ref.double()).abs().max().item() if ref.numel() else 0.0


def assert_three_way(kernel, eager, ref64, dtype, what="", factor=2.0):
    """Kernel error vs the float64 reference must be at most factor x the error of eager
    PyTorch in the same dtype, plus a small atol relative to the output's magnitude."""
    assert torch.isfinite(kernel).all(), f"{what}: non-finite values in kernel output"
    # atol relative to the output's magnitude, floored at magnitude 1 (an exactly-zero
    # reference, e.g. dq with a single key, still allows rounding noise of O(1) inputs).
    scale = ref64.abs().max().item() if ref64.numel() else 1.0
    err_k, err_e = max_err(kernel, ref64), max_err(eager, ref64)
    bound = factor * err_e + REL_ATOL[dtype] * max(scale, 1.0)
    assert err_k <= bound, f"{what}: kernel err {err_k:.3e} > bound {bound:.3e} (eager err {err_e:.3e}, {dtype})"


def assert_f64(actual, expected, what="", rtol=1e-10, atol=1e-10):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def mod_param(form, B, N, D, device, dtype, scale=0.5, seed=None):
    """A modulation parameter in one of the accepted layouts for x of shape (B, N, D)."""
    shapes = {"BD": (B, D), "B1D": (B, 1, D), "BND": (B, N, D), "D": (D,)}
    return rand(*shapes[form], device=device, dtype=dtype, scale=scale, seed=seed)


def randomize_params(model, seed=0, scale=0.3):
    """Random values (float64 draws, cast to each parameter) for every trainable parameter: the
    adaLN-Zero init (zero modulation, zero final layer) would hide most errors in a comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)
    return model


def build_has_cuda():
    return dmf_kernels.build_info()["cuda"]


def as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def leaf(inputs):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]


def grads_of(fn, inputs, grad_outputs):
    xs = leaf(inputs)
    outs = as_tuple(fn(*xs))
    return outs, torch.autograd.grad(outs, xs, grad_outputs)


def check_fwd_bwd_f64(fn, ref_fn, inputs, names):
    """Forward and every input gradient of fn against the float64 eager reference."""
    ref_outs = as_tuple(ref_fn(*inputs))
    grad_outputs = [rand(*o.shape, device=o.device, dtype=o.dtype, seed=100 + i) for i, o in enumerate(ref_outs)]
    outs, grads = grads_of(fn, inputs, grad_outputs)
    ref_outs, ref_grads = grads_of(ref_fn, inputs, grad_outputs)
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert_f64(o, r, f"output {i}")
    for n, g, r in zip(names, grads, ref_grads):
        assert_f64(g, r, f"grad of {n}")


def check_jvp_f64(fn, ref_fn, primals, tangents):
    """torch.func.jvp and torch.autograd.forward_ad of fn against torch.func.jvp of the
    float64 eager reference; also backward through the jvp's primal output."""
    ref_out, ref_tan = torch.func.jvp(ref_fn, tuple(primals), tuple(tangents))
    out, tan = torch.func.jvp(fn, tuple(primals), tuple(tangents))
    for o, r in zip(as_tuple(out), as_tuple(ref_out)):
        assert_f64(o, r, "jvp primal")
    for t, r in zip(as_tuple(tan), as_tuple(ref_tan)):
        assert_f64(t, r, "func.jvp tangent")

    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        fa_tan = [fwAD.unpack_dual(o).tangent for o in as_tuple(fn(*duals))]
    for t, r in zip(fa_tan, as_tuple(ref_tan)):
        assert_f64(t, r, "forward_ad tangent")

    # MeanFlow's use: u, du_dt = jvp(...); loss(u).backward() must reach the inputs.
    xs = leaf(primals)
    xr = leaf(primals)
    out, _ = torch.func.jvp(fn, tuple(xs), tuple(tangents))
    rout, _ = torch.func.jvp(ref_fn, tuple(xr), tuple(tangents))
    w = [rand(*o.shape, device=o.device, dtype=o.dtype, seed=7 + i) for i, o in enumerate(as_tuple(rout))]
    sum((o * wi).sum() for o, wi in zip(as_tuple(out), w)).backward()
    sum((o * wi).sum() for o, wi in zip(as_tuple(rout), w)).backward()
    for a, b in zip(xs, xr):
        assert_f64(a.grad, b.grad, "grad through the jvp primal")


def check_three_way(fn, ref_fn, inputs64, tangents64, dtype, names):
    """Forward, backward and JVP of fn in `dtype` against eager PyTorch in `dtype`, both
    measured against the float64 reference."""
    lp = [t.to(dtype) for t in inputs64]
    tlp = [t.to(dtype) for t in tangents64]
    with torch.no_grad():
        outs_k, outs_e, outs_r = as_tuple(fn(*lp)), as_tuple(ref_fn(*lp)), as_tuple(ref_fn(*inputs64))
    for i, (k, e, r) in enumerate(zip(outs_k, outs_e, outs_r)):
        assert_three_way(k, e, r, dtype, f"forward output {i}")
    g64 = [rand(*o.shape, device=o.device, dtype=torch.float64, seed=200 + i) for i, o in enumerate(outs_r)]
    glp = [g.to(dtype) for g in g64]
    _, gk = grads_of(fn, lp, glp)
    _, ge = grads_of(ref_fn, lp, glp)
    _, gr = grads_of(ref_fn, inputs64, g64)
    for n, k, e, r in zip(names, gk, ge, gr):
        assert_three_way(k, e, r, dtype, f"grad of {n}")
    _, tk = torch.func.jvp(fn, tuple(lp), tuple(tlp))
    _, te = torch.func.jvp(ref_fn, tuple(lp), tuple(tlp))
    _, tr = torch.func.jvp(ref_fn, tuple(inputs64), tuple(tangents64))
    for i, (k, e, r) in enumerate(zip(as_tuple(tk), as_tuple(te), as_tuple(tr))):
        assert_three_way(k, e, r, dtype, f"tangent {i}")


@pytest.fixture
def rms_statistic_in_input_dtype(monkeypatch):
    """The official RMSNorm computes its statistic in fp32 even for fp64 input (a 1e-7
    relative difference); our kernels use fp64 for fp64. The fp64 tests compare formulas, so
    the reference keeps the input's dtype here; low-precision tests use it unchanged."""
    def forward(self, x):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        norm_x = torch.rsqrt(x.pow(2).mean(-1, keepdim=True, dtype=acc) + self.eps)
        return x * norm_x.to(dtype=x.dtype) * self.scale.to(dtype=x.dtype)
    from replicas import official_dmf
    monkeypatch.setattr(official_dmf.RMSNorm, "forward", forward)


class PreNormStack(torch.nn.Module):
    """Blocks of dmf_kernels.nn.PreNormBlock with one rotary embedding (in-context conditioning:
    x carries the condition tokens), x: (B, grid^2, dim) -> same. For tests/kernels/test_act_ckpt.py
    and tests/fsdp_worker.py."""

    def __init__(self, depth=3, dim=16, heads=2, grid=3):
        super().__init__()
        from dmf_kernels import nn as dnn
        self.rope = dnn.RotaryEmbedding2D(dim // heads // 2, grid)
        self.blocks = torch.nn.ModuleList(dnn.PreNormBlock(dim, heads) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x, self.rope)
        return x
