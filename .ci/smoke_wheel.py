"""Run by .ci/test_wheel.sh in a fresh venv holding torch and the installed wheel, with no compiler on
PATH: the package imports from site-packages, says it has the CUDA kernels it was built with, and
one C++ op (rms_norm) matches the float64 reference forward, backward and under torch.func.jvp on
CPU tensors."""
import shutil
import sys
from pathlib import Path

import torch

compilers = [c for c in ("cc", "gcc", "c++", "g++", "clang", "nvcc") if shutil.which(c)]
assert not compilers, f"compilers on PATH: {compilers}"

import dmf_kernels  # noqa: E402
from dmf_kernels import reference  # noqa: E402

where = Path(dmf_kernels.__file__).resolve()
assert Path(sys.prefix).resolve() in where.parents, f"dmf_kernels imported from {where}, not the venv {sys.prefix}"
info = dmf_kernels.build_info()
expect_archs = sys.argv[1]
assert info["cuda"] and info["cuda_archs"] == expect_archs and info["cuda_version"] == torch.version.cuda, info

torch.manual_seed(0)
x = torch.randn(3, 7, 40, dtype=torch.float32, requires_grad=True)
w = torch.randn(40, dtype=torch.float32, requires_grad=True)
dx, dw, g = torch.randn_like(x), torch.randn_like(w), torch.randn(3, 7, 40)
x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()

out = dmf_kernels.rms_norm(x, w)
ref = reference.rms_norm(x64, w64)
torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
gx, gw = torch.autograd.grad(out, (x, w), g)
rx, rw = torch.autograd.grad(ref, (x64, w64), g.double())
torch.testing.assert_close(gx, rx.float(), rtol=1e-4, atol=1e-4)
torch.testing.assert_close(gw, rw.float(), rtol=1e-4, atol=1e-4)
_, t = torch.func.jvp(dmf_kernels.rms_norm, (x.detach(), w.detach()), (dx, dw))
_, rt = torch.func.jvp(reference.rms_norm, (x64.detach(), w64.detach()), (dx.double(), dw.double()))
torch.testing.assert_close(t, rt.float(), rtol=1e-4, atol=1e-4)
print(f"wheel OK: dmf_kernels from {where.parent}, torch {torch.__version__}, build_info {info}")
