"""PyTorch's own derivative oracle on every public op, float64, small odd shapes: backward and
forward-mode AD against finite differences (check_forward_ad), forward AD under vmap
(check_batched_forward_grad: jacfwd, vmap over jvp), an undefined upstream gradient
(check_undefined_grad), and the batched backward (check_batched_grad). Also the explicit jvp
forms' primal outputs, whose backward is the same formula reached through the raw jvp op.
"""
import pytest
import torch

import dmf_kernels as dk
from bad_input_cases import CASE_IDS, CASES, split, tangents_for
from conftest import DEVICES, rand

CHECKS = dict(check_forward_ad=True, check_batched_forward_grad=True, check_undefined_grad=True,
              check_batched_grad=True)


def leaves(ts):
    return [t.detach().clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradcheck(case, device):
    primals, tables = split(case, case.build(2, 3, 5 if case.name != "rope" else 6, device, torch.float64))
    assert torch.autograd.gradcheck(lambda *p: case.fn(*p, *tables), leaves(primals), **CHECKS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradcheck_explicit_jvp_primal(case, device):
    """Backward through the explicit jvp form's primal outputs (MeanFlow's u of `u, du_dt = jvp(...)`),
    the tangents fixed; forward AD does not reach through it (its tangents are plain tensors)."""
    primals, tables = split(case, case.build(2, 3, 5 if case.name != "rope" else 6, device, torch.float64))
    tangents = tangents_for(primals)

    def primal_outputs(*p):
        kw = dict(zip(case.names, p))
        kw.update({f"{n}_dot": t for n, t in zip(case.names, tangents)})
        kw.update(zip(case.tables, tables))
        res = case.fn.jvp(**kw)
        return res[0::2] if len(res) > 2 else res[0]

    assert torch.autograd.gradcheck(primal_outputs, leaves(primals), check_undefined_grad=True)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_attention(device):
    """dk.attention with its default arguments (scale 1/sqrt(D), no rotary tables)."""
    q, k, v = (rand(1, 2, 5, 4, device=device, seed=s) for s in (1, 2, 3))
    assert torch.autograd.gradcheck(dk.attention, leaves([q, k, v]), **CHECKS)
