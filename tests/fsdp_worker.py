"""The worker of tests/kernels/test_fsdp.py, run under torchrun (gloo, CPU): each case builds a tiny
float64 model, an unsharded copy, shards the model with FSDP2 (fully_shard per block, then the
root) and measures the largest difference to the copy of: the forward, the gradients after a
backward (through full_tensor()), dmf_kernels.model_jvp (output and tangent, and the gradients of
a loss on its output) and torch.func.jvp. Every flag combination of DMFT and the patched
LightningDiT: fsdp_combos.py, in the same run. Rank 0 writes {case: {check: error or "raised: ..."}}
(each check's largest error over the ranks) as JSON to argv[1]; argv[2:] are the case names (all
when none). FSDP_WORKER_TRACE=1 prints the tracebacks of raising cases, FSDP_WORKER_TIMES=1 each
case's seconds."""
import faulthandler
import signal
import sys

# Before anything else: a rank that crashes in C++ (SIGSEGV, SIGABRT, ...) writes every thread's Python
# stack to stderr, and one that torchrun ends with SIGTERM because another rank died writes where it
# was waiting (chain: then it terminates as before). test_fsdp.py shows these first on a failure. Only
# as the worker: test_fsdp.py imports this file for the case names, and its process keeps its handlers.
if __name__ == "__main__":
    faulthandler.enable(all_threads=True)
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)

import copy  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

# and before faulthandler's dump, c10's handler prints every thread's C++ frames: a crash in gloo's
# threads, FSDP's collectives or our ops has no Python frame of its own
if __name__ == "__main__":
    torch._C._set_print_stack_traces_on_fatal_signal(True)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # replicas, conftest helpers
import dmf_kernels as dk  # noqa: E402
from dmf_kernels import nn as dnn  # noqa: E402
from conftest import PreNormStack, randomize_params as randomize  # noqa: E402
import fsdp_combos  # noqa: E402

D, H, B, N = 16, 2, 2, 4   # hidden, heads, batch, tokens (a 2 x 2 grid for the rotary embedding)


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def err(a, b):
    a, b = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    assert len(a) == len(b), (len(a), len(b))
    e = 0.0
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            e = max(e, (full(x).double() - full(y).double()).abs().max().item())
    return e




def grads_err(model, ref):
    rg = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    e = 0.0
    for n, p in model.named_parameters():
        if n in rg:
            if (p.grad is None) != (rg[n] is None):
                return float("inf")
            if p.grad is not None:
                e = max(e, err(p.grad, rg[n]))
    model.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    return e


def loss_of(out, seed=5):
    g = torch.Generator().manual_seed(seed)
    outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor) and o.is_floating_point()]
    return sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in outs)


def compare(model, ref, call, primals, tangents, jvp=True):
    """model (sharded) against ref (unsharded) on call(module, *primals)."""
    res = {}
    out, out_r = call(model, *primals), call(ref, *primals)
    res["forward"] = err(out, out_r)
    loss_of(out).backward()
    loss_of(out_r).backward()
    res["backward"] = grads_err(model, ref)
    if not jvp:
        return res
    # a partial with the module among its arguments: model_jvp finds it (a lambda's default argument
    # it would not, and it would fall back to torch.func.jvp)
    (o, d), (o_r, d_r) = (dk.model_jvp(functools.partial(call, m), primals, tangents) for m in (model, ref))
    res["model_jvp"] = max(err(o, o_r), err(d, d_r))
    loss_of(o).backward()
    loss_of(o_r).backward()
    res["model_jvp_backward"] = grads_err(model, ref)
    zeros = tuple(torch.zeros_like(p) if t is None else t for p, t in zip(primals, tangents))
    (o, d), (o_r, d_r) = (torch.func.jvp(lambda *a, m=m: call(m, *a), primals, zeros) for m in (model, ref))
    res["func_jvp"] = max(err(o, o_r), err(d, d_r))
    return res


def rnd(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def shard(model, units=(), reshard=True, mp=None):
    kw = dict(reshard_after_forward=reshard, **({"mp_policy": mp} if mp else {}))
    for u in units:
        fully_shard(u, **kw)
    fully_shard(model, **kw)
    return model


# ---- dmf_kernels.nn modules, each its own FSDP unit ----------------------------------------
def module_case(build, inputs, jvp=True, call=None):
    def run():
        torch.manual_seed(0)
        ref = randomize(build().double())
        model = shard(copy.deepcopy(ref))
        primals = inputs()
        tangents = tuple(rnd(*p.shape, seed=9) if p.is_floating_point() else None for p in primals)
        return compare(model, ref, call or (lambda m, *a: m(*a)), primals, tangents, jvp)
    return run


def rope_call(m, x):
    return m(x, rope=ROPE)


ROPE = dnn.RotaryEmbedding2D(D // H // 2, 2).double()
X, C = (lambda: (rnd(B, N, D),)), (lambda: (rnd(B, N, D), rnd(B, D, seed=2)))
CASES = {
    "RMSNorm": module_case(lambda: dnn.RMSNorm(D), X),
    "LayerNorm": module_case(lambda: dnn.LayerNorm(D), X),
    "Attention-rope-rmsqk": module_case(lambda: dnn.Attention(D, H, qk_norm="rms"), X, call=rope_call),
    "Attention-layerqk": module_case(lambda: dnn.Attention(D, H, qk_norm="layer"), X),
    "Mlp": module_case(lambda: dnn.Mlp(D, 2 * D), X),
    "SwiGLUFFN": module_case(lambda: dnn.SwiGLUFFN(D, 2 * D), X),
    "DiTBlock": module_case(lambda: dnn.DiTBlock(D, H), C),
    "DiTBlock-lightning": module_case(lambda: dnn.DiTBlock(D, H, qk_norm="rms", norm="rms", mlp="swiglu",
                                                           wo_shift=True), C,
                                      call=lambda m, x, c: m(x, c, ROPE)),
    "PreNormBlock": module_case(lambda: dnn.PreNormBlock(D, H), X, call=lambda m, x: m(x, ROPE)),
    "FinalLayer": module_case(lambda: dnn.FinalLayer(D, 2, 3), C),
    "TimestepEmbedder": module_case(lambda: dnn.TimestepEmbedder(D), lambda: (torch.rand(B, dtype=torch.float64),)),
    "LabelEmbedder": module_case(lambda: dnn.LabelEmbedder(5, D), lambda: (torch.tensor([1, 5]),), jvp=False),
    "PatchEmbed": module_case(lambda: dnn.PatchEmbed(4, 2, 3, D), lambda: (rnd(B, 3, 4, 4),)),
}


def prenorm_act_ckpt():
    """PreNormBlocks, each its own unit, checkpointed (act_ckpt after fully_shard) against the
    unsharded stack without checkpointing."""
    ref = randomize(PreNormStack(depth=2, dim=D, heads=H, grid=2).double())
    model = copy.deepcopy(ref)
    shard(model, list(model.blocks))
    assert dnn.act_ckpt(model) == 2
    return compare(model, ref, lambda m, x: m(x), (rnd(B, N, D),), (rnd(B, N, D, seed=9),))


CASES["PreNormBlock-act-ckpt"] = prenorm_act_ckpt


# ---- dmf.DMFT: per-block units, then the root --------------------------------------------------
def dmft_batch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, 3, 8, 8, generator=g, dtype=torch.float64)
    a, c = torch.rand(B, generator=g, dtype=torch.float64), torch.rand(B, generator=g, dtype=torch.float64)
    return (x, torch.maximum(a, c), torch.minimum(a, c)), torch.tensor([1, 5])


def dmft_case(flags, reshard, dmf_depth=1):
    def run():
        from dmf.model import DMFT
        ref = randomize(DMFT(input_size=8, patch_size=2, in_channels=3, hidden_size=D, depth=3, num_heads=H,
                             num_classes=5, dmf_depth=dmf_depth, use_logvar=True, **flags).double())
        model = copy.deepcopy(ref)
        shard(model, list(model.blocks), reshard)
        primals, y = dmft_batch()
        tangents = (rnd(*primals[0].shape, seed=7), torch.ones_like(primals[1]), None)
        return compare(model, ref, lambda m, x, t, r: m(x, t, r, y, return_logvar=True), primals, tangents)
    return run


DMFT_FLAGS = {"plain": {}, "lightning": dict(use_swiglu=True, use_rope=True, use_rmsnorm=True),
              "qknorm-woshift": dict(use_qknorm=True, wo_shift=True), "officialqk": dict(qk_norm=True)}
for _name, _flags in DMFT_FLAGS.items():
    for _reshard in (True, False) if _name in ("plain", "lightning") else (True,):
        CASES[f"DMFT-{_name}-reshard{int(_reshard)}"] = dmft_case(_flags, _reshard)
# more of the flags' combinations (each flag changes which fused kernel a block's step runs)
MORE_FLAGS = {"lightning-all": dict(use_swiglu=True, use_rope=True, use_rmsnorm=True, use_qknorm=True, wo_shift=True),
              "rope-gelu-layernorm": dict(use_rope=True), "swiglu-layerqk": dict(use_swiglu=True, use_qknorm=True)}
for _name, _flags in MORE_FLAGS.items():
    CASES[f"DMFT-{_name}-reshard1"] = dmft_case(_flags, True)
for _k in (0,):  # all blocks decoder (conditioned on r: no conditioning tangent reaches a block)
    CASES[f"DMFT-plain-dmfdepth{_k}-reshard0"] = dmft_case({}, False, dmf_depth=_k)


def dmft_act_ckpt_case(flags, before_shard):
    """Activation checkpointing (dmf_kernels.nn.act_ckpt) switched on before or after fully_shard:
    the sharded, checkpointed model against the unsharded one without, also through the trainer's
    DMF loss (model_jvp inside, guidance passes under no_grad)."""
    def run():
        from dmf.loss import dmf_loss, draw
        from dmf.model import DMFT
        ref = randomize(DMFT(input_size=8, patch_size=2, in_channels=3, hidden_size=D, depth=3, num_heads=H,
                             num_classes=5, dmf_depth=1, use_logvar=True, **flags).double())
        model = copy.deepcopy(ref)
        if before_shard:
            assert dnn.act_ckpt(model) == 3
        shard(model, list(model.blocks), True)
        if not before_shard:
            assert dnn.act_ckpt(model) == 3
        primals, y = dmft_batch()
        tangents = (rnd(*primals[0].shape, seed=7), torch.ones_like(primals[1]), None)
        res = compare(model, ref, lambda m, x, t, r: m(x, t, r, y, return_logvar=True), primals, tangents)
        g = torch.Generator().manual_seed(4)
        d = draw(g, primals[0].shape, cfg_prob=0.5)
        d = type(d)(*(v.double() if v.is_floating_point() else v for v in (getattr(d, f) for f in d.__dataclass_fields__)))
        for m in (model, ref):
            dmf_loss(m, m, primals[0], y, d, 5, omega=0.4, g_max=0.9)[0].backward()
        res["dmf_loss_backward"] = grads_err(model, ref)
        return res
    return run


CASES["DMFT-act-ckpt-lightning-before-shard"] = dmft_act_ckpt_case(DMFT_FLAGS["lightning"], True)
CASES["DMFT-act-ckpt-qknorm-woshift-after-shard"] = dmft_act_ckpt_case(DMFT_FLAGS["qknorm-woshift"], False)


def dmft_compiled_case(flags, order, backend="inductor", ckpt=False):
    """torch.compile of each block (Module.compile(): its __call__, FSDP's hooks included, which
    Dynamo runs eagerly), then fully_shard ("compile-then-shard", the order of torchtitan), or
    fully_shard then compile ("shard-then-compile"), optionally with act_ckpt, against the
    unsharded, uncompiled model without checkpointing."""
    def run():
        from dmf.model import DMFT
        ref = randomize(DMFT(input_size=8, patch_size=2, in_channels=3, hidden_size=D, depth=2, num_heads=H,
                             num_classes=5, dmf_depth=1, use_logvar=True, **flags).double())
        model = copy.deepcopy(ref)
        if order == "compile-then-shard":
            for b in model.blocks:
                b.compile(backend=backend)
        shard(model, list(model.blocks), True)
        if order == "shard-then-compile":
            for b in model.blocks:
                b.compile(backend=backend)
        if ckpt:  # activation checkpointing inside the compiled blocks (_act_ckpt.py's compiled branch)
            dnn.act_ckpt(model)
        primals, y = dmft_batch()
        tangents = (rnd(*primals[0].shape, seed=7), torch.ones_like(primals[1]), None)
        from torch._dynamo.utils import counters
        call = lambda m, x, t, r: m(x, t, r, y, return_logvar=True)  # noqa: E731
        graphs = {}
        with torch.compiler.set_stance("default"):
            # the blocks really compile, for the plain forward and for model_jvp's jvp pass (FSDP's
            # hooks run eagerly around them); under an eager torch.func.jvp Dynamo does not compile
            # (pytorch issue 128711) and the blocks run eagerly, with a warning (tests/kernels/test_nn.py)
            for what, run_it in (("forward", lambda: call(model, *primals)),
                                 ("model_jvp", lambda: dk.model_jvp(functools.partial(call, model), primals, tangents))):
                counters.clear()
                run_it()
                graphs[what] = counters["stats"]["unique_graphs"]
            res = compare(model, ref, call, primals, tangents)
        res.update({f"{w}_not_compiled": 0.0 if n > 0 else float("inf") for w, n in graphs.items()})
        return res
    return run


# In the test run: the aot_eager backend (Dynamo's capture and AOTAutograd's joint graph around FSDP's
# hooks, which is what FSDP changes; Inductor's code for our ops is tests/kernels/test_compile.py's).
# Inductor itself costs ~35 s per case on 2 cores: run by name, e.g.
#   torchrun --standalone --nproc_per_node 2 tests/fsdp_worker.py out.json DMFT-compiled-blocks-lightning
CASES["DMFT-compiled-aot-lightning"] = dmft_compiled_case(DMFT_FLAGS["lightning"], "compile-then-shard", "aot_eager")
CASES["DMFT-compiled-aot-plain-shard-first-act-ckpt"] = dmft_compiled_case(DMFT_FLAGS["plain"], "shard-then-compile",
                                                                           "aot_eager", ckpt=True)
BY_NAME_ONLY = {"DMFT-compiled-blocks-lightning": dmft_compiled_case(DMFT_FLAGS["lightning"], "compile-then-shard"),
                "DMFT-compiled-blocks-plain-shard-first": dmft_compiled_case(DMFT_FLAGS["plain"],
                                                                             "shard-then-compile")}


def dmft_bf16():
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) on an fp32 DMFT: a smoke test
    (runs, finite, close to the fp32 model at bf16's precision)."""
    from dmf.model import DMFT
    ref = randomize(DMFT(input_size=8, patch_size=2, in_channels=3, hidden_size=D, depth=2, num_heads=H,
                         num_classes=5, dmf_depth=1, use_swiglu=True, use_rope=True, use_rmsnorm=True).double())
    ref = ref.float()
    model = copy.deepcopy(ref)
    model = shard(model, list(model.blocks), True, MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                    reduce_dtype=torch.float32))
    (x, t, r), y = dmft_batch()
    x, t, r = x.float(), t.float(), r.float()
    out, dout = dk.model_jvp(lambda a, b, c: model(a, b, c, y), (x, t, r), (torch.ones_like(x), torch.ones_like(t),
                                                                            None))
    out_r, dout_r = dk.model_jvp(lambda a, b, c: ref(a, b, c, y), (x, t, r), (torch.ones_like(x), torch.ones_like(t),
                                                                              None))
    loss_of(out).backward()
    grads = [full(p.grad) for p in model.parameters() if p.grad is not None]
    scale = max(out_r.abs().max().item(), dout_r.abs().max().item(), 1.0)
    return {"bf16_relative": max(err(out, out_r), err(dout, dout_r)) / scale,
            "bf16_finite": 0.0 if all(torch.isfinite(g).all() for g in grads) and len(grads) else float("inf")}


CASES["DMFT-bf16-mixed-precision"] = dmft_bf16


# ---- models dmf_kernels.patch handles: patched, then sharded ------------------------------------
def replica(kind, **flags):
    from replicas import dit as rd, lightningdit as rl, official_dmf as rdmf
    fsdp_combos.replica_rms_in_input_dtype()
    (x, t, r), y = dmft_batch()
    kw = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=D, depth=2, num_heads=H, num_classes=5)
    if kind == "DiT":
        return rd.DiT(**kw, learn_sigma=False), lambda m, x, t: m(x, t, y), (x, t)
    if kind == "LightningDiT":
        m = rl.LightningDiT(**kw, **(flags or dict(use_qknorm=True, use_swiglu=True, use_rope=True, use_rmsnorm=True)))
        return m, lambda m, x, t: m(x, t, y), (x, t)
    return (rdmf.DMFT(**kw, dmf_depth=1, qk_norm=True, use_logvar=True),
            lambda m, x, t, r: m(x, t, r, y, return_logvar=True), (x, t, r))


def patched_case(kind, reshard=True, **flags):
    def run():
        model, call, primals = replica(kind, **flags)
        ref = randomize(model.double())
        dk.patch(ref)
        model = copy.deepcopy(ref)
        model = shard(model, list(model.blocks), reshard)
        tangents = (rnd(*primals[0].shape, seed=7), torch.ones_like(primals[1]), *[None] * (len(primals) - 2))
        return compare(model, ref, call, primals, tangents)
    return run


for _kind in ("DiT", "LightningDiT", "officialDMF"):
    CASES[f"patched-{_kind}"] = patched_case(_kind)
CASES["patched-LightningDiT-reshard0"] = patched_case("LightningDiT", False)
CASES["patched-LightningDiT-layernorm-gelu-woshift"] = patched_case("LightningDiT", use_qknorm=True, use_rope=True,
                                                                    wo_shift=True)


def forward_ad_case(kind):
    """A hand-written torch.autograd.forward_ad block around the sharded root, inside
    dmf_kernels.fsdp_forward_ad, with the input x requiring grad (FSDP's hook Function sees it):
    output, tangent, the parameters' and x's gradients of a loss on the output. Patched models
    call their sharded blocks on dual activations from their own forward loop."""
    def run():
        import torch.autograd.forward_ad as fwAD
        if kind == "DMFT":
            from dmf.model import DMFT
            model = DMFT(input_size=8, patch_size=2, in_channels=3, hidden_size=D, depth=2, num_heads=H,
                         num_classes=5, dmf_depth=1, use_swiglu=True, use_rope=True, use_rmsnorm=True)
            (x, t, r), y = dmft_batch()
            call, primals = (lambda m, x, t, r: m(x, t, r, y)), (x, t, r)
        else:
            model, call, primals = replica(kind)
        ref = randomize(model.double())
        if kind != "DMFT":
            dk.patch(ref)
        model = copy.deepcopy(ref)
        shard(model, list(model.blocks))
        tangents = (rnd(*primals[0].shape, seed=7), torch.ones_like(primals[1]))
        res, outs = {}, []
        for m in (model, ref):
            x = primals[0].clone().requires_grad_(True)
            with fwAD.dual_level(), dk.fsdp_forward_ad(m):
                o = call(m, fwAD.make_dual(x, tangents[0]), fwAD.make_dual(primals[1], tangents[1]), *primals[2:])
                o, o_dot = fwAD.unpack_dual(o)
            loss_of(o).backward()
            outs.append((o, o_dot.clone(), x.grad))
        (o, d, gx), (o_r, d_r, gx_r) = outs
        res["forward_ad"] = max(err(o, o_r), err(d, d_r))
        res["forward_ad_backward"] = max(grads_err(model, ref), err(gx, gx_r))
        return res
    return run


for _kind in ("DMFT", "DiT"):
    CASES[f"forward_ad-hand-written-{_kind}"] = forward_ad_case(_kind)


# ---- diffusers transformers patched by dmf_kernels.patch (tests/kernels/diffusers_models.py) ----------
def diffusers_units(name, model):
    """Each transformer block its own unit (the GQA model: each of its per-layer modules). diffusers'
    DiT reads block 0's timestep embedder again after the loop (`transformer_blocks[0].norm1.emb`,
    its output conditioning), outside block 0's __call__, when FSDP has resharded it: the
    unpatched model fails the same way ("mixed torch.Tensor and DTensor"). The embedders as units
    of their own are gathered around each call."""
    units = [b for attr in ("transformer_blocks", "single_transformer_blocks", "blocks", "attns", "ffs", "norms")
             for b in getattr(model, attr, [])]
    return ([b.norm1.emb for b in units] if name == "dit" else []) + units


def diffusers_case(name, **kw):
    def run():
        sys.path.insert(0, str(Path(__file__).resolve().parent / "kernels"))
        from diffusers_models import build
        ref, call, x, t = build(name, **kw)
        dk.patch(ref)
        model = copy.deepcopy(ref)
        shard(model, diffusers_units(name, model))
        return compare(model, ref, call, (x, t), (rnd(*x.shape, seed=7), torch.ones_like(t)))
    return run


for _name, _kw in (("dit", {}), ("pixart", {}), ("sd3", dict(qk_norm="rms_norm")), ("flux", {}), ("wan", {}),
                   ("qwen_image", {}), ("gqa", {})):
    CASES[f"patched-diffusers-{_name}"] = diffusers_case(_name, **_kw)


def patch_after_shard():
    """The wrong order is refused with the order to use."""
    model, _, _ = replica("DiT")
    shard(model.double(), list(model.blocks))
    try:
        dk.patch(model)
    except ValueError as e:
        return {"refused": 0.0 if "before fully_shard" in str(e) else float("inf")}
    return {"refused": float("inf")}


CASES["patch-after-fully_shard"] = patch_after_shard


def all_gathers():
    """A block's parameters are gathered once for the primal and the tangent: model_jvp of a
    DMFT with reshard_after_forward=True all-gathers once per unit (3 blocks + the root)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as pg
    from dmf.model import DMFT
    model = randomize(DMFT(input_size=8, patch_size=2, in_channels=3, hidden_size=D, depth=3, num_heads=H,
                           num_classes=5, dmf_depth=1).double())
    shard(model, list(model.blocks), True)
    (x, t, r), y = dmft_batch()
    calls, real = [], pg.foreach_all_gather
    pg.foreach_all_gather = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        dk.model_jvp(lambda a, b, c: model(a, b, c, y), (x, t, r), (torch.ones_like(x), torch.ones_like(t), None))
    finally:
        pg.foreach_all_gather = real
    return {"extra_all_gathers": float(len(calls) - 4)}


CASES["all-gathers-once-per-unit"] = all_gathers


def merged(results):
    """Every rank's results of one case in one: the largest error per check, a raise wins."""
    out = {}
    for res in results:
        if "raised" in res:
            return res
        for k, v in res.items():
            out[k] = max(out.get(k, v), v)
    return out


fsdp_combos.add_cases(sys.modules[__name__], CASES)


def segfault_on_rank_1():
    """Run by name only (test_fsdp.py's check of what a crash leaves): rank 1 reads address 0 in C
    code, rank 0 waits for it in a barrier until torchrun ends it with SIGTERM."""
    if dist.get_rank() == 1:
        import ctypes
        ctypes.string_at(0)
    dist.barrier()
    return {}


BY_NAME_ONLY["segfault-on-rank-1"] = segfault_on_rank_1


def main():
    dist.init_process_group("gloo")
    names = sys.argv[2:] or list(CASES)
    results = {}
    for name in names:
        # one line per case: a crash dump follows the case it happened in
        print(f"fsdp_worker rank {dist.get_rank()}: case {name}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            with torch.compiler.set_stance("force_eager"):
                results[name] = {**CASES, **BY_NAME_ONLY}[name]()
        except Exception as e:  # reported per case: the test names what raised
            results[name] = {"raised": f"{type(e).__name__}: {e}"[:2000]}
            if os.environ.get("FSDP_WORKER_TRACE"):
                traceback.print_exc()
        if os.environ.get("FSDP_WORKER_TIMES") and dist.get_rank() == 0:
            print(f"{name}: {time.perf_counter() - start:.2f} s", file=sys.stderr)
    start = time.perf_counter()
    for name, check in fsdp_combos.DEFERRED:  # no collectives: each rank its share, at once
        try:
            results[name].update(check())
        except Exception as e:
            results[name] = {"raised": f"reference check: {type(e).__name__}: {e}"[:2000]}
    if os.environ.get("FSDP_WORKER_TIMES") and dist.get_rank() == 0:
        print(f"reference checks: {time.perf_counter() - start:.2f} s", file=sys.stderr)
    # some checks run on one rank only (fsdp_combos.py's reference checks), and a rank may fail alone
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        results = {name: merged([g[name] for g in gathered]) for name in names}
        Path(sys.argv[1]).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
