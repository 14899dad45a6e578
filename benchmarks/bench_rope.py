"""rope (LightningDiT / EVA rotary embedding on interleaved pairs) vs eager PyTorch (t * cos +
rotate_half(t) * sin) and torch.compile on q of shape (B, H, N, head_dim) with fp32 (N, head_dim)
tables, the constants of the op (captured, not differentiated)."""
import torch

import dmf_kernels as dk
from dmf_kernels import reference as ref

from .harness import standard_cases


def shapes(device, quick):
    if device == "cuda":
        return [(64, 12, 256, 64), (64, 16, 256, 72)]
    return [(8, 12, 256, 64)]


def cases(device, dtype, quick):
    for B, H, N, Dh in shapes(device, quick):
        cos = torch.randn(N, Dh, device=device)  # fp32 buffers, as LightningDiT keeps them
        sin = torch.randn(N, Dh, device=device)

        def inputs(B=B, H=H, N=N, Dh=Dh):
            q = torch.randn(B, H, N, Dh, device=device, dtype=dtype)
            return [q], [torch.randn_like(q)]

        def ours(q, cos=cos, sin=sin):
            return dk.rope(q, cos, sin)

        def eager(q, cos=cos, sin=sin):
            return ref.rope(q, cos, sin)

        yield from standard_cases("rope", f"B{B} H{H} N{N} Dh{Dh}", dtype, inputs, ours, eager,
                                  lambda p, t, cos=cos, sin=sin: dk.jvp.rope(p[0], t[0], cos, sin))
