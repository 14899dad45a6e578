"""gated_residual (x + gate * y) vs eager PyTorch and torch.compile, DiT-B/XL shapes."""
import torch

import dmf_kernels as dk
from dmf_kernels import reference as ref

from .bench_adaln import shapes
from .harness import standard_cases


def cases(device, dtype, quick):
    for B, N, D in shapes(device, quick):
        def inputs(B=B, N=N, D=D):
            x, y = (torch.randn(B, N, D, device=device, dtype=dtype) for _ in range(2))
            gate = 0.5 * torch.randn(B, D, device=device, dtype=dtype)
            prim = [x, gate, y]
            return prim, [torch.randn_like(t) for t in prim]

        yield from standard_cases(
            "gated_residual", f"B{B} N{N} D{D}", dtype, inputs, dk.gated_residual, ref.gated_residual,
            lambda p, t: dk.jvp.gated_residual(p[0], t[0], p[1], t[1], p[2], t[2]))
