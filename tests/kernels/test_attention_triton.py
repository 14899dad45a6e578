"""The Triton attention kernels themselves: on a CUDA GPU, or on the CPU under
TRITON_INTERPRET=1 (`make test` runs this file a second time with it set). The interpreter
computes garbage for tl.dot on bf16 operands, so bf16 runs on CUDA only.

Outputs are poisoned with NaN before each launch, so an element a kernel fails to write
cannot pass by luck."""
import pytest
import torch

from attention_triton_helpers import INTERPRET, _gpu_default_tiles, _record_launches, qkv
from attention_triton_helpers import tdev  # noqa: F401 (a fixture)
from conftest import assert_three_way, rand

# (B, H, NQ, NK, D); small for the interpreter: its cost grows with every program instance.
# The last two divide evenly into the interpreter's 16x16 tiles (no tail masks in the loops:
# MASK_N / MASK_M False), one with an unpadded remainder of the head dim (80 = 64 + 16).
SHAPES = [(1, 1, 1, 1, 16), (1, 2, 17, 17, 72), (2, 1, 40, 23, 64), (1, 1, 33, 50, 80), (1, 1, 20, 20, 96),
          (1, 1, 18, 9, 128), (1, 1, 12, 40, 48), (1, 1, 257, 257, 72), (1, 1, 5, 1000, 72),
          (2, 1, 32, 48, 80), (1, 2, 16, 32, 72)]


def dtypes(device):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


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
        g3 = at.attention_bwd(g, q, k, v, o, lse, 0.1, block_m=16, block_n=16, dq_blocks=(bm, bn, 4))
        for a, b, c in zip(g1, g2, g3):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind,bm,bn,D", _gpu_default_tiles(), ids=str)


def test_triton_attention_gpu_default_tiles(tdev, kind, bm, bn, D):
    from dmf_kernels import attention_triton as at
    from dmf_kernels import reference as ref

    B, H, NQ, NK = 1, 1, 37, 45  # partial last tiles in both directions for every tile size
    scale = D ** -0.5
    q, k, v = (t.float() for t in qkv(B, H, NQ, NK, D, tdev))
    qd, kd, vd = (t.float() for t in qkv(B, H, NQ, NK, D, tdev, seed=7))
    ro, rt = math_jvp(*(t.double() for t in (q, k, v, qd, kd, vd)), scale)
    tol = dict(rtol=1e-4, atol=1e-5)
    if kind == "fwd":
        o, _ = at.attention_fwd(q, k, v, scale, block_m=bm, block_n=bn)
        torch.testing.assert_close(o.double(), ro, **tol)
    elif kind == "jvp":
        o, od, _ = at.attention_jvp(q, k, v, qd, kd, vd, scale, block_m=bm, block_n=bn)
        torch.testing.assert_close(o.double(), ro, **tol)
        torch.testing.assert_close(od.double(), rt, **tol)
    else:
        o, lse = at.attention_fwd(q, k, v, scale)
        g = rand(*o.shape, device=tdev, seed=3).float()
        grads = at.attention_bwd(g, q, k, v, o, lse, scale, block_m=bm, block_n=bn)
        xs = [t.double().requires_grad_() for t in (q, k, v)]
        want = torch.autograd.grad(ref.attention(*xs, scale), xs, g.double())
        for a, b in zip(grads, want):
            torch.testing.assert_close(a.double(), b, **tol)


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


# ---------------------------------------------------------------- launch plumbing (issue 8)


def test_triton_attention_grid_within_cuda_limits(monkeypatch):
    # B * H = 70000 programs per query block: on grid axis 1 (limit 65535) the launch fails
    # on a GPU; the launchers must put it on axis 0 (limit 2^31 - 1).
    from dmf_kernels import attention_triton as at

    log = _record_launches(monkeypatch, at)
    q = torch.empty(7000, 10, 33, 72, device="meta", dtype=torch.float16)
    at.attention_fwd(q, q, q, 0.1)
    at.attention_jvp(q, q, q, q, q, q, 0.1)
    at.attention_bwd(q, q, q, q, q, torch.empty(7000, 10, 33, device="meta"), 0.1)
    assert len(log) == 5
    for grid, _ in log:
        assert grid[0] <= 2**31 - 1 and all(g <= 65535 for g in grid[1:]), grid
        assert 70000 in grid


def test_triton_attention_align8_only_when_valid(monkeypatch):
    # Stride rounding (ALIGN8) is a no-op only when every non-last stride is a multiple of 8.
    from dmf_kernels import attention_triton as at

    log = _record_launches(monkeypatch, at)
    contig = torch.empty(2, 3, 17, 72, device="meta", dtype=torch.float16)
    fused = [t.permute(0, 2, 1, 3) for t in torch.empty(2, 17, 3, 3, 72, device="meta", dtype=torch.float16).unbind(2)]
    narrow = torch.empty(2, 3, 17, 75, device="meta", dtype=torch.float16)[..., :72]  # row stride 75
    at.attention_fwd(contig, contig, contig, 0.1)
    at.attention_fwd(*fused, 0.1)
    at.attention_fwd(contig, narrow, contig, 0.1)
    assert [kw["ALIGN8"] for _, kw in log] == [True, True, False]


def test_triton_attention_odd_strides_correct(tdev):
    # Row stride 75 (not a multiple of 8): the kernels must not round it.
    from dmf_kernels import attention_triton as at

    q, k, v = (rand(1, 2, 13, 75, device=tdev, dtype=torch.float32, seed=s)[..., :72] for s in (1, 2, 3))
    ro, rt = math_jvp(*(x.double() for x in (q, k, v, v, q, k)), 72 ** -0.5)
    o, od, _ = at.attention_jvp(q, k, v, v, q, k, 72 ** -0.5)
    torch.testing.assert_close(o.double(), ro, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(od.double(), rt, rtol=1e-4, atol=1e-5)


def test_triton_attention_int64_batch_offsets(tdev):
    # Batch stride 2^30 elements with B = 3: (B - 1) * stride_b = 2^31 overflows int32.
    # One 4 GiB fp16 storage; only the pages the views touch are ever written.
    from dmf_kernels import attention_triton as at

    if tdev == "cuda" and torch.cuda.get_device_properties(0).total_memory < 8 * 2**30:
        pytest.skip("needs 4 GiB of device memory")
    N, D = 9, 16
    try:
        store = torch.empty(2**31 + 3 * N * D, dtype=torch.float16, device=tdev)
    except RuntimeError:
        pytest.skip("cannot reserve 4 GiB")
    q, k, v = (store[i * N * D:].as_strided((3, 1, N, D), (2**30, N * D, D, 1)) for i in range(3))
    for i, t in enumerate((q, k, v)):
        t.copy_(rand(3, 1, N, D, device=tdev, dtype=torch.float16, seed=30 + i))
    ref = [x.double() for x in (q, k, v)]
    ro, rt = math_jvp(*ref, *ref, 0.25)
    o, lse = at.attention_fwd(q, k, v, 0.25)
    torch.testing.assert_close(o.double(), ro, rtol=2e-2, atol=2e-3)
    o2, od, _ = at.attention_jvp(q, k, v, q, k, v, 0.25)
    torch.testing.assert_close(od.double(), rt, rtol=2e-2, atol=5e-3)
    dq, dk, dv = at.attention_bwd(o, q, k, v, o, lse, 0.25)
    xs = [x.clone().requires_grad_() for x in ref]
    from dmf_kernels import reference as refm

    rg = torch.autograd.grad(refm.attention(*xs, 0.25), xs, o.double())
    for a, b in zip((dq, dk, dv), rg):
        torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=5e-3)


def test_triton_attention_fp32_follows_matmul_precision(tdev):
    from dmf_kernels import attention_triton as at

    old = torch.get_float32_matmul_precision()
    try:
        expect = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}
        for mode, prec in expect.items():
            torch.set_float32_matmul_precision(mode)
            assert at._precision(torch.float32) == prec
            assert at._precision(torch.float16) == "tf32"  # ignored for 16-bit operands
        torch.set_float32_matmul_precision("high")
        q, k, v = qkv(1, 1, 20, 20, 72, tdev)
        o, _ = at.attention_fwd(q.float(), k.float(), v.float(), 0.2)
        from dmf_kernels import reference as ref

        torch.testing.assert_close(o.double(), ref.attention(q, k, v, 0.2), rtol=1e-4, atol=1e-5)
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")


def test_triton_attention_launches_on_inputs_device():
    from dmf_kernels import attention_triton as at
    from dmf_kernels import reference as ref

    q, k, v = qkv(1, 2, 33, 33, 72, "cuda:1")
    with torch.cuda.device(0):
        o, _ = at.attention_fwd(q.half(), k.half(), v.half(), 0.1)
    assert o.device == q.device
    torch.testing.assert_close(o.double(), ref.attention(q, k, v, 0.1), rtol=1e-2, atol=2e-3)


@pytest.mark.skipif(not INTERPRET, reason="routing under TRITON_INTERPRET=1 only")


def test_interpreter_bf16_cpu_takes_pytorch_path():
    # The interpreter's tl.dot on bf16 is garbage: CPU bf16 must not reach it.
    import dmf_kernels  # noqa: F401  (registers the ops)
    from dmf_kernels import reference as ref

    q, k, v = qkv(1, 2, 17, 17, 72, "cpu")
    o, _ = torch.ops.dmf_kernels.attention_fwd(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.1)
    torch.testing.assert_close(o.double(), ref.attention(q, k, v, 0.1), rtol=3e-2, atol=2e-2)
