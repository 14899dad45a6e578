"""dmf_kernels.model_jvp: the drop-in for the `torch.func.jvp` line of a MeanFlow trainer.

    (u, logvar), (du_dt, _) = dmf_kernels.model_jvp(partial(model, y=y, return_logvar=True),
                                                    (x_t, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))

How it differs from torch.func.jvp, and why:
- The blocks run their jvp pass (dmf_kernels.nn modules, or blocks patched by
  dmf_kernels.patch): primal and tangent in one kernel pass per op, the primal recorded by
  autograd, the tangent not. The glue around them (patch embedding, timestep MLP,
  unpatchify) runs under torch.autograd.forward_ad; it is cheap.
- Tangent outputs are detached: MeanFlow's target uses stopgrad(du/dt), and eager
  torch.func.jvp keeps every tangent op of the whole network in the autograd graph
  (pytorch issue 151782), holding their activations alive until the backward.
- A tangent that is None does not enter forward-mode AD at all, so e.g. DMF's decoder
  blocks see a conditioning without tangent and skip its work. A small tangent (at most
  65536 elements) that is all zeros, like the official code's `torch.zeros_like(r)`, is
  skipped the same way when the check is free: for CPU tensors by default. On a GPU the check
  is a host sync (it would stall the CPU's run-ahead and break CUDA graph capture), so pass
  None for a zero tangent there, or `skip_zero_tangents=True`. Never under torch.compile
  (a data-dependent branch). A zero tangent that is not skipped is still correct, only slower.
- Under FSDP2 (fully_shard) the dual inputs pass FSDP's hooks as plain tensors (_fsdp.py).
For a model with none of our modules it falls back to torch.func.jvp (with a one-time
warning saying so) and still detaches the tangents.
"""
import functools
import warnings

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
from torch.utils import _pytree as pytree

from ._fsdp import fsdp_dual_hooks

_ZERO_CHECK_MAX_NUMEL = 65536
_warned = set()


def _modules_of(fn, depth=0):
    """The nn.Modules fn runs: fn itself, the func of a functools.partial (and modules among
    its arguments), the owner of a bound method, or modules a lambda / closure captured."""
    if depth > 8:
        return []
    if isinstance(fn, nn.Module):
        return [fn]
    if isinstance(fn, functools.partial):
        found = _modules_of(fn.func, depth + 1)
        for a in list(fn.args) + list(fn.keywords.values()):
            if isinstance(a, nn.Module):
                found.append(a)
        return found
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):
        return [owner]
    found = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, nn.Module) or isinstance(value, functools.partial) or callable(value):
            found += _modules_of(value, depth + 1)
    return found


def has_dual_blocks(module: nn.Module) -> bool:
    """Whether `module` contains dmf_kernels.nn modules or blocks patched by dmf_kernels.patch."""
    from .nn import JvpModule

    return any(isinstance(m, JvpModule) or getattr(m, "_dmf_kernels_patched", None) for m in module.modules())


def _check(primals, tangents):
    if not isinstance(primals, (tuple, list)) or not isinstance(tangents, (tuple, list)):
        raise TypeError("model_jvp: primals and tangents must be tuples (as for torch.func.jvp), got "
                        f"{type(primals).__name__} and {type(tangents).__name__}")
    if len(primals) != len(tangents):
        raise ValueError(f"model_jvp: {len(primals)} primals but {len(tangents)} tangents")
    for i, (p, t) in enumerate(zip(primals, tangents)):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"model_jvp: primals[{i}] must be a Tensor, got {type(p).__name__}")
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"model_jvp: tangents[{i}] must be a Tensor or None, got {type(t).__name__}")
        if t.shape != p.shape:
            raise ValueError(f"model_jvp: tangents[{i}] must have the shape of primals[{i}] {tuple(p.shape)}, "
                             f"got {tuple(t.shape)}")
        if t.dtype != p.dtype:
            raise TypeError(f"model_jvp: tangents[{i}] must have the dtype of primals[{i}] ({p.dtype}), got {t.dtype}")
        if t.device != p.device:
            raise ValueError(f"model_jvp: tangents[{i}] is on {t.device}, expected primals[{i}]'s device {p.device}")
        if not p.is_floating_point():
            raise TypeError(f"model_jvp: primals[{i}] has dtype {p.dtype}; only floating-point primals can have a "
                            "tangent (pass None)")


def _is_zero(t, skip_zero_tangents):
    if t is None:
        return True
    if skip_zero_tangents is None:
        skip_zero_tangents = t.device.type == "cpu"
    if not skip_zero_tangents or torch.compiler.is_compiling() or t.numel() > _ZERO_CHECK_MAX_NUMEL:
        return False
    return not bool(t.any())


def _fallback(fn, primals, tangents, why):
    if why not in _warned:
        _warned.add(why)
        warnings.warn(f"dmf_kernels.model_jvp: {why}; falling back to torch.func.jvp (tangents still "
                      "detached; blocks from dmf_kernels.nn or dmf_kernels.patch still take their one-pass "
                      "jvp path, but tangent activations of the rest stay in the autograd graph). For the "
                      "full jvp pass, pass the model, a functools.partial of it or a lambda that "
                      "captures it directly, built from dmf_kernels.nn or patched by dmf_kernels.patch.",
                      stacklevel=3)
    tangents = tuple(torch.zeros_like(p) if t is None else t for p, t in zip(primals, tangents))
    out, out_dot = torch.func.jvp(fn, tuple(primals), tangents)
    return out, pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out_dot)


def model_jvp(fn, primals, tangents, *, skip_zero_tangents=None):
    """Jacobian-vector product of a DiT-style model, with the calling convention of torch.func.jvp.

    Args:
        fn: a module, a functools.partial of one (e.g. partial(model, y=y, return_logvar=True)),
            a bound method of one, or a function closing over one (lambda x, t, r: model(x, t, r, y));
            its outputs may be a tensor or any tuple/dict of tensors (and non-tensors).
        primals: tuple of tensors, e.g. (x_t, t, r).
        tangents: tuple of the same length; each a tensor of its primal's shape, dtype and
            device, or None (zero tangent, skipped).
        skip_zero_tangents: whether small all-zero tangents are detected and skipped like None
            (default: for CPU tensors only; on CUDA the check costs a host sync).
    Returns:
        (outputs, output_tangents), each with fn's output structure. `outputs` are
        differentiable (a loss on them backpropagates through the fused backward kernels);
        `output_tangents` are detached tensors.
    """
    _check(primals, tangents)
    modules = _modules_of(fn)
    if not modules:
        return _fallback(fn, primals, tangents, f"found no nn.Module in {type(fn).__name__} (looked at modules, "
                                                "functools.partial, bound methods and closure variables)")
    if not any(has_dual_blocks(m) for m in modules):
        return _fallback(fn, primals, tangents, f"{type(modules[0]).__name__} has no dmf_kernels.nn modules and "
                                                "no patched blocks")
    if not torch.compiler.is_compiling() and (fwAD._current_level >= 0 or
                                              torch._C._functorch.peek_interpreter_stack() is not None):
        raise RuntimeError("dmf_kernels.model_jvp cannot run inside another forward-mode AD or torch.func transform "
                           "(torch.func.jvp, jacfwd, vmap or forward_ad.dual_level): PyTorch's forward_ad does not "
                           "nest. Call torch.func.jvp there instead (our modules still take their jvp path).")
    with fwAD.dual_level(), fsdp_dual_hooks(modules):
        args = [p if _is_zero(t, skip_zero_tangents) else fwAD.make_dual(p, t.detach())
                for p, t in zip(primals, tangents)]
        out = fn(*args)
        flat, spec = pytree.tree_flatten(out)
        outs, outs_dot = [], []
        for o in flat:
            if isinstance(o, torch.Tensor):
                p, t = fwAD.unpack_dual(o)
                outs.append(p)
                outs_dot.append(torch.zeros_like(p) if t is None else t.detach())
            else:
                outs.append(o)
                outs_dot.append(None)
    return pytree.tree_unflatten(outs, spec), pytree.tree_unflatten(outs_dot, spec)
