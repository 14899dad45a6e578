"""FSDP2 (torch.distributed.fsdp.fully_shard) under forward-mode AD.

FSDP2's pre-forward hook passes a unit's grad-requiring inputs through an autograd Function
(RegisterPostBackwardFunction, which queues the reduce-scatter of the unit's gradients). Its
forward returns the inputs as they are and its jvp returns the tangents as they are, which
PyTorch's forward AD refuses for a dual input ("A custom Function's forward is returning a view
(or an input as-is) but the jvp is not returning a view"; PyTorch 2.13). So a dual tensor must
not reach that hook. Two ways in here:
- the block driver (dmf_kernels.nn.dit_blocks) calls each block with plain tensors and their
  tangents beside them, so no dual tensor reaches a block's hooks;
- `fsdp_dual_hooks(modules)` (model_jvp enters it; public as `dmf_kernels.fsdp_forward_ad` for
  a hand-written torch.autograd.forward_ad block) puts a hook on each FSDP unit before
  FSDP's own that takes the tangents off dual inputs, and one after it that puts them back
  (cast to the input's dtype, as FSDP's mixed precision casts the primal): FSDP sees plain
  tensors, the module's forward sees dual ones.
"""
import contextlib

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils import _pytree as pytree

try:  # torch.distributed is optional in a PyTorch build
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - builds without distributed
    FSDPModule = ()


def fsdp_units(modules):
    """The FSDP2 units among `modules` and their submodules (each once)."""
    if not FSDPModule:
        return []
    seen, units = set(), []
    for root in modules:
        for m in root.modules():
            if isinstance(m, FSDPModule) and id(m) not in seen:
                seen.add(id(m))
                units.append(m)
    return units


def _split(args, kwargs):
    flat, spec = pytree.tree_flatten((args, kwargs))
    primals, tangents = [], []
    for a in flat:
        t = None
        if isinstance(a, torch.Tensor):
            a, t = fwAD.unpack_dual(a)
        primals.append(a)
        tangents.append(t)
    return primals, tangents, spec


@contextlib.contextmanager
def fsdp_dual_hooks(modules):
    """While open, dual inputs of the FSDP2 units among `modules` pass FSDP's pre-forward hook
    as plain tensors (see the module docstring). Hooks are removed on exit."""
    handles = []
    for unit in fsdp_units(modules):
        stash = []

        def strip(module, args, kwargs, stash=stash):
            primals, tangents, spec = _split(args, kwargs)
            stash.append(tangents)
            if all(t is None for t in tangents):
                return None
            return pytree.tree_unflatten(primals, spec)

        def rewrap(module, args, kwargs, stash=stash):
            tangents = stash.pop()
            if all(t is None for t in tangents):
                return None
            flat, spec = pytree.tree_flatten((args, kwargs))
            flat = [a if t is None else fwAD.make_dual(a, t.to(a.dtype)) for a, t in zip(flat, tangents)]
            return pytree.tree_unflatten(flat, spec)

        # FSDP's hook was prepended by fully_shard: prepending ours puts it first
        handles.append(unit.register_forward_pre_hook(strip, prepend=True, with_kwargs=True))
        handles.append(unit.register_forward_pre_hook(rewrap, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def fsdp_forward_ad(*modules):
    """Context manager for a hand-written forward-mode AD block around FSDP2-sharded modules:

        with torch.autograd.forward_ad.dual_level(), dmf_kernels.fsdp_forward_ad(model):
            out = model(fwAD.make_dual(x, x_dot), ...)

    Without it, a dual tensor that requires grad (x itself, or any activation between units, as
    in a model whose own forward calls its sharded blocks in a loop) reaches FSDP2's pre-forward
    hook, whose autograd Function PyTorch's forward AD refuses ("A custom Function's forward is
    returning a view ... but the jvp is not returning a view"). dmf_kernels.model_jvp does this
    by itself. Modules: the sharded root (its units are found inside); not needed and harmless
    for unsharded ones."""
    import torch.nn as nn

    for i, m in enumerate(modules):
        if not isinstance(m, nn.Module):
            raise TypeError(f"fsdp_forward_ad: modules[{i}] must be an nn.Module, got {type(m).__name__}")
    return fsdp_dual_hooks(modules)
