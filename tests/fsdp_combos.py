"""Every flag combination under fully_shard, for tests/fsdp_worker.py's one 2-rank run: dmf.DMFT's
48 (use_swiglu x use_rope x use_rmsnorm x wo_shift x {no qk-norm, use_qknorm, qk_norm}) and the
32 of hustvl/LightningDiT patched by dmf_kernels.patch (use_qknorm, use_swiglu, use_rope,
use_rmsnorm, wo_shift). Each flag picks a code path of a block's step (dmf_kernels/nn/blocks.py):
use_rmsnorm the RMSNorm-adaLN kernels (rms_adaln_modulate, gated_residual_rms_adaln) instead of
the LayerNorm ones, also in the final layer, and the kind of LightningDiT's qk-norm; wo_shift the
4-way modulation and a None shift (the RMS kernels take none, the LayerNorm path a zero one);
use_swiglu the MLP (SwiGLUFFN or Mlp); use_rope the attention call (rotary tables inside the
kernels) and, with a qk-norm, its order with the rotation. They meet in the same kernels, so all
combinations run, not a pairwise subset: at ~0.2 s a combination, all 80 cost ~20 s.

A cheaper check per combination than the worker's named cases (which keep theirs): one model of
depth 1 each (its pending residual crosses into the root unit's final layer; the crossing between
two block units is in the named cases), DMFT's block alternately an encoder (dmf_depth 1: c_t,
with t's tangent) and a decoder (dmf_depth 0: c_r, no conditioning tangent); forward, backward,
model_jvp and the backward of a loss on its output, no torch.func.jvp; gradients compared shard by
shard. The unsharded reference itself is checked per combination: its model_jvp against
torch.func.jvp and its tangent against central differences of its plain forward (independent of
our jvp pass: a tangent 0.1% off gives 1e-3, the combinations at most 2.1e-9 of the tangent's size),
shared out between the ranks and run after the sharded cases. The patched LightningDiT's unsharded
model_jvp is also checked against the unpatched original's torch.func.jvp for all 32 combinations
in tests/kernels/test_lightningdit.py.

Case names list the flags that are on: "DMFT-flags-swiglu-rope-rmsnorm-woshift-qknorm-dmfdepth0",
"DMFT-flags-rope-officialqk-dmfdepth0" (qk_norm: the official DMF's), "LightningDiT-flags-none"."""
import contextlib
import copy
import functools
import itertools
import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

DMFT_QK = {"": {}, "qknorm": dict(use_qknorm=True), "officialqk": dict(qk_norm=True)}
LIGHTNING_FLAGS = ("use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm", "wo_shift")


NAMES = {"use_swiglu": "swiglu", "use_rope": "rope", "use_rmsnorm": "rmsnorm", "wo_shift": "woshift",
         "use_qknorm": "qknorm", "qk_norm": "officialqk"}


def flag_id(flags):
    return "-".join(NAMES[k] for k, v in flags.items() if v) or "none"


def dmft_combos():
    for swiglu, rope, rms, wo in itertools.product((False, True), repeat=4):
        for qk in DMFT_QK.values():
            yield dict(use_swiglu=swiglu, use_rope=rope, use_rmsnorm=rms, wo_shift=wo, **qk)


def lightning_combos():
    for values in itertools.product((False, True), repeat=len(LIGHTNING_FLAGS)):
        yield dict(zip(LIGHTNING_FLAGS, values))


def shard_grads_err(model, ref):
    """The worker's grads_err without a collective (full_tensor() of every gradient, one
    all-gather each, was 40% of a combination's time): each rank compares its own shard of each
    gradient with the same rows of the unsharded model's (FSDP2 shards dim 0 as torch.chunk
    does); the worker takes the largest error over the ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    want = {n: p.grad for n, p in ref.named_parameters()}
    e = 0.0
    for n, p in model.named_parameters():
        if (p.grad is None) != (want[n] is None):
            return float("inf")
        if p.grad is None:
            continue
        g, r = p.grad, want[n]
        if isinstance(g, DTensor):
            if g.placements != (Shard(0),):
                return float("inf")
            rows = torch.chunk(r, world, dim=0)
            g, r = g.to_local(), rows[rank] if rank < len(rows) else r[:0]
        if g.shape != r.shape:
            return float("inf")
        if g.numel():
            e = max(e, (g - r).abs().max().item())
    model.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    return e


def cheap_compare(w, model, ref, call, primals, tangents):
    """The worker's compare without torch.func.jvp (w: the worker module)."""
    res = {}
    out, out_r = call(model, *primals), call(ref, *primals)
    res["forward"] = w.err(out, out_r)
    w.loss_of(out).backward()
    w.loss_of(out_r).backward()
    res["backward"] = shard_grads_err(model, ref)
    (o, d), (o_r, d_r) = (w.dk.model_jvp(functools.partial(call, m), primals, tangents) for m in (model, ref))
    res["model_jvp"] = max(w.err(o, o_r), w.err(d, d_r))
    w.loss_of(o).backward()
    w.loss_of(o_r).backward()
    res["model_jvp_backward"] = shard_grads_err(model, ref)
    return res


def _embedding(orig):
    """The sinusoidal timestep embedding in float64 for float64 t (the models compute it in fp32,
    the reference codebases' convention: its rounding, ~6e-8, over a difference step would swamp
    the central differences)."""
    def embedding(t, dim, max_period=10000):
        if t.dtype != torch.float64:
            return orig(t, dim, max_period)
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
        e = torch.cat([torch.cos(t[..., None] * freqs), torch.sin(t[..., None] * freqs)], dim=-1)
        return torch.cat([e, torch.zeros_like(e[..., :1])], dim=-1) if dim % 2 else e
    return embedding


@contextlib.contextmanager
def embedding_in_float64():
    import dmf.model
    from dmf_kernels import nn as dnn
    from replicas import lightningdit as rl
    saved = dnn.timestep_embedding, dmf.model.timestep_embedding, rl.TimestepEmbedder.timestep_embedding
    dnn.timestep_embedding = dmf.model.timestep_embedding = _embedding(saved[0])
    rl.TimestepEmbedder.timestep_embedding = staticmethod(_embedding(saved[2]))
    try:
        yield
    finally:
        dnn.timestep_embedding, dmf.model.timestep_embedding = saved[:2]
        rl.TimestepEmbedder.timestep_embedding = staticmethod(saved[2])


def reference_checks(w, ref, call, primals, tangents):
    """The unsharded model's model_jvp (out and tangent) against torch.func.jvp, and its tangent
    against central differences of the plain forward (relative to the tangent's size), with the
    timestep embedding in float64."""
    zeros = tuple(torch.zeros_like(p) if t is None else t for p, t in zip(primals, tangents))
    leaves = torch.utils._pytree.tree_leaves
    with embedding_in_float64(), torch.no_grad():
        out, out_dot = w.dk.model_jvp(functools.partial(call, ref), primals, tangents)
        o, d = torch.func.jvp(functools.partial(call, ref), primals, zeros)
        # float64: truncation eps^2 / 6 times a third derivative (large here: the LayerNorm models'
        # tangents reach 40; at eps 1e-5 the error was 1e-7 of the tangent), rounding ~1e-16 / eps
        eps = 1e-6
        plus = call(ref, *(p + eps * t for p, t in zip(primals, zeros)))
        minus = call(ref, *(p - eps * t for p, t in zip(primals, zeros)))
    fd = [(a - b) / (2 * eps) for a, b in zip(leaves(plus), leaves(minus))]
    scale = max(max(t.abs().max().item() for t in leaves(out_dot)), 1.0)
    return {"ref_model_jvp_vs_func_jvp": w.err((out, out_dot), (o, d)),
            "ref_model_jvp_vs_differences": max((a - b).abs().max().item()
                                                for a, b in zip(fd, leaves(out_dot))) / scale}


def replica_rms_in_input_dtype():
    """The replicas' RMSNorms compute their statistic in fp32 even for fp64 input; the patch
    self-checks compare formulas in fp64 (as tests/conftest.py's rms_statistic_in_input_dtype)."""
    from replicas import lightningdit as rl, official_dmf as rdmf

    def rms(self, x, w):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return (x.to(acc) * torch.rsqrt(x.to(acc).pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * w
    rl.RMSNorm.forward = lambda self, x: rms(self, x, self.weight)
    rdmf.RMSNorm.forward = lambda self, x: rms(self, x, self.scale.to(x.dtype))


DEFERRED = []  # (case name, reference check): the worker runs them after the sharded cases


def combo_case(w, name, build, call, primals_of, index):
    """build() -> the unsharded float64 model; call(model, *primals); primals_of() -> (primals, tangents).
    w: the worker module (its helpers)."""
    def run():
        ref = build()
        model = copy.deepcopy(ref)
        w.shard(model, list(model.blocks), True)
        primals, tangents = primals_of()
        if index % dist.get_world_size() == dist.get_rank():
            # deferred: inline, the other rank would wait for it at the next case's all-gather
            DEFERRED.append((name, functools.partial(reference_checks, w, ref, call, primals, tangents)))
        return cheap_compare(w, model, ref, call, primals, tangents)
    return run


def add_cases(w, cases):
    """Every combination's case into `cases` (the worker's CASES)."""
    (x, t, r), y = w.dmft_batch()
    kw = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=w.D, depth=1, num_heads=w.H, num_classes=5)

    def dmft(flags, dmf_depth):
        from dmf.model import DMFT
        return w.randomize(DMFT(**kw, dmf_depth=dmf_depth, use_logvar=True, **flags).double())

    def lightning(flags):
        from replicas import lightningdit as rl
        replica_rms_in_input_dtype()
        model = w.randomize(rl.LightningDiT(**kw, **flags).double())
        w.dk.patch(model)
        return model

    def dmft_call(m, x, t, r):
        return m(x, t, r, y, return_logvar=True)

    def lightning_call(m, x, t):
        return m(x, t, y)

    def dmft_inputs():
        return (x, t, r), (w.rnd(*x.shape, seed=7), torch.ones_like(t), None)

    def lightning_inputs():
        return (x, t), (w.rnd(*x.shape, seed=7), torch.ones_like(t))

    for i, flags in enumerate(dmft_combos()):
        k = i % 2  # the block an encoder (dmf_depth 1: c_t, with t's tangent) or a decoder (0: c_r, none)
        name = f"DMFT-flags-{flag_id(flags)}-dmfdepth{k}"
        cases[name] = combo_case(w, name, functools.partial(dmft, flags, k), dmft_call, dmft_inputs, i)
    for i, flags in enumerate(lightning_combos()):
        name = f"LightningDiT-flags-{flag_id(flags)}"
        cases[name] = combo_case(w, name, functools.partial(lightning, flags), lightning_call, lightning_inputs, i)
