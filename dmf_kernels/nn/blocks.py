"""The adaLN-Zero DiT block (LayerNorm or RMSNorm, GELU or SwiGLU MLP, with or without shift,
optional rotary embedding), the pre-norm block without adaLN, the final layer, and `dit_blocks`,
the driver that runs a stack of blocks fusing each block's last gated residual with the next
norm + modulate. Each computation is written once, as a jvp pass whose tangents may all be None
(the primal)."""
import warnings
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .._forward_ad import check_tangent, dual_inputs
from ..gated_residual import gated_residual
from ..norm_mod import adaln_modulate, gated_residual_adaln, gated_residual_rms_adaln, rms_adaln_modulate
from ._act_ckpt import checkpointed, checkpointed_step
from .functional import call_jvp, check_cond, chunks, forward_ad_call, linear_jvp, silu_jvp, to_dtype
from . import Attention, JvpModule, Mlp, RMSNorm, SwiGLUFFN, rms_gain

# FSDP2 warns when a unit returns a view (an in-place op on it would skip its pre-backward hook).
# The blocks' outputs under dit_blocks (a chunk of the modulation, Linear outputs: views) only reach the
# next block's fused ops, never an in-place op: the warning would only be noise there.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP(DiTBlock|FinalLayer)\) returned a view tensor")

_NORMS = ("layer", "rms")
_MLPS = ("gelu", "swiglu")


def _modulation(linear, n, c, c_dot, dtype):
    s, s_dot = silu_jvp(c, c_dot)
    m, m_dot = linear_jvp(s, s_dot, linear)
    return to_dtype(dtype, *m.chunk(n, dim=-1)), to_dtype(dtype, *chunks(m_dot, n))  # n x (B, [1,] D) views


def _block_norm(kind, dim):
    if kind not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {kind!r}")
    # LightningDiT's RMSNorm: a `weight`, eps 1e-6
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6) if kind == "layer" else RMSNorm(dim, 1e-6, "weight")


def norm_mod_jvp(norm, x, x_dot, shift, shift_d, scale, scale_d):
    """`norm` (a LayerNorm without affine, or an RMSNorm with weight: ours or one patched by
    dmf_kernels.patch) then modulate, one fused kernel: (h, h_dot). shift may be None (no shift)."""
    if not isinstance(norm, nn.LayerNorm):
        return rms_adaln_modulate.maybe_jvp(x=x, x_dot=x_dot, shift=shift, shift_dot=shift_d, scale=scale,
                                            scale_dot=scale_d, weight=rms_gain(norm).to(x.dtype), eps=norm.eps)
    if shift is None:  # LayerNorm without shift: a zero (B, D) shift costs one tiny tensor
        shift = torch.zeros_like(scale)
    return adaln_modulate.maybe_jvp(x, x_dot, shift, shift_d, scale, scale_d, norm.eps)


def residual_norm_mod_jvp(norm, x, x_dot, gate, gate_d, y, y_dot, shift, shift_d, scale, scale_d):
    """x + gate * y, then `norm` and modulate, one fused kernel: (x_out, x_out_dot, h, h_dot)."""
    if not isinstance(norm, nn.LayerNorm):
        return gated_residual_rms_adaln.maybe_jvp(x=x, x_dot=x_dot, gate=gate, gate_dot=gate_d, y=y, y_dot=y_dot,
                                                  shift=shift, shift_dot=shift_d, scale=scale, scale_dot=scale_d,
                                                  weight=rms_gain(norm).to(x.dtype), eps=norm.eps)
    if shift is None:
        shift = torch.zeros_like(scale)
    return gated_residual_adaln.maybe_jvp(x, x_dot, gate, gate_d, y, y_dot, shift, shift_d, scale, scale_d, norm.eps)


class DiTBlock(JvpModule):
    """adaLN-Zero DiT block. x: (B, N, D), c: (B, D) or (B, 1, D) -> (B, N, D).

        shift1, scale1, gate1, shift2, scale2, gate2 = Linear(SiLU(c)).chunk(6)   (wo_shift: no shifts, 4)
        x = x + gate1 * attn(norm1(x) * (1 + scale1) + shift1, rope)
        x = x + gate2 * mlp(norm2(x) * (1 + scale2) + shift2)

    Defaults give facebookresearch/DiT's block (LayerNorm, GELU-tanh MLP). LightningDiT's options,
    with its parameter names (so its state_dicts load with strict=True):
        norm="rms"      norm1/norm2 are RMSNorm with a `weight` (use_rmsnorm)
        mlp="swiglu"    SwiGLUFFN(D, int(2/3 * mlp_ratio * D)) with `w12`, `w3` (use_swiglu)
        wo_shift=True   adaLN without shift, Linear(D, 4D) (wo_shift)
        qk_norm         see dmf_kernels.nn.qk_norm_module (LightningDiT's use_qknorm is "rms"
                        with norm="rms", else "layer")
    and a rotary embedding passed at call time: forward(x, c, feat_rope).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm=False, *,
                 norm: str = "layer", mlp: str = "gelu", wo_shift: bool = False):
        super().__init__()
        if mlp not in _MLPS:
            raise ValueError(f"DiTBlock: mlp must be one of {_MLPS}, got {mlp!r}")
        # LightningDiT's registration order (its state_dict order; LayerNorms have no parameters)
        self.norm1 = _block_norm(norm, hidden_size)
        self.norm2 = _block_norm(norm, hidden_size)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm)
        hidden = int(hidden_size * mlp_ratio)
        self.mlp = Mlp(hidden_size, hidden) if mlp == "gelu" else SwiGLUFFN(hidden_size, int(2 / 3 * hidden))
        self.wo_shift = wo_shift
        n = 4 if wo_shift else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, n * hidden_size, bias=True))

    # The pieces dit_blocks composes across block boundaries.
    def modulation_jvp(self, c: Tensor, c_dot: Optional[Tensor], dtype):
        """(shift1, scale1, gate1, shift2, scale2, gate2) and their tangents (None without c_dot;
        the shifts are None without shift)."""
        if not getattr(self, "wo_shift", False):
            return _modulation(self.adaLN_modulation[1], 6, c, c_dot, dtype)
        (scale1, gate1, scale2, gate2), (scale1_d, gate1_d, scale2_d, gate2_d) = \
            _modulation(self.adaLN_modulation[1], 4, c, c_dot, dtype)
        return (None, scale1, gate1, None, scale2, gate2), (None, scale1_d, gate1_d, None, scale2_d, gate2_d)

    def body_jvp(self, x, x_dot, h, h_dot, mods, mods_dot, rope=None):
        """x and h = norm1+modulate(x) -> (x after the attention residual, gate2, mlp output), each
        with its tangent: the MLP residual is left to the caller, to fuse with what comes next."""
        _, _, gate1, shift2, scale2, gate2 = mods
        _, _, gate1_d, shift2_d, scale2_d, gate2_d = mods_dot
        if rope is None:  # (a patched DiT/SiT attention takes no rope argument)
            a, a_dot = call_jvp(self.attn, h, h_dot)
        elif h_dot is None:
            a, a_dot = self.attn(h, rope=rope), None  # its own __call__, so hooks on it run
        else:
            a, a_dot = self.attn.forward_jvp(h, h_dot, rope=rope)
        a, a_dot = to_dtype(x.dtype, a, a_dot)
        x, x_dot, h, h_dot = residual_norm_mod_jvp(self.norm2, x, x_dot, gate1, gate1_d, a, a_dot, shift2, shift2_d,
                                                   scale2, scale2_d)
        m, m_dot = to_dtype(x.dtype, *call_jvp(self.mlp, h, h_dot))
        return (x, x_dot), (gate2, gate2_d), (m, m_dot)

    def forward(self, x: Tensor, c: Tensor, feat_rope=None, *, _chain=None):
        """_chain: dit_blocks' protocol (see chain_step); without it, the block alone."""
        if _chain is not None:
            return block_step(self, x, c, feat_rope, **_chain)
        # already inside this block's __call__ (its hooks ran): the step runs directly
        return dit_blocks([self], x, [c], rope=feat_rope, _inside=True)

    def forward_jvp(self, x: Tensor, c: Tensor, x_dot: Optional[Tensor], c_dot: Optional[Tensor], feat_rope=None):
        return dit_blocks_jvp([self], x, [c], x_dot, [c_dot], rope=feat_rope)


class PreNormBlock(JvpModule):
    """Pre-norm transformer block without adaLN, for in-context conditioning (the condition
    tokens are part of x): RMSNorm with weight, attention with optional rotary embedding,
    RMSNorm, SwiGLU MLP. x: (B, N, D) -> (B, N, D).

        x = x + attn(norm1(x), rope)
        x = x + mlp(norm2(x))

    The attention residual and norm2 run as one fused kernel (the RMSNorm-adaLN kernel with a
    unit gate and zero scale). dmf_kernels.nn.act_ckpt checkpoints it (its jvp pass once in the
    forward, the primal recomputed in the backward)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm="rms",
                 mlp: str = "swiglu"):
        super().__init__()
        if mlp not in _MLPS:
            raise ValueError(f"PreNormBlock: mlp must be one of {_MLPS}, got {mlp!r}")
        self.norm1 = RMSNorm(hidden_size, 1e-6, "weight")
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = RMSNorm(hidden_size, 1e-6, "weight")
        hidden = int(hidden_size * mlp_ratio)
        self.mlp = Mlp(hidden_size, hidden) if mlp == "gelu" else SwiGLUFFN(hidden_size, int(2 / 3 * hidden))

    def forward(self, x: Tensor, feat_rope=None) -> Tensor:
        return self._forward(x, rope=feat_rope)

    def forward_jvp(self, x: Tensor, x_dot: Optional[Tensor], rope=None):
        x_dot = check_tangent("PreNormBlock", "x_dot", x_dot, x)
        if getattr(self, "act_ckpt", False) and torch.is_grad_enabled():  # dmf_kernels.nn.act_ckpt
            return checkpointed(lambda x, x_dot: self.step(x, x_dot, rope), (x,), (x_dot,))
        return self.step(x, x_dot, rope)

    def step(self, x, x_dot, rope):
        """The block's jvp pass: (out, out_dot)."""
        h, h_dot = call_jvp(self.norm1, x, x_dot)
        a, a_dot = (self.attn(h, rope=rope), None) if h_dot is None else self.attn.forward_jvp(h, h_dot, rope=rope)
        a, a_dot = to_dtype(x.dtype, a, a_dot)
        one = x.new_ones(x.shape[-1])
        x, x_dot, h, h_dot = gated_residual_rms_adaln.maybe_jvp(
            x=x, x_dot=x_dot, gate=one, gate_dot=None, y=a, y_dot=a_dot, shift=None, shift_dot=None,
            scale=torch.zeros_like(one), scale_dot=None, weight=rms_gain(self.norm2).to(x.dtype), eps=self.norm2.eps)
        m, m_dot = to_dtype(x.dtype, *call_jvp(self.mlp, h, h_dot))
        return x + m, (None if x_dot is None and m_dot is None else
                       (x_dot if m_dot is None else m_dot if x_dot is None else x_dot + m_dot))


class FinalLayer(JvpModule):
    """x: (B, N, D), c -> (B, N, p * p * C): norm + modulate (shift, scale), then Linear.
    norm="rms": LightningDiT's RMSNorm with a `weight` (use_rmsnorm)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *, norm: str = "layer"):
        super().__init__()
        self.norm_final = _block_norm(norm, hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def modulation_jvp(self, c, c_dot, dtype):
        return _modulation(self.adaLN_modulation[1], 2, c, c_dot, dtype)

    def forward(self, x: Tensor, c: Tensor, *, _chain=None):
        if _chain is not None:
            return final_step(self, x, c, **_chain)
        return self._forward(x, c)

    def forward_jvp(self, x, c, x_dot, c_dot):
        check_cond(c, x, "FinalLayer")
        x_dot = check_tangent("FinalLayer", "x_dot", x_dot, x)
        c_dot = check_tangent("FinalLayer", "c_dot", c_dot, c)
        (shift, scale), (shift_d, scale_d) = self.modulation_jvp(c, c_dot, x.dtype)
        h, h_dot = norm_mod_jvp(self.norm_final, x, x_dot, shift, shift_d, scale, scale_d)
        return linear_jvp(h, h_dot, self.linear)


def dit_blocks(blocks: Sequence[DiTBlock], x: Tensor, conds: Sequence[Tensor], final: Optional[FinalLayer] = None,
               final_cond: Optional[Tensor] = None, rope=None, _inside=False) -> Tensor:
    """x through `blocks` (block i conditioned on conds[i]), then `final` if given, fusing each
    block's last gated residual with the next norm + modulate. Equals
    `final(block_n(...block_1(x, c_1, rope)...), c_final)`; switches to the jvp pass under
    forward-mode AD. rope: None or the rotary embedding every block's attention applies."""
    n, has_final = len(conds), final is not None
    dual = dual_inputs(x, *conds, *([final_cond] if has_final else []))
    if dual is not None:
        (x, *rest), (x_dot, *rest_dot) = dual
        modules = list(blocks) + ([final] if has_final else [])
        return forward_ad_call("dit_blocks", modules, dual[0], lambda: dit_blocks_jvp(
            blocks, x, rest[:n], x_dot, rest_dot[:n], final, rest[n] if has_final else None,
            rest_dot[n] if has_final else None, rope, _inside))
    if len(blocks) != n:
        raise ValueError(f"dit_blocks: {len(blocks)} blocks but {n} conditionings")
    return dit_blocks_jvp(blocks, x, conds, None, [None] * n, final, final_cond, None, rope, _inside)[0]


def dit_blocks_jvp(blocks, x, conds, x_dot, conds_dot, final=None, final_cond=None, final_cond_dot=None, rope=None,
                   _inside=False):
    """The jvp pass of dit_blocks: (out, out_dot), out recorded, out_dot not; None tangents
    (x_dot, any of conds_dot) are zero and skipped; with all of them None, out_dot is None and
    the cost is that of dit_blocks' primal.

    Each block's share of the work (its modulation, the previous block's pending residual fused
    with its norm1 + modulate, its attention and MLP, primal and tangent) runs inside one call of
    the block's own __call__ (`_chain`), so hooks on the block run around exactly the work that
    reads its parameters: FSDP2 (fully_shard per block) gathers them once for primal and tangent
    and frees them after. The inputs are plain tensors, tangents beside them (never dual
    tensors, which FSDP's hook Function cannot pass under forward AD). _inside: called from the
    one block's own forward, whose hooks already ran."""
    if len(blocks) != len(conds) or len(conds) != len(conds_dot):
        raise ValueError(f"dit_blocks_jvp: {len(blocks)} blocks, {len(conds)} conditionings and "
                         f"{len(conds_dot)} conditioning tangents")
    x_dot = check_tangent("DiTBlock", "x_dot", x_dot, x)
    for c in conds:
        check_cond(c, x, "DiTBlock")
    conds_dot = [check_tangent("DiTBlock", "c_dot", cd, c) for c, cd in zip(conds, conds_dot)]
    if final is not None:
        check_cond(final_cond, x, "FinalLayer")
        final_cond_dot = check_tangent("FinalLayer", "c_dot", final_cond_dot, final_cond)
    if not blocks and final is not None and x_dot is None and final_cond_dot is None:
        return final(x, final_cond), None  # its own __call__, as a plain forward would
    pending = None  # (gate, gate_dot, m, m_dot): x + gate * m not yet added
    for block, c, c_dot in zip(blocks, conds, conds_dot):
        # Tangents cross the block boundary detached: FSDP's hook Function gives every
        # grad-requiring input a (zero) gradient, which the ops refuse on their tangent outputs.
        chain = dict(x_dot=_detached(x_dot), c_dot=c_dot, pending=_detached_tangents(pending))
        x, x_dot, *pending = block_step(block, x, c, rope, **chain) if _inside else block(x, c, rope, _chain=chain)
    if final is not None:
        return final(x, final_cond, _chain=dict(x_dot=_detached(x_dot), c_dot=final_cond_dot,
                                                pending=_detached_tangents(pending)))
    if pending is not None:
        x, x_dot = gated_residual.maybe_jvp(x, x_dot, *pending)
    return x, x_dot


def _detached(t):
    return None if t is None else t.detach()


def _detached_tangents(pending):
    """(gate, gate_dot, m, m_dot) with the tangents detached."""
    if pending is None:
        return None
    gate, gate_d, m, m_dot = pending
    return gate, _detached(gate_d), m, _detached(m_dot)


def _pending_norm_mod(norm, x, x_dot, pending, shift, shift_d, scale, scale_d):
    """norm + modulate of x, after the pending gated residual of the block before (fused)."""
    if pending is None:
        return (x, x_dot, *norm_mod_jvp(norm, x, x_dot, shift, shift_d, scale, scale_d))
    gate, gate_d, m, m_dot = pending
    return residual_norm_mod_jvp(norm, x, x_dot, gate, gate_d, m, m_dot, shift, shift_d, scale, scale_d)


def block_step(block, x, c, rope, x_dot=None, c_dot=None, pending=None):
    """chain_step, under activation checkpointing when the block's `act_ckpt` is set (see
    dmf_kernels.nn.act_ckpt) and a backward can follow."""
    if getattr(block, "act_ckpt", False) and torch.is_grad_enabled():
        return checkpointed_step(chain_step, block, x, c, rope, x_dot, c_dot, pending)
    return chain_step(block, x, c, rope, x_dot, c_dot, pending)


def chain_step(block, x, c, rope, x_dot=None, c_dot=None, pending=None):
    """One block of dit_blocks_jvp: -> (x, x_dot, gate2, gate2_dot, m, m_dot), the MLP residual
    x + gate2 * m left pending for the next block's norm1 (or the final layer's norm)."""
    if pending is not None and len(pending) != 4:
        raise ValueError(f"DiTBlock: _chain pending must be (gate, gate_dot, m, m_dot), got {len(pending)} items")
    mods, mods_d = block.modulation_jvp(c, c_dot, x.dtype)
    x, x_dot, h, h_dot = _pending_norm_mod(block.norm1, x, x_dot, pending, mods[0], mods_d[0], mods[1], mods_d[1])
    (x, x_dot), (gate, gate_d), (m, m_dot) = block.body_jvp(x, x_dot, h, h_dot, mods, mods_d, rope=rope)
    return x, x_dot, gate, gate_d, m, m_dot


def final_step(final, x, c, x_dot=None, c_dot=None, pending=None):
    """The final layer in dit_blocks_jvp: the pending residual fused with its norm + modulate,
    then its Linear -> (out, out_dot)."""
    (shift, scale), (shift_d, scale_d) = final.modulation_jvp(c, c_dot, x.dtype)
    _, _, h, h_dot = _pending_norm_mod(final.norm_final, x, x_dot, pending, shift, shift_d, scale, scale_d)
    return linear_jvp(h, h_dot, final.linear)       # (B, N, p * p * C)
