"""The Triton attention kernels themselves: on a CUDA GPU, or on the CPU under
TRITON_INTERPRET=1 (`make test` runs this file a second time with it set). The interpreter
computes garbage for tl.dot on bf16 operands, so bf16 runs on CUDA only.

Outputs are poisoned with NaN before each launch, so an element a kernel fails to write
cannot pass by luck."""
import os

import pytest
import torch

from conftest import assert_three_way, rand

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# (B, H, NQ, NK, D); small for the interpreter: its cost grows with every program instance.
SHAPES = [(1, 1, 1, 1, 16), (1, 2, 17, 17, 72), (2, 1, 40, 23, 64), (1, 1, 33, 50, 80), (1, 1, 20, 20, 96),
          (1, 1, 18, 9, 128), (1, 1, 12, 40, 48), (1, 1, 257, 257, 72), (1, 1, 5, 1000, 72)]


@pytest.fixture
def tdev(device):
    if device == "cpu" and not INTERPRET:
        pytest.skip("Triton kernels on CPU need TRITON_INTERPRET=1 (make test runs this file with it)")
    from dmf_kernels import attention_triton

    attention_triton.POISON_OUTPUTS = True
    yield device
    attention_triton.POISON_OUTPUTS = False


def dtypes(device):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


def qkv(B, H, NQ, NK, D, device, seed=0, scale=1.0):
    return [rand(B, H, n, D, device=device, seed=seed + i, scale=scale) for i, n in enumerate((NQ, NK, NK))]


def math_jvp(q, k, v, qd, kd, vd, scale):
    from dmf_kernels import reference as ref

    return torch.func.jvp(lambda a, b, c: ref.attention(a, b, c, scale), (q, k, v), (qd, kd, vd))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_attention_kernels(tdev, shape):
    from dmf_kernels import attention_triton as at
    from dmf_kernels import reference as ref

    D = shape[-1]
    scale = D ** -0.5
    q, k, v = qkv(*shape, tdev)
    qd, kd, vd = qkv(*shape, tdev, seed=10)
    ro, rt = math_jvp(q, k, v, qd, kd, vd, scale)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    g = rand(*ro.shape, device=tdev, seed=20)
    rg = torch.autograd.grad(ref.attention(*xs, scale), xs, g)
    for dtype in dtypes(tdev):
        lp = [t.to(dtype) for t in (q, k, v, qd, kd, vd)]
        with torch.no_grad():
            eo, et = math_jvp(*lp, scale)
            o, lse = at.attention_fwd(*lp[:3], scale)
            assert_three_way(o, eo, ro, dtype, f"fwd {dtype}")
            o2, od, lse2 = at.attention_jvp(*lp, scale)
            assert_three_way(o2, eo, ro, dtype, f"jvp primal {dtype}")
            assert_three_way(od, et, rt, dtype, f"jvp tangent {dtype}")
            torch.testing.assert_close(lse, lse2)
            ref_lse = torch.logsumexp((q @ k.transpose(-1, -2)) * scale, -1)
            torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-2, atol=1e-2)
            grads = at.attention_bwd(g.to(dtype), *lp[:3], o, lse, scale)
        xe = [t.clone().requires_grad_() for t in lp[:3]]
        eg = torch.autograd.grad(ref.attention(*xe, scale), xe, g.to(dtype))
        for a, b, c, n in zip(grads, eg, rg, "qkv"):
            assert_three_way(a, b, c, dtype, f"d{n} {dtype}")


def test_triton_attention_tangent_subsets(tdev):
    from dmf_kernels import attention_triton as at

    q, k, v = qkv(1, 2, 19, 21, 72, tdev)
    qd, kd, vd = qkv(1, 2, 19, 21, 72, tdev, seed=4)
    for tangents in [(qd, None, None), (None, kd, None), (None, None, vd), (None, None, None)]:
        full = [torch.zeros_like(p) if t is None else t for p, t in zip((q, k, v), tangents)]
        ro, rt = math_jvp(q, k, v, *full, 0.2)
        o, od, _ = at.attention_jvp(*(t.float() for t in (q, k, v)),
                                    *(None if t is None else t.float() for t in tangents), 0.2)
        torch.testing.assert_close(od.double(), rt, rtol=1e-4, atol=1e-5)


def test_triton_attention_block_size_independent(tdev):
    from dmf_kernels import attention_triton as at

    q, k, v, qd, kd, vd = (t.float() for t in qkv(1, 1, 40, 40, 72, tdev) + qkv(1, 1, 40, 40, 72, tdev, seed=5))
    base = at.attention_jvp(q, k, v, qd, kd, vd, 0.1, block_m=16, block_n=16)
    for bm, bn in [(32, 16), (16, 32), (64, 64)]:
        other = at.attention_jvp(q, k, v, qd, kd, vd, 0.1, block_m=bm, block_n=bn)
        for a, b in zip(base, other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        o, lse = at.attention_fwd(q, k, v, 0.1, block_m=bm, block_n=bn)
        torch.testing.assert_close(o, base[0], rtol=1e-5, atol=1e-5)
        g = torch.randn_like(o)
        g1 = at.attention_bwd(g, q, k, v, o, lse, 0.1, block_m=16, block_n=16)
        g2 = at.attention_bwd(g, q, k, v, o, lse, 0.1, block_m=bm, block_n=bn)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_triton_attention_strided_inputs(tdev):
    from dmf_kernels import attention_triton as at

    proj = rand(2, 17, 3, 2, 72, device=tdev, dtype=torch.float32, seed=1)
    q, k, v = (proj[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    t = rand(2, 2, 17, 72, device=tdev, dtype=torch.float32, seed=2).transpose(1, 2).contiguous().transpose(1, 2)
    ro, rt = math_jvp(*(x.double() for x in (q, k, v, t)), torch.zeros(2, 2, 17, 72, dtype=torch.float64,
                                                                       device=tdev), t.double(), 72 ** -0.5)
    o, od, _ = at.attention_jvp(q, k, v, t, None, t, 72 ** -0.5)
    torch.testing.assert_close(o.double(), ro, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(od.double(), rt, rtol=1e-4, atol=1e-5)


def test_triton_attention_large_logits_and_tangents(tdev):
    # Logits around 1e3 (a nearly one-hot softmax) and tangents large enough that p * S_dot
    # overflows fp16 without the guard. O_dot is then a small difference of huge terms; the
    # centred accumulator keeps fp16 within 0.5% of float64 (measured 2.5e-4 in the
    # interpreter; the uncentred recurrence gave 12.6%, eager fp16 gives NaN).
    from dmf_kernels import attention_triton as at
    from dmf_kernels import reference as ref

    prim = [t.half().double() for t in qkv(1, 1, 24, 24, 64, tdev, scale=12.0)]
    tans = [t.half().double() for t in qkv(1, 1, 24, 24, 64, tdev, seed=3, scale=200.0)]
    _, rt = torch.func.jvp(lambda a, b, c: ref.attention(a, b, c, 1.0), tuple(prim), tuple(tans))
    for dtype, tol in [(torch.float32, 1e-4), (torch.float16, 5e-3)]:
        o, od, _ = at.attention_jvp(*(t.to(dtype) for t in prim + tans), 1.0)
        assert torch.isfinite(o).all() and torch.isfinite(od).all(), f"{dtype}: non-finite output"
        rel = ((od.double() - rt).abs().max() / rt.abs().max()).item()
        assert rel < tol, f"{dtype}: tangent off by {rel:.2e} relative"


def test_batch_offsets_are_int64(tdev):
    """(B - 1) * stride_b >= 2^31 elements with stride_b < 2^31 (a 32-bit argument, as for a
    fused qkv at B = 256, N = 4096): a view with a huge batch stride (4 GiB of virtual fp16
    storage, only the used rows touched). int32 offsets would wrap and read elsewhere."""
    if tdev == "cuda" and torch.cuda.get_device_properties(0).total_memory < 16 << 30:
        pytest.skip("needs 5 GiB of GPU memory")
    from dmf_kernels import attention_triton as at

    H, N, D = 2, 9, 16
    B, stride_b = 3, 2**30 + 64
    base = torch.empty((B - 1) * stride_b + H * N * D, dtype=torch.float16, device=tdev)
    views = []
    for seed in range(3):
        t = base.as_strided((B, H, N, D), (stride_b, N * D, D, 1))
        t.copy_(rand(B, H, N, D, device=tdev, dtype=torch.float16, seed=seed))
        views.append(t.clone())  # the values; base is overwritten by the next copy
    q = base.as_strided((B, H, N, D), (stride_b, N * D, D, 1))  # holds views[2]
    o, lse = at.attention_fwd(q, views[1], views[0], 0.25)
    o_ref, _ = at.attention_fwd(views[2], views[1], views[0], 0.25)
    torch.testing.assert_close(o, o_ref)
    del base


def test_strides_rounded_only_when_valid(tdev):
    """A row stride of 17 (not a multiple of 8) must not be rounded: results equal the
    contiguous copy's; the launcher's check says why."""
    from dmf_kernels import attention_triton as at

    wide = [rand(1, 2, 11, 17, device=tdev, dtype=torch.float32, seed=i) for i in range(3)]
    q, k, v = (t[..., :16] for t in wide)
    assert not at._div8(q) and at._div8(q.contiguous())
    o, _ = at.attention_fwd(q, k, v, 0.25)
    o_ref, _ = at.attention_fwd(*(t.contiguous() for t in (q, k, v)), 0.25)
    torch.testing.assert_close(o, o_ref)
    o, od, _ = at.attention_jvp(q, k, v, q, None, v, 0.25)
    o2, od2, _ = at.attention_jvp(*(t.contiguous() for t in (q, k, v, q)), None, v.contiguous(), 0.25)
    torch.testing.assert_close(od, od2)


def test_launch_plans():
    """One-dimensional grids (the second CUDA grid axis stops at 65535 = B * H), fp32
    precision from torch's matmul setting, the stride flag (meta tensors: nothing runs)."""
    from dmf_kernels import attention_triton as at

    q = torch.empty(5000, 16, 256, 72, device="meta", dtype=torch.bfloat16)  # B * H = 80000
    o, lse = torch.empty_like(q), torch.empty(5000, 16, 256, device="meta")
    (launch,) = at.plan_fwd(q, q, q, 0.1, o, lse)
    bm = launch.options["BLOCK_M"]
    assert launch.grid == (256 // bm * 80000,) and launch.options["STRIDE_DIV8"]
    qkv = torch.empty(2, 256, 3, 16, 72, device="meta", dtype=torch.bfloat16).permute(2, 0, 3, 1, 4)
    (launch,) = at.plan_jvp(qkv[0], qkv[1], qkv[2], qkv[0], None, qkv[2], 0.1, o[:2], o[:2], lse[:2])
    assert launch.options["STRIDE_DIV8"]  # fused-qkv strides 3456 / 72 / 216: all multiples of 8
    prev = torch.get_float32_matmul_precision()
    try:
        for setting, expected in (("highest", "ieee"), ("high", "tf32x3"), ("medium", "tf32")):
            torch.set_float32_matmul_precision(setting)
            assert at._precision(torch.float32) == expected
    finally:
        torch.set_float32_matmul_precision(prev)


def test_cpu_bf16_never_reaches_the_interpreter():
    import importlib

    A = importlib.import_module("dmf_kernels.attention")

    q = torch.empty(1, 1, 4, 16, dtype=torch.bfloat16)
    assert not A._use_triton(q)
    assert A._use_triton(q.float()) == INTERPRET
