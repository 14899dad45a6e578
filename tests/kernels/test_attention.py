"""dmf_kernels.attention through the public API: forward, backward and JVP against the
float64 math path, the dual API, compile, opcheck, bad input, CPU-path memory. On a CUDA
device these run the Triton kernels; on CPU the blockwise PyTorch path (the Triton kernels
under the interpreter are in test_attention_triton.py and test_attention_triton_rope.py)."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import dmf_kernels as dk
from dmf_kernels import reference as ref
from conftest import LOW_PRECISION, assert_f64, assert_three_way, rand

# (B, H, NQ, NK, D): DiT head dims 64 and 72, the other supported odd ones, ragged lengths.
SHAPES = [(1, 2, 1, 1, 64), (2, 2, 17, 17, 72), (1, 3, 257, 257, 72), (1, 1, 40, 1000, 64), (2, 1, 33, 7, 80),
          (1, 2, 65, 65, 96), (1, 1, 31, 47, 128), (1, 2, 20, 20, 16)]


def qkv(B, H, NQ, NK, D, device, dtype=torch.float64, seed=0, scale=1.0):
    return [rand(B, H, n, D, device=device, dtype=dtype, seed=seed + i, scale=scale)
            for i, n in enumerate((NQ, NK, NK))]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_attention_f64(device, shape):
    q, k, v = qkv(*shape, device)
    tangents = qkv(*shape, device, seed=10)
    # forward and backward
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    xr = [t.clone().requires_grad_() for t in (q, k, v)]
    out, r_out = dk.attention(*xs), ref.attention(*xr)
    assert_f64(out, r_out, "o")
    g = rand(*out.shape, device=device, seed=20)
    for a, b, n in zip(torch.autograd.grad(out, xs, g), torch.autograd.grad(r_out, xr, g), "qkv"):
        assert_f64(a, b, f"d{n}")
    # torch.func.jvp, forward_ad, dual API
    o, t = torch.func.jvp(dk.attention, (q, k, v), tuple(tangents))
    ro, rt = torch.func.jvp(ref.attention, (q, k, v), tuple(tangents))
    assert_f64(o, ro, "jvp primal")
    assert_f64(t, rt, "func.jvp tangent")
    with fwAD.dual_level():
        fa = fwAD.unpack_dual(dk.attention(*[fwAD.make_dual(p, tt) for p, tt in zip((q, k, v), tangents)])).tangent
    assert_f64(fa, rt, "forward_ad tangent")
    o2, t2 = dk.jvp.attention(q, k, v, *tangents)
    assert_f64(o2, ro)
    assert_f64(t2, rt)


def test_attention_scale_and_partial_tangents(device):
    q, k, v = qkv(2, 2, 19, 23, 72, device)
    qd, kd, vd = qkv(2, 2, 19, 23, 72, device, seed=5)
    for tangents in [(qd, None, None), (None, kd, None), (None, None, vd), (None, None, None)]:
        full = [torch.zeros_like(p) if t is None else t for p, t in zip((q, k, v), tangents)]
        ro, rt = torch.func.jvp(lambda a, b, c: ref.attention(a, b, c, scale=0.3), (q, k, v), tuple(full))
        o, t = dk.jvp.attention(q, k, v, *tangents, scale=0.3)
        assert_f64(o, ro)
        assert_f64(t, rt)


def test_attention_grad_through_jvp_primal(device):
    # MeanFlow: u, du_dt = jvp(model, ...); loss(u).backward()
    q, k, v = qkv(1, 2, 33, 33, 72, device)
    tangents = qkv(1, 2, 33, 33, 72, device, seed=3)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    xr = [t.clone().requires_grad_() for t in (q, k, v)]
    o, t = torch.func.jvp(dk.attention, tuple(xs), tuple(tangents))
    ro, rt = torch.func.jvp(ref.attention, tuple(xr), tuple(tangents))
    with pytest.raises(RuntimeError, match=r"gradients through forward-mode tangents are not supported"):
        (o.sum() + t.sum()).backward(retain_graph=True)
    (o * 1.5).sum().backward()
    (ro * 1.5).sum().backward()
    for a, b in zip(xs, xr):
        assert_f64(a.grad, b.grad)


def test_attention_permuted_qkv_view(device):
    # q, k, v as permuted views of a fused (B, N, 3, H, D) projection, read in place.
    qkv_proj = rand(2, 21, 3, 4, 72, device=device, seed=1)
    q, k, v = (qkv_proj[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    assert not q.is_contiguous()
    assert_f64(dk.attention(q, k, v), ref.attention(q, k, v))
    t = rand(*q.shape, device=device, seed=2)
    assert_f64(dk.jvp.attention(q, k, v, t, None, None)[1],
               torch.func.jvp(lambda a: ref.attention(a, k, v), (q,), (t,))[1])


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", [(2, 2, 65, 65, 72), (1, 2, 100, 37, 64)], ids=str)
def test_attention_low_precision(device, dtype, shape):
    q, k, v = qkv(*shape, device)
    tq, tk, tv = qkv(*shape, device, seed=10)
    lp = [t.to(dtype) for t in (q, k, v, tq, tk, tv)]
    ro, rt = torch.func.jvp(ref.attention, (q, k, v), (tq, tk, tv))
    eo, et = torch.func.jvp(ref.attention, tuple(lp[:3]), tuple(lp[3:]))
    ko, kt = torch.func.jvp(dk.attention, tuple(lp[:3]), tuple(lp[3:]))
    assert_three_way(ko, eo, ro, dtype, "o")
    assert_three_way(kt, et, rt, dtype, "o_dot")
    g = rand(*ro.shape, device=device, seed=30)
    xs = [t.clone().requires_grad_() for t in lp[:3]]
    xe = [t.clone().requires_grad_() for t in lp[:3]]
    x64 = [t.clone().requires_grad_() for t in (q, k, v)]
    gk = torch.autograd.grad(dk.attention(*xs), xs, g.to(dtype))
    ge = torch.autograd.grad(ref.attention(*xe), xe, g.to(dtype))
    gr = torch.autograd.grad(ref.attention(*x64), x64, g)
    for a, b, c, n in zip(gk, ge, gr, "qkv"):
        assert_three_way(a, b, c, dtype, f"d{n}")


def test_attention_compile(device):
    torch._dynamo.reset()
    q, k, v = qkv(1, 2, 24, 24, 64, device, dtype=torch.float32)
    tangents = qkv(1, 2, 24, 24, 64, device, dtype=torch.float32, seed=4)
    f = torch.compile(dk.attention, fullgraph=True)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    xe = [t.clone().requires_grad_() for t in (q, k, v)]
    out, eout = f(*xs), dk.attention(*xe)
    torch.testing.assert_close(out, eout)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, xs, g), torch.autograd.grad(eout, xe, g)):
        torch.testing.assert_close(a, b)
    jvp = torch.compile(lambda *a: torch.func.jvp(dk.attention, a[:3], a[3:]), fullgraph=True)
    (o, t), (eo, et) = jvp(q, k, v, *tangents), torch.func.jvp(dk.attention, (q, k, v), tuple(tangents))
    torch.testing.assert_close(o, eo)
    torch.testing.assert_close(t, et)
    assert t.abs().max() > 0


@pytest.mark.parametrize("name", ["attention_fwd", "attention_jvp", "attention_bwd"])
def test_attention_opcheck(device, name):
    q, k, v = qkv(1, 2, 9, 13, 64, device, dtype=torch.float32)
    qd, kd, vd = qkv(1, 2, 9, 13, 64, device, dtype=torch.float32, seed=3)
    o, lse = torch.ops.dmf_kernels.attention_fwd(q, k, v, 0.125)
    args = {"attention_fwd": (q, k, v, 0.125), "attention_jvp": (q, k, v, qd, None, vd, 0.125),
            "attention_bwd": (torch.randn_like(o), q, k, v, o, lse, 0.125)}[name]
    torch.library.opcheck(getattr(torch.ops.dmf_kernels, name).default, args)


def test_attention_bad_input(device):
    q, k, v = qkv(1, 2, 9, 13, 64, device, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"k's head dim 32 differs from q's 64"):
        dk.attention(q, k[..., :32], v)
    with pytest.raises(ValueError, match=r"v's head dim 32 differs"):
        dk.attention(q, k, v[..., :32])
    with pytest.raises(ValueError, match=r"share batch and heads"):
        dk.attention(q, k[:, :1], v[:, :1])
    with pytest.raises(TypeError, match=r"k has dtype torch.float16, expected q's dtype torch.float32"):
        dk.attention(q, k.half(), v)
    with pytest.raises(TypeError, match=r"must be float16, bfloat16, float32 or float64"):
        dk.attention(q.int(), k.int(), v.int())
    with pytest.raises(ValueError, match=r"must have shape \(B, H, N, D\)"):
        dk.attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match=r"same sequence length"):
        dk.attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match=r"k_dot must have the shape of its primal"):
        dk.jvp.attention(q, k, v, None, k[:, :, :3], None)
    with pytest.raises(ValueError, match=r"no keys"):
        dk.attention(q, k[:, :, :0], v[:, :, :0])
    if device == "cuda":
        with pytest.raises(ValueError, match=r"head dim 160 is outside the supported range 16..128"):
            dk.attention(*qkv(1, 1, 4, 4, 160, device, dtype=torch.float16))


def test_attention_empty_queries(device):
    q, k, v = qkv(1, 2, 0, 13, 64, device, dtype=torch.float32)
    assert dk.attention(q, k, v).shape == (1, 2, 0, 64)
    o, t = dk.jvp.attention(q, k, v, q, None, None)
    assert o.shape == t.shape == (1, 2, 0, 64)


def test_attention_large_logits_finite(device):
    q, k, v = qkv(1, 2, 33, 33, 64, device, dtype=torch.float32, scale=30.0)
    o, t = dk.jvp.attention(q, k, v, *qkv(1, 2, 33, 33, 64, device, dtype=torch.float32, seed=7, scale=30.0))
    assert torch.isfinite(o).all() and torch.isfinite(t).all()


def test_attention_cpu_path_memory_is_linear():
    # The blockwise CPU path must not materialise the N x N scores: at N = 2048 one fp32
    # score matrix per head is 16 MiB, and the eager math JVP holds several. Measured from
    # the profiler's allocation timeline (per-op deltas miss frees inside custom ops).
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    def peak_above_start(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            fn()
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
        totals = [sum(s) for s in sizes]
        return max(totals) - totals[0]

    N, D = 2048, 64
    q, k, v, qd, kd, vd = (torch.randn(1, 1, N, D) for _ in range(6))
    ours = peak_above_start(lambda: dk.jvp.attention(q, k, v, qd, kd, vd))
    eager = peak_above_start(lambda: torch.func.jvp(ref.attention, (q, k, v), (qd, kd, vd)))
    assert eager > 2 * N * N * 4, "the measurement failed to see the math path's N x N matrices"
    assert ours < 0.5 * N * N * 4, f"peak {ours / 2**20:.1f} MiB: the N x N scores were materialised"


# ---------------------------------------------------------------- rotary embedding (issue 15)


def lightning_rope(t, cos, sin):
    """LightningDiT's VisionRotaryEmbeddingFast.forward, written out: t * cos + rotate_half(t) * sin,
    rotate_half as its rearrange '... (d r) -> ... d r' (r = 2), stack((-x2, x1)), back."""
    x1, x2 = t.reshape(*t.shape[:-1], -1, 2).unbind(-1)
    return t * cos + torch.stack((-x2, x1), dim=-1).reshape(t.shape) * sin


def rope_ref(q, k, v, scale=None, cos=None, sin=None):
    """float64 reference with LightningDiT's formula (independent of dmf_kernels.reference)."""
    q, k = lightning_rope(q, cos, sin), lightning_rope(k, cos, sin)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


def tables(N, D, device, dtype=torch.float64, seed=100):
    """Random tables (not a rotation: cos^2 + sin^2 != 1, the two entries of a pair differ),
    so every term of the forward, backward and JVP formulas is exercised."""
    return rand(N, D, device=device, dtype=dtype, seed=seed), rand(N, D, device=device, dtype=dtype, seed=seed + 1)


def test_reference_rope_is_lightningdit():
    t = rand(2, 3, 5, 8, seed=1)
    cos, sin = tables(5, 8, "cpu")
    torch.testing.assert_close(ref.rope(t, cos, sin), lightning_rope(t, cos, sin), rtol=0, atol=0)
    # with a real rotation table (equal angles within a pair), rope is an isometry per pair
    theta = torch.rand(5, 4, dtype=torch.float64).repeat_interleave(2, -1)
    r = ref.rope(t, theta.cos(), theta.sin())
    torch.testing.assert_close(r.norm(dim=-1), t.norm(dim=-1))


@pytest.mark.parametrize("shape", [(1, 2, 1, 64), (2, 2, 17, 72), (1, 3, 257, 64), (1, 1, 257, 72)], ids=str)
def test_attention_rope_f64(device, shape):
    B, H, N, D = shape
    q, k, v = qkv(B, H, N, N, D, device)
    tangents = qkv(B, H, N, N, D, device, seed=10)
    cos, sin = tables(N, D, device)
    fn = lambda a, b, c: dk.attention(a, b, c, rope_cos=cos, rope_sin=sin)  # noqa: E731
    rf = lambda a, b, c: rope_ref(a, b, c, None, cos, sin)  # noqa: E731
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    xr = [t.clone().requires_grad_() for t in (q, k, v)]
    out, r_out = fn(*xs), rf(*xr)
    assert_f64(out, r_out, "o")
    g = rand(*out.shape, device=device, seed=20)
    for a, b, n in zip(torch.autograd.grad(out, xs, g), torch.autograd.grad(r_out, xr, g), "qkv"):
        assert_f64(a, b, f"d{n}")
    ro, rt = torch.func.jvp(rf, (q, k, v), tuple(tangents))
    o, t = torch.func.jvp(fn, (q, k, v), tuple(tangents))
    assert_f64(o, ro, "jvp primal")
    assert_f64(t, rt, "func.jvp tangent")
    with fwAD.dual_level():
        fa = fwAD.unpack_dual(fn(*[fwAD.make_dual(p, tt) for p, tt in zip((q, k, v), tangents)])).tangent
    assert_f64(fa, rt, "forward_ad tangent")
    o2, t2 = dk.jvp.attention(q, k, v, *tangents, None, cos, sin)
    assert_f64(o2, ro)
    assert_f64(t2, rt)
    o3, t3 = dk.attention.maybe_jvp(q, k, v, *tangents, rope_cos=cos, rope_sin=sin)
    assert_f64(t3, rt)
    assert dk.attention.maybe_jvp(q, k, v, None, None, None, rope_cos=cos, rope_sin=sin)[1] is None


def test_attention_rope_partial_tangents_scale_and_grad_through_jvp(device):
    q, k, v = qkv(2, 2, 19, 19, 72, device)
    qd, kd, vd = qkv(2, 2, 19, 19, 72, device, seed=5)
    cos, sin = tables(19, 72, device)
    rf = lambda a, b, c: rope_ref(a, b, c, 0.3, cos, sin)  # noqa: E731
    for tangents in [(qd, None, None), (None, kd, None), (None, None, vd), (qd, kd, None)]:
        full = [torch.zeros_like(p) if t is None else t for p, t in zip((q, k, v), tangents)]
        ro, rt = torch.func.jvp(rf, (q, k, v), tuple(full))
        o, t = dk.jvp.attention(q, k, v, *tangents, scale=0.3, rope_cos=cos, rope_sin=sin)
        assert_f64(o, ro)
        assert_f64(t, rt)
    # MeanFlow: u, du_dt = jvp(...); loss(u).backward() reaches q, k, v through the rotation
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    xr = [t.clone().requires_grad_() for t in (q, k, v)]
    o, _ = torch.func.jvp(lambda a, b, c: dk.attention(a, b, c, 0.3, cos, sin), tuple(xs), (qd, kd, vd))
    (o * 1.5).sum().backward()
    (rf(*xr) * 1.5).sum().backward()
    for a, b in zip(xs, xr):
        assert_f64(a.grad, b.grad)


def test_attention_rope_tables_any_float_dtype_and_fused_view(device):
    # fp32 / bf16 tables are used in the compute dtype (here float64: exact for their values);
    # q, k, v as permuted views of a fused projection
    proj = rand(2, 21, 3, 2, 64, device=device, seed=1)
    q, k, v = (proj[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    for dt in (torch.float32, torch.bfloat16):
        cos, sin = (t.to(dt) for t in tables(21, 64, device))
        assert_f64(dk.attention(q, k, v, None, cos, sin), rope_ref(q, k, v, None, cos.double(), sin.double()))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_attention_rope_low_precision(device, dtype):
    B, H, N, D = 2, 2, 65, 72
    q, k, v = qkv(B, H, N, N, D, device)
    tq, tk, tv = qkv(B, H, N, N, D, device, seed=10)
    cos, sin = tables(N, D, device)
    lp = [t.to(dtype) for t in (q, k, v, tq, tk, tv)]
    ro, rt = torch.func.jvp(lambda a, b, c: rope_ref(a, b, c, None, cos, sin), (q, k, v), (tq, tk, tv))
    lc, ls = cos.to(dtype), sin.to(dtype)  # eager in the input dtype: the model's buffers cast with it
    eo, et = torch.func.jvp(lambda a, b, c: rope_ref(a, b, c, None, lc, ls), tuple(lp[:3]), tuple(lp[3:]))
    ko, kt = torch.func.jvp(lambda a, b, c: dk.attention(a, b, c, None, cos, sin), tuple(lp[:3]), tuple(lp[3:]))
    assert_three_way(ko, eo, ro, dtype, "o")
    assert_three_way(kt, et, rt, dtype, "o_dot")
    g = rand(*ro.shape, device=device, seed=30)
    xs = [t.clone().requires_grad_() for t in lp[:3]]
    xe = [t.clone().requires_grad_() for t in lp[:3]]
    x64 = [t.clone().requires_grad_() for t in (q, k, v)]
    gk = torch.autograd.grad(dk.attention(*xs, None, cos, sin), xs, g.to(dtype))
    ge = torch.autograd.grad(rope_ref(*xe, None, lc, ls), xe, g.to(dtype))
    gr = torch.autograd.grad(rope_ref(*x64, None, cos, sin), x64, g)
    for a, b, c, n in zip(gk, ge, gr, "qkv"):
        assert_three_way(a, b, c, dtype, f"d{n}")


def test_attention_rope_bad_tables(device):
    q, k, v = qkv(1, 2, 9, 9, 64, device, dtype=torch.float32)
    cos, sin = tables(9, 64, device, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"rope_cos must have shape \(N, D\) = \(9, 64\), got \(8, 64\)"):
        dk.attention(q, k, v, rope_cos=cos[:8], rope_sin=sin)
    with pytest.raises(ValueError, match=r"rope_sin must have shape \(N, D\) = \(9, 64\), got \(9, 32\)"):
        dk.jvp.attention(q, k, v, q, None, None, rope_cos=cos, rope_sin=sin[:, :32])
    with pytest.raises(ValueError, match=r"rope_cos given without rope_sin"):
        dk.attention(q, k, v, rope_cos=cos)
    with pytest.raises(ValueError, match=r"rope_sin given without rope_cos"):
        dk.attention(q, k, v, rope_sin=sin)
    with pytest.raises(ValueError, match=r"needs self-attention, NQ == NK; got NQ = 9, NK = 5"):
        dk.attention(q, k[:, :, :5], v[:, :, :5], rope_cos=cos, rope_sin=sin)
    with pytest.raises(TypeError, match=r"rope_cos must be a floating-point tensor, got torch.int64"):
        dk.attention(q, k, v, rope_cos=cos.long(), rope_sin=sin)
    with pytest.raises(TypeError, match=r"rope_sin must be a Tensor or None, got float"):
        dk.attention(q, k, v, rope_cos=cos, rope_sin=0.5)
    with pytest.raises(ValueError, match=r"rope_sin is on meta, expected q's device"):
        dk.attention(q, k, v, rope_cos=cos, rope_sin=sin.to("meta"))
    q7, k7, v7 = qkv(1, 2, 9, 9, 63, device)
    with pytest.raises(ValueError, match=r"needs an even head dim .* got D = 63"):
        dk.attention(q7, k7, v7, rope_cos=cos[:, :63].double(), rope_sin=sin[:, :63].double())


def test_attention_rope_nan_in_nan_out(device):
    q, k, v = qkv(1, 2, 17, 17, 64, device, dtype=torch.float32)
    cos, sin = tables(17, 64, device, dtype=torch.float32)
    qn = q.clone()
    qn[0, 1, 3, 5] = float("nan")
    o, t = dk.jvp.attention(qn, k, v, q, k, v, rope_cos=cos, rope_sin=sin)
    assert o[0, 1, 3].isnan().all() and t[0, 1, 3].isnan().all()
    assert not o[0, 0].isnan().any()  # the other head is untouched
    cn = cos.clone()
    cn[4, 0] = float("nan")  # row 4 of the table: query 4's scores and key 4's in every row
    o = dk.attention(q, k, v, rope_cos=cn, rope_sin=sin)
    assert o.isnan().all()


def test_attention_rope_rotation_tables(device):
    # LightningDiT's tables (one angle per interleaved pair, VisionRotaryEmbeddingFast with
    # freqs repeated 'n -> (n r)', r = 2): the CPU path's one-product case (b = 0)
    from dmf_kernels import attention_cpu as ac

    B, H, N, D = 2, 2, 17, 72
    q, k, v = qkv(B, H, N, N, D, device)
    tangents = qkv(B, H, N, N, D, device, seed=10)
    freqs = 1.0 / (10000 ** (torch.arange(0, D // 2, 2, dtype=torch.float64, device=device) / (D // 2)))
    grid = torch.arange(N, dtype=torch.float64, device=device)[:, None] * freqs  # (N, D/4) per axis
    theta = torch.cat([grid, grid.flip(0)], -1).repeat_interleave(2, -1)  # (N, D), pairs share an angle
    cos, sin = theta.cos(), theta.sin()
    assert ac.rope_tables(cos, sin, torch.float64, device)[1] is None
    assert ac.rope_tables(*tables(N, D, device), torch.float64, device)[1] is not None
    fn = lambda a, b, c: dk.attention(a, b, c, None, cos, sin)  # noqa: E731
    rf = lambda a, b, c: rope_ref(a, b, c, None, cos, sin)  # noqa: E731
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    xr = [t.clone().requires_grad_() for t in (q, k, v)]
    out, r_out = fn(*xs), rf(*xr)
    assert_f64(out, r_out, "o")
    g = rand(*out.shape, device=device, seed=20)
    for a, b, n in zip(torch.autograd.grad(out, xs, g), torch.autograd.grad(r_out, xr, g), "qkv"):
        assert_f64(a, b, f"d{n}")
    for tg in (tangents, [tangents[0], None, None], [None, tangents[1], None]):
        full = [torch.zeros_like(p) if t is None else t for p, t in zip((q, k, v), tg)]
        ro, rt = torch.func.jvp(rf, (q, k, v), tuple(full))
        o, t = dk.jvp.attention(q, k, v, *tg, None, cos, sin)
        assert_f64(o, ro)
        assert_f64(t, rt)
