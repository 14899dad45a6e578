"""The Triton attention kernels with rotary embedding (tables (N, D), ROPE): on a CUDA GPU, or
on the CPU under TRITON_INTERPRET=1 (`make test` runs this file a second time with it set),
like test_attention_triton.py."""
import pytest
import torch

from attention_triton_helpers import _gpu_default_tiles, _record_launches, qkv
from attention_triton_helpers import tdev  # noqa: F401 (a fixture)
from conftest import assert_three_way, rand


# ---------------------------------------------------------------- rotary embedding (issue 15)


def rope_tables(N, D, device, seed=100):
    # random tables (not rotations): every term of the formulas shows up in the result
    return rand(N, D, device=device, seed=seed), rand(N, D, device=device, seed=seed + 1)


def rope_math_jvp(q, k, v, qd, kd, vd, scale, cos, sin):
    from dmf_kernels import reference as ref

    return torch.func.jvp(lambda a, b, c: ref.attention(a, b, c, scale, cos, sin), (q, k, v), (qd, kd, vd))


# (B, H, N, D): a masked remainder (72), tails in both loops, an unpadded remainder (80, no
# masks at 32 = 2 tiles), 128, one token.
ROPE_SHAPES = [(1, 2, 17, 72), (1, 1, 33, 64), (1, 1, 32, 80), (1, 1, 9, 128), (1, 1, 1, 16)]


@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=str)


def test_triton_attention_rope_kernels(tdev, shape):
    from dmf_kernels import attention_triton as at
    from dmf_kernels import reference as ref

    B, H, N, D = shape
    scale = D ** -0.5
    q, k, v = qkv(B, H, N, N, D, tdev)
    qd, kd, vd = qkv(B, H, N, N, D, tdev, seed=10)
    cos, sin = rope_tables(N, D, tdev)
    ro, rt = rope_math_jvp(q, k, v, qd, kd, vd, scale, cos, sin)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    g = rand(*ro.shape, device=tdev, seed=20)
    rg = torch.autograd.grad(ref.attention(*xs, scale, cos, sin), xs, g)
    for dtype in (torch.float32, torch.float16):
        lp = [t.to(dtype) for t in (q, k, v, qd, kd, vd)]
        lc, ls = cos.to(dtype), sin.to(dtype)
        rope = (cos.float(), sin.float())
        with torch.no_grad():
            eo, et = rope_math_jvp(*lp, scale, lc, ls)
            o, lse = at.attention_fwd(*lp[:3], scale, rope=rope)
            assert_three_way(o, eo, ro, dtype, f"fwd {dtype}")
            o2, od, lse2 = at.attention_jvp(*lp, scale, rope=rope)
            assert_three_way(o2, eo, ro, dtype, f"jvp primal {dtype}")
            assert_three_way(od, et, rt, dtype, f"jvp tangent {dtype}")
            torch.testing.assert_close(lse, lse2)
            grads = at.attention_bwd(g.to(dtype), *lp[:3], o, lse, scale, rope=rope)
        xe = [t.clone().requires_grad_() for t in lp[:3]]
        eg = torch.autograd.grad(ref.attention(*xe, scale, lc, ls), xe, g.to(dtype))
        for a, b, c, n in zip(grads, eg, rg, "qkv"):
            assert_three_way(a, b, c, dtype, f"d{n} {dtype}")


@pytest.mark.parametrize("bm,bn", sorted({(16, 16)} | {(bm, bn) for _, bm, bn, _ in _gpu_default_tiles(rope=True)}),
                         ids=str)


def test_triton_attention_rope_tiles_and_tangent_subsets(tdev, bm, bn):
    # The GPU's tile shapes (the backward's in-register back-rotation reshapes the
    # accumulator tiles), partial tiles both ways, each tangent alone; fp32 against float64.
    from dmf_kernels import attention_triton as at
    from dmf_kernels import reference as ref

    N, D, scale = 37, 72, 0.2
    q, k, v = qkv(1, 1, N, N, D, tdev)
    qd, kd, vd = qkv(1, 1, N, N, D, tdev, seed=4)
    cos, sin = rope_tables(N, D, tdev)
    rope = (cos, sin)  # float64 tables: the launcher converts them to fp32
    f = lambda *t: [None if x is None else x.float() for x in t]  # noqa: E731
    tol = dict(rtol=1e-4, atol=1e-5)
    for tangents in [(qd, kd, vd), (qd, None, None), (None, kd, None)]:
        full = [torch.zeros_like(p) if t is None else t for p, t in zip((q, k, v), tangents)]
        ro, rt = rope_math_jvp(q, k, v, *full, scale, cos, sin)
        o, od, _ = at.attention_jvp(*f(q, k, v, *tangents), scale, block_m=bm, block_n=bn, rope=rope)
        torch.testing.assert_close(o.double(), ro, **tol)
        torch.testing.assert_close(od.double(), rt, **tol)
    o, lse = at.attention_fwd(*f(q, k, v), scale, block_m=bm, block_n=bn, rope=rope)
    torch.testing.assert_close(o.double(), ro, **tol)
    g = rand(1, 1, N, D, device=tdev, seed=3)
    grads = at.attention_bwd(*f(g, q, k, v), o, lse, scale, block_m=bm, block_n=bn, dq_blocks=(bm, bn, 4), rope=rope)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    for a, b in zip(grads, torch.autograd.grad(ref.attention(*xs, scale, cos, sin), xs, g)):
        torch.testing.assert_close(a.double(), b, **tol)


def test_triton_attention_rope_flag_only_with_tables(monkeypatch):
    # ROPE is a constexpr: without tables every kernel is compiled exactly as before.
    from dmf_kernels import attention_triton as at

    log = _record_launches(monkeypatch, at)
    q = torch.empty(2, 3, 17, 72, device="meta", dtype=torch.float16)
    lse = torch.empty(2, 3, 17, device="meta")
    tab = torch.empty(17, 72, device="meta", dtype=torch.bfloat16)
    for rope in (None, (tab, tab)):
        at.attention_fwd(q, q, q, 0.1, rope=rope)
        at.attention_jvp(q, q, q, q, q, q, 0.1, rope=rope)
        at.attention_bwd(q, q, q, q, q, lse, 0.1, rope=rope)
    flags = [kw.get("ROPE") for _, kw in log]
    assert flags == [False, False, None, False, False, True, True, None, True, True]  # preprocess has none


def test_triton_attention_rope_public_routing(tdev):
    # dmf_kernels.attention with tables reaches the Triton kernels (interpreter or GPU) and
    # agrees with the float64 path
    import dmf_kernels as dk
    from dmf_kernels import reference as ref

    q, k, v = qkv(1, 2, 20, 20, 64, tdev)
    cos, sin = rope_tables(20, 64, tdev)
    o = dk.attention(q.float(), k.float(), v.float(), None, cos.float(), sin)
    torch.testing.assert_close(o.double(), ref.attention(q, k, v, None, cos, sin), rtol=1e-4, atol=1e-5)
