"""Whole DiT blocks and models: our dmf_kernels.nn model (dmf.DMFT) against the same model in
eager PyTorch (the official DMF code's structure, tests/replicas/official_dmf.py, with SDPA
for the primal and the math path under torch.func.jvp, since SDPA has no forward-mode rule)
and against torch.compile of that.

Modes (the MeanFlow training step is `jvp+bwd`):
    fwd        forward, no grad
    fwd+bwd    forward, loss, backward (a plain training step without the optimizer)
    fwd+jvp    primal and tangent, no grad (ours: model_jvp; eager: torch.func.jvp)
    jvp+bwd    (u, du/dt) = jvp(model, (x, t, r), (v, 1, 0)); loss(u, stopgrad(target)); backward
Shapes: one DiT block (B, N, D) and whole DMFTs at N = 256 tokens: S/2 on CPU, B/2 and XL/2
on a GPU (bf16). The `jvp/own fwd` column of jvp+bwd rows is our jvp+bwd over our fwd+bwd.
"""
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import dmf_kernels as dk
from dmf import DMFT_models

from .harness import Case, compiled

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from replicas import official_dmf  # noqa: E402  (the eager baseline: the official code's model)


def shapes(device, quick):
    """(name, kind, B): kind is a DMFT_models name; 'block' rows use that model's first block."""
    if device == "cuda":
        return [("DMFT-B/2", "block", 32), ("DMFT-B/2", "model", 32), ("DMFT-XL/2", "block", 32),
                ("DMFT-XL/2", "model", 32)]
    return [("DMFT-S/2", "block", 8), ("DMFT-S/2", "model", 4 if quick else 8)]


def sdpa_op(q, k, v):
    """The official attn_op with op="torch_sdpa": q, k, v (B, L, H, D)."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


@functools.lru_cache(maxsize=2)  # consecutive cases share a model: an XL/2 pair takes seconds to build
def build(name, device, dtype, eager_attention):
    """(ours, eager) with the same random weights; 32x32x4 latents -> N = 256 tokens at patch 2.
    Built on `device` directly (XL/2 initialised on the CPU took seconds per case)."""
    ctor = DMFT_models[name]
    kw = dict(input_size=32, in_channels=4, num_classes=1000, use_logvar=True)
    spec = ctor.keywords
    with torch.device(device):
        ours = ctor(**kw)
        ref = official_dmf.DMFT(**kw, depth=spec["depth"], hidden_size=spec["hidden_size"],
                                patch_size=spec["patch_size"], num_heads=spec["num_heads"], dmf_depth=ours.dmf_depth)
    with torch.no_grad():  # nonzero adaLN / final layers: the zero init would skip real work in no model
        for p in ours.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    ref.load_state_dict(ours.state_dict())
    if eager_attention == "sdpa":
        for blk in ref.blocks:
            blk.attn.attn = sdpa_op
    return ours.to(dtype), ref.to(dtype)


def cases(device, dtype, quick):
    dname = str(dtype).replace("torch.", "")
    for name, kind, B in shapes(device, quick):
        for mode in ("fwd", "fwd+bwd", "fwd+jvp", "jvp+bwd"):
            for prov in ("dmf", "eager", "compile"):
                yield Case(f"dit_{kind}", mode, prov, f"{name} B{B} N256", dname,
                           functools.partial(_make, name, kind, B, mode, prov, device, dtype))


def _inputs(ours, B, device, dtype, kind):
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    if kind == "block":
        D = ours.blocks[0].attn.qkv.in_features
        return dict(x=rnd(B, 256, D), c=rnd(B, 1, D), x_dot=rnd(B, 256, D), c_dot=rnd(B, 1, D))
    a, b = torch.rand(B, 1, 1, 1, generator=g), torch.rand(B, 1, 1, 1, generator=g)
    return dict(x=rnd(B, 4, 32, 32), t=torch.maximum(a, b).to(device, dtype), r=torch.minimum(a, b).to(device, dtype),
                y=torch.randint(0, 1000, (B,), generator=g).to(device), v=rnd(B, 4, 32, 32))


def model_step(mode, fn, primals, tangents, params, jvp, before=None):
    """One timed step of `mode` on fn(*primals): fwd and fwd+jvp without grad; fwd+bwd the plain
    training step; jvp+bwd the MeanFlow step (target from du/dt, detached). `before` runs first."""
    def step():
        if before is not None:
            before()
        if mode == "fwd":
            with torch.no_grad():
                return fn(*primals)
        if mode == "fwd+jvp":
            with torch.no_grad():
                return jvp(fn, primals, tangents)
        if mode == "fwd+bwd":
            out = fn(*primals)
            loss = out.float().square().mean()
        else:
            out, out_dot = jvp(fn, primals, tangents)
            loss = (out.float() - out_dot.detach().float()).square().mean()
        return torch.autograd.grad(loss, params, allow_unused=True)  # logvar head: unused by fwd+bwd
    return step


def _make(name, kind, B, mode, prov, device, dtype):
    needs_jvp = "jvp" in mode
    ours, ref = build(name, device, dtype, "math" if needs_jvp else "sdpa")
    model = ours if prov == "dmf" else ref
    if kind == "block":
        model = model.blocks[0]
    inp = _inputs(ours, B, device, dtype, kind)
    params = [p for p in model.parameters() if p.requires_grad]

    if kind == "block":
        primals, tangents = (inp["x"], inp["c"]), (inp["x_dot"], inp["c_dot"])
        fn = model
    else:
        primals = (inp["x"], inp["t"], inp["r"])
        tangents = (inp["v"], torch.ones_like(inp["t"]), torch.zeros_like(inp["r"]))
        fn = functools.partial(model, y=inp["y"])
    jvp = dk.model_jvp if prov == "dmf" else torch.func.jvp

    step = model_step(mode, fn, primals, tangents, params, jvp)
    run = compiled(step) if prov == "compile" else step
    return run, 0, 0
