"""The Triton gelu_tanh dual kernel against float64, on the CPU under TRITON_INTERPRET=1 (run
by `make test` in its own process) or on CUDA. Skipped when neither: the CPU path is covered
by test_gelu.py."""
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA, rand

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if HAS_CUDA and not INTERPRET else "cpu"
# the cuda mark: gpu_check.sh selects the GPU tests with -m cuda
pytestmark = [pytest.mark.skipif(not (INTERPRET or HAS_CUDA), reason="needs TRITON_INTERPRET=1 or a CUDA GPU")] + \
    ([pytest.mark.cuda] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []),
                         ids=str)
@pytest.mark.parametrize("n", [1, 1023, 1025, 3 * 4099])
def test_gelu_triton_jvp(dtype, n):
    from dmf_kernels.gelu_triton import gelu_tanh_jvp

    a64 = rand(n, device=DEVICE, scale=4.0, seed=1)
    ad64 = rand(n, device=DEVICE, seed=2)
    a64[0] = 30.0 if n > 1 else a64[0]   # both tanh tails: exp overflow and underflow
    a64[-1] = -30.0 if n > 1 else a64[-1]
    r_g, r_gd = torch.func.jvp(lambda x: F.gelu(x, approximate="tanh"), (a64,), (ad64,))
    g, gd = gelu_tanh_jvp(a64.to(dtype), ad64.to(dtype))
    e_g, e_gd = torch.func.jvp(lambda x: F.gelu(x, approximate="tanh"), (a64.to(dtype),), (ad64.to(dtype),))
    for k, e, r in ((g, e_g, r_g), (gd, e_gd, r_gd)):
        assert k.dtype == dtype and torch.isfinite(k).all()
        err_k, err_e = (k.double() - r).abs().max().item(), (e.double() - r).abs().max().item()
        assert err_k <= 2 * err_e + 1e-6 * r.abs().max().item(), (err_k, err_e)
