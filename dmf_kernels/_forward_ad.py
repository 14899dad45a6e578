"""Forward-mode AD at the boundary of our ops: detect dual tensors among an op's inputs, and wrap
an op's (primal, tangent) results back into dual tensors.

Vocabulary (README, "Words"): a *tangent* is the directional derivative of a value (`x_dot`);
a *jvp* computes primals and tangents together in one pass; a *dual* tensor is PyTorch's
forward-AD pairing of a primal with its tangent, and only appears here.
"""
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor


def dual_inputs(*tensors):
    """(primals, tangents) when any input carries a tangent at the current forward-AD level
    (torch.func.jvp, forward_ad, jacfwd; eager or under torch.compile), else None.

    Every public op routes forward-mode AD this way instead of defining autograd.Function.jvp:
    the one-pass jvp kernel runs instead of a primal kernel followed by a tangent kernel, and
    under torch.compile Dynamo refuses Functions that define `jvp` while without one it silently
    drops the tangent (pytorch issue 192985; tests/test_compile.py compares the tangents).
    """
    unpacked = [None if t is None else fwAD.unpack_dual(t) for t in tensors]
    tangents = [None if u is None else u.tangent for u in unpacked]
    if all(t is None for t in tangents):
        return None
    return [None if u is None else u.primal for u in unpacked], tangents


class _TangentGuard(torch.autograd.Function):
    """Identity on a forward-mode tangent whose backward raises. The jvp kernels do not
    differentiate tangents; without this, a loss that used a non-detached tangent (eager
    torch.func.jvp tangents are differentiable) would silently miss that gradient. Saves
    nothing, so it costs no activation memory. Its forward is a view, so vmap (jacfwd,
    vmap over jvp) can batch it with the generated rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(name, tangent, *inputs):
        return tangent.view_as(tangent)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.name = inputs[0]
        ctx.n_inputs = len(inputs) - 2
        # Unmaterialised: a consumer that returns None for the tangent must not arrive here as
        # a zero tensor and trip the error.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, *grads):
        if all(g is None for g in grads):
            return (None,) * (len(grads) + 1 + ctx.n_inputs)
        raise RuntimeError(
            f"dmf_kernels.{ctx.name}: gradients through forward-mode tangents are not supported; "
            "detach the tangent (as MeanFlow's stopgrad target does)"
        )


def make_duals(primals, tangents, name=None, inputs=()):
    """Wraps (primal, tangent) pairs as dual tensors of the current forward-AD level. In eager,
    when grad mode is on, tangents are guarded so that backprop into them raises."""
    # Inside torch.func.jvp the inputs do not report requires_grad, so the guard is applied
    # whenever grad mode is on; autograd drops it where nothing requires grad. Under
    # torch.compile AOTAutograd gives every output a gradient placeholder, so it cannot run.
    if name is not None and not torch.compiler.is_compiling() and torch.is_grad_enabled():
        tangents = [_TangentGuard.apply(name, t, *inputs) for t in tangents]
    return tuple(fwAD.make_dual(p, t) for p, t in zip(primals, tangents))


def check_tangent(owner, name, t, primal, primal_name="its primal"):
    """A tangent given by the caller: None (zero), or a tensor with its primal's shape, dtype and
    device. Returns it detached: tangents are constants of the primal graph (MeanFlow detaches
    du/dt), so no gradient may flow into them through our jvp passes."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{owner}: {name} must be a Tensor or None, got {type(t).__name__}")
    if t.shape != primal.shape:
        raise ValueError(f"{owner}: {name} must have the shape of {primal_name} {tuple(primal.shape)}, "
                         f"got {tuple(t.shape)}")
    if t.dtype != primal.dtype or t.device != primal.device:
        raise TypeError(f"{owner}: {name} must have {primal_name}'s dtype and device ({primal.dtype}, "
                        f"{primal.device}), got ({t.dtype}, {t.device})")
    return t.detach()
