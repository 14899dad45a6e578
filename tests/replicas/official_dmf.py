"""The official Decoupled MeanFlow code (kyungmnlee/dmf: models/layers.py, models/dmft.py,
loss.py): same module structure, parameter names, conventions and arithmetic. Attention is the
official "base" op (math path, the one torch.func.jvp can differentiate); loss is DMFLoss with
an injectable jvp function so the tests can swap torch.func.jvp for dmf_kernels.model_jvp."""
import math
from functools import partial

import torch
import torch.nn as nn

from .dit import get_2d_sincos_pos_embed
from .timm_layers import PatchEmbed


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        norm_x = torch.rsqrt(x.pow(2).mean(-1, keepdim=True, dtype=torch.float32) + self.eps)
        return x * norm_x.to(dtype=x.dtype) * self.scale.to(dtype=x.dtype)


def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half).to(t.device)
    args = t[..., None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, emb_size=256):
        super().__init__()
        self.emb_size = emb_size
        self.mlp = nn.Sequential(nn.Linear(emb_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, dim=self.emb_size).to(t.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes=1000, hidden_size=768, use_cfg_embedding=True):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)

    def forward(self, labels):
        return self.embedding_table(labels)


def attn_op(q, k, v):
    """The official "base" op: q, k, v (B, L, H, D) -> (B, L, H, D)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q = q * q.shape[-1] ** -0.5
    x = (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    return x.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, proj_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.attn = attn_op

    def forward(self, x, rope=None):
        B, L, C = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 1, 3, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = self.attn(q, k, v).reshape(B, L, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, act_layer=nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=True)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=True)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, **block_kwargs):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True,
                              qk_norm=block_kwargs.get("qk_norm", False))
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DMFT(nn.Module):
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, use_cfg_embedding=True, num_classes=1000, dmf_depth=8, use_logvar=False,
                 **block_kwargs):
        super().__init__()
        self.input_size, self.patch_size = input_size, patch_size
        self.in_channels = self.out_channels = in_channels
        self.num_heads, self.num_classes, self.dmf_depth, self.use_logvar = num_heads, num_classes, dmf_depth, use_logvar
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, use_cfg_embedding)
        self.num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, **block_kwargs)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        if use_logvar:
            self.logvar_t_embedder = partial(timestep_embedding, dim=128)
            self.logvar_linear = nn.Linear(256, 1)
        pos = get_2d_sincos_pos_embed(hidden_size, int(self.num_patches ** 0.5))
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))

    def unpatchify(self, x):
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c))
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, r, y, return_logvar=False):
        t, r = t.reshape(-1), r.reshape(-1)
        x = self.x_embedder(x) + self.pos_embed
        B, L, D = x.shape
        t_embed = self.t_embedder(t).reshape(B, -1, D)
        y_embed = self.y_embedder(y).reshape(B, -1, D)
        c_t = t_embed + y_embed
        for block in self.blocks[:self.dmf_depth]:
            x = block(x, c_t)
        c_r = self.t_embedder(r).reshape(B, -1, D) + y_embed
        for block in self.blocks[self.dmf_depth:]:
            x = block(x, c_r)
        x = self.unpatchify(self.final_layer(x, c_r))
        if return_logvar:
            logvar = self.logvar_linear(torch.cat([self.logvar_t_embedder(t), self.logvar_t_embedder(r)], dim=1)
                                        .to(x.dtype))
            return x, logvar.view(-1, *[1] * (x.ndim - 1))
        return x


def log_lv_loss(x, y, lv, eps=0.01):
    """As in the official loss.py, broadcasting included: mean_loss is (B,) and lv (B, 1, 1, 1),
    so the result is (B, 1, 1, B) (every sample's m against every logvar), then averaged by the
    training script. dmf.loss uses the per-sample form of the paper; this is the oracle."""
    err = (x - y) ** 2
    mean_loss = torch.mean(err, dim=list(range(1, len(x.shape))))
    return torch.log((1 / lv.exp()) * mean_loss + eps) + lv


def dmf_mf_loss(model, x_t, t, r, y, v, jvp=torch.func.jvp):
    """The MF branch of the official DMFLoss.__call__ (times, noise and labels given):
    (u, lv), (du_dt, _) = jvp(partial(model, y=y, return_logvar=True), (x_t, t, r), (v, 1, 0))."""
    model_fn = partial(model, y=y, return_logvar=True)
    (u, lv), (du_dt, _) = jvp(model_fn, (x_t, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    u_tgt = (v + (r - t) * du_dt).detach()
    return log_lv_loss(u, u_tgt, lv).mean()
