"""dmf.loss against the official DMF loss (tests/replicas/official_dmf.py, float64): the MF branch
with model_jvp equals the official one sample at a time (the official broadcasting slip only
matters for B > 1), our per-sample pairing for B > 1, gradients of the whole DMF loss equal
with model_jvp and torch.func.jvp, time proposals and model guidance."""

import torch

import dmf_kernels as dk
from conftest import assert_f64
from dmf import DMFT
from dmf.loss import Draw, dmf_loss, draw, guided_velocity, log_lv_loss, mf_branch
from replicas import official_dmf as rdmf

KW = dict(input_size=8, patch_size=2, in_channels=2, hidden_size=48, num_heads=3, num_classes=10, use_logvar=True,
          depth=3, dmf_depth=2)


def models(seed=0):
    ref = rdmf.DMFT(**KW).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the zero inits (adaLN, final layer, logvar) would hide most errors
        for p in ref.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    ours = DMFT(**KW).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def inputs(B, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 2, 8, 8, generator=g, dtype=torch.float64)
    a, b = torch.rand(B, 1, 1, 1, generator=g, dtype=torch.float64), torch.rand(B, 1, 1, 1, generator=g,
                                                                                  dtype=torch.float64)
    y = torch.randint(0, 11, (B,), generator=g)
    v = torch.randn(B, 2, 8, 8, generator=g, dtype=torch.float64)
    return x, torch.maximum(a, b), torch.minimum(a, b), y, v


def test_mf_branch_matches_official_per_sample():
    ours, ref = models()
    x, t, r, y, v = inputs(3)
    per_sample, u, u_tgt = mf_branch(ours, x, t, r, y, v, dk.model_jvp)
    assert per_sample.shape == (3,)
    for i in range(3):  # B = 1: the official (B, 1, 1, B) broadcast is a single pairing
        s = slice(i, i + 1)
        assert_f64(per_sample[i], rdmf.dmf_mf_loss(ref, x[s], t[s], r[s], y[s], v[s]), f"sample {i}")
    # for B > 1 the official log_lv_loss pairs every sample's error with every logvar, (B, 1, 1, B);
    # its diagonal is our per-sample loss
    _, lv = ours(x, t, r, y, return_logvar=True)
    official = rdmf.log_lv_loss(u, u_tgt, lv)
    assert official.shape == (3, 1, 1, 3)
    assert_f64(torch.diagonal(official.reshape(3, 3)), per_sample, "diagonal")


def test_log_lv_loss_formula():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    phi = torch.randn(4, 1, 1, 1, generator=g)
    m = ((pred - target) ** 2).flatten(1).mean(1)
    expected = torch.log(torch.exp(-phi.flatten()) * m + 0.01) + phi.flatten()
    torch.testing.assert_close(log_lv_loss(pred, target, phi), expected)


def test_dmf_loss_model_jvp_equals_func_jvp():
    """The whole stage-2 loss (both branches, guidance on) and its parameter gradients are the
    same with our fused JVP and with eager torch.func.jvp on the official model."""
    ours, ref = models()
    x, _, _, y, _ = inputs(4)
    d = draw(torch.Generator().manual_seed(3), x.shape, cfg_prob=0.5)
    d = Draw(*(getattr(d, f).double() if getattr(d, f).is_floating_point() else getattr(d, f)
               for f in d.__dataclass_fields__))
    y = y.clamp(max=9)
    lo, _ = dmf_loss(ours, ours, x, y, d, 10, omega=0.5, g_min=0.1, g_max=0.9, jvp=dk.model_jvp)
    lr, _ = dmf_loss(ref, ref, x, y, d, 10, omega=0.5, g_min=0.1, g_max=0.9, jvp=torch.func.jvp)
    assert_f64(lo, lr, "loss")
    go = torch.autograd.grad(lo, [p for p in ours.parameters() if p.requires_grad])
    gr = torch.autograd.grad(lr, [p for p in ref.parameters() if p.requires_grad])
    for a, b in zip(go, gr):
        assert_f64(a, b, "parameter gradient")


def test_time_proposals_and_guidance():
    d = draw(torch.Generator().manual_seed(0), (4000, 1, 2, 2))
    assert (d.r_mf <= d.t_mf).all() and (d.t_fm > 0).all() and (d.t_fm < 1).all()
    # t = max of sigmoid(N(0.4, 1)) and sigmoid(N(-1.2, 1)): median well above r's
    assert d.t_mf.median() > 0.55 and d.r_mf.median() < 0.3
    assert 0.07 < d.drop.float().mean() < 0.13
    ours, _ = models()
    x, t, _, y, v = inputs(4)
    drop = torch.tensor([False, True, False, False])
    t = torch.tensor([0.5, 0.5, 0.95, 0.2], dtype=torch.float64).view(4, 1, 1, 1)
    vg = guided_velocity(ours, x, t, y.clamp(max=9), v, drop, 10, omega=0.6, g_min=0.0, g_max=0.7)
    changed = (vg != v).flatten(1).any(1)
    assert changed.tolist() == [True, False, False, True]  # dropped label, t outside [g_min, g_max]: plain v
    u_c = ours(x[:1], t[:1], t[:1], y[:1].clamp(max=9))
    u_u = ours(x[:1], t[:1], t[:1], torch.tensor([10]))
    assert_f64(vg[:1], v[:1] + 0.6 * (u_c - u_u), "guided target")


def test_without_logvar_head_phi_is_zero():
    """--no-logvar: the loss is log(m + 0.01) per sample, as with a logvar head stuck at zero."""
    ours, _ = models()
    with torch.no_grad():
        ours.logvar_linear.weight.zero_()
        ours.logvar_linear.bias.zero_()
    plain = DMFT(**dict(KW, use_logvar=False)).double()
    plain.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("logvar")}, strict=True)
    x, _, _, y, _ = inputs(3)
    d = draw(torch.Generator().manual_seed(4), x.shape)
    d = Draw(*(getattr(d, f).double() if getattr(d, f).is_floating_point() else getattr(d, f)
               for f in d.__dataclass_fields__))
    a, _ = dmf_loss(ours, ours, x, y.clamp(max=9), d, 10)
    b, _ = dmf_loss(plain, plain, x, y.clamp(max=9), d, 10)
    assert_f64(a, b, "loss")


def test_teacher_velocity_in_the_mf_branch():
    """teacher=<frozen flow model>: the MF branch's tangent and target use the teacher's
    u_T(x_t, t, t | y) (labels after dropout), detached; the FM branch keeps its data target;
    no gradient reaches the teacher; gradients equal torch.func.jvp's on the official model."""
    ours, ref = models()
    teacher, _ = models(seed=7)
    teacher.requires_grad_(False)
    x, _, _, y, _ = inputs(4)
    d = draw(torch.Generator().manual_seed(5), x.shape, cfg_prob=0.5)
    d = Draw(*(getattr(d, f).double() if getattr(d, f).is_floating_point() else getattr(d, f)
               for f in d.__dataclass_fields__))
    y = y.clamp(max=9)
    loss, _ = dmf_loss(ours, ours, x, y, d, 10, jvp=dk.model_jvp, teacher=teacher)
    # by hand: the MF branch with v = the teacher's velocity, plus the (data) FM branch
    y_in = torch.where(d.drop, 10, y)
    x_mf = (1 - d.t_mf) * x + d.t_mf * d.noise_mf
    v_teacher = teacher(x_mf, d.t_mf, d.t_mf, y_in)
    mf, _, _ = mf_branch(ours, x_mf, d.t_mf, d.r_mf, y_in, v_teacher, torch.func.jvp)
    data, _ = dmf_loss(ours, ours, x, y, d, 10, jvp=dk.model_jvp)
    mf_data, _, _ = mf_branch(ours, x_mf, d.t_mf, d.r_mf, y_in, d.noise_mf - x, dk.model_jvp)
    assert_f64(loss, data - 0.5 * mf_data.mean() + 0.5 * mf.mean(), "loss")
    assert not torch.allclose(mf, mf_data)
    g_ours = torch.autograd.grad(loss, [p for p in ours.parameters() if p.requires_grad])
    ref_loss, _ = dmf_loss(ref, ref, x, y, d, 10, jvp=torch.func.jvp, teacher=teacher)
    for a, b in zip(g_ours, torch.autograd.grad(ref_loss, [p for p in ref.parameters() if p.requires_grad])):
        assert_f64(a, b, "parameter gradient")
