"""hustvl/LightningDiT blocks and models (issue 15): RMSNorm-adaLN, SwiGLU, 2-D RoPE (LightningDiT's
released configuration: use_swiglu, use_rope, use_rmsnorm). The model is LightningDiT itself
(tests/replicas/lightningdit.py, its own @torch.compile decorators removed so that `eager` is
eager):
    dmf        dmf_kernels.patch(model), the MeanFlow step through dmf_kernels.model_jvp
    eager      the unpatched model; SDPA for the primal, the math path under torch.func.jvp (SDPA
               has no forward-mode rule)
    compile    torch.compile of the eager step
Modes as in bench_dit (fwd, fwd+bwd, fwd+jvp, jvp+bwd: the flow-map training step with
(u, du/dt) = jvp(model, (x, t), (v, 1))). Shapes: B-sized (hidden 768, depth 12, 12 heads of 64)
at N = 256 tokens (16 x 16 latents of 32 channels, patch 1: LightningDiT-B/1 on VA-VAE f16d32) on
the CPU, fp32; XL/1 (1152, 28, 16 heads of 72) in bf16 on a GPU.
"""
import copy
import functools
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

import dmf_kernels as dk

from .bench_dit import model_step
from .harness import Case, compiled

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from replicas import lightningdit as rl  # noqa: E402  (the eager baseline: LightningDiT's model)

FLAGS = dict(use_qknorm=False, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False)
SIZES = {"LightningDiT-B/1": rl.LightningDiT_B_1, "LightningDiT-XL/1": rl.LightningDiT_XL_1}


def shapes(device, quick):
    """(name, kind, B); 'block' rows use the model's first block with its rotary embedding."""
    if device == "cuda":
        return [("LightningDiT-XL/1", "block", 32), ("LightningDiT-XL/1", "model", 32)]
    return [("LightningDiT-B/1", "block", 8), ("LightningDiT-B/1", "model", 4 if quick else 8)]


def _uncompiled(model):
    """LightningDiT compiles its module forwards and `modulate`; the eager baseline runs them eagerly."""
    for m in model.modules():
        fn = type(m).forward
        if hasattr(fn, "_torchdynamo_orig_callable"):
            m.forward = types.MethodType(fn._torchdynamo_orig_callable, m)
    return model


rl.modulate = getattr(rl.modulate, "_torchdynamo_orig_callable", rl.modulate)


def _math_sdpa(q, k, v, dropout_p=0.0):
    return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v


def _attention(math):
    """The eager attention: SDPA, or its math path under torch.func.jvp."""
    rl.F = types.SimpleNamespace(silu=F.silu, scaled_dot_product_attention=_math_sdpa if math
                                 else F.scaled_dot_product_attention)


@functools.lru_cache(maxsize=2)  # consecutive cases share a model
def build(name, device, dtype):
    """(patched, eager): LightningDiT with the same random weights (nonzero adaLN and final layer)."""
    with torch.device(device):
        ref = SIZES[name](input_size=16, in_channels=32, num_classes=1000, **FLAGS)
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
        for blk in ref.blocks:
            blk.norm1.weight.fill_(1.0), blk.norm2.weight.fill_(1.0)
        ref.final_layer.norm_final.weight.fill_(1.0)
    ref = ref.to(dtype)
    ours = copy.deepcopy(ref)
    report = dk.patch(ours)  # (it runs LightningDiT's compiled glue undecorated itself)
    if report.skipped or report.count("block") != len(ours.blocks):
        raise RuntimeError(f"bench_lightningdit: the patch did not take every block:\n{report}")
    # The eager baseline without its @torch.compile decorators (after the copy: an instance-level
    # forward would shadow the patched class's)
    return ours, _uncompiled(ref)


def cases(device, dtype, quick):
    dname = str(dtype).replace("torch.", "")
    for name, kind, B in shapes(device, quick):
        for mode in ("fwd", "fwd+bwd", "fwd+jvp", "jvp+bwd"):
            for prov in ("dmf", "eager", "compile"):
                yield Case(f"lightningdit_{kind}", mode, prov, f"{name} B{B} N256", dname,
                           functools.partial(_make, name, kind, B, mode, prov, device, dtype))


def _make(name, kind, B, mode, prov, device, dtype):
    needs_jvp = "jvp" in mode
    ours, ref = build(name, device, dtype)
    model = ours if prov == "dmf" else ref
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    D = ref.hidden_size
    if kind == "block":
        blk, rope = model.blocks[0], model.feat_rope
        fn = lambda x, c: blk(x, c, rope)  # noqa: E731
        primals, tangents = (rnd(B, 256, D), rnd(B, D)), (rnd(B, 256, D), rnd(B, D))
        params = [p for p in blk.parameters() if p.requires_grad]
    else:
        t = torch.rand(B, generator=g).to(device, dtype)
        fn = functools.partial(model, y=torch.randint(0, 1000, (B,), generator=g).to(device))
        primals, tangents = (rnd(B, 32, 16, 16), t), (rnd(B, 32, 16, 16), torch.ones_like(t))
        params = [p for p in model.parameters() if p.requires_grad]
    jvp = dk.model_jvp if prov == "dmf" else torch.func.jvp

    step = model_step(mode, fn, primals, tangents, params, jvp, before=lambda: _attention(math=needs_jvp))
    run = compiled(step) if prov == "compile" else step
    return run, 0, 0
