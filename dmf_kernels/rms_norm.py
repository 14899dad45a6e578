"""rms_norm: RMSNorm with a learnable scale, as used for qk-norm in DiT/DMF attention."""
from ._extension import ops
from ._op import Op


def _rms_norm_backward(s, g):
    dx, dweight = ops.rms_norm_bwd(g.out, s.x, s.weight, s.rstd)
    return dict(x=dx, weight=dweight)


rms_norm = Op(
    "rms_norm", fwd=ops.rms_norm_fwd, jvp=ops.rms_norm_jvp, bwd=ops.rms_norm_bwd, inputs=("x", "weight"),
    params=dict(eps=1e-6), outputs=("out",), stats=("rstd",), saved=("x", "weight", "rstd"),
    backward=_rms_norm_backward, grads_like=("x", "weight"),
    doc="""out = x / sqrt(mean(x^2) + eps) * weight, over the last dim.

    Args:
        x: (..., D), e.g. q or k of shape (B, H, N, head_dim); any leading shape.
        weight: (D,), same dtype as x.
    Returns:
        out: (..., D), differentiable, correct under torch.func.jvp / forward_ad.
    """).fn
