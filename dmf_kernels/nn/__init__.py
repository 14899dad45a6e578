"""DiT modules on the fused ops, each with a jvp forward.

Parameter names and shapes are those of facebookresearch/DiT (with timm's Attention and Mlp)
and of the official Decoupled MeanFlow code (kyungmnlee/dmf, models/layers.py), so their
state_dicts load with strict=True.

Every module has
    forward(*inputs)                    the primal; differentiable through our backward kernels
    forward_jvp(*inputs, *tangents)     (out, out_dot) in one jvp pass: `out` is recorded by
                                        autograd, `out_dot` is not (no tangent activation is
                                        saved for backward); a tangent given as None is zero
                                        and its work is skipped
and each is written once: `forward` is `forward_jvp` with None tangents, which runs every
primal op at its own cost (measured: benchmarks/results/issue14_before_after.md). `forward`
switches to the jvp pass when its inputs carry forward-mode tangents (torch.func.jvp,
torch.autograd.forward_ad, dmf_kernels.model_jvp), so a model built from these modules gets
the one-pass kernels without any change to the training code. The timestep embedder is the
exception: it is cheap glue and stays under PyTorch's forward-mode AD, so its rounding matches
the reference codebases exactly.

Conditioning `c` may be (B, D) (facebookresearch/DiT) or (B, 1, D) (the official DMF code).

Speed choices (the jvp pass of one DiT block):
- Linear: primal `x W^T + b` recorded; tangent `x_dot W^T` (no bias) computed without
  autograd. Two GEMMs reading W twice: at DiT shapes the GEMM is compute-bound (XL/2 at B=32,
  N=256: 8192 rows against a 1152 x 3456 weight), so stacking [x; x_dot] into one GEMM would
  only add the copy of the stacked rows.
- GELU-tanh and its tangent in one kernel (`gelu_tanh.maybe_jvp`).
- Block boundaries: the last gated residual of block i and the norm + modulate of block i+1
  (or of the final layer) are one fused kernel (`dit_blocks`): x is read and written once
  per boundary instead of twice.

Files: functional.py (jvp helpers: linear, SiLU, timestep embedding, checks), this file
(embedders, norms, attention, MLP), blocks.py (DiT block, final layer, the block driver).
"""
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from .._forward_ad import check_tangent, dual_inputs
from ..attention import attention
from ..gelu import gelu_tanh
from ..rms_norm import rms_norm
from .functional import call_jvp, forward_ad_call, linear_jvp, silu_jvp, timestep_embedding, timestep_embedding_jvp


class JvpModule(nn.Module):
    """Base of the modules with a jvp forward; dmf_kernels.model_jvp looks for it."""

    def forward_jvp(self, *args):  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _forward(self, *inputs):
        """forward(*inputs) of a module whose forward_jvp(*inputs, *tangents) is the one path."""
        dual = dual_inputs(*inputs)
        if dual is not None:
            primals, tangents = dual
            return forward_ad_call(type(self).__name__, [self], primals, lambda: self.forward_jvp(*primals, *tangents))
        return self.forward_jvp(*inputs, *(None,) * len(inputs))[0]


DualModule = JvpModule  # the name before the vocabulary of issue 14


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D) tokens, N = (H / p) * (W / p): a stride-p convolution
    (`proj`, the attribute structure of timm's PatchEmbed). Glue: under forward-mode AD it
    stays with PyTorch's rules (a linear map of the input: cheap)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"PatchEmbed: img_size {img_size} must be divisible by patch_size {patch_size}")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        expected = (self.proj.in_channels, *self.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"PatchEmbed: x must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                             f"got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, H/p, W/p) -> (B, N, D)


class RMSNorm(JvpModule):
    """RMSNorm with a learnable `scale` (the official DMF qk-norm; parameter name `scale`)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # The op itself handles forward-mode AD, also with a tangent on `scale`.
        return rms_norm(x, self.scale.to(x.dtype), self.eps)

    def forward_jvp(self, x: Tensor, x_dot: Optional[Tensor]):
        x_dot = check_tangent("RMSNorm", "x_dot", x_dot, x)
        return rms_norm.maybe_jvp(x, x_dot, self.scale.to(x.dtype), None, self.eps)


class TimestepEmbedder(JvpModule):
    """t (B,) -> (B, hidden): sinusoidal embedding, then Linear-SiLU-Linear (`mlp.0`, `mlp.2`)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))

    def forward(self, t: Tensor) -> Tensor:
        # Glue: stays under PyTorch's forward-mode AD (see the package docstring).
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))

    def forward_jvp(self, t: Tensor, t_dot: Optional[Tensor]):
        t_dot = check_tangent("TimestepEmbedder", "t_dot", t_dot, t)
        if t_dot is None:
            return self.forward(t), None
        dtype = self.mlp[0].weight.dtype
        e, e_dot = timestep_embedding_jvp(t, t_dot, self.frequency_embedding_size)
        h, h_dot = linear_jvp(e.to(dtype), e_dot.to(dtype), self.mlp[0])
        h, h_dot = silu_jvp(h, h_dot)
        return linear_jvp(h, h_dot, self.mlp[2])


class LabelEmbedder(JvpModule):
    """Class labels (B,) -> (B, hidden); row `num_classes` is the null class of
    classifier-free guidance (label dropout is the trainer's job)."""

    def __init__(self, num_classes: int, hidden_size: int, use_cfg_embedding: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + int(use_cfg_embedding), hidden_size)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)

    def forward_jvp(self, labels: Tensor, labels_dot=None):
        return self.forward(labels), None  # integer labels have no tangent


class Attention(JvpModule):
    """Multi-head self-attention: fused qkv Linear, optional qk-norm (RMSNorm with a learnable
    `scale` per head dim), non-causal attention (dmf_kernels.attention), proj Linear.
    x: (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, qk_norm: bool = False,
                 proj_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def _heads(self, t, B, N):
        # (B, N, 3D) -> q, k, v: (B, H, N, Dh) views of the fused projection, read in place
        if t is None:
            return None, None, None
        return t.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x)

    def forward_jvp(self, x: Tensor, x_dot: Optional[Tensor]):
        x_dot = check_tangent("Attention", "x_dot", x_dot, x)
        B, N, C = x.shape
        qkv, qkv_dot = linear_jvp(x, x_dot, self.qkv)
        (q, k, v), (q_dot, k_dot, v_dot) = self._heads(qkv, B, N), self._heads(qkv_dot, B, N)
        q, q_dot = call_jvp(self.q_norm, q, q_dot)
        k, k_dot = call_jvp(self.k_norm, k, k_dot)
        o, o_dot = attention.maybe_jvp(q, k, v, q_dot, k_dot, v_dot)  # one pass: (B, H, N, Dh) each
        o, o_dot = (None if t is None else t.transpose(1, 2).reshape(B, N, C) for t in (o, o_dot))
        return linear_jvp(o, o_dot, self.proj)


class Mlp(JvpModule):
    """fc1 -> GELU (tanh) -> fc2; x: (..., D) -> (..., D)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x)

    def forward_jvp(self, x: Tensor, x_dot: Optional[Tensor]):
        x_dot = check_tangent("Mlp", "x_dot", x_dot, x)
        a, a_dot = linear_jvp(x, x_dot, self.fc1)
        g, g_dot = gelu_tanh.maybe_jvp(a, a_dot)
        return linear_jvp(g, g_dot, self.fc2)


from .blocks import DiTBlock, FinalLayer, dit_blocks, dit_blocks_jvp  # noqa: E402  (they build on the above)

linear_dual, silu_dual = linear_jvp, silu_jvp  # the names before the vocabulary of issue 14

__all__ = [
    "JvpModule", "DualModule", "PatchEmbed", "RMSNorm", "TimestepEmbedder", "LabelEmbedder", "Attention", "Mlp",
    "DiTBlock", "FinalLayer", "linear_jvp", "silu_jvp", "timestep_embedding", "timestep_embedding_jvp",
    "dit_blocks", "dit_blocks_jvp",
]
