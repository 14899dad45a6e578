"""adaln_modulate, gated_residual_adaln and rms_adaln_modulate (LightningDiT's RMSNorm adaLN) vs
eager PyTorch and torch.compile.

Shapes: DiT-B (D = 768) and DiT-XL (D = 1152) at N = 256 and 1024 tokens; shift/scale/gate
of shape (B, D) as a DiT block's adaLN projection produces them. The fwd+jvp case gives
every input a tangent (an encoder block: t moves, so does the conditioning)."""
import torch

import dmf_kernels as dk
from dmf_kernels import reference as ref

from .harness import standard_cases


def shapes(device, quick, headline=False):
    """(B, N, D); on a GPU about 16k-64k tokens per batch as in DiT training."""
    if device == "cuda":
        if headline:
            return [(64, 256, 768), (64, 256, 1152), (16, 1024, 768), (16, 1024, 1152)]
        return [(64, 256, 1152), (16, 1024, 1152)]
    return [(8, 256, 768), (8, 256, 1152)] if quick else [(8, 256, 768), (8, 256, 1152), (2, 1024, 1152)]


def cases(device, dtype, quick):
    for B, N, D in shapes(device, quick, headline=True):
        shape = f"B{B} N{N} D{D}"

        def adaln_inputs(B=B, N=N, D=D):
            x = torch.randn(B, N, D, device=device, dtype=dtype)
            shift, scale = (0.5 * torch.randn(B, D, device=device, dtype=dtype) for _ in range(2))
            prim = [x, shift, scale]
            return prim, [torch.randn_like(t) for t in prim]

        yield from standard_cases(
            "adaln_modulate", shape, dtype, adaln_inputs, dk.adaln_modulate, ref.adaln_modulate,
            lambda p, t: dk.jvp.adaln_modulate(p[0], t[0], p[1], t[1], p[2], t[2]))

        def rms_inputs(B=B, N=N, D=D):  # LightningDiT's adaLN: RMSNorm with a weight, shift and scale
            x = torch.randn(B, N, D, device=device, dtype=dtype)
            shift, scale = (0.5 * torch.randn(B, D, device=device, dtype=dtype) for _ in range(2))
            weight = 1.0 + 0.1 * torch.randn(D, device=device, dtype=dtype)
            prim = [x, shift, scale, weight]
            return prim, [torch.randn_like(t) for t in prim]

        yield from standard_cases(
            "rms_adaln_modulate", shape, dtype, rms_inputs, dk.rms_adaln_modulate, ref.rms_adaln_modulate,
            lambda p, t: dk.jvp.rms_adaln_modulate(x=p[0], x_dot=t[0], shift=p[1], shift_dot=t[1], scale=p[2],
                                                   scale_dot=t[2], weight=p[3], weight_dot=t[3]))

        def residual_inputs(B=B, N=N, D=D):
            x, y = (torch.randn(B, N, D, device=device, dtype=dtype) for _ in range(2))
            gate, shift, scale = (0.5 * torch.randn(B, D, device=device, dtype=dtype) for _ in range(3))
            prim = [x, gate, y, shift, scale]
            return prim, [torch.randn_like(t) for t in prim]

        if (B, N, D) not in shapes(device, quick):
            continue
        yield from standard_cases(
            "gated_residual_adaln", shape, dtype, residual_inputs, dk.gated_residual_adaln, ref.gated_residual_adaln,
            lambda p, t: dk.jvp.gated_residual_adaln(*[a for pair in zip(p, t) for a in pair]))
