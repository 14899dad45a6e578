"""Activation checkpointing of DiT blocks that keeps the jvp pass: each block's activations are
dropped after its forward and recomputed in the backward, while the tangents (du/dt) are still
computed in the one forward pass.

What failed before (torch.utils.checkpoint of a block's jvp pass: "35 tensors saved in the
forward vs 33 on recompute"): the recompute runs in the backward, after the forward-AD level has
closed, so it takes the primal path; under forward AD the attention's tangent output required
grad, so the tangent GEMM of the projection after it (linear_jvp) was recorded and saved its
weight, tensors the primal does not save. linear_jvp now computes its tangent under no_grad, and
the checkpoint sits inside each block's share of the block driver (chain_step), where the inputs
are plain tensors and the tangents explicit arguments:
- the forward runs the jvp pass (primal recorded, tangent not) once;
- the recompute in the backward runs the primal only: the tangents are stop-gradient values (the
  MeanFlow target is v - (t - r) stopgrad(du/dt), method.md) that no backward reads, and the jvp
  pass saves exactly the tensors the primal saves, in the same order (the primal ops are the same
  calls; the tangent ops record nothing), so PyTorch's non-reentrant checkpoint matches them one
  to one (its count and metadata checks stay on; tests/kernels/test_act_ckpt.py);
- the tangent inputs are not kept for the backward (only x, c and the pending residual's gate and
  MLP output are, as for any checkpointed block).
A PreNormBlock (no adaLN, not run by the block driver) is checkpointed the same way around its
own jvp pass (PreNormBlock.forward_jvp): x kept, x_dot given to the first call only.
Under FSDP2 the block's parameters are gathered again for the recompute by FSDP's pre-backward
hook (as for checkpoint_wrapper), so the recompute reads the unsharded weights; the forward still
gathers once for primal and tangent.
"""
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def checkpointed(fn, primals, tangents):
    """fn(*primals, *tangents) under non-reentrant checkpointing, the recompute without tangents
    (each None). primals are what the checkpoint keeps for the backward; the tangents are not kept."""
    if torch.compiler.is_compiling():
        # Dynamo traces the function once into the checkpoint's graph and the partitioner
        # recomputes only what the backward reads (no tangent op): no first-call switch needed
        # (a mutated closure would be a side effect Dynamo refuses inside the checkpoint).
        return checkpoint(fn, *primals, *tangents, use_reentrant=False)
    # The tangents reach the first call only: popped, so the checkpoint (which keeps the function
    # until the backward) does not keep them alive.
    box = {"t": tuple(tangents)}

    def run(*primals):
        return fn(*primals, *box.pop("t", (None,) * len(tangents)))

    return checkpoint(run, *primals, use_reentrant=False)


def checkpointed_step(step, block, x, c, rope, x_dot, c_dot, pending):
    """step(block, x, c, rope, x_dot, c_dot, pending) -> (x, x_dot, gate, gate_dot, m, m_dot)
    under non-reentrant checkpointing, the recompute without tangents."""
    gate, gate_d, m, m_dot = pending if pending is not None else (None, None, None, None)

    def run(x, c, gate, m, x_dot, c_dot, gate_d, m_dot):
        return step(block, x, c, rope, x_dot, c_dot, None if gate is None else (gate, gate_d, m, m_dot))

    return checkpointed(run, (x, c, gate, m), (x_dot, c_dot, gate_d, m_dot))


def _is_block(m: nn.Module) -> bool:
    from .blocks import DiTBlock, PreNormBlock
    return isinstance(m, (DiTBlock, PreNormBlock)) or getattr(m, "_dmf_kernels_patched", None) == "block"


def act_ckpt(model: nn.Module, enabled: bool = True) -> int:
    """Turns activation checkpointing of every block in `model` (dmf_kernels.nn.DiTBlock and
    PreNormBlock, or a block patched by dmf_kernels.patch) on or off; returns how many blocks it set. Each block's
    activations are then recomputed in the backward, its tangents still computed once in the
    forward (model_jvp, torch.func.jvp, forward_ad; see this module's docstring). Before or
    after fully_shard alike. Gradients equal those without (the same ops on the same inputs)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"act_ckpt: model must be an nn.Module, got {type(model).__name__}")
    n = 0
    for m in model.modules():
        if _is_block(m):
            m.act_ckpt = bool(enabled)
            n += 1
    return n
