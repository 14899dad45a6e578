"""The ops composed as in a DiT block, under MeanFlow's pattern: u, du_dt = jvp(block, ...)
then loss(u).backward(). The same block runs with the eager references and with
dmf_kernels; float64, so both must agree to rounding: output, tangent, parameter grads."""
import pytest
import torch
import torch.nn.functional as F

import dmf_kernels as dk
from dmf_kernels import reference as ref
from conftest import assert_f64

B, N, D, H = 2, 9, 48, 3
OPS = {
    "eager": dict(adaln=ref.adaln_modulate, res_adaln=ref.gated_residual_adaln, res=ref.gated_residual,
                  rms=ref.rms_norm, attn=ref.attention),
    "dmf": dict(adaln=dk.adaln_modulate, res_adaln=dk.gated_residual_adaln, res=dk.gated_residual,
                rms=dk.rms_norm, attn=dk.attention),
}


def params(device):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s, scale=0.2: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(device)  # noqa: E731
    return dict(ada=mk(D, 6 * D), qkv=mk(D, 3 * D), proj=mk(D, D), fc1=mk(D, 4 * D), fc2=mk(4 * D, D),
                qn=1 + mk(D // H), kn=1 + mk(D // H))


def block(ops, p, x, c):
    """x: (B, N, D) tokens, c: (B, D) conditioning; adaLN-Zero DiT block with qk-norm."""
    shift1, scale1, gate1, shift2, scale2, gate2 = (F.silu(c) @ p["ada"]).chunk(6, dim=1)  # (B, D) views
    h = ops["adaln"](x, shift1, scale1)
    q, k, v = (h @ p["qkv"]).reshape(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, Dh)
    q, k = ops["rms"](q, p["qn"]), ops["rms"](k, p["kn"])
    a = ops["attn"](q, k, v).transpose(1, 2).reshape(B, N, D) @ p["proj"]
    x, h = ops["res_adaln"](x, gate1, a, shift2, scale2)
    return ops["res"](x, gate2, F.gelu(h @ p["fc1"], approximate="tanh") @ p["fc2"])


def meanflow_step(ops, p, x, c, x_dot, c_dot):
    u, du_dt = torch.func.jvp(lambda x_, c_: block(ops, p, x_, c_), (x, c), (x_dot, c_dot))
    loss = ((u - du_dt.detach()) ** 2).mean()
    grads = torch.autograd.grad(loss, list(p.values()))
    return u, du_dt, grads


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_dit_block_meanflow_step(device, compiled):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    x, x_dot = (torch.randn(B, N, D, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    c, c_dot = (torch.randn(B, D, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    p_ref = {k: v.clone().requires_grad_() for k, v in params(device).items()}
    p_dmf = {k: v.clone().requires_grad_() for k, v in params(device).items()}
    step = meanflow_step
    if compiled:
        step = torch.compile(meanflow_step, fullgraph=False)  # grad() inside: graph breaks are allowed here
    u_r, t_r, g_r = meanflow_step(OPS["eager"], p_ref, x, c, x_dot, c_dot)
    u, t, grads = step(OPS["dmf"], p_dmf, x, c, x_dot, c_dot)
    assert_f64(u, u_r, "u", rtol=1e-9, atol=1e-9)
    assert_f64(t, t_r, "du/dt", rtol=1e-9, atol=1e-9)
    for name, a, b in zip(p_ref, grads, g_r):
        assert_f64(a, b, f"grad of {name}", rtol=1e-8, atol=1e-9)


def test_dit_block_gradient_through_tangent_raises(device):
    # A loss that keeps du/dt attached would need second-order rules the kernels do not
    # have: eager must say so instead of returning a partial gradient.
    g = torch.Generator().manual_seed(2)
    x, x_dot = (torch.randn(B, N, D, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    c, c_dot = (torch.randn(B, D, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    p = {k: v.clone().requires_grad_() for k, v in params(device).items()}
    u, du_dt = torch.func.jvp(lambda x_, c_: block(OPS["dmf"], p, x_, c_), (x, c), (x_dot, c_dot))
    with pytest.raises(RuntimeError, match=r"gradients through forward-mode tangents are not supported"):
        ((u - du_dt) ** 2).mean().backward()
