"""swiglu: h = silu(x[..., :H]) * x[..., H:], LightningDiT's SwiGLUFFN after its fused w12
projection (x12 = w12(x); x1, x2 = x12.chunk(2, -1); silu(x1) * x2), with the halves read in
place and primal + tangent in one pass:

    h_dot = silu'(a) a_dot b + silu(a) b_dot,   silu'(a) = sigmoid(a) (1 + a (1 - sigmoid(a)))
    backward: dx = [g b silu'(a), g silu(a)]
"""
from ._extension import ops
from ._op import Op


def _swiglu_backward(s, g):
    return dict(x=ops.swiglu_bwd(g.h, s.x))


def _h_shape(x):
    return (*x.shape[:-1], x.shape[-1] // 2)


swiglu = Op(
    "swiglu", fwd=ops.swiglu_fwd, jvp=ops.swiglu_jvp, bwd=ops.swiglu_bwd, inputs=("x",), outputs=("h",),
    saved=("x",), backward=_swiglu_backward, grads_like=("x",), out_shape=_h_shape,
    doc="""h = silu(a) * b with [a, b] = x.chunk(2, -1), in one pass without copying the halves.

    Args:
        x: (..., 2H), e.g. the output of the fused w12 projection; any leading shape; its rows are
            read in place when the leading dims fold into at most three strided groups (else copied).
    Returns:
        h: (..., H), contiguous, differentiable, correct under torch.func.jvp / forward_ad.
    """).fn
