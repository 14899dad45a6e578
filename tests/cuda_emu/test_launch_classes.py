"""The CUDA kernels (csrc/cuda/*.cu) under the CPU emulation, one case per launch-configuration
class: every (team, elements per thread, vector width) the row launchers can pick for each
dtype, and the column-tile shapes of gated_residual, each op forward / backward / JVP against
the float64 reference (three-way bound in low precision).

The schedule is DMF_KERNELS_CUDA_EMU (<schedule>:<seed>) when set, else priority order seed 1.
Rows: 2 x 19 = 38 per-sample groups, so sub-warp teams leave the last warp partly empty (its
idle teams return early: shuffle masks must not name them) and groups do not align with blocks.
"""
import functools
import os

import pytest
import torch

import dmf_kernels as dk
from dmf_kernels import cuda_emu
from dmf_kernels import reference as ref
from conftest import assert_f64, assert_three_way, rand

B, N = 2, 19
N_LONG = 3  # rows of 4096+ elements: one block each, so fewer rows keep the emulation quick
VEC = {torch.float32: 4, torch.float16: 8, torch.bfloat16: 8, torch.float64: 1}
MAX_DIM = 16384  # kMaxDim of csrc/cuda/launch.h
SCHEDULE, _, SEED = (os.environ.get("DMF_KERNELS_CUDA_EMU") or "priority:1").partition(":")


@pytest.fixture(autouse=True)
def emulated():
    with cuda_emu.enabled(SCHEDULE, int(SEED or 0)):
        yield


def vec_for(dim, dtype):
    v = VEC[dtype]
    return v if dim % v == 0 else 1


@functools.cache
def row_classes(dtype):
    """{(team, ept, vec): a D that launches it} over every D the CUDA path takes: the smallest
    D >= 5 where the class has one (a LayerNorm over 1-4 elements is degenerate: eager fp16's
    own JVP overflows at variance 0), else the smallest."""
    classes = {}
    for dim in range(1, MAX_DIM + 1):
        vec = vec_for(dim, dtype)
        team, ept, _, _ = cuda_emu.row_launch(dim, vec)
        if (team, ept, vec) not in classes or classes[(team, ept, vec)] < 5:
            classes[(team, ept, vec)] = dim
    return classes


ROW_CASES = [pytest.param(dtype, cls, dim, id=f"{str(dtype)[6:]}-team{cls[0]}-ept{cls[1]}-vec{cls[2]}-D{dim}")
             for dtype in VEC for cls, dim in sorted(row_classes(dtype).items())]


def test_row_classes_cover_every_shape_the_launcher_has():
    # Each dtype reaches sub-warp teams of 8 and 16, warp teams and whole-block rows, and
    # every EPT a block row can take; the cases above run each of them.
    for dtype in VEC:
        classes = row_classes(dtype)
        teams = {c[0] for c in classes}
        assert teams == {8, 16, 32, 0}, (dtype, teams)
        assert {c[1] for c in classes if c[0] == 0} == {8, 16, 32}, (dtype, classes)


def check(kernel, eager, ref64, dtype, what):
    if dtype == torch.float64:
        assert_f64(kernel, ref64, what, rtol=1e-9, atol=1e-9)
    else:
        assert_three_way(kernel, eager, ref64, dtype, what)


def run_all(fn, ref_fn, inputs64, tangents64, dtype, names):
    """Forward, every input gradient and the JVP tangent of fn in `dtype` (C++ ops: the
    emulated CUDA kernels) against ref_fn in `dtype` and in float64."""
    lp = [t.to(dtype) for t in inputs64]
    tlp = [t.to(dtype) for t in tangents64]
    launches = cuda_emu.launch_count()
    out_k = fn(*lp)
    assert cuda_emu.launch_count() > launches, "the emulated CUDA kernels did not run"
    out_e, out_r = ref_fn(*lp), ref_fn(*inputs64)
    check(out_k, out_e, out_r, dtype, "forward")
    g64 = rand(*out_r.shape, seed=300)

    def grads(f, xs, g):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        return torch.autograd.grad(f(*xs), xs, g)

    for n, k, e, r in zip(names, grads(fn, lp, g64.to(dtype)), grads(ref_fn, lp, g64.to(dtype)),
                          grads(ref_fn, inputs64, g64)):
        check(k, e, r, dtype, f"grad of {n}")
    _, tk = torch.func.jvp(fn, tuple(lp), tuple(tlp))
    _, te = torch.func.jvp(ref_fn, tuple(lp), tuple(tlp))
    _, tr = torch.func.jvp(ref_fn, tuple(inputs64), tuple(tangents64))
    check(tk, te, tr, dtype, "jvp tangent")


def tokens(dim):
    return N if dim < 4096 else N_LONG


def tangents(inputs, seed=500):
    return [rand(*t.shape, seed=seed + i) for i, t in enumerate(inputs)]


@pytest.mark.parametrize("dtype,cls,dim", ROW_CASES)
def test_gated_residual_adaln_class(dtype, cls, dim):
    # gated_residual_adaln covers adaln_modulate's kernels too (the same fwd/jvp/bwd kernels
    # with the residual part switched on), plus per-sample (B, D) modulation.
    n = tokens(dim)
    inputs = [rand(B, n, dim, scale=2.0, offset=0.7, seed=1), rand(B, dim, scale=0.5, seed=4),
              rand(B, n, dim, seed=5), rand(B, dim, scale=0.5, seed=2), rand(B, dim, scale=0.5, seed=3)]

    def fused(x, gate, y, shift, scale):
        return dk.gated_residual_adaln(x, gate, y, shift, scale)[1]

    def eager(x, gate, y, shift, scale):
        return ref.gated_residual_adaln(x, gate, y, shift, scale)[1]

    run_all(fused, eager, inputs, tangents(inputs), dtype, ["x", "gate", "y", "shift", "scale"])


@pytest.mark.parametrize("dtype,cls,dim", ROW_CASES)
def test_adaln_modulate_class(dtype, cls, dim):
    inputs = [rand(B, tokens(dim), dim, scale=2.0, offset=0.7, seed=1), rand(dim, scale=0.5, seed=2),
              rand(dim, scale=0.5, seed=3)]
    run_all(dk.adaln_modulate, ref.adaln_modulate, inputs, tangents(inputs), dtype, ["x", "shift", "scale"])


@pytest.mark.parametrize("dtype,cls,dim", ROW_CASES)
def test_rms_norm_class(dtype, cls, dim):
    inputs = [rand(B, tokens(dim), dim, scale=2.0, offset=0.3, seed=1), rand(dim, scale=0.2, offset=1.0, seed=2)]
    run_all(dk.rms_norm, ref.rms_norm, inputs, tangents(inputs), dtype, ["x", "weight"])


# norm_mod's RMS kind: the same kernels with the rms flag, a weight row (row_stride 0)
# and an absent shift (no shift loads, no shift partials), in every launch class.
@pytest.mark.parametrize("dtype,cls,dim", ROW_CASES)
def test_rms_adaln_modulate_class(dtype, cls, dim):
    inputs = [rand(B, tokens(dim), dim, scale=2.0, offset=0.7, seed=1), rand(B, dim, scale=0.5, seed=3),
              rand(dim, scale=0.2, offset=1.0, seed=6)]

    def fused(x, scale, weight):  # LightningDiT's wo_shift form
        return dk.rms_adaln_modulate(x, None, scale, weight)

    def eager(x, scale, weight):
        return ref.rms_adaln_modulate(x, None, scale, weight)

    run_all(fused, eager, inputs, tangents(inputs), dtype, ["x", "scale", "weight"])


@pytest.mark.parametrize("dtype,cls,dim", ROW_CASES)
def test_gated_residual_rms_adaln_class(dtype, cls, dim):
    n = tokens(dim)
    inputs = [rand(B, n, dim, scale=2.0, offset=0.7, seed=1), rand(B, dim, scale=0.5, seed=4),
              rand(B, n, dim, seed=5), rand(B, dim, scale=0.5, seed=2), rand(B, dim, scale=0.5, seed=3),
              rand(dim, scale=0.2, offset=1.0, seed=6)]

    def fused(x, gate, y, shift, scale, weight):
        return dk.gated_residual_rms_adaln(x, gate, y, shift, scale, weight)[1]

    def eager(x, gate, y, shift, scale, weight):
        return ref.gated_residual_rms_adaln(x, gate, y, shift, scale, weight)[1]

    run_all(fused, eager, inputs, tangents(inputs), dtype, ["x", "gate", "y", "shift", "scale", "weight"])


# gated_residual: column tiles of up to 512 threads x VEC columns; one tile, several tiles,
# vectorised or not; per-sample and full-shape gates.
@pytest.mark.parametrize("dtype", list(VEC), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("dim", [72, 4099, 4104])
@pytest.mark.parametrize("gate_form", ["BD", "BND"])
def test_gated_residual_tiles(dtype, dim, gate_form):
    gate = rand(B, dim, scale=0.5, seed=4) if gate_form == "BD" else rand(B, N, dim, scale=0.5, seed=4)
    inputs = [rand(B, N, dim, seed=1), gate, rand(B, N, dim, seed=5)]
    run_all(dk.gated_residual, ref.gated_residual, inputs, tangents(inputs), dtype, ["x", "gate", "y"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_misaligned_modulation_views(dtype):
    # Chunks of a fused projection at an odd element offset: row strides allow 16-byte vectors
    # but the pointers are not 16-byte aligned, so the launchers must take the scalar path
    # (a dropped alignment check is a misaligned vector access: UBSan's report in this build).
    dim = 64
    c = rand(B, 4 * dim + 8, scale=0.5, seed=9).to(dtype)
    shift, scale = c[:, 1:1 + dim], c[:, 1 + dim:1 + 2 * dim]
    x = rand(B, N, dim, scale=2.0, offset=0.7, seed=1).to(dtype)
    out = dk.adaln_modulate(x, shift, scale)
    check(out, ref.adaln_modulate(x, shift, scale), ref.adaln_modulate(x.double(), shift.double(), scale.double()),
          dtype, "forward with misaligned views")


def test_nan_in_nan_out():
    x = rand(B, N, 72, seed=1)
    x[0, 3, 5] = float("nan")
    out = dk.adaln_modulate(x, rand(72, seed=2), rand(72, seed=3))
    assert torch.isnan(out[0, 3]).all() and torch.isfinite(out[0, :3]).all() and torch.isfinite(out[1]).all()


def test_empty_input_launches_nothing():
    launches = cuda_emu.launch_count()
    out = dk.adaln_modulate(torch.empty(0, 5, 72), torch.randn(72), torch.randn(72))
    assert out.shape == (0, 5, 72) and cuda_emu.launch_count() == launches


# ------------------------------------------------------------------ swiglu, rope
# Both are flat elementwise launches (256-thread blocks over rows * D / VEC vectors, the last
# block partial). Classes: 16-byte vectors or scalar (VEC = 1 for swiglu, one pair for rope),
# rows read in place through strided views, and a misaligned view that must take the scalar path.


@pytest.mark.parametrize("dtype", list(VEC), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("form", ["vec-H72", "scalar-H4099", "strided-H72", "misaligned-H64"])
def test_swiglu_class(dtype, form):
    H = int(form.split("-H")[1])
    n = tokens(H)
    if form.startswith("strided"):  # the first 2H columns of a wider (B, N, 3H) projection, rows permuted
        x = rand(n, B, 3 * H, scale=2.0, seed=1).transpose(0, 1)[..., :2 * H]
    elif form.startswith("misaligned"):  # strides allow vectors, rows start one element past 16 bytes
        x = rand(B, n, 2 * H + 8, scale=2.0, seed=1)[..., 1:1 + 2 * H]
    else:
        x = rand(B, n, 2 * H, scale=2.0, seed=1)
    run_all(dk.swiglu, ref.swiglu, [x], tangents([x]), dtype, ["x"])


def rope_tables(N, D, dtype):
    cos, sin = rand(N, D, scale=0.7, offset=0.3, seed=11), rand(N, D, scale=0.7, seed=12)
    return (cos, sin) if dtype == torch.float64 else (cos.float(), sin.float())


@pytest.mark.parametrize("dtype", list(VEC), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("form", ["vec-D64", "vec-D72", "pairs-D66", "qview-D64", "misaligned-D64"])
def test_rope_class(dtype, form):
    D = int(form.split("-D")[1])
    if form.startswith("qview"):  # q of a fused qkv projection (B, N, 3, H, D) -> (B, H, N, D)
        x = rand(B, N, 3, 2, D, seed=1).permute(2, 0, 3, 1, 4)[0]
    elif form.startswith("misaligned"):  # strides allow vectors, rows start one element past 16 bytes
        x = rand(B, 2, N, D + 8, seed=1)[..., 1:1 + D]
    else:
        x = rand(B, 2, N, D, seed=1)
    cos, sin = rope_tables(N, D, dtype)

    def fused(t):
        return dk.rope(t, cos, sin)

    def eager(t):
        c, s = (cos.double(), sin.double()) if t.dtype == torch.float64 else (cos, sin)
        return (t * c + ref.rotate_half(t) * s).to(t.dtype)

    run_all(fused, eager, [x], tangents([x]), dtype, ["x"])
