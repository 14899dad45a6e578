"""The jvp helpers the modules compose: each takes tangents that may be None (zero) and returns
(primal, tangent) with a None tangent when there is nothing to compute, so one code path serves
the primal (all tangents None, at the primal's cost) and the jvp pass."""
import math
import warnings
from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._forward_ad import check_tangent, make_duals


def linear_jvp(x: Tensor, x_dot: Optional[Tensor], linear: nn.Linear):
    """(x W^T + b, x_dot W^T): the primal recorded by autograd, the tangent not. The primal is the
    module's own call, as in a plain forward (its hooks run)."""
    y = linear(x)
    if x_dot is None:
        return y, None
    # Not recorded even when x_dot requires grad (the attention's tangent does under torch.func.jvp):
    # it would save the weight for a backward that never comes, and make the jvp pass save more
    # tensors than the primal (_act_ckpt.py's primal-only recompute relies on them being the same).
    with torch.no_grad():
        return y, F.linear(x_dot, linear.weight.detach())


def silu_jvp(c: Tensor, c_dot: Optional[Tensor]):
    """(silu(c), silu'(c) c_dot) with silu'(c) = sigmoid(c) (1 + c (1 - sigmoid(c)))."""
    s = F.silu(c)
    if c_dot is None:
        return s, None
    with torch.no_grad():
        sig = torch.sigmoid(c)
        return s, sig * (1 + c * (1 - sig)) * c_dot


def timestep_embedding_jvp(t: Tensor, t_dot: Optional[Tensor], dim: int, max_period: int = 10000):
    """Sinusoidal embedding e = [cos(t f), sin(t f)] (B, dim) of raw t, f = max_period^(-i/half),
    computed in fp32 like the reference codebases (t (B,) or any shape: (..., dim)), and its
    tangent e_dot = [-sin(t f) f t_dot, cos(t f) f t_dot] (None for a None t_dot)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[..., None].float() * freqs
    out = [torch.cat([torch.cos(args), torch.sin(args)], dim=-1)]
    if t_dot is not None:
        args_dot = t_dot[..., None].float() * freqs
        out.append(torch.cat([-torch.sin(args) * args_dot, torch.cos(args) * args_dot], dim=-1))
    if dim % 2:
        out = [torch.cat([e, torch.zeros_like(e[..., :1])], dim=-1) for e in out]
    return out[0], (out[1] if t_dot is not None else None)


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000) -> Tensor:
    """The embedding alone (see timestep_embedding_jvp)."""
    return timestep_embedding_jvp(t, None, dim, max_period)[0]


def check_cond(c, x, owner):
    if not isinstance(c, Tensor):
        raise TypeError(f"{owner}: c must be a Tensor, got {type(c).__name__}")
    B, D = x.shape[0], x.shape[-1]
    if tuple(c.shape) not in ((B, D), (B, 1, D)):
        raise ValueError(f"{owner}: c must have shape (B, D) = ({B}, {D}) or (B, 1, D) = ({B}, 1, {D}) for x of "
                         f"shape {tuple(x.shape)}, got {tuple(c.shape)}")


def chunks(t: Optional[Tensor], n: int):
    return (None,) * n if t is None else t.chunk(n, dim=-1)


def to_dtype(dtype, *ts):
    """Casts to the residual stream's dtype. Under autocast the residual stream stays fp32
    (x_embedder(x) + pos_embed) while Linear outputs are bf16; the fused ops take one dtype.
    A no-op (no copy) without autocast."""
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in ts)


def call_jvp(module, x, x_dot):
    """A submodule on (x, x_dot): without a tangent its own __call__ (so forward hooks on it
    run, as in the module's own forward), else its jvp pass."""
    if isinstance(module, nn.Identity):
        return x, x_dot
    if x_dot is None:
        return module(x), None
    return module.forward_jvp(x, x_dot)


def no_parameter_tangents(module):
    """The jvp pass treats parameters as constants (MeanFlow: zero parameter tangents). With
    tangents on the parameters too (torch.func.functional_call under jvp with parameter
    tangents), refuse clearly. One parameter is looked at: functional_call makes all or none
    of them dual, and this runs on every jvp call."""
    p = next(module.parameters(), None)
    if p is not None and fwAD.unpack_dual(p).tangent is not None:
        raise NotImplementedError(
            f"dmf_kernels.nn.{type(module).__name__}: forward-mode tangents on the parameters are not supported "
            "by the fused jvp pass (only tangents of the inputs)")


_warned_compiled_under_transform = False


def warn_compiled_under_transform(modules):
    """One warning per process when a torch.compile'd module (Module.compile()) runs under an eager
    torch.func transform: PyTorch does not compile there ("Calling torch.func.jvp(compiled_fn) from
    eager mode is not supported", pytorch issue 128711), Dynamo skips every frame and the module
    runs eagerly, right but at eager speed, and says so only in TORCH_LOGS."""
    global _warned_compiled_under_transform
    if _warned_compiled_under_transform or torch.compiler.is_compiling():
        return
    level = torch._C._functorch.peek_interpreter_stack()
    if level is None or not any(getattr(m, "_compiled_call_impl", None) is not None for m in modules):
        return
    _warned_compiled_under_transform = True
    name = level.key().name.lower()
    warnings.warn(
        f"dmf_kernels: a compiled module ran eagerly under torch.func.{name}: PyTorch does not compile a compiled "
        f"function called inside an eager torch.func.{name} (pytorch issue 128711). For compiled blocks use "
        f"dmf_kernels.model_jvp(f, primals, tangents) (the drop-in for torch.func.jvp; FSDP2 too), or "
        f"torch.compile the function that calls torch.func.{name}.", stacklevel=3)


def forward_ad_call(owner, modules, primals, run):
    """Forward-mode AD into modules: `run()` -> (out, out_dot), the jvp pass on the unpacked
    dual inputs, re-wrapped as a dual output whose tangent raises if a gradient reaches it."""
    warn_compiled_under_transform(modules)
    for m in modules:
        no_parameter_tangents(m)
    out, out_dot = run()
    inputs = tuple(p for p in primals if isinstance(p, Tensor) and p.is_floating_point())
    return make_duals((out,), (torch.zeros_like(out) if out_dot is None else out_dot,), f"nn.{owner}", inputs)[0]


__all__ = ["linear_jvp", "silu_jvp", "timestep_embedding", "timestep_embedding_jvp", "check_cond", "check_tangent",
           "chunks", "to_dtype", "call_jvp", "forward_ad_call"]
