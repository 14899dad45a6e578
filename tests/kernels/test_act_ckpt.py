"""Activation checkpointing of the blocks (dmf_kernels.nn.act_ckpt, `dmf train --act-ckpt`):
float64, the gradients of the trainer's DMF loss with checkpointing equal those without (to
rounding: the recompute runs the same ops on the same inputs, only the gradient sums' order
differs), through model_jvp, torch.func.jvp and torch.autograd.forward_ad, for DMFT in several
flag sets and a DiT patched by dmf_kernels.patch, and for a stack of PreNormBlocks (also with
compiled blocks); the recompute really happens (each block's step runs again in the backward,
without tangents), and the tensors kept for the backward shrink. Under FSDP2:
tests/fsdp_worker.py (the act-ckpt cases)."""
import copy
import functools
import sys
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import dmf_kernels as dk
from dmf import DMFT
from dmf.loss import dmf_loss, draw
from dmf_kernels import nn as dnn
from dmf_kernels.nn import act_ckpt
from dmf_kernels.nn import blocks as nn_blocks

from conftest import PreNormStack, randomize_params

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FLAGS = {"plain": {}, "lightning": dict(use_swiglu=True, use_rope=True, use_rmsnorm=True, use_qknorm=True),
         "officialqk-woshift": dict(qk_norm=True, wo_shift=True)}


def dmft(flags, depth=3):
    return randomize_params(DMFT(input_size=8, patch_size=2, in_channels=3, hidden_size=16, depth=depth, num_heads=2,
                                 num_classes=5, dmf_depth=1, use_logvar=True, **flags).double())


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 4, 2])
    d = draw(g, x.shape, cfg_prob=0.3)
    d = type(d)(*(v.double() if v.is_floating_point() else v for v in (getattr(d, f) for f in d.__dataclass_fields__)))
    return x, y, d


def loss_grads(model, jvp):
    x, y, d = batch()
    model.zero_grad(set_to_none=True)
    loss, _ = dmf_loss(model, model, x, y, d, 5, omega=0.4, g_max=0.9, jvp=jvp)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    assert la.item() == lb.item()  # the forward is the very same computation
    assert ga.keys() == gb.keys() and len(ga) > 20
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-10, atol=1e-12 * gb[k].abs().max().item(),
                                   msg=lambda m: f"{k}: {m}")


def forward_ad_jvp(fn, primals, tangents):
    with fwAD.dual_level():
        out = fn(*(p if t is None else fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
        flat = [fwAD.unpack_dual(o) for o in out] if isinstance(out, tuple) else fwAD.unpack_dual(out)
        if isinstance(out, tuple):
            return tuple(f.primal for f in flat), tuple(f.tangent.detach() for f in flat)
        return flat.primal, flat.tangent.detach()


JVPS = {"model_jvp": dk.model_jvp, "func_jvp": torch.func.jvp, "forward_ad": forward_ad_jvp}


# every flag set through model_jvp (the trainer's), the other two jvp paths on LightningDiT's flags
@pytest.mark.parametrize("flags,jvp", [(f, "model_jvp") for f in FLAGS] +
                         [("lightning", "func_jvp"), ("lightning", "forward_ad")])
def test_dmf_loss_gradients_equal_without(flags, jvp):
    ref = dmft(FLAGS[flags])
    model = copy.deepcopy(ref)
    assert act_ckpt(model) == 3
    assert_same(loss_grads(model, JVPS[jvp]), loss_grads(ref, JVPS[jvp]))


def test_recompute_runs_each_block_again_without_tangents(monkeypatch):
    model = dmft(FLAGS["lightning"])
    act_ckpt(model)
    calls, real = [], nn_blocks.chain_step

    def spy(block, x, c, rope, x_dot=None, c_dot=None, pending=None):
        calls.append((torch.is_grad_enabled(), x_dot is not None, c_dot is not None))
        return real(block, x, c, rope, x_dot, c_dot, pending)

    monkeypatch.setattr(nn_blocks, "chain_step", spy)
    x, y, d = batch()
    loss, _ = dmf_loss(model, model, x, y, d, 5, omega=0.4, g_max=0.9)
    forward = len(calls)
    # FM branch, two guidance passes (no grad: not checkpointed) and the MF branch's jvp pass:
    # blocks 1 and 2 (the decoder, conditioned on r) get the x tangent, block 0 also c_t's
    assert forward == 4 * 3 and calls[-3:] == [(True, True, True), (True, True, False), (True, True, False)]
    loss.backward()
    # the backward recomputes the 3 blocks of the FM branch and of the MF branch, primal only
    assert len(calls) == forward + 6 and all(c == (True, False, False) for c in calls[forward:])


def saved_bytes(model):
    """Bytes of the tensors autograd keeps for the backward (outside checkpointed regions; one
    storage counted once)."""
    seen = {}

    def pack(t):
        try:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        except RuntimeError:  # a tensor without a storage of its own (e.g. a parameter's detached view)
            seen[id(t)] = t.numel() * t.element_size()
        return t

    x, y, d = batch()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = dmf_loss(model, model, x, y, d, 5)
    loss.backward()
    return sum(seen.values())


def test_fewer_tensors_kept_for_the_backward():
    ref = dmft(FLAGS["plain"], depth=6)
    model = copy.deepcopy(ref)
    act_ckpt(model)
    with_ckpt, without = saved_bytes(model), saved_bytes(ref)
    assert with_ckpt < 0.5 * without, (with_ckpt, without)


def test_patched_dit_and_switching_off():
    from replicas import dit as rd
    ref = randomize_params(rd.DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=16, depth=2, num_heads=2,
                                  num_classes=5, learn_sigma=False).double())
    dk.patch(ref)
    model = copy.deepcopy(ref)
    assert act_ckpt(model) == 2
    x, y, d = batch()
    t = d.t_mf.reshape(-1)
    grads = []
    for m in (model, ref):
        out, out_dot = dk.model_jvp(functools.partial(m, y=y), (x, t), (d.noise_mf, torch.ones_like(t)))
        (out * out_dot).sum().backward()
        grads.append([p.grad for p in m.parameters() if p.requires_grad])
    assert len(grads[0]) > 20 and all(g is not None for g in grads[0] + grads[1])
    for a, b in zip(*grads):  # the gradient sums' order differs: rounding relative to the largest entry
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * b.abs().max().item())
    assert act_ckpt(model, False) == 2 and not any(getattr(b, "act_ckpt") for b in model.blocks)


# ---- PreNormBlock (no adaLN; its own jvp pass is checkpointed, not the block driver's step) ----
def prenorm(depth=3):
    return randomize_params(PreNormStack(depth).double())


def prenorm_jvp_loss(model, jvp):
    """(loss, out_dot, gradients) of a loss on the jvp's primal output and its (detached) tangent."""
    g = torch.Generator().manual_seed(2)
    x, x_dot, w = (torch.randn(2, 9, 16, generator=g, dtype=torch.float64) for _ in range(3))
    model.zero_grad(set_to_none=True)
    out, out_dot = jvp(model, (x,), (x_dot,))
    out_dot = out_dot.detach()
    loss = (out * w).sum() + (out * out_dot).sum()
    loss.backward()
    return loss.detach(), out_dot, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def compiled_model_jvp(model, primals, tangents):
    """model_jvp under torch.compile (aot_eager: Dynamo and AOTAutograd's joint graph; the
    checkpoint becomes Dynamo's checkpoint operator). The whole call is compiled, as in a compiled
    training step: a block compiled alone would get dual inputs, which AOTAutograd refuses."""
    from torch._dynamo.utils import counters
    counters.clear()
    out = torch.compile(lambda *p: dk.model_jvp(model, p, tangents), backend="aot_eager")(*primals)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # all of it compiled
    return out


@pytest.mark.parametrize("jvp", ["model_jvp", "func_jvp", "forward_ad", "compiled"])
def test_prenorm_gradients_and_tangents_equal_without(jvp):
    ref = prenorm()
    model = copy.deepcopy(ref)
    assert act_ckpt(model) == 3 and all(b.act_ckpt for b in model.blocks)
    run = compiled_model_jvp if jvp == "compiled" else JVPS[jvp]
    (loss, out_dot, grads), (loss_r, out_dot_r, grads_r) = prenorm_jvp_loss(model, run), prenorm_jvp_loss(ref, run)
    assert torch.equal(out_dot, out_dot_r)  # the tangent: the same jvp pass, computed once
    assert_same((loss, grads), (loss_r, grads_r))


def test_prenorm_recompute_runs_each_block_again_without_tangents(monkeypatch):
    model = prenorm()
    act_ckpt(model)
    calls, real = [], dnn.PreNormBlock.step

    def spy(self, x, x_dot, rope):
        calls.append((torch.is_grad_enabled(), x_dot is not None))
        return real(self, x, x_dot, rope)

    monkeypatch.setattr(dnn.PreNormBlock, "step", spy)
    g = torch.Generator().manual_seed(3)
    x, x_dot = (torch.randn(2, 9, 16, generator=g, dtype=torch.float64) for _ in range(2))
    out, out_dot = dk.model_jvp(model, (x,), (x_dot,))
    assert calls == [(True, True)] * 3
    (out * out_dot).sum().backward()
    assert calls[3:] == [(True, False)] * 3
    with torch.no_grad():  # no backward can follow: not checkpointed
        model(x)
    assert len(calls) == 9


def prenorm_saved_bytes(model):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(2, 9, 16, dtype=torch.float64)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, out_dot = dk.model_jvp(model, (x,), (torch.ones_like(x),))
    (out * out_dot).sum().backward()
    return sum(seen.values())


def test_prenorm_fewer_tensors_kept_for_the_backward():
    ref = prenorm(depth=6)
    model = copy.deepcopy(ref)
    act_ckpt(model)
    with_ckpt, without = prenorm_saved_bytes(model), prenorm_saved_bytes(ref)
    assert with_ckpt < 0.3 * without, (with_ckpt, without)


def test_bad_input():
    with pytest.raises(TypeError, match="act_ckpt: model must be an nn.Module, got str"):
        act_ckpt("DMFT-S/2")
