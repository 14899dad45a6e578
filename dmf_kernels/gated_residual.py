"""gated_residual: out = x + gate * y (the adaLN-Zero residual of a DiT block)."""
from ._extension import ops
from ._op import Op


def _gated_residual_backward(s, g):
    dgate, dy = ops.gated_residual_bwd(g.out, s.gate, s.y)
    return dict(x=g.out, gate=dgate, y=dy)


gated_residual = Op(
    "gated_residual", fwd=ops.gated_residual_fwd, jvp=ops.gated_residual_jvp, bwd=ops.gated_residual_bwd,
    inputs=("x", "gate", "y"), outputs=("out",), saved=("gate", "y"), backward=_gated_residual_backward,
    grads_like=("gate", "y"),
    doc="""out = x + gate * y.

    Args:
        x, y: (..., D), same shape and dtype.
        gate: (D,), (B, D) (per sample, broadcast over tokens), (B, 1, D) or x's shape.
    Returns:
        out: (..., D), differentiable, correct under torch.func.jvp / forward_ad.
    """).fn
