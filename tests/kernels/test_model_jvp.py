"""dmf_kernels.model_jvp and dmf.DMFT against the official DMF code (tests/replicas, float64):
state_dict, u, logvar, du/dt, the official MF loss with torch.func.jvp swapped for
model_jvp, output structures, None / zero tangents, the fallback, compile, bad input."""
import functools
import warnings

import pytest
import torch

import dmf_kernels as dk
from conftest import assert_f64, rand, randomize_params
from dmf import DMFT
from replicas import official_dmf as rdmf

pytestmark = pytest.mark.usefixtures("rms_statistic_in_input_dtype")
KW = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=48, num_heads=3, num_classes=10, use_logvar=True)


def models(device, depth=3, dmf_depth=2, qk_norm=False, seed=0):
    ref = rdmf.DMFT(**KW, depth=depth, dmf_depth=dmf_depth, qk_norm=qk_norm).double().to(device)
    randomize_params(ref, seed)
    ours = DMFT(**KW, depth=depth, dmf_depth=dmf_depth, qk_norm=qk_norm).double().to(device)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def batch(device, b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 8, 8, generator=g, dtype=torch.float64).to(device)
    a, c = torch.rand(b, 1, 1, 1, generator=g, dtype=torch.float64), torch.rand(b, 1, 1, 1, generator=g,
                                                                                 dtype=torch.float64)
    t, r = torch.maximum(a, c).to(device), torch.minimum(a, c).to(device)
    y = torch.tensor([1, 10, 4, 7, 0][:b], device=device)  # 10 = the null class
    v = torch.randn(x.shape, generator=g, dtype=torch.float64).to(device)
    return x, t, r, y, v


def trainable(m):
    return [p for p in m.parameters() if p.requires_grad]


@pytest.mark.parametrize("depth,dmf_depth,qk_norm", [(2, 1, False), (3, 2, True), (4, 4, False), (4, 0, True)])
def test_dmft_matches_official(device, depth, dmf_depth, qk_norm):
    ours, ref = models(device, depth, dmf_depth, qk_norm)
    assert list(ours.state_dict()) == list(ref.state_dict())
    x, t, r, y, v = batch(device)
    u_r, lv_r = ref(x, t, r, y, return_logvar=True)
    u, lv = ours(x, t, r, y, return_logvar=True)
    assert_f64(u, u_r, "u")
    assert_f64(lv, lv_r, "logvar")
    tangents = (v, torch.ones_like(t), torch.zeros_like(r))
    (u_r, lv_r), (du_r, dlv_r) = torch.func.jvp(functools.partial(ref, y=y, return_logvar=True), (x, t, r), tangents)
    (u, lv), (du, dlv) = dk.model_jvp(functools.partial(ours, y=y, return_logvar=True), (x, t, r), tangents)
    assert_f64(u, u_r, "jvp u")
    assert_f64(du, du_r, "du/dt", rtol=1e-9, atol=1e-9)
    assert_f64(dlv, dlv_r, "dlogvar/dt", rtol=1e-9, atol=1e-9)
    assert u.requires_grad and not du.requires_grad and du.grad_fn is None
    g = torch.autograd.grad((u * v).sum() + lv.sum(), trainable(ours))
    g_r = torch.autograd.grad((u_r * v).sum() + lv_r.sum(), trainable(ref))
    for (name, _), a, b in zip([(n, p) for n, p in ours.named_parameters() if p.requires_grad], g, g_r):
        assert_f64(a, b, f"grad of {name}", rtol=1e-9, atol=1e-9)


def test_official_loss_with_model_jvp_swapped_in(device):
    """The one-line change: the official MF loss with torch.func.jvp -> dmf_kernels.model_jvp
    gives the same loss and gradients (official model and ours, same weights)."""
    ours, ref = models(device, depth=4, dmf_depth=3, qk_norm=True)
    x, t, r, y, v = batch(device, b=4)
    loss_r = rdmf.dmf_mf_loss(ref, x, t, r, y, v)
    loss = rdmf.dmf_mf_loss(ours, x, t, r, y, v, jvp=dk.model_jvp)
    assert_f64(loss, loss_r, "loss")
    for (name, _), a, b in zip(ours.named_parameters(), torch.autograd.grad(loss, trainable(ours)),
                               torch.autograd.grad(loss_r, trainable(ref))):
        assert_f64(a, b, f"grad of {name}", rtol=1e-9, atol=1e-9)


def test_zero_and_none_tangents_skip_the_decoder_conditioning(device):
    ours, ref = models(device, depth=3, dmf_depth=1)
    x, t, r, y, v = batch(device)
    seen = []
    for blk in ours.blocks:
        orig = blk.modulation_jvp
        blk.modulation_jvp = functools.partial(lambda o, c, c_dot, dtype: seen.append(c_dot is None) or
                                               o(c, c_dot, dtype), orig)
    fn = functools.partial(ours, y=y)
    _, du0 = dk.model_jvp(fn, (x, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    assert seen == [False, True, True]  # encoder block has a tangent, decoder blocks none
    _, du1 = dk.model_jvp(fn, (x, t, r), (v, torch.ones_like(t), None))
    _, du_r = torch.func.jvp(functools.partial(ref, y=y), (x, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    assert_f64(du0, du_r, "du/dt (zero r tangent)", rtol=1e-9, atol=1e-9)
    assert_f64(du1, du_r, "du/dt (None r tangent)", rtol=1e-9, atol=1e-9)
    # a nonzero r tangent is honoured
    rd = rand(*r.shape, device=device, seed=5)
    _, du2 = dk.model_jvp(fn, (x, t, r), (v, torch.ones_like(t), rd))
    _, du2_r = torch.func.jvp(functools.partial(ref, y=y), (x, t, r), (v, torch.ones_like(t), rd))
    assert_f64(du2, du2_r, "du/dt (nonzero r tangent)", rtol=1e-9, atol=1e-9)


def test_output_structures(device):
    ours, _ = models(device)
    x, t, r, y, v = batch(device)
    # a lambda closing over the model; dict and tuple outputs with a non-tensor leaf
    fn = lambda x_, t_, r_: {"u": ours(x_, t_, r_, y), "pair": (ours(x_, t_, r_, y, return_logvar=True)[1], 3)}  # noqa
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # recognised: no fallback warning
        out, tan = dk.model_jvp(fn, (x, t, r), (v, torch.ones_like(t), None))
    assert set(out) == {"u", "pair"} and out["pair"][1] == 3 and tan["pair"][1] is None
    (u, lv), (du, dlv) = dk.model_jvp(functools.partial(ours, y=y, return_logvar=True), (x, t, r),
                                      (v, torch.ones_like(t), None))
    assert_f64(out["u"], u)
    assert_f64(tan["u"], du, rtol=1e-9, atol=1e-9)
    # a bound method is recognised too
    out2, tan2 = dk.model_jvp(ours.forward, (x, t, r, y), (v, torch.ones_like(t), None, None))
    assert_f64(tan2, du, rtol=1e-9, atol=1e-9)


def test_fallback_for_unknown_models_warns_once(device):
    _, ref = models(device)
    x, t, r, y, v = batch(device)
    fn = functools.partial(ref, y=y)
    tangents = (v, torch.ones_like(t), torch.zeros_like(r))
    with pytest.warns(UserWarning, match="has no dmf_kernels.nn modules and no patched blocks; falling back"):
        out, tan = dk.model_jvp(fn, (x, t, r), tangents)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        dk.model_jvp(fn, (x, t, r), tangents)
    r_out, r_tan = torch.func.jvp(fn, (x, t, r), tangents)
    assert_f64(tan, r_tan)
    assert not tan.requires_grad and out.requires_grad


LIGHTNING = dict(use_qknorm=True, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=True)


@pytest.mark.parametrize("blocks", ["dit", "lightning"])
def test_compiled_training_step_matches_eager(monkeypatch, blocks):
    # The timestep embedding is computed in fp32 (the reference codebases' convention), and
    # Inductor rounds that fp32 arithmetic differently (6e-8); float64 here compares formulas.
    import dmf.model
    from dmf_kernels import nn as dnn
    emb = dnn.timestep_embedding
    f64 = lambda t, dim, max_period=10000: emb(t, dim, max_period) if t.dtype != torch.float64 else \
        torch.cat([torch.cos(t[..., None] * _freqs(dim, max_period, t)), torch.sin(t[..., None] * _freqs(dim, max_period, t))], -1)  # noqa
    monkeypatch.setattr(dnn, "timestep_embedding", f64)
    monkeypatch.setattr(dmf.model, "timestep_embedding", f64)
    torch._dynamo.reset()
    if blocks == "dit":
        ours, _ = models("cpu", depth=2, dmf_depth=1, qk_norm=True)  # float64: compare formulas, not rounding
    else:  # RMSNorm-adaLN without shift, SwiGLU, RoPE inside the attention, RMSNorm qk-norm
        ours = randomize_params(DMFT(**dict(KW, hidden_size=64, num_heads=2), depth=2, dmf_depth=1, **LIGHTNING)
                                .double())
    x, t, r, y, v = batch("cpu")

    def step(x, t, r, v):
        (u, lv), (du, _) = dk.model_jvp(functools.partial(ours, y=y, return_logvar=True), (x, t, r),
                                         (v, torch.ones_like(t), torch.zeros_like(r)))
        u_tgt = (v + (r - t) * du).detach()
        loss = (((u - u_tgt) ** 2).mean((1, 2, 3)) * torch.exp(-lv.reshape(-1)) + lv.reshape(-1)).mean()
        return loss, du, torch.autograd.grad(loss, trainable(ours))

    loss_e, du_e, g_e = step(x, t, r, v)
    loss_c, du_c, g_c = torch.compile(step)(x, t, r, v)
    assert_f64(du_c, du_e, "compiled du/dt", rtol=1e-9, atol=1e-9)  # a dropped tangent would differ
    assert du_e.abs().max() > 0
    assert_f64(loss_c, loss_e, "compiled loss")
    for a, b in zip(g_c, g_e):
        assert_f64(a, b, "compiled grads", rtol=1e-8, atol=1e-9)


def _freqs(dim, max_period, t):
    import math
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=t.device) / half)


def test_bad_input(device):
    ours, _ = models(device)
    x, t, r, y, v = batch(device)
    fn = functools.partial(ours, y=y)
    with pytest.raises(ValueError, match=r"tangents\[0\] must have the shape of primals\[0\] \(3, 3, 8, 8\)"):
        dk.model_jvp(fn, (x, t, r), (v[:, :2], None, None))
    with pytest.raises(TypeError, match=r"tangents\[1\] must have the dtype of primals\[1\] \(torch.float64\)"):
        dk.model_jvp(fn, (x, t, r), (v, torch.ones_like(t, dtype=torch.float32), None))
    with pytest.raises(ValueError, match="3 primals but 2 tangents"):
        dk.model_jvp(fn, (x, t, r), (v, None))
    with pytest.raises(TypeError, match="must be tuples"):
        dk.model_jvp(fn, x, v)
    with pytest.raises(ValueError, match=r"dmf_depth must be in \[0, depth\] = \[0, 3\], got 5"):
        DMFT(**KW, depth=3, dmf_depth=5)
    with pytest.raises(ValueError, match="needs a model built with use_logvar=True"):
        DMFT(**{**KW, "use_logvar": False}, depth=1, dmf_depth=1).double().to(device)(x, t, r, y, return_logvar=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_dmft_bf16_cuda():
    """bf16 on a GPU: u and du/dt error vs float64 at most ~2x the official model's in bf16."""
    from conftest import assert_three_way
    kw = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=144, num_heads=2, num_classes=10, depth=4,
              dmf_depth=3, use_logvar=True)
    ref = rdmf.DMFT(**kw).double().cuda()
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p.mul_(0).add_(torch.randn_like(p) * 0.05)
    ours = DMFT(**kw).double().cuda()
    ours.load_state_dict(ref.state_dict())
    x, t, r, y, v = batch("cuda", b=4)
    x, v = torch.randn(4, 4, 16, 16, device="cuda", dtype=torch.float64), torch.randn(4, 4, 16, 16, device="cuda",
                                                                                     dtype=torch.float64)
    tg = (v, torch.ones_like(t), torch.zeros_like(r))
    u64, du64 = torch.func.jvp(functools.partial(ref, y=y), (x, t, r), tg)
    bf = lambda *a: tuple(z.bfloat16() for z in a)  # noqa: E731
    ue, due = torch.func.jvp(functools.partial(ref.bfloat16(), y=y), bf(x, t, r), bf(*tg))
    uk, duk = dk.model_jvp(functools.partial(ours.bfloat16(), y=y), bf(x, t, r), bf(*tg))
    assert_three_way(uk, ue, u64, torch.bfloat16, "u")
    assert_three_way(duk, due, du64, torch.bfloat16, "du/dt")


def test_autocast_bf16_three_way():
    """Under CPU autocast (bf16 Linears, fp32 residual stream) model_jvp's u and du/dt are
    as close to float64 as the official model's torch.func.jvp under the same autocast."""
    from conftest import assert_three_way
    ours, ref = models("cpu", depth=3, dmf_depth=2, qk_norm=True)
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p.mul_(0.2)  # moderate activations: bf16 errors stay comparable
    ours.load_state_dict(ref.state_dict())
    x, t, r, y, v = batch("cpu")
    tg = (v, torch.ones_like(t), torch.zeros_like(r))
    u64, du64 = torch.func.jvp(functools.partial(ref, y=y), (x, t, r), tg)
    ours.float(), ref.float()
    f32 = lambda *a: tuple(z.float() for z in a)  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ue, due = torch.func.jvp(functools.partial(ref, y=y), f32(x, t, r), f32(*tg))
        uk, duk = dk.model_jvp(functools.partial(ours, y=y), f32(x, t, r), f32(*tg))
    assert uk.dtype == ue.dtype == torch.bfloat16
    assert_three_way(uk, ue, u64, torch.bfloat16, "u")
    assert_three_way(duk, due, du64, torch.bfloat16, "du/dt")


def test_skip_zero_tangents_option(device):
    ours, _ = models(device, depth=2, dmf_depth=1)
    x, t, r, y, v = batch(device)
    calls = []
    blk = ours.blocks[1]
    orig = blk.modulation_jvp
    blk.modulation_jvp = lambda c, c_dot, dtype: calls.append(c_dot is None) or orig(c, c_dot, dtype)
    fn = functools.partial(ours, y=y)
    tg = (v, torch.ones_like(t), torch.zeros_like(r))
    outs = [dk.model_jvp(fn, (x, t, r), tg, skip_zero_tangents=flag)[1] for flag in (True, False, None)]
    assert calls == [True, False, device == "cpu"]  # default: checked on CPU only (free there)
    for o in outs[1:]:
        assert_f64(o, outs[0])


def test_nested_forward_ad_and_parameter_tangents_raise_clearly():
    ours, _ = models("cpu", depth=2, dmf_depth=1)
    x, t, r, y, v = batch("cpu")
    fn = functools.partial(ours, y=y)
    with pytest.raises(RuntimeError, match="cannot run inside another forward-mode AD or torch.func transform"):
        torch.func.jvp(lambda x_: dk.model_jvp(fn, (x_, t, r), (v, None, None))[1], (x,), (v,))
    params = {k: p.detach() for k, p in ours.named_parameters()}
    dparams = {k: torch.randn_like(p) for k, p in params.items()}
    call = lambda p, x_: torch.func.functional_call(ours, p, (x_, t, r, y))  # noqa: E731
    with pytest.raises(NotImplementedError, match="tangents on the parameters are not supported"):
        torch.func.jvp(call, (params, x), (dparams, v))


def test_jacfwd_and_vmap_of_jvp_through_modules():
    from dmf_kernels import nn as dnn
    mlp = dnn.Attention(16, 2, qk_norm=True).double()
    x = rand(1, 3, 16, seed=3)
    jf = torch.func.jacfwd(mlp)(x)
    jr = torch.func.jacrev(mlp)(x)
    assert_f64(jf, jr.detach(), "jacfwd vs jacrev")
    a, b = rand(4, 1, 3, 16, seed=4), rand(4, 1, 3, 16, seed=5)
    batched = torch.func.vmap(lambda a_, b_: torch.func.jvp(mlp, (a_,), (b_,))[1])(a, b)
    for i in range(4):
        assert_f64(batched[i], torch.func.jvp(mlp, (a[i],), (b[i],))[1].detach())
