"""rope: rotary position embedding on interleaved pairs, as LightningDiT / EVA apply it
(VisionRotaryEmbeddingFast.forward: t * freqs_cos + rotate_half(t) * freqs_sin, rotate_half
(x0, x1) -> (-x1, x0)). Per pair at position n:

    out = (x0 c0 - x1 s0, x1 c1 + x0 s1)               c = cos[n], s = sin[n]
    out_dot = rope(x_dot)                               (linear, constant tables; same pass)
    backward, the transpose: dx = (g0 c0 + g1 s1, g1 c1 - g0 s0) = g cos - rotate_half(g sin)

cos and sin are constant tables (no tangent, no gradient: Op's TENSOR params).
"""
from ._extension import ops
from ._op import TENSOR, Op


def _rope_backward(s, g):
    return dict(x=ops.rope_bwd(g.out, s.cos, s.sin))


rope = Op(
    "rope", fwd=ops.rope_fwd, jvp=ops.rope_jvp, bwd=ops.rope_bwd, inputs=("x",),
    params=dict(cos=TENSOR, sin=TENSOR), outputs=("out",), saved=("cos", "sin"), backward=_rope_backward,
    grads_like=("grad_out",),
    doc="""out = x * cos + rotate_half(x) * sin, rotate_half on interleaved pairs (x0, x1) -> (-x1, x0).

    Args:
        x: (..., N, D), e.g. q or k of shape (B, H, N, D); D even. Its rows are read in place when
            the leading dims fold into at most three strided groups (q and k as permuted views of a
            fused qkv projection do), else copied.
        cos, sin: (N, D) tables of any float dtype (LightningDiT's fp32 buffers), used in fp32
            (fp64 for fp64 x). Constants: a forward-mode tangent on them, or requires_grad, raises.
    Returns:
        out: like x (contiguous), differentiable w.r.t. x, correct under torch.func.jvp / forward_ad.
    """).fn
