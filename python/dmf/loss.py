"""Flow matching and Decoupled MeanFlow losses (linear path, t = 1 is noise).

All randomness (times, noise, label dropout) comes in as a `Draw` made from one torch.Generator
for the whole global batch, so a resumed run and every DDP rank replay exactly the same numbers.
"""
import functools
from dataclasses import dataclass

import torch
from torch import Tensor


def _f32(t: Tensor) -> Tensor:
    """At least float32 (bf16 model outputs under autocast), float64 kept (the parity tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _default_jvp():
    try:
        from dmf_kernels import model_jvp
        return model_jvp
    except ImportError:  # an older dmf_kernels: eager forward-mode AD still gives the same numbers
        return torch.func.jvp


def _is_model_jvp(jvp) -> bool:
    """Whether `jvp` is dmf_kernels.model_jvp, also through functools.partial (e.g. with
    skip_zero_tangents): by identity, not by name (a partial has no __name__)."""
    while isinstance(jvp, functools.partial):
        jvp = jvp.func
    try:
        from dmf_kernels import model_jvp
    except ImportError:
        return False
    return jvp is model_jvp


@dataclass
class Draw:
    """The random numbers of one global batch (all (B, ...), on CPU until `.to`)."""
    noise_fm: Tensor   # (B, C, H, W)
    noise_mf: Tensor   # (B, C, H, W)
    t_fm: Tensor       # (B, 1, 1, 1)
    t_mf: Tensor       # (B, 1, 1, 1)
    r_mf: Tensor       # (B, 1, 1, 1), r <= t
    drop: Tensor       # (B,) bool: label replaced by the null class

    def to(self, device):
        return Draw(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def shard(self, rank, world):
        b = self.drop.shape[0] // world
        return Draw(*(getattr(self, f)[rank * b:(rank + 1) * b] for f in self.__dataclass_fields__))


def draw(g: torch.Generator, shape, P_mean=0.0, P_std=1.0, P_mean_t=0.4, P_std_t=1.0, P_mean_r=-1.2, P_std_r=1.0,
         cfg_prob=0.1) -> Draw:
    """Logit-normal times as in the official DMFLoss.sample_times: t_fm ~ sigmoid(N(P_mean, P_std));
    the MF pair from two independent draws, t = max, r = min."""
    B = shape[0]
    ln = lambda m, s: torch.sigmoid(torch.randn(B, 1, 1, 1, generator=g) * s + m)  # noqa: E731
    noise_fm = torch.randn(shape, generator=g)
    noise_mf = torch.randn(shape, generator=g)
    t_fm, a, b = ln(P_mean, P_std), ln(P_mean_t, P_std_t), ln(P_mean_r, P_std_r)
    drop = torch.rand(B, generator=g) < cfg_prob
    return Draw(noise_fm, noise_mf, t_fm, torch.maximum(a, b), torch.minimum(a, b), drop)


def log_lv_loss(pred: Tensor, target: Tensor, logvar: Tensor, eps: float = 0.01) -> Tensor:
    """Per-sample robust loss log(exp(-phi) * m + eps) + phi, m = mean (C,H,W) squared error; (B,).
    The official loss.py computes this between m (B,) and logvar (B, 1, 1, 1), which broadcasts to
    (B, 1, 1, B): every sample's error against every sample's logvar. We pair them per sample."""
    m = (_f32(pred) - _f32(target)).square().mean(dim=(1, 2, 3))       # (B,)
    phi = _f32(logvar).reshape(-1)                                      # (B,)
    return torch.log(torch.exp(-phi) * m + eps) + phi


def flow_loss(model, x: Tensor, y: Tensor, d: Draw, num_classes: int) -> Tensor:
    """Stage 1: plain flow matching, mean of |u(x_t, t, t) - v|^2."""
    y = torch.where(d.drop, num_classes, y)              # null class for classifier-free guidance
    x_t = (1 - d.t_fm) * x + d.t_fm * d.noise_fm         # (B, C, H, W)
    v = d.noise_fm - x
    u = model(x_t, d.t_fm, d.t_fm, y)
    return (_f32(u) - _f32(v)).square().mean()


@torch.no_grad()
def model_velocity(model, x_t, t, y):
    """The model's own instantaneous velocity u(x_t, t, t | y), detached, in at least fp32."""
    return _f32(model(x_t, t, t, y))


@torch.no_grad()
def guided_velocity(model, x_t, t, y, v, drop, num_classes, omega, g_min, g_max):
    """Model guidance: v + omega * (u(x_t, t, t | y) - u(x_t, t, t | null)) for t in [g_min, g_max]
    and kept labels, plain v elsewhere (the official compute_guidance, g_type "mg")."""
    if omega == 0:
        return v
    y_null = torch.full_like(y, num_classes)
    u = _f32(model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([y, y_null])))
    u_cond, u_uncond = u.chunk(2)
    use = (t >= g_min) & (t <= g_max) & ~drop.view(-1, 1, 1, 1)
    return torch.where(use, v + omega * (u_cond - u_uncond), v)


def mf_branch(raw_model, x_t, t, r, y, v, jvp):
    """The MeanFlow branch: u(x_t, t, r) and du/dt along the trajectory from ONE forward-mode
    pass with tangents (v, 1, 0); du/dt comes back detached (a stopgrad target), u differentiable.
    Returns (per-sample loss (B,), u, u_tgt)."""
    use_lv = getattr(raw_model, "use_logvar", True)
    fn = functools.partial(raw_model, y=y, return_logvar=use_lv)
    # model_jvp takes None for the zero tangent of r (the decoder then skips tangent work with no
    # host-side zero check); torch.func.jvp needs the zeros.
    r_dot = None if _is_model_jvp(jvp) else torch.zeros_like(r)
    out, out_dot = jvp(fn, (x_t, t, r), (v.to(x_t.dtype), torch.ones_like(t), r_dot))
    (u, lv), du_dt = (out, out_dot[0]) if use_lv else ((out, torch.zeros_like(t)), out_dot)
    u_tgt = (v - (t - r) * _f32(du_dt)).detach()          # u = v - (t - r) du/dt (MeanFlow identity)
    return log_lv_loss(u, u_tgt, lv), u, u_tgt


def dmf_loss(model, raw_model, x: Tensor, y: Tensor, d: Draw, num_classes: int, omega=0.0, g_min=0.0, g_max=1.0,
             jvp=None, teacher=None):
    """Stage 2: 0.5 * (FM branch + MF branch), each with the log-variance loss; returns
    (loss, {"fm_mse", "mf_mse"}): the per-branch mean squared errors, for logging.

    `model` runs the FM branch (it may be the DDP wrapper, whose forward arms gradient sync);
    the MF branch's JVP runs on `raw_model`, the unwrapped module (forward-mode AD cannot go
    through DDP's forward). Both share parameters, so DDP's hooks fire once per parameter on
    the sum of both branches' gradients. `jvp` defaults to dmf_kernels.model_jvp; the benchmark
    passes torch.func.jvp to run the official way.

    `teacher`: None (the official method) takes the conditional velocity v = noise - x for the
    MF branch's tangent and target; a frozen flow model (the stage-1 weights) takes its
    velocity u_T(x_t, t, t | y) instead (one extra no-grad forward): the marginal velocity,
    without the conditional one's variance, which the target v - (t - r) du/dt carries with a
    weight growing with t - r. The FM branch keeps its data target either way. With omega > 0
    the guidance difference u(x_t, t, t | y) - u(x_t, t, t | null) is still the student's (as
    in the official code), added to the teacher's velocity; for dropped labels the teacher's
    null-class velocity is used, which is meaningful only if its flow stage trained with label
    dropout (ours does: cfg_prob 0.1). (The model's own detached velocity in place of a frozen
    teacher diverged on digits within 50 steps: the MF branch became self-consistent at
    near-zero error, its logvar weight grew, and the FM error went from 1.5 to 700.)"""
    jvp = jvp or _default_jvp()
    y = torch.where(d.drop, num_classes, y)

    # FM branch: r = t, target the (guided) velocity
    x_fm = (1 - d.t_fm) * x + d.t_fm * d.noise_fm                              # (B, C, H, W)
    v_fm = guided_velocity(raw_model, x_fm, d.t_fm, y, d.noise_fm - x, d.drop, num_classes, omega, g_min, g_max)
    if getattr(raw_model, "use_logvar", True):
        u_fm, lv_fm = model(x_fm, d.t_fm, d.t_fm, y, return_logvar=True)        # (B, C, H, W), (B, 1, 1, 1)
    else:  # without the head: phi = 0, loss log(m + 0.01), MeanFlow's adaptive weight
        u_fm, lv_fm = model(x_fm, d.t_fm, d.t_fm, y), torch.zeros_like(d.t_fm)
    fm = log_lv_loss(u_fm, v_fm, lv_fm)                                         # (B,)

    # MF branch
    x_mf = (1 - d.t_mf) * x + d.t_mf * d.noise_mf
    v_mf = d.noise_mf - x if teacher is None else model_velocity(teacher, x_mf, d.t_mf, y)
    v_mf = guided_velocity(raw_model, x_mf, d.t_mf, y, v_mf, d.drop, num_classes, omega, g_min, g_max)
    mf, u, u_tgt = mf_branch(raw_model, x_mf, d.t_mf, d.r_mf, y, v_mf, jvp)                # (B,)

    with torch.no_grad():
        logs = {"fm_mse": (_f32(u_fm) - v_fm).square().mean(), "mf_mse": (_f32(u) - u_tgt).square().mean()}
    return 0.5 * (fm.mean() + mf.mean()), logs
