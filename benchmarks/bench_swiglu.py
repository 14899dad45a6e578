"""swiglu (LightningDiT's SwiGLUFFN activation, h = silu(x[..., :H]) * x[..., H:]) vs eager
PyTorch (chunk + silu + mul) and torch.compile on the w12 projection's output (B, N, 2H)."""
import torch

import dmf_kernels as dk
from dmf_kernels import reference as ref

from .harness import standard_cases


def shapes(device, quick):
    if device == "cuda":
        return [(64, 256, 2048), (64, 256, 3072)]  # LightningDiT-B / XL: H = int(2/3 * 4 * D) rounded
    return [(8, 256, 2048)]


def cases(device, dtype, quick):
    for B, N, H in shapes(device, quick):
        def inputs(B=B, N=N, H=H):
            x = torch.randn(B, N, 2 * H, device=device, dtype=dtype)
            return [x], [torch.randn_like(x)]

        yield from standard_cases("swiglu", f"B{B} N{N} H{H}", dtype, inputs, dk.swiglu, ref.swiglu,
                                  lambda p, t: dk.jvp.swiglu(p[0], t[0]))
