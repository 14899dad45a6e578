"""Eager PyTorch references of every op, written the way DiT code writes them. Used by
the tests (in float64 as ground truth) and by the benchmarks (as the eager baseline)."""
import torch
import torch.nn.functional as F


def _bcast(p, x):
    """Modulation parameter -> broadcastable against x: (B, D) means per sample."""
    if p.dim() == 2 and x.dim() >= 3:
        return p.reshape(p.shape[0], *([1] * (x.dim() - 2)), p.shape[-1])
    return p


def modulate(x, shift, scale):
    return x * (1 + _bcast(scale, x)) + _bcast(shift, x)


def adaln_modulate(x, shift, scale, eps=1e-6):
    return modulate(F.layer_norm(x, x.shape[-1:], eps=eps), shift, scale)


def gated_residual(x, gate, y):
    return x + _bcast(gate, x) * y


def gated_residual_adaln(x, gate, y, shift, scale, eps=1e-6):
    x_out = gated_residual(x, gate, y)
    return x_out, adaln_modulate(x_out, shift, scale, eps)


def rms_norm(x, weight, eps=1e-6):
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps) if x.dtype != torch.float64 else \
        torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (x * rstd).to(x.dtype) * weight


def attention(q, k, v, scale=None, rope_cos=None, rope_sin=None):
    """The math path: softmax(scale * q k^T) v with the N x N matrix materialised. The only
    SDPA formulation PyTorch can take forward-mode derivatives of. With rope tables, q and k
    are rotated first (rope below)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if rope_cos is not None:
        q, k = rope(q, rope_cos, rope_sin), rope(k, rope_cos, rope_sin)
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


def rms_adaln_modulate(x, shift, scale, weight=None, eps=1e-6):
    """LightningDiT's adaLN with RMSNorm: `RMSNorm(x)` computes in fp32 then `.type_as(x) * weight`,
    the modulation runs in x's dtype; shift None is its wo_shift form (x * (1 + scale)). fp64
    stays fp64 (the tests' ground truth)."""
    acc = x if x.dtype == torch.float64 else x.float()
    h = (acc * torch.rsqrt(acc.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)
    if weight is not None:
        h = h * weight
    out = h * (1 + _bcast(scale, x))
    return out if shift is None else out + _bcast(shift, x)


def gated_residual_rms_adaln(x, gate, y, shift, scale, weight=None, eps=1e-6):
    x_out = gated_residual(x, gate, y)
    return x_out, rms_adaln_modulate(x_out, shift, scale, weight, eps)
# LightningDiT's SwiGLUFFN activation and its rotary embedding (EVA's rotate_half).
def swiglu(x):
    x1, x2 = x.chunk(2, dim=-1)
    return F.silu(x1) * x2


def rotate_half(x):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rope(x, cos, sin):
    """VisionRotaryEmbeddingFast.forward: t * freqs_cos + rotate_half(t) * freqs_sin. With fp32
    tables and a bf16 t the official code returns fp32 (type promotion); here the result is cast
    back to x's dtype, like dmf_kernels.rope."""
    return (x * cos + rotate_half(x) * sin).to(x.dtype)
