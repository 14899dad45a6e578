"""Loads dmf_kernels._C (which registers torch.ops.dmf_kernels.*) and adds, per raw op:

- a fake (meta) kernel, so torch.compile and FakeTensor tracing see output shapes;
- an autograd formula that raises: the raw ops are building blocks; derivatives are
  provided by the autograd.Functions in this package. Without it PyTorch would let a
  backward pass run through them and silently drop the gradient (second-order use, or
  backprop through a tangent).
"""
import torch

from . import _C  # noqa: F401  (registers the ops)

ops = torch.ops.dmf_kernels


def build_info() -> dict:
    """What the compiled extension contains: cpu, cuda, cuda_archs, versions, debug."""
    return dict(_C.build_info())


def _rows(x):
    return x.new_empty(x.shape)


def _stats(x):
    return x.new_empty(x.shape[:-1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


def _like(t):
    return t.new_empty(t.shape)


_FAKES = {
    "adaln_modulate_fwd": lambda x, shift, scale, eps: (_rows(x), _stats(x), _stats(x)),
    "adaln_modulate_bwd": lambda g, x, scale, mean, rstd: (_rows(x), _like(scale), _like(scale)),
    "adaln_modulate_jvp": lambda x, xd, sh, shd, sc, scd, eps: (_rows(x), _rows(x), _stats(x), _stats(x)),
    "adaln_modulate_tangent": lambda x, xd, shd, sc, scd, mean, rstd: _rows(x),
    "gated_residual_adaln_fwd": lambda x, gate, y, sh, sc, eps: (_rows(x), _rows(x), _stats(x), _stats(x)),
    "gated_residual_adaln_bwd": lambda gxo, gh, xo, gate, y, sc, mean, rstd: (
        _rows(xo), _like(gate), _rows(xo), _like(sc), _like(sc)),
    "gated_residual_adaln_jvp": lambda x, xd, gate, gd, y, yd, sh, shd, sc, scd, eps: (
        _rows(x), _rows(x), _rows(x), _rows(x), _stats(x), _stats(x)),
    "gated_residual_adaln_tangent": lambda xo, xd, gate, gd, y, yd, shd, sc, scd, mean, rstd: (_rows(xo), _rows(xo)),
    "gated_residual_fwd": lambda x, gate, y: _rows(x),
    "gated_residual_bwd": lambda g, gate, y: (_like(gate), _rows(y)),
    "gated_residual_jvp": lambda x, xd, gate, gd, y, yd: (_rows(x), _rows(x)),
    "gated_residual_tangent": lambda xd, gate, gd, y, yd: _rows(y),
    "rms_norm_fwd": lambda x, w, eps: (_rows(x), _stats(x)),
    "rms_norm_bwd": lambda g, x, w, rstd: (_rows(x), _like(w)),
    "rms_norm_jvp": lambda x, xd, w, wd, eps: (_rows(x), _rows(x), _stats(x)),
    "rms_norm_tangent": lambda x, xd, w, wd, rstd: _rows(x),
}

RAW_OPS = tuple(_FAKES)


def _no_derivative(name):
    public = name.rsplit("_", 1)[0]

    def backward(ctx, *grads):
        raise RuntimeError(
            f"dmf_kernels::{name} has no derivative. Differentiate dmf_kernels.{public} "
            f"(or dmf_kernels.jvp.{public}) instead; derivatives of tangents and double "
            "backward are not supported."
        )

    return backward


for _name, _fake in _FAKES.items():
    torch.library.register_fake(f"dmf_kernels::{_name}", _fake)
    torch.library.register_autograd(f"dmf_kernels::{_name}", _no_derivative(_name))
