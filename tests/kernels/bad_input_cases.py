"""The table behind tests/kernels/test_bad_input.py and test_gradcheck.py: every public op except
the attention (its own bad-input tests live with it), with its float64 eager reference and a
builder of small float64 inputs for any (B, N, D), and the entry points every op is called
through (forward, backward, explicit jvp, torch.func.jvp, forward_ad), each returning plain
tensors to compare against the reference's.
"""
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwAD

import dmf_kernels as dk
from dmf_kernels import reference as ref
from conftest import as_tuple, rand


@dataclass
class Case:
    name: str
    fn: object           # the public op
    ref: object          # its float64 eager reference, same signature
    build: object        # (B, N, D, device, dtype) -> inputs in call order (differentiable first)
    names: tuple         # names of the differentiable inputs (they carry tangents and gradients)
    tables: tuple = ()   # constant tensor params after them (rope's cos, sin)
    dims: str = "D"      # what the last dim of x is in terms of D ("2D" for swiglu)
    extra: dict = field(default_factory=dict)


def _x(B, N, D, device, dtype, seed=1):
    return rand(B, N, D, device=device, dtype=dtype, scale=2.0, offset=0.7, seed=seed)


def _row(B, D, device, dtype, seed):
    # (B, D): per sample, broadcast over tokens (the DiT layout)
    return rand(B, D, device=device, dtype=dtype, scale=0.5, seed=seed)


def _mod(B, N, D, device, dtype):
    return [_x(B, N, D, device, dtype), _row(B, D, device, dtype, 2), _row(B, D, device, dtype, 3)]


def _res(B, N, D, device, dtype):
    x, shift, scale = _mod(B, N, D, device, dtype)
    return [x, _row(B, D, device, dtype, 4), rand(B, N, D, device=device, dtype=dtype, seed=5), shift, scale]


def _weight(D, device, dtype):
    return rand(D, device=device, dtype=dtype, scale=0.5, offset=1.0, seed=6)


def _rope_tables(N, D, device):
    angle = rand(N, D // 2, seed=8, scale=3.0).repeat_interleave(2, -1)
    return [angle.cos().to(device), angle.sin().to(device)]


def _rope(B, N, D, device, dtype):
    # (B, H, N, D) with H = 3
    return [rand(B, 3, N, D, device=device, dtype=dtype, seed=1), *_rope_tables(N, D, device)]


CASES = [
    Case("adaln_modulate", dk.adaln_modulate, ref.adaln_modulate, _mod, ("x", "shift", "scale")),
    Case("gated_residual", dk.gated_residual, ref.gated_residual,
         lambda B, N, D, dev, dt: [_x(B, N, D, dev, dt), _row(B, D, dev, dt, 4), rand(B, N, D, device=dev, dtype=dt,
                                                                                     seed=5)],
         ("x", "gate", "y")),
    Case("gated_residual_adaln", dk.gated_residual_adaln, ref.gated_residual_adaln, _res,
         ("x", "gate", "y", "shift", "scale")),
    Case("rms_norm", dk.rms_norm, ref.rms_norm,
         lambda B, N, D, dev, dt: [_x(B, N, D, dev, dt), _weight(D, dev, dt)], ("x", "weight")),
    Case("rms_adaln_modulate", dk.rms_adaln_modulate, ref.rms_adaln_modulate,
         lambda B, N, D, dev, dt: _mod(B, N, D, dev, dt) + [_weight(D, dev, dt)], ("x", "shift", "scale", "weight")),
    Case("gated_residual_rms_adaln", dk.gated_residual_rms_adaln, ref.gated_residual_rms_adaln,
         lambda B, N, D, dev, dt: _res(B, N, D, dev, dt) + [_weight(D, dev, dt)],
         ("x", "gate", "y", "shift", "scale", "weight")),
    Case("gelu_tanh", dk.gelu_tanh, lambda a: torch.nn.functional.gelu(a, approximate="tanh"),
         lambda B, N, D, dev, dt: [_x(B, N, D, dev, dt)], ("a",)),
    Case("swiglu", dk.swiglu, ref.swiglu, lambda B, N, D, dev, dt: [_x(B, N, 2 * D, dev, dt)], ("x",), dims="2D"),
    Case("rope", dk.rope, ref.rope, _rope, ("x",), tables=("cos", "sin")),
]
CASE_IDS = [c.name for c in CASES]


def split(case, inputs):
    n = len(case.names)
    return inputs[:n], inputs[n:]


def tangents_for(primals, seed=50):
    return [rand(*p.shape, device=p.device, dtype=p.dtype, seed=seed + i) for i, p in enumerate(primals)]


def grad_outputs_for(outs, seed=100):
    return [rand(*o.shape, device=o.device, dtype=o.dtype, seed=seed + i) for i, o in enumerate(outs)]


# ------------------------------------------------------------------ entry points
# Each: (fn, primals, tables, tangents, grad_outputs) -> tuple of tensors. The reference runs
# through the same function with fn = case.ref, so a difference is the op's, not the harness's.

def forward(fn, primals, tables, tangents, grads):
    with torch.no_grad():
        return as_tuple(fn(*primals, *tables))


def backward(fn, primals, tables, tangents, grads):
    xs = [p.detach().clone().requires_grad_() for p in primals]
    outs = as_tuple(fn(*xs, *tables))
    return (*outs, *torch.autograd.grad(outs, xs, grads))


def func_jvp(fn, primals, tables, tangents, grads):
    out, tan = torch.func.jvp(lambda *p: fn(*p, *tables), tuple(primals), tuple(tangents))
    return (*as_tuple(out), *as_tuple(tan))


def forward_ad(fn, primals, tables, tangents, grads):
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        outs = as_tuple(fn(*duals, *tables))
        return tuple(u for o in outs for u in fwAD.unpack_dual(o)[:2])


def explicit_jvp(case):
    """dmf_kernels.jvp.<op> by keyword (its positional order is the raw jvp op's); the reference
    of an explicit jvp is torch.func.jvp of the eager reference, outputs then tangents."""
    def run(fn, primals, tables, tangents, grads):
        if fn is case.ref:
            return func_jvp(fn, primals, tables, tangents, grads)
        kw = dict(zip(case.names, primals))
        kw.update({f"{n}_dot": t for n, t in zip(case.names, tangents)})
        kw.update(zip(case.tables, tables))
        res = fn.jvp(**kw)
        return (*res[0::2], *res[1::2]) if len(res) > 2 else res
    return run


def forward_ad_pairs_to_func_jvp_order(res, n_out):
    return (*res[0:2 * n_out:2], *res[1:2 * n_out:2])


ENTRY_POINTS = ["forward", "backward", "explicit_jvp", "func_jvp", "forward_ad"]


def entry(case, name):
    if name == "explicit_jvp":
        return explicit_jvp(case)
    if name == "forward_ad":
        def run(fn, primals, tables, tangents, grads):
            res = forward_ad(fn, primals, tables, tangents, grads)
            return forward_ad_pairs_to_func_jvp_order(res, len(res) // 2)
        return run
    return dict(forward=forward, backward=backward, func_jvp=func_jvp)[name]
