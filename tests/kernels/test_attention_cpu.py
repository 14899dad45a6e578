"""The CPU attention path's two implementations agree: aten's flash kernels (used for CPU
tensors) and the blockwise PyTorch forward/backward (used for float64 on CUDA), against the
float64 math path; the flash backward accepts the lse of our one-pass JVP."""
import pytest
import torch

from dmf_kernels import attention_cpu as ac
from dmf_kernels import reference as ref
from conftest import assert_f64, rand


@pytest.mark.parametrize("nq,nk,d", [(17, 17, 72), (1, 33, 64), (257, 100, 16)])
@pytest.mark.parametrize("block", [None, 16])
def test_flash_and_blockwise_match_math(nq, nk, d, block):
    q, do = rand(2, 3, nq, d, seed=1), rand(2, 3, nq, d, seed=4)
    k, v = rand(2, 3, nk, d, seed=2), rand(2, 3, nk, d, seed=3)
    scale = d ** -0.5
    fwd = ac.attention_fwd if block is None else ac.attention_fwd_blockwise
    bwd = ac.attention_bwd if block is None else ac.attention_bwd_blockwise
    o, lse = fwd(q, k, v, scale, block=block) if block else fwd(q, k, v, scale)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    o_ref = ref.attention(*xs)
    assert_f64(o, o_ref, "o")
    assert_f64(lse, torch.logsumexp((q @ k.transpose(-1, -2)) * scale, -1), "lse")
    grads = bwd(do, q, k, v, o, lse, scale, block=block) if block else bwd(do, q, k, v, o, lse, scale)
    for name, g, r in zip("qkv", grads, torch.autograd.grad(o_ref, xs, do)):
        assert_f64(g, r, f"d{name}")
    # the JVP's lse drives the same backward
    _, _, lse_jvp = ac.attention_jvp(q, k, v, None, None, None, scale)
    assert_f64(lse_jvp, lse, "jvp lse")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d", [(16, 64), (33, 72)])
def test_low_precision_flash_path_rounds_fp32_results(dtype, n, d):
    """fp16/bf16 on the CPU: the backward (and the fp16 forward) is aten's fp32 kernel on upcast
    copies, rounded once (aten's own low-precision kernels are slower and about twice as far
    from float64): bit-equal to that, and so within about one rounding of the float64 result."""
    q, k, v, do = (rand(3, 2, n, d, seed=s).to(dtype) for s in range(4))
    scale = d ** -0.5
    o, lse = ac.attention_fwd(q, k, v, scale)
    grads = ac.attention_bwd(do, q, k, v, o, lse, scale)
    f32 = [t.float() for t in (do, q, k, v, o)]
    want_grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(*f32, lse, 0.0, False,
                                                                                      scale=scale)
    for name, got, want in zip(["dq", "dk", "dv"], grads, want_grads):
        assert got.dtype == dtype and got.is_contiguous() and torch.equal(got, want.to(dtype)), name
    if dtype == torch.float16:
        o32, lse32 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q.float(), k.float(), v.float(),
                                                                                scale=scale)
        assert torch.equal(o, o32.to(dtype)) and torch.equal(lse, lse32)
    assert o.dtype == dtype and o.is_contiguous() and lse.dtype == torch.float32
    xs = [t.double().requires_grad_() for t in (q, k, v)]
    o_ref = ref.attention(*xs)
    refs = [o_ref, *torch.autograd.grad(o_ref, xs, do.double())]
    for name, got, want in zip(["o", "dq", "dk", "dv"], [o, *grads], refs):
        err = (got.double() - want).abs().max().item()
        rounding = (want.to(dtype).double() - want).abs().max().item()
        assert err <= 2 * rounding + 1e-3 * want.abs().max().item(), (name, err, rounding)
