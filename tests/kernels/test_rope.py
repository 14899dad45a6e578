"""rope (LightningDiT / EVA VisionRotaryEmbeddingFast, interleaved pairs): forward, backward and
JVP against float64 references with random tables (not only true cos / sin: the backward is the
transpose of the rotation, whatever the tables), strided q / k views, low precision, NaN, bad
input and torch.compile."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import dmf_kernels as dk
from conftest import LOW_PRECISION, assert_f64, check_fwd_bwd_f64, check_jvp_f64, check_three_way, rand

ops = torch.ops.dmf_kernels


def rotate_half(x):
    # EVA / LightningDiT: x = rearrange(x, '... (d r) -> ... d r', r=2); x1, x2 = x.unbind(-1);
    # x = torch.stack((-x2, x1), dim=-1); rearrange(x, '... d r -> ... (d r)')
    x = x.reshape(*x.shape[:-1], -1, 2)
    x1, x2 = x.unbind(dim=-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def lightningdit_rope(t, freqs_cos, freqs_sin):
    # VisionRotaryEmbeddingFast.forward
    return t * freqs_cos + rotate_half(t) * freqs_sin


def lightningdit_tables(head_dim, grid, theta=10000.0):
    """VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=grid)'s freqs_cos / freqs_sin:
    (grid * grid, head_dim), float64 here."""
    dim = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[:dim // 2] / dim))
    t = torch.arange(grid, dtype=torch.float64)
    freqs = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, dim=-1)   # '... n -> ... (n r)', r=2
    both = torch.cat([freqs[:, None, :].expand(grid, grid, -1), freqs[None, :, :].expand(grid, grid, -1)], dim=-1)
    both = both.reshape(grid * grid, head_dim)
    return both.cos(), both.sin()


def tables(N, D, device, dtype=torch.float64, seed=3):
    """Random tables: cos and sin of a pair differ, and cos^2 + sin^2 != 1."""
    return (rand(N, D, device=device, dtype=dtype, scale=0.7, offset=0.3, seed=seed),
            rand(N, D, device=device, dtype=dtype, scale=0.7, seed=seed + 1))


# (B, H, N, D): head dims 64 and 72, N = 1, 17, 257; 3-D and 2-D x
SHAPES = [(2, 3, 17, 64), (1, 2, 257, 72), (2, 2, 1, 64), (3, 17, 72), (257, 64), (2, 1, 5, 2)]


def fns(cos, sin):
    return (lambda x: dk.rope(x, cos, sin)), (lambda x: lightningdit_rope(x, cos, sin))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rope_f64_random_tables(device, shape):
    cos, sin = tables(shape[-2], shape[-1], device)
    x = rand(*shape, device=device, seed=1)
    fn, ref = fns(cos, sin)
    check_fwd_bwd_f64(fn, ref, [x], ["x"])
    check_jvp_f64(fn, ref, [x], [rand(*shape, device=device, seed=70)])


def test_rope_backward_is_the_transpose(device):
    # <rope(x), g> = <x, rope_bwd(g)> for random tables; with true tables it is the inverse rotation.
    cos, sin = tables(17, 64, device)
    x, g = rand(2, 17, 64, device=device, seed=1), rand(2, 17, 64, device=device, seed=2)
    assert_f64((dk.rope(x, cos, sin) * g).sum(), (x * ops.rope_bwd(g, cos, sin)).sum())
    cos, sin = (t.to(device) for t in lightningdit_tables(64, 4))
    assert_f64(ops.rope_bwd(dk.rope(x[:, :16], cos, sin), cos, sin), x[:, :16])


@pytest.mark.parametrize("head_dim,grid", [(64, 16), (72, 4)])
def test_rope_lightningdit_tables(device, head_dim, grid):
    cos, sin = (t.to(device) for t in lightningdit_tables(head_dim, grid))
    x = rand(2, 3, grid * grid, head_dim, device=device, seed=1)
    fn, ref = fns(cos, sin)
    check_fwd_bwd_f64(fn, ref, [x], ["x"])
    check_jvp_f64(fn, ref, [x], [rand(*x.shape, device=device, seed=70)])


def test_rope_jvp_forms(device):
    cos, sin = tables(17, 64, device)
    x, xd = rand(2, 3, 17, 64, device=device, seed=1), rand(2, 3, 17, 64, device=device, seed=2)
    ref_out, ref_tan = torch.func.jvp(lambda t: lightningdit_rope(t, cos, sin), (x,), (xd,))
    xs = x.clone().requires_grad_()
    for jvp in (dk.jvp.rope, dk.rope.jvp, dk.rope.maybe_jvp):
        out, tan = jvp(xs, xd, cos, sin)
        assert_f64(out, ref_out)
        assert_f64(tan, ref_tan)
        assert out.requires_grad and not tan.requires_grad
    out, tan = dk.jvp.rope(x, None, cos, sin)
    assert_f64(out, ref_out)
    assert torch.equal(tan, torch.zeros_like(tan))
    assert dk.rope.maybe_jvp(x, None, cos, sin)[1] is None
    out, tan = ops.rope_jvp(x, None, cos, sin)  # the raw op writes a zero tangent
    assert torch.equal(tan, torch.zeros_like(tan))


def test_rope_gradcheck(device):
    cos, sin = tables(3, 6, device)
    x = rand(2, 3, 6, device=device, seed=1).requires_grad_()
    fn = lambda t: dk.rope(t, cos, sin)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradcheck(fn, (x,), check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, check_batched_grad=False)


@pytest.mark.parametrize("which", ["q", "k", "transposed_bn", "unfoldable"])
def test_rope_strided_views(device, which):
    # q and k as views of a fused qkv projection (B, N, 3, H, D) -> (B, H, N, D): read in place.
    B, N, H, D = 2, 17, 3, 64
    qkv = rand(B, N, 3, H, D, device=device, seed=1)
    if which in ("q", "k"):
        x = qkv.permute(2, 0, 3, 1, 4)[0 if which == "q" else 1]
        xd = rand(B, N, 3, H, D, device=device, seed=2).permute(2, 0, 3, 1, 4)[1]
    elif which == "transposed_bn":
        x = rand(N, B, D, device=device, seed=1).transpose(0, 1)
        xd = rand(*x.shape, device=device, seed=2)
    else:
        x = rand(2, 2, 3, N, 2 * D, device=device, seed=1).permute(2, 0, 1, 3, 4)[..., D:]
        x = x.transpose(0, 1)  # four strided groups: copied
        xd = rand(*x.shape, device=device, seed=2)
    assert not x.is_contiguous()
    cos, sin = tables(N, D, device)
    fn, ref = fns(cos, sin)
    check_fwd_bwd_f64(fn, ref, [x], ["x"])
    check_jvp_f64(fn, ref, [x], [xd])


def test_rope_table_dtypes(device):
    # any float dtype of the tables; used in fp32 (fp64 for fp64 x), so fp16 tables give
    # exactly what their fp32 copies give
    x = rand(2, 17, 64, device=device, dtype=torch.float32, seed=1)
    cos, sin = tables(17, 64, device, dtype=torch.float16)
    torch.testing.assert_close(dk.rope(x, cos, sin), dk.rope(x, cos.float(), sin.float()), rtol=0, atol=0)
    cos64, sin64 = tables(17, 64, device)
    torch.testing.assert_close(dk.rope(x, cos64, sin64), dk.rope(x, cos64.float(), sin64.float()), rtol=0, atol=0)
    xb = x.bfloat16()
    assert dk.rope(xb, cos64.float(), sin64.float()).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", [(2, 12, 257, 64), (2, 4, 17, 72)], ids=str)
def test_rope_low_precision(device, dtype, shape):
    # fp32 tables (LightningDiT's buffers); the eager reference computes in fp32 by promotion
    # and rounds once to x's dtype, as the kernel does.
    cos, sin = (t.float() for t in tables(shape[-2], shape[-1], device))

    def fn(x):
        return dk.rope(x, cos, sin)

    def ref(x):
        return lightningdit_rope(x, cos.to(torch.float64) if x.dtype == torch.float64 else cos,
                                 sin.to(torch.float64) if x.dtype == torch.float64 else sin).to(x.dtype)

    x = rand(*shape, device=device, seed=1)
    check_three_way(fn, ref, [x], [rand(*shape, device=device, seed=71)], dtype, ["x"])


def test_rope_nan_propagates(device):
    cos, sin = tables(5, 8, device, dtype=torch.float32)
    x = rand(2, 5, 8, device=device, dtype=torch.float32, seed=1)
    x[0, 2, 3] = float("nan")  # pair (2, 3) of row (0, 2)
    xd = torch.ones_like(x)
    xd[1, 4, 6] = float("nan")
    out, tan = dk.jvp.rope(x, xd, cos, sin)
    bad = torch.zeros_like(x, dtype=torch.bool)
    bad[0, 2, 2:4] = True
    assert torch.equal(torch.isnan(out), bad)
    bad_t = torch.zeros_like(bad)
    bad_t[1, 4, 6:8] = True
    assert torch.equal(torch.isnan(tan), bad_t)
    cos_nan = cos.clone()
    cos_nan[3, 5] = float("nan")  # position 3, element 5: that element of every row at n = 3
    out = dk.rope(rand(2, 5, 8, device=device, dtype=torch.float32, seed=1), cos_nan, sin)
    bad = torch.zeros_like(bad)
    bad[:, 3, 5] = True
    assert torch.equal(torch.isnan(out), bad)


def test_rope_bad_input(device):
    x = rand(2, 17, 64, device=device)
    cos, sin = tables(17, 64, device)
    with pytest.raises(RuntimeError, match=r"rope: cos must have shape \(N, D\) = \(17, 64\) \(x's last two dims\), "
                                           r"got \[16, 64\]"):
        dk.rope(x, cos[:16], sin)
    with pytest.raises(RuntimeError, match=r"rope: sin must have shape \(N, D\) = \(17, 64\) .*got \[2, 17, 64\]"):
        dk.rope(x, cos, sin.expand(2, 17, 64))
    with pytest.raises(RuntimeError, match=r"rope: the head dim D \(x's last dim\) must be even \(interleaved pairs\), "
                                           r"got 63"):
        dk.rope(x[..., :63], cos[:, :63], sin[:, :63])
    with pytest.raises(RuntimeError, match=r"rope: x must have shape \(\.\.\., N, D\)"):
        dk.rope(x[0, 0], cos, sin)
    with pytest.raises(RuntimeError, match=r"rope: cos must be a floating-point table, got Int"):
        dk.rope(x, cos.int(), sin)
    with pytest.raises(RuntimeError, match=r"rope_jvp: x_dot must have x's shape"):
        dk.jvp.rope(x, x[:, :3], cos, sin)
    with pytest.raises(TypeError, match=r"cos must be a Tensor"):
        dk.rope(x, 1.0, sin)


def test_rope_tables_are_constants(device):
    x = rand(2, 17, 64, device=device)
    cos, sin = tables(17, 64, device)
    # a tangent on a table: raised, not dropped
    with pytest.raises(RuntimeError, match=r"rope: cos carries a forward-mode tangent, but cos and sin are constant"):
        torch.func.jvp(dk.rope, (x, cos, sin), (x, torch.ones_like(cos), torch.zeros_like(sin)))
    with fwAD.dual_level():
        with pytest.raises(RuntimeError, match=r"rope: sin carries a forward-mode tangent"):
            dk.rope(fwAD.make_dual(x, x), cos, fwAD.make_dual(sin, sin))
        with pytest.raises(RuntimeError, match=r"rope: sin carries a forward-mode tangent"):
            dk.jvp.rope(x, x, cos, fwAD.make_dual(sin, sin))
    # a table that requires grad would silently get none
    with pytest.raises(RuntimeError, match=r"rope: cos requires grad, but cos and sin are constant tables"):
        dk.rope(x, cos.clone().requires_grad_(), sin)
    with torch.no_grad():
        dk.rope(x, cos.clone().requires_grad_(), sin)


def test_rope_empty(device):
    cos, sin = tables(5, 8, device)
    x = torch.empty(0, 3, 5, 8, device=device, dtype=torch.float64, requires_grad=True)
    out = dk.rope(x, cos, sin)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape


# ------------------------------------------------------------------ torch.compile (as test_compile.py)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def compile_inputs(device):
    r = lambda *s, seed: rand(*s, device=device, dtype=torch.float32, seed=seed)  # noqa: E731
    return r(2, 3, 5, 24, seed=1), r(5, 24, seed=2), r(5, 24, seed=3), r(2, 3, 5, 24, seed=4)


def test_rope_compile_forward_backward(device, fresh_dynamo):
    x, cos, sin, _ = compile_inputs(device)
    xs, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = torch.compile(dk.rope, fullgraph=True)(xs, cos, sin), dk.rope(xe, cos, sin)
    close(out, ref)
    g = rand(*x.shape, device=device, dtype=torch.float32, seed=9)
    close(torch.autograd.grad(out, xs, g)[0], torch.autograd.grad(ref, xe, g)[0])


def test_rope_compile_func_jvp(device, fresh_dynamo):
    x, cos, sin, xd = compile_inputs(device)

    def run(x, xd, cos, sin):
        return torch.func.jvp(lambda t: dk.rope(t, cos, sin), (x,), (xd,))

    out, tan = torch.compile(run, fullgraph=True)(x, xd, cos, sin)
    ref_out, ref_tan = torch.func.jvp(lambda t: lightningdit_rope(t, cos, sin), (x,), (xd,))
    close(out, ref_out)
    close(tan, ref_tan)


def test_rope_compile_forward_ad(device, fresh_dynamo):
    x, cos, sin, xd = compile_inputs(device)

    def run(x, xd, cos, sin):
        with fwAD.dual_level():
            return fwAD.unpack_dual(dk.rope(fwAD.make_dual(x, xd), cos, sin)).tangent

    tan = torch.compile(run, fullgraph=True)(x, xd, cos, sin)
    assert tan is not None, "compiled forward-mode AD dropped the tangent"
    close(tan, lightningdit_rope(xd, cos, sin))


def test_rope_compile_jvp_form(device, fresh_dynamo):
    x, cos, sin, xd = compile_inputs(device)

    def step(x, xd, cos, sin):
        out, tan = dk.jvp.rope(x, xd, cos, sin)
        return (out * tan).sum()

    xs, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.compile(step, fullgraph=True)(xs, xd, cos, sin).backward()
    step(xe, xd, cos, sin).backward()
    close(xs.grad, xe.grad)
