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

Modern DiT parts (hustvl/LightningDiT and the models built on it): RMSNorm-adaLN with a weight
(`norm="rms"`), adaLN without shift (`wo_shift`), the SwiGLU MLP (`SwiGLUFFN`), 2-D rotary position
embedding applied inside the attention kernels (`RotaryEmbedding2D`, passed to the attention as
`rope`), and qk-norms of every kind (`qk_norm`: the official DMF's RMSNorm with `scale`, an
RMSNorm with `weight`, or LayerNorm with weight and bias); parameter and buffer names are
LightningDiT's, so its state_dicts load with strict=True. `PreNormBlock` is the block without
adaLN (in-context conditioning).

Files: functional.py (jvp helpers: linear, SiLU, timestep embedding, checks), this file
(embedders, norms, rotary embedding, attention, MLPs), blocks.py (DiT block, pre-norm block, final
layer, the block driver), _act_ckpt.py (act_ckpt: activation checkpointing of the blocks, keeping the jvp pass).
"""
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from .._forward_ad import check_tangent, dual_inputs
from ..attention import attention
from ..gelu import gelu_tanh
from ..norm_mod import adaln_modulate
from ..rms_norm import rms_norm
from ..rope import rope as rope_op
from ..swiglu import swiglu
from .functional import call_jvp, forward_ad_call, linear_jvp, silu_jvp, timestep_embedding, timestep_embedding_jvp


class JvpModule(nn.Module):
    """Base of the modules with a jvp forward; dmf_kernels.model_jvp looks for it."""

    def forward_jvp(self, *args):  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _forward(self, *inputs, **options):
        """forward(*inputs) of a module whose forward_jvp(*inputs, *tangents, **options) is the one
        path; options are non-tensor arguments (e.g. the attention's rope module)."""
        dual = dual_inputs(*inputs)
        if dual is not None:
            primals, tangents = dual
            return forward_ad_call(type(self).__name__, [self], primals,
                                   lambda: self.forward_jvp(*primals, *tangents, **options))
        return self.forward_jvp(*inputs, *(None,) * len(inputs), **options)[0]


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
    """RMSNorm with a learnable per-channel weight: x / sqrt(mean(x^2) + eps) * weight.

    The weight's name follows the codebase the module stands in for: `scale` (the official DMF's
    qk-norm, the default) or `weight` (LightningDiT, Llama, torch.nn.RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6, param_name: str = "scale"):
        super().__init__()
        if param_name not in ("scale", "weight"):
            raise ValueError(f"RMSNorm: param_name must be 'scale' or 'weight', got {param_name!r}")
        self.eps = eps
        self.param_name = param_name
        setattr(self, param_name, nn.Parameter(torch.ones(dim)))

    def gain(self) -> Tensor:
        return rms_gain(self)

    def forward(self, x: Tensor) -> Tensor:
        # The op itself handles forward-mode AD, also with a tangent on the weight.
        return rms_norm(x, self.gain().to(x.dtype), self.eps)

    def forward_jvp(self, x: Tensor, x_dot: Optional[Tensor]):
        x_dot = check_tangent("RMSNorm", "x_dot", x_dot, x)
        return rms_norm.maybe_jvp(x, x_dot, self.gain().to(x.dtype), None, self.eps)


def rms_gain(norm: nn.Module) -> Tensor:
    """The learnable weight of an RMSNorm, ours or another codebase's (`scale` or `weight`)."""
    name = getattr(norm, "param_name", None)
    if name is None:
        name = "scale" if isinstance(getattr(norm, "scale", None), nn.Parameter) else "weight"
    return getattr(norm, name)


class LayerNorm(nn.LayerNorm, JvpModule):
    """nn.LayerNorm over the last dim with weight and bias (LightningDiT's qk-norm without
    use_rmsnorm); the jvp pass through the fused LayerNorm-modulate kernel, with
    `scale = weight - 1` and `shift = bias` (exact: 1 + (w - 1) == w in floating point for
    w in [0.5, 2], and within one rounding elsewhere)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__(dim, eps=eps, elementwise_affine=True, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x)

    def forward_jvp(self, x: Tensor, x_dot: Optional[Tensor]):
        x_dot = check_tangent("LayerNorm", "x_dot", x_dot, x)
        return adaln_modulate.maybe_jvp(x, x_dot, self.bias.to(x.dtype), None, (self.weight - 1).to(x.dtype), None,
                                        self.eps)


def qk_norm_module(kind, head_dim: int) -> nn.Module:
    """The qk-norm of one head: False/None -> Identity; True or "rms_scale" -> RMSNorm with `scale`
    (the official DMF's); "rms" -> RMSNorm with `weight` (LightningDiT with use_rmsnorm); "layer" ->
    LayerNorm(head_dim) with weight and bias, eps 1e-5 (LightningDiT without use_rmsnorm)."""
    if kind is None or kind is False:
        return nn.Identity()
    if kind is True or kind == "rms_scale":
        return RMSNorm(head_dim)
    if kind == "rms":
        return RMSNorm(head_dim, param_name="weight")
    if kind == "layer":
        return LayerNorm(head_dim)
    raise ValueError(f"qk_norm must be False, True, 'rms_scale', 'rms' or 'layer', got {kind!r}")


class RotaryEmbedding2D(nn.Module):
    """2-D rotary position embedding of LightningDiT / EVA (`VisionRotaryEmbeddingFast`, with
    freqs_for="lang"): buffers `freqs_cos`, `freqs_sin` of shape (N, 2 * dim) = (N, head_dim) for
    the N = ft_seq_len^2 tokens of a square grid (row-major); interleaved pairs rotate:
        rope(t) = t * freqs_cos + rotate_half(t) * freqs_sin,  rotate_half: (t0, t1) -> (-t1, t0).
    `forward(t)` applies it to t (..., N, head_dim) with dmf_kernels.rope. Pass the module as the
    attention's `rope` argument to rotate q and k inside the attention kernels instead.

    Args:
        dim: half the head dim (the rotary dim of one axis), as LightningDiT's `dim`.
        pt_seq_len: the grid side the frequencies were defined for; ft_seq_len: the grid side
            used (defaults to pt_seq_len); theta: the frequency base.
    """

    def __init__(self, dim: int, pt_seq_len: int = 16, ft_seq_len: Optional[int] = None, theta: float = 10000):
        super().__init__()
        if dim % 2:
            raise ValueError(f"RotaryEmbedding2D: dim (half the head dim) must be even, got {dim}")
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[:(dim // 2)].float() / dim))  # (dim / 2,)
        ft_seq_len = pt_seq_len if ft_seq_len is None else ft_seq_len
        t = torch.arange(ft_seq_len) / ft_seq_len * pt_seq_len                          # (S,)
        freqs = (t[:, None] * freqs).repeat_interleave(2, dim=-1)                       # (S, dim) pairs
        S = ft_seq_len
        freqs = torch.cat([freqs[:, None, :].expand(S, S, dim), freqs[None, :, :].expand(S, S, dim)], dim=-1)
        self.register_buffer("freqs_cos", freqs.cos().reshape(S * S, 2 * dim))         # (N, head_dim)
        self.register_buffer("freqs_sin", freqs.sin().reshape(S * S, 2 * dim))

    def forward(self, t: Tensor) -> Tensor:
        return rope_op(t, self.freqs_cos, self.freqs_sin)


def rope_tables(rope, owner="Attention"):
    """(cos, sin) tables of a rope argument: None, our RotaryEmbedding2D, or a module with
    `freqs_cos`/`freqs_sin` buffers whose formula dmf_kernels.patch has verified."""
    if rope is None:
        return None, None
    if isinstance(rope, RotaryEmbedding2D) or getattr(rope, "_dmf_kernels_rope_checked", False):
        return rope.freqs_cos, rope.freqs_sin
    raise TypeError(f"{owner}: rope must be None, a dmf_kernels.nn.RotaryEmbedding2D or a LightningDiT-style rotary "
                    f"embedding checked by dmf_kernels.patch, got {type(rope).__name__}")


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
    """Multi-head self-attention: fused qkv Linear, optional qk-norm (see qk_norm_module), optional
    rotary embedding of q and k inside the attention kernels, non-causal attention
    (dmf_kernels.attention), proj Linear. x: (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, qk_norm=False,
                 proj_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = qk_norm_module(qk_norm, self.head_dim)
        self.k_norm = qk_norm_module(qk_norm, self.head_dim)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def _heads(self, t, B, N):
        # (B, N, 3D) -> q, k, v: (B, H, N, Dh) views of the fused projection, read in place
        if t is None:
            return None, None, None
        return t.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: Tensor, rope=None) -> Tensor:
        """rope: None, or the model's rotary embedding (LightningDiT's `feat_rope`)."""
        return self._forward(x, rope=rope)

    def forward_jvp(self, x: Tensor, x_dot: Optional[Tensor], rope=None):
        x_dot = check_tangent("Attention", "x_dot", x_dot, x)
        cos, sin = rope_tables(rope)
        B, N, C = x.shape
        qkv, qkv_dot = linear_jvp(x, x_dot, self.qkv)
        (q, k, v), (q_dot, k_dot, v_dot) = self._heads(qkv, B, N), self._heads(qkv_dot, B, N)
        q, q_dot = call_jvp(self.q_norm, q, q_dot)
        k, k_dot = call_jvp(self.k_norm, k, k_dot)
        # one pass: rotates q, k (and their tangents) in the kernel; (B, H, N, Dh) each
        o, o_dot = attention.maybe_jvp(q, k, v, q_dot, k_dot, v_dot, None, cos, sin)
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


class SwiGLUFFN(JvpModule):
    """LightningDiT's SwiGLU MLP: w12 (D -> 2H), silu(first half) * second half, w3 (H -> D), the
    middle step one fused kernel reading both halves in place (dmf_kernels.swiglu).
    x: (..., D) -> (..., D)."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 bias: bool = True):
        super().__init__()
        hidden_features = hidden_features or in_features
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features or in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x)

    def forward_jvp(self, x: Tensor, x_dot: Optional[Tensor]):
        x_dot = check_tangent("SwiGLUFFN", "x_dot", x_dot, x)
        a, a_dot = linear_jvp(x, x_dot, self.w12)      # (..., 2H)
        h, h_dot = swiglu.maybe_jvp(a, a_dot)          # (..., H)
        return linear_jvp(h, h_dot, self.w3)


from .blocks import DiTBlock, FinalLayer, PreNormBlock, dit_blocks, dit_blocks_jvp  # noqa: E402  (they build on the above)
from ._act_ckpt import act_ckpt  # noqa: E402

linear_dual, silu_dual = linear_jvp, silu_jvp  # the names before the vocabulary of issue 14

__all__ = [
    "JvpModule", "DualModule", "PatchEmbed", "RMSNorm", "LayerNorm", "RotaryEmbedding2D", "TimestepEmbedder",
    "LabelEmbedder", "Attention", "Mlp", "SwiGLUFFN", "DiTBlock", "PreNormBlock", "FinalLayer", "qk_norm_module",
    "rope_tables", "linear_jvp", "silu_jvp", "timestep_embedding", "timestep_embedding_jvp",
    "dit_blocks", "dit_blocks_jvp", "act_ckpt",
]
