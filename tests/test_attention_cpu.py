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
