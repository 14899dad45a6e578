"""The adaLN-Zero DiT block, the final layer, and `dit_blocks`, the driver that runs a stack of
blocks fusing each block's last gated residual with the next norm + modulate. Each computation
is written once, as a jvp pass whose tangents may all be None (the primal)."""
from typing import Optional, Sequence

import torch.nn as nn
from torch import Tensor

from .._forward_ad import check_tangent, dual_inputs
from ..gated_residual import gated_residual
from ..norm_mod import adaln_modulate, gated_residual_adaln
from .functional import call_jvp, check_cond, chunks, forward_ad_call, linear_jvp, silu_jvp, to_dtype
from . import Attention, JvpModule, Mlp


def _modulation(linear, n, c, c_dot, dtype):
    s, s_dot = silu_jvp(c, c_dot)
    m, m_dot = linear_jvp(s, s_dot, linear)
    return to_dtype(dtype, *m.chunk(n, dim=-1)), to_dtype(dtype, *chunks(m_dot, n))  # n x (B, [1,] D) views


class DiTBlock(JvpModule):
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
    def modulation_jvp(self, c: Tensor, c_dot: Optional[Tensor], dtype):
        """(shift1, scale1, gate1, shift2, scale2, gate2) and their tangents (None without c_dot)."""
        return _modulation(self.adaLN_modulation[1], 6, c, c_dot, dtype)

    def body_jvp(self, x, x_dot, h, h_dot, mods, mods_dot):
        """x and h = norm1+modulate(x) -> (x after the attention residual, gate2, mlp output), each
        with its tangent: the MLP residual is left to the caller, to fuse with what comes next."""
        _, _, gate1, shift2, scale2, gate2 = mods
        _, _, gate1_d, shift2_d, scale2_d, gate2_d = mods_dot
        a, a_dot = to_dtype(x.dtype, *call_jvp(self.attn, h, h_dot))
        x, x_dot, h, h_dot = gated_residual_adaln.maybe_jvp(x, x_dot, gate1, gate1_d, a, a_dot, shift2, shift2_d,
                                                             scale2, scale2_d, self.norm2.eps)
        m, m_dot = to_dtype(x.dtype, *call_jvp(self.mlp, h, h_dot))
        return (x, x_dot), (gate2, gate2_d), (m, m_dot)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        return dit_blocks([self], x, [c])

    def forward_jvp(self, x: Tensor, c: Tensor, x_dot: Optional[Tensor], c_dot: Optional[Tensor]):
        return dit_blocks_jvp([self], x, [c], x_dot, [c_dot])


class FinalLayer(JvpModule):
    """x: (B, N, D), c -> (B, N, p * p * C): norm + modulate (shift, scale), then Linear."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def modulation_jvp(self, c, c_dot, dtype):
        return _modulation(self.adaLN_modulation[1], 2, c, c_dot, dtype)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        return self._forward(x, c)

    def forward_jvp(self, x, c, x_dot, c_dot):
        check_cond(c, x, "FinalLayer")
        x_dot = check_tangent("FinalLayer", "x_dot", x_dot, x)
        c_dot = check_tangent("FinalLayer", "c_dot", c_dot, c)
        (shift, scale), (shift_d, scale_d) = self.modulation_jvp(c, c_dot, x.dtype)
        h, h_dot = adaln_modulate.maybe_jvp(x, x_dot, shift, shift_d, scale, scale_d, self.norm_final.eps)
        return linear_jvp(h, h_dot, self.linear)


def dit_blocks(blocks: Sequence[DiTBlock], x: Tensor, conds: Sequence[Tensor], final: Optional[FinalLayer] = None,
               final_cond: Optional[Tensor] = None) -> Tensor:
    """x through `blocks` (block i conditioned on conds[i]), then `final` if given, fusing each
    block's last gated residual with the next norm + modulate. Equals
    `final(block_n(...block_1(x, c_1)...), c_final)`; switches to the jvp pass under
    forward-mode AD."""
    n, has_final = len(conds), final is not None
    dual = dual_inputs(x, *conds, *([final_cond] if has_final else []))
    if dual is not None:
        (x, *rest), (x_dot, *rest_dot) = dual
        modules = list(blocks) + ([final] if has_final else [])
        return forward_ad_call("dit_blocks", modules, dual[0], lambda: dit_blocks_jvp(
            blocks, x, rest[:n], x_dot, rest_dot[:n], final, rest[n] if has_final else None,
            rest_dot[n] if has_final else None))
    if len(blocks) != n:
        raise ValueError(f"dit_blocks: {len(blocks)} blocks but {n} conditionings")
    return dit_blocks_jvp(blocks, x, conds, None, [None] * n, final, final_cond, None)[0]


def dit_blocks_jvp(blocks, x, conds, x_dot, conds_dot, final=None, final_cond=None, final_cond_dot=None):
    """The jvp pass of dit_blocks: (out, out_dot), out recorded, out_dot not; None tangents
    (x_dot, any of conds_dot) are zero and skipped; with all of them None, out_dot is None and
    the cost is that of dit_blocks' primal."""
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
    if not blocks:
        if final is None:
            return x, x_dot
        if x_dot is None and final_cond_dot is None:
            return final(x, final_cond), None  # its own __call__, as a plain forward would
        return final.forward_jvp(x, final_cond, x_dot, final_cond_dot)
    mods, mods_d = blocks[0].modulation_jvp(conds[0], conds_dot[0], x.dtype)
    h, h_dot = adaln_modulate.maybe_jvp(x, x_dot, mods[0], mods_d[0], mods[1], mods_d[1], blocks[0].norm1.eps)
    for i, block in enumerate(blocks):
        (x, x_dot), (gate, gate_d), (m, m_dot) = block.body_jvp(x, x_dot, h, h_dot, mods, mods_d)
        # x + gate * m is still pending: fused with the next norm + modulate
        if i + 1 < len(blocks):
            mods, mods_d = blocks[i + 1].modulation_jvp(conds[i + 1], conds_dot[i + 1], x.dtype)
            x, x_dot, h, h_dot = gated_residual_adaln.maybe_jvp(x, x_dot, gate, gate_d, m, m_dot, mods[0],
                                                                 mods_d[0], mods[1], mods_d[1], blocks[i + 1].norm1.eps)
        elif final is not None:
            (shift, scale), (shift_d, scale_d) = final.modulation_jvp(final_cond, final_cond_dot, x.dtype)
            _, _, h, h_dot = gated_residual_adaln.maybe_jvp(x, x_dot, gate, gate_d, m, m_dot, shift, shift_d, scale,
                                                             scale_d, final.norm_final.eps)
            return linear_jvp(h, h_dot, final.linear)       # (B, N, p * p * C)
        else:
            x, x_dot = gated_residual.maybe_jvp(x, x_dot, gate, gate_d, m, m_dot)
    return x, x_dot
