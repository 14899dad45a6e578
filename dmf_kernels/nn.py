"""DiT modules on the fused ops, each with a dual-stream forward.

Parameter names and shapes are those of facebookresearch/DiT (with timm's Attention and Mlp)
and of the official Decoupled MeanFlow code (kyungmnlee/dmf, models/layers.py), so their
state_dicts load with strict=True.

Every module has
    forward(*inputs)                    the primal; differentiable through our backward kernels
    forward_jvp(*inputs, *tangents)     (out, out_dot) in one dual pass: `out` is recorded by
                                        autograd, `out_dot` is not (no tangent activation is
                                        saved for backward); a tangent given as None is zero
                                        and its work is skipped
and `forward` itself switches to the dual pass when its inputs carry forward-mode tangents
(torch.func.jvp, torch.autograd.forward_ad, dmf_kernels.model_jvp), so a model built from
these modules gets the one-pass kernels without any change to the training code. The
timestep embedder is the exception: it is cheap glue and stays under PyTorch's forward-mode
AD, so its rounding matches the reference codebases exactly.

Conditioning `c` may be (B, D) (facebookresearch/DiT) or (B, 1, D) (the official DMF code).

Speed choices (the dual stream of one DiT block):
- Linear: primal `x W^T + b` recorded; tangent `x_dot W^T` (no bias) computed without
  autograd. Two GEMMs reading W twice: at DiT shapes the GEMM is compute-bound (XL/2 at B=32,
  N=256: 8192 rows against a 1152 x 3456 weight), so stacking [x; x_dot] into one GEMM would
  only add the copy of the stacked rows.
- GELU-tanh and its tangent in one kernel (`gelu_tanh_dual`).
- Block boundaries: the last gated residual of block i and the norm + modulate of block i+1
  (or of the final layer) are one fused kernel (`dit_blocks`): x is read and written once
  per boundary instead of twice.
"""
import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._library import dual_inputs, make_duals
from .adaln import adaln_modulate, adaln_modulate_dual, gated_residual_adaln, gated_residual_adaln_dual
from .attention import attention, attention_dual
from .gated_residual import gated_residual, gated_residual_dual
from .gelu import gelu_tanh, gelu_tanh_dual
from .rms_norm import rms_norm, rms_norm_dual

__all__ = [
    "DualModule", "PatchEmbed", "RMSNorm", "TimestepEmbedder", "LabelEmbedder", "Attention", "Mlp", "DiTBlock", "FinalLayer",
    "linear_dual", "silu_dual", "timestep_embedding", "dit_blocks", "dit_blocks_jvp",
]


# ---------------------------------------------------------------- dual-stream helpers


def linear_dual(x: Tensor, x_dot: Optional[Tensor], linear: nn.Linear):
    """(x W^T + b, x_dot W^T): the primal recorded by autograd, the tangent not."""
    y = F.linear(x, linear.weight, linear.bias)
    if x_dot is None:
        return y, None
    return y, F.linear(x_dot, linear.weight.detach())


def silu_dual(c: Tensor, c_dot: Optional[Tensor]):
    """(silu(c), silu'(c) c_dot) with silu'(c) = sigmoid(c) (1 + c (1 - sigmoid(c)))."""
    s = F.silu(c)
    if c_dot is None:
        return s, None
    with torch.no_grad():
        sig = torch.sigmoid(c)
        return s, sig * (1 + c * (1 - sig)) * c_dot


def _check_tangent(name, t, primal, owner):
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{owner}: {name} must be a Tensor or None, got {type(t).__name__}")
    if t.shape != primal.shape:
        raise ValueError(f"{owner}: {name} must have the shape of its primal {tuple(primal.shape)}, "
                         f"got {tuple(t.shape)}")
    if t.dtype != primal.dtype or t.device != primal.device:
        raise TypeError(f"{owner}: {name} must have its primal's dtype and device ({primal.dtype}, "
                        f"{primal.device}), got ({t.dtype}, {t.device})")
    return t.detach()  # tangents are constants of the primal graph (MeanFlow detaches du/dt)


def _check_cond(c, x, owner):
    if not isinstance(c, Tensor):
        raise TypeError(f"{owner}: c must be a Tensor, got {type(c).__name__}")
    B, D = x.shape[0], x.shape[-1]
    if tuple(c.shape) not in ((B, D), (B, 1, D)):
        raise ValueError(f"{owner}: c must have shape (B, D) = ({B}, {D}) or (B, 1, D) = ({B}, 1, {D}) for x of "
                         f"shape {tuple(x.shape)}, got {tuple(c.shape)}")


def _chunks(t: Optional[Tensor], n: int):
    return (None,) * n if t is None else t.chunk(n, dim=-1)


def _to(dtype, *ts):
    """Casts to the residual stream's dtype. Under autocast the residual stream stays fp32
    (x_embedder(x) + pos_embed) while Linear outputs are bf16; the fused ops take one dtype.
    A no-op (no copy) without autocast."""
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in ts)


def _no_parameter_tangents(module):
    """The dual pass treats parameters as constants (MeanFlow: zero parameter tangents). With
    tangents on the parameters too (torch.func.functional_call under jvp with parameter
    tangents), refuse clearly. One parameter is looked at: functional_call makes all or none
    of them dual, and this runs on every dual call."""
    import torch.autograd.forward_ad as fwAD

    p = next(module.parameters(), None)
    if p is not None and fwAD.unpack_dual(p).tangent is not None:
        raise NotImplementedError(
            f"dmf_kernels.nn.{type(module).__name__}: forward-mode tangents on the parameters are not supported "
            "by the fused dual pass (only tangents of the inputs)")


def _dual_call(module, primals, tangents):
    """Runs module.forward_jvp on unpacked forward-mode duals and re-wraps the outputs."""
    _no_parameter_tangents(module)
    out = module.forward_jvp(*primals, *tangents)
    outs, outs_dot = (out[0],), (out[1],)
    name = type(module).__name__
    duals = make_duals(outs, [torch.zeros_like(o) if d is None else d for o, d in zip(outs, outs_dot)],
                       f"nn.{name}", tuple(p for p in primals if isinstance(p, Tensor) and p.is_floating_point()))
    return duals[0]


class DualModule(nn.Module):
    """Base of the modules with a dual-stream forward; dmf_kernels.model_jvp looks for it."""

    def forward_jvp(self, *args):  # pragma: no cover - every subclass defines it
        raise NotImplementedError


# ---------------------------------------------------------------- embedders and norms


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


class RMSNorm(DualModule):
    """RMSNorm with a learnable `scale` (the official DMF qk-norm; parameter name `scale`)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.scale.to(x.dtype), self.eps)

    def forward_jvp(self, x: Tensor, x_dot: Optional[Tensor]):
        x_dot = _check_tangent("x_dot", x_dot, x, "RMSNorm")
        if x_dot is None:
            return self.forward(x), None
        return rms_norm_dual(x, x_dot, self.scale.to(x.dtype), None, self.eps)


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000) -> Tensor:
    """Sinusoidal embedding [cos(t f), sin(t f)] (B, dim) of raw t, f = max_period^(-i/half),
    computed in fp32 like the reference codebases (t (B,) or any shape: (..., dim))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[..., None].float() * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb


def _timestep_embedding_jvp(t, t_dot, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[..., None].float() * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    args_dot = t_dot[..., None].float() * freqs
    emb_dot = torch.cat([-torch.sin(args) * args_dot, torch.cos(args) * args_dot], dim=-1)
    if dim % 2:
        emb, emb_dot = (torch.cat([e, torch.zeros_like(e[..., :1])], dim=-1) for e in (emb, emb_dot))
    return emb, emb_dot


class TimestepEmbedder(DualModule):
    """t (B,) -> (B, hidden): sinusoidal embedding, then Linear-SiLU-Linear (`mlp.0`, `mlp.2`)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))

    def forward(self, t: Tensor) -> Tensor:
        # Glue: stays under PyTorch's forward-mode AD (see the module docstring).
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))

    def forward_jvp(self, t: Tensor, t_dot: Optional[Tensor]):
        t_dot = _check_tangent("t_dot", t_dot, t, "TimestepEmbedder")
        if t_dot is None:
            return self.forward(t), None
        dtype = self.mlp[0].weight.dtype
        e, e_dot = _timestep_embedding_jvp(t, t_dot, self.frequency_embedding_size)
        h, h_dot = linear_dual(e.to(dtype), e_dot.to(dtype), self.mlp[0])
        h, h_dot = silu_dual(h, h_dot)
        return linear_dual(h, h_dot, self.mlp[2])


class LabelEmbedder(DualModule):
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


# ---------------------------------------------------------------- attention and MLP


class Attention(DualModule):
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
        return t.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: Tensor) -> Tensor:
        dual = dual_inputs(x)
        if dual is not None:
            return _dual_call(self, *dual)
        B, N, C = x.shape
        q, k, v = self._heads(self.qkv(x), B, N)
        q, k = self.q_norm(q), self.k_norm(k)
        o = attention(q, k, v)                              # (B, H, N, Dh)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))

    def forward_jvp(self, x: Tensor, x_dot: Optional[Tensor]):
        x_dot = _check_tangent("x_dot", x_dot, x, "Attention")
        if x_dot is None:
            return self.forward(x), None
        B, N, C = x.shape
        qkv, qkv_dot = linear_dual(x, x_dot, self.qkv)
        q, k, v = self._heads(qkv, B, N)
        q_dot, k_dot, v_dot = self._heads(qkv_dot, B, N)
        q, q_dot = _norm_dual(self.q_norm, q, q_dot)
        k, k_dot = _norm_dual(self.k_norm, k, k_dot)
        o, o_dot = attention_dual(q, k, v, q_dot, k_dot, v_dot)  # one pass: (B, H, N, Dh) each
        o, o_dot = (t.transpose(1, 2).reshape(B, N, C) for t in (o, o_dot))
        return linear_dual(o, o_dot, self.proj)


def _norm_dual(norm, t, t_dot):
    if isinstance(norm, nn.Identity):
        return t, t_dot
    return norm.forward_jvp(t, t_dot)


class Mlp(DualModule):
    """fc1 -> GELU (tanh) -> fc2; x: (..., D) -> (..., D)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        dual = dual_inputs(x)
        if dual is not None:
            return _dual_call(self, *dual)
        return self.fc2(gelu_tanh(self.fc1(x)))

    def forward_jvp(self, x: Tensor, x_dot: Optional[Tensor]):
        x_dot = _check_tangent("x_dot", x_dot, x, "Mlp")
        a, a_dot = linear_dual(x, x_dot, self.fc1)
        g, g_dot = gelu_tanh_dual(a, a_dot)
        return linear_dual(g, g_dot, self.fc2)


# ---------------------------------------------------------------- DiT block and final layer


class DiTBlock(DualModule):
    """adaLN-Zero DiT block. x: (B, N, D), c: (B, D) or (B, 1, D) -> (B, N, D).

        shift1, scale1, gate1, shift2, scale2, gate2 = Linear(SiLU(c)).chunk(6)
        x = x + gate1 * attn(LN(x) * (1 + scale1) + shift1)
        x = x + gate2 * mlp(LN(x) * (1 + scale2) + shift2)
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    # The pieces dit_blocks composes across block boundaries.
    def modulation(self, c: Tensor, dtype: torch.dtype):
        m = self.adaLN_modulation[1](F.silu(c))
        return _to(dtype, *m.chunk(6, dim=-1))  # 6 x (B, [1,] D) views

    def modulation_jvp(self, c: Tensor, c_dot: Optional[Tensor], dtype: torch.dtype):
        s, s_dot = silu_dual(c, c_dot)
        m, m_dot = linear_dual(s, s_dot, self.adaLN_modulation[1])
        return _to(dtype, *m.chunk(6, dim=-1)), _to(dtype, *_chunks(m_dot, 6))

    def body(self, x: Tensor, h: Tensor, mods):
        """x and h = norm1+modulate(x) -> (x after the attention residual, gate2, mlp output):
        the MLP residual is left to the caller, to fuse with what comes next."""
        _, _, gate1, shift2, scale2, gate2 = mods
        x, h = gated_residual_adaln(x, gate1, *_to(x.dtype, self.attn(h)), shift2, scale2, self.norm2.eps)
        return x, gate2, _to(x.dtype, self.mlp(h))[0]

    def body_jvp(self, x, x_dot, h, h_dot, mods, mods_dot):
        _, _, gate1, shift2, scale2, gate2 = mods
        _, _, gate1_d, shift2_d, scale2_d, gate2_d = mods_dot
        a, a_dot = _to(x.dtype, *self.attn.forward_jvp(h, h_dot))
        x, x_dot, h, h_dot = gated_residual_adaln_dual(x, x_dot, gate1, gate1_d, a, a_dot, shift2, shift2_d,
                                                       scale2, scale2_d, self.norm2.eps)
        m, m_dot = _to(x.dtype, *self.mlp.forward_jvp(h, h_dot))
        return (x, x_dot), (gate2, gate2_d), (m, m_dot)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        return dit_blocks([self], x, [c])

    def forward_jvp(self, x: Tensor, c: Tensor, x_dot: Optional[Tensor], c_dot: Optional[Tensor]):
        return dit_blocks_jvp([self], x, [c], x_dot, [c_dot])


class FinalLayer(DualModule):
    """x: (B, N, D), c -> (B, N, p * p * C): norm + modulate (shift, scale), then Linear."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def modulation(self, c, dtype):
        return _to(dtype, *self.adaLN_modulation[1](F.silu(c)).chunk(2, dim=-1))

    def modulation_jvp(self, c, c_dot, dtype):
        s, s_dot = silu_dual(c, c_dot)
        m, m_dot = linear_dual(s, s_dot, self.adaLN_modulation[1])
        return _to(dtype, *m.chunk(2, dim=-1)), _to(dtype, *_chunks(m_dot, 2))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        dual = dual_inputs(x, c)
        if dual is not None:
            return _dual_call(self, *dual)
        _check_cond(c, x, "FinalLayer")
        shift, scale = self.modulation(c, x.dtype)
        return self.linear(adaln_modulate(x, shift, scale, self.norm_final.eps))

    def forward_jvp(self, x, c, x_dot, c_dot):
        _check_cond(c, x, "FinalLayer")
        x_dot = _check_tangent("x_dot", x_dot, x, "FinalLayer")
        c_dot = _check_tangent("c_dot", c_dot, c, "FinalLayer")
        (shift, scale), (shift_d, scale_d) = self.modulation_jvp(c, c_dot, x.dtype)
        if x_dot is None and c_dot is None:  # no tangent at all: nothing to compute
            return self.linear(adaln_modulate(x, shift, scale, self.norm_final.eps)), None
        h, h_dot = adaln_modulate_dual(x, x_dot, shift, shift_d, scale, scale_d, self.norm_final.eps)
        return linear_dual(h, h_dot, self.linear)


# ---------------------------------------------------------------- a stack of blocks


def dit_blocks(blocks: Sequence[DiTBlock], x: Tensor, conds: Sequence[Tensor], final: Optional[FinalLayer] = None,
               final_cond: Optional[Tensor] = None) -> Tensor:
    """x through `blocks` (block i conditioned on conds[i]), then `final` if given, fusing each
    block's last gated residual with the next norm + modulate. Equals
    `final(block_n(...block_1(x, c_1)...), c_final)`; switches to the dual pass under
    forward-mode AD."""
    tensors = [x, *conds] + ([final_cond] if final is not None else [])
    dual = dual_inputs(*tensors)
    if dual is not None:
        for b in list(blocks) + ([final] if final is not None else []):
            _no_parameter_tangents(b)
        (x, *rest), (x_dot, *rest_dot) = dual
        n = len(conds)
        out, out_dot = dit_blocks_jvp(blocks, x, rest[:n], x_dot, rest_dot[:n], final,
                                      rest[n] if final is not None else None,
                                      rest_dot[n] if final is not None else None)
        inputs = tuple(t for t in (x, *rest) if t is not None)
        return make_duals((out,), (torch.zeros_like(out) if out_dot is None else out_dot,), "nn.dit_blocks",
                          inputs)[0]
    if len(blocks) != len(conds):
        raise ValueError(f"dit_blocks: {len(blocks)} blocks but {len(conds)} conditionings")
    for c in conds:
        _check_cond(c, x, "DiTBlock")
    if not blocks:
        return x if final is None else final(x, final_cond)
    mods = blocks[0].modulation(conds[0], x.dtype)
    h = adaln_modulate(x, mods[0], mods[1], blocks[0].norm1.eps)
    for i, block in enumerate(blocks):
        x, gate, m = block.body(x, h, mods)                 # x + gate * m is still pending
        if i + 1 < len(blocks):
            mods = blocks[i + 1].modulation(conds[i + 1], x.dtype)
            x, h = gated_residual_adaln(x, gate, m, mods[0], mods[1], blocks[i + 1].norm1.eps)
        elif final is not None:
            _check_cond(final_cond, x, "FinalLayer")
            shift, scale = final.modulation(final_cond, x.dtype)
            _, h = gated_residual_adaln(x, gate, m, shift, scale, final.norm_final.eps)
            return final.linear(h)                          # (B, N, p * p * C)
        else:
            x = gated_residual(x, gate, m)
    return x


def dit_blocks_jvp(blocks, x, conds, x_dot, conds_dot, final=None, final_cond=None, final_cond_dot=None):
    """The dual pass of dit_blocks: (out, out_dot), out recorded, out_dot not; None tangents
    (x_dot, any of conds_dot) are zero and skipped."""
    if len(blocks) != len(conds) or len(conds) != len(conds_dot):
        raise ValueError(f"dit_blocks_jvp: {len(blocks)} blocks, {len(conds)} conditionings and "
                         f"{len(conds_dot)} conditioning tangents")
    x_dot = _check_tangent("x_dot", x_dot, x, "DiTBlock")
    for c in conds:
        _check_cond(c, x, "DiTBlock")
    conds_dot = [_check_tangent("c_dot", cd, c, "DiTBlock") for c, cd in zip(conds, conds_dot)]
    if final is not None:
        _check_cond(final_cond, x, "FinalLayer")
        final_cond_dot = _check_tangent("c_dot", final_cond_dot, final_cond, "FinalLayer")
    if not blocks:
        return (x, x_dot) if final is None else final.forward_jvp(x, final_cond, x_dot, final_cond_dot)
    mods, mods_d = blocks[0].modulation_jvp(conds[0], conds_dot[0], x.dtype)
    h, h_dot = adaln_modulate_dual(x, x_dot, mods[0], mods_d[0], mods[1], mods_d[1], blocks[0].norm1.eps)
    if x_dot is None and mods_d[0] is None:
        h_dot = None                                        # no tangent at all so far
    for i, block in enumerate(blocks):
        (x, x_dot), (gate, gate_d), (m, m_dot) = block.body_jvp(x, x_dot, h, h_dot, mods, mods_d)
        if i + 1 < len(blocks):
            mods, mods_d = blocks[i + 1].modulation_jvp(conds[i + 1], conds_dot[i + 1], x.dtype)
            x, x_dot, h, h_dot = gated_residual_adaln_dual(x, x_dot, gate, gate_d, m, m_dot, mods[0], mods_d[0],
                                                           mods[1], mods_d[1], blocks[i + 1].norm1.eps)
        elif final is not None:
            (shift, scale), (shift_d, scale_d) = final.modulation_jvp(final_cond, final_cond_dot, x.dtype)
            _, _, h, h_dot = gated_residual_adaln_dual(x, x_dot, gate, gate_d, m, m_dot, shift, shift_d, scale,
                                                       scale_d, final.norm_final.eps)
            return linear_dual(h, h_dot, final.linear)
        else:
            x, x_dot = gated_residual_dual(x, x_dot, gate, gate_d, m, m_dot)
    return x, x_dot
