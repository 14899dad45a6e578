"""DMFT: the Decoupled MeanFlow transformer, on dmf_kernels.nn.

A DiT/SiT whose first `dmf_depth` blocks (the encoder) see c_t = t_embed(t) + y_embed(y) and
whose remaining blocks and final layer (the decoder) see c_r = t_embed(r) + y_embed(y), with
one shared timestep embedder. Constructor arguments, forward signature and state_dict keys
are those of the official DMFT (kyungmnlee/dmf, models/dmft.py), so released DMF checkpoints
and SiT/REPA flow checkpoints load unchanged. Under dmf_kernels.model_jvp (or torch.func.jvp)
the blocks run their one-pass jvp pass.

LightningDiT blocks (hustvl/LightningDiT: RMSNorm-adaLN, SwiGLU, 2-D RoPE, optional qk-norm and
adaLN without shift) with its flags and state_dict keys (`feat_rope.freqs_cos`, `blocks.0.mlp.w12`,
`blocks.0.norm1.weight`, ...), so a LightningDiT checkpoint converts unchanged: the
`LightningDMF-*` entries of DMFT_models (LightningDiT's released configuration: use_swiglu,
use_rope, use_rmsnorm).
"""
from functools import partial

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from dmf_kernels.nn import DiTBlock, FinalLayer, LabelEmbedder, PatchEmbed, RotaryEmbedding2D, TimestepEmbedder
from dmf_kernels.nn import dit_blocks, timestep_embedding

# Accepted for compatibility with the official constructor; our attention is always used.
_IGNORED_BLOCK_KWARGS = ("attn_func", "fused_attn")


class DMFT(nn.Module):
    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, use_cfg_embedding: bool = True,
                 num_classes: int = 1000, dmf_depth: int = 8, use_logvar: bool = False, qk_norm: bool = False,
                 use_qknorm: bool = False, use_swiglu: bool = False, use_rope: bool = False, use_rmsnorm: bool = False,
                 wo_shift: bool = False, **block_kwargs):
        """qk_norm: the official DMF's qk-norm (RMSNorm with `scale`). use_qknorm, use_swiglu, use_rope,
        use_rmsnorm, wo_shift: LightningDiT's flags (its qk-norm is an RMSNorm with `weight` with
        use_rmsnorm, else LayerNorm with weight and bias)."""
        super().__init__()
        unknown = sorted(set(block_kwargs) - set(_IGNORED_BLOCK_KWARGS))
        if unknown:
            raise TypeError(f"DMFT: unknown arguments {unknown}")
        if not 0 <= dmf_depth <= depth:
            raise ValueError(f"DMFT: dmf_depth must be in [0, depth] = [0, {depth}], got {dmf_depth}")
        if hidden_size % num_heads:
            raise ValueError(f"DMFT: hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        if qk_norm and use_qknorm:
            raise ValueError("DMFT: qk_norm (the official DMF's) and use_qknorm (LightningDiT's) are exclusive")
        head_dim = hidden_size // num_heads
        if use_rope and head_dim % 4:
            raise ValueError(f"DMFT: use_rope needs a head dim divisible by 4 (2-D rotary pairs), got {head_dim}")
        self.input_size, self.patch_size = input_size, patch_size
        self.in_channels = self.out_channels = in_channels
        self.num_heads, self.num_classes = num_heads, num_classes
        self.dmf_depth, self.use_logvar = dmf_depth, use_logvar

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, use_cfg_embedding)
        self.num_patches = self.x_embedder.num_patches
        # fixed sin-cos position embedding (a parameter without grad, as in the official code)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size), requires_grad=False)
        # LightningDiT's rotary embedding: head_dim / 2 rotary dims per grid axis
        self.feat_rope = RotaryEmbedding2D(head_dim // 2, input_size // patch_size) if use_rope else None
        qk = "rms_scale" if qk_norm else ("rms" if use_rmsnorm else "layer") if use_qknorm else False
        norm = "rms" if use_rmsnorm else "layer"
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk, norm=norm,
                                              mlp="swiglu" if use_swiglu else "gelu", wo_shift=wo_shift)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm=norm)
        if use_logvar:
            self.logvar_linear = nn.Linear(256, 1)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], int(self.num_patches ** 0.5))
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))  # like nn.Linear, not nn.Conv2d
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        for p in (self.final_layer.adaLN_modulation[-1].weight, self.final_layer.adaLN_modulation[-1].bias,
                  self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.constant_(p, 0)
        if self.use_logvar:
            nn.init.constant_(self.logvar_linear.weight, 0)
            nn.init.constant_(self.logvar_linear.bias, 0)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, N, p * p * C) -> (B, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c))
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: Tensor, t: Tensor, r: Tensor, y: Tensor, return_logvar: bool = False):
        """x: (B, C, H, W), t and r: (B,) or (B, 1, 1, 1) with r <= t, y: (B,) class labels
        (num_classes = null class). Returns u (B, C, H, W), the average velocity from t to r,
        and with return_logvar also logvar (B, 1, 1, 1)."""
        t, r = t.reshape(-1), r.reshape(-1)
        x = self.x_embedder(x) + self.pos_embed               # (B, N, D)
        y_embed = self.y_embedder(y)                          # (B, D)
        c_t = self.t_embedder(t) + y_embed                    # encoder conditioning (B, D)
        c_r = self.t_embedder(r) + y_embed                    # decoder conditioning (B, D)
        depth, k = len(self.blocks), self.dmf_depth
        x = dit_blocks(self.blocks, x, [c_t] * k + [c_r] * (depth - k), self.final_layer, c_r,
                       rope=self.feat_rope)                    # (B, N, p*p*C)
        x = self.unpatchify(x)                                # (B, C, H, W)
        if not return_logvar:
            return x
        if not self.use_logvar:
            raise ValueError("DMFT: return_logvar=True needs a model built with use_logvar=True")
        emb = torch.cat([timestep_embedding(t, 128), timestep_embedding(r, 128)], dim=1)  # (B, 256)
        logvar = self.logvar_linear(emb.to(self.logvar_linear.weight.dtype))
        return x, logvar.view(-1, *[1] * (x.ndim - 1))


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size^2, embed_dim) fixed 2-D sin-cos embedding (MAE / DiT)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    return np.concatenate([_sincos_1d(embed_dim // 2, grid[0]), _sincos_1d(embed_dim // 2, grid[1])], axis=1)


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


_SIZES = {  # name: (depth, hidden_size, num_heads); official sizes, then small ones for CPU
    "XL": (28, 1152, 16), "L": (24, 1024, 16), "M": (16, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6),
    "Ti": (6, 192, 3),
}
DMFT_models = {
    f"DMFT-{size}/{p}": partial(DMFT, depth=d, hidden_size=h, patch_size=p, num_heads=nh,
                                **({"dmf_depth": 4} if size == "Ti" else {}))
    for size, (d, h, nh) in _SIZES.items() for p in ((1, 2, 4) if size == "Ti" else (2, 4, 8))
}
# LightningDiT's sizes (models/lightningdit.py) and its released configuration (configs/
# lightningdit_xl_vavae_f16d32.yaml: SwiGLU, RoPE, RMSNorm; no qk-norm, with shift); Ti and S for CPUs.
_LIGHTNING = dict(use_swiglu=True, use_rope=True, use_rmsnorm=True)
DMFT_models.update({
    f"LightningDMF-{size}/{p}": partial(DMFT, depth=d, hidden_size=h, patch_size=p, num_heads=nh, **_LIGHTNING,
                                        **({"dmf_depth": 4} if size == "Ti" else {}))
    for size, (d, h, nh) in _SIZES.items() if size in ("XL", "L", "B", "S", "Ti") for p in (1, 2)
})
