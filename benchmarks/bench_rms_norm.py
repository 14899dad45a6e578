"""rms_norm (qk-norm) vs eager PyTorch and torch.compile on q of shape (B, H, N, head_dim):
DiT-B/2 (H = 12, head_dim = 64) and DiT-XL/2 (H = 16, head_dim = 72)."""
import torch

import dmf_kernels as dk
from dmf_kernels import reference as ref

from .harness import standard_cases


def shapes(device, quick):
    if device == "cuda":
        return [(64, 12, 256, 64), (64, 16, 256, 72)]
    return [(8, 16, 256, 72)] if quick else [(8, 12, 256, 64), (8, 16, 256, 72), (2, 16, 1024, 72)]


def cases(device, dtype, quick):
    for B, H, N, Dh in shapes(device, quick):
        def inputs(B=B, H=H, N=N, Dh=Dh):
            q = torch.randn(B, H, N, Dh, device=device, dtype=dtype)
            w = 1 + 0.1 * torch.randn(Dh, device=device, dtype=dtype)
            return [q, w], [torch.randn_like(q), None]

        yield from standard_cases(
            "rms_norm", f"B{B} H{H} N{N} Dh{Dh}", dtype, inputs, dk.rms_norm, ref.rms_norm,
            lambda p, t: dk.jvp.rms_norm(p[0], t[0], p[1], t[1]))
