"""The one-declaration op layer (dmf_kernels/_op.py): the name link to the raw ops' schemas,
the generated signatures, forward-mode AD of the Python-op families under torch.compile, and
the patch fixes of issue 14 (each of the patch/loss tests failed before)."""
import copy
import importlib
import inspect

import pytest
import torch

import dmf_kernels as dk
from dmf_kernels import nn as dnn
from dmf_kernels._op import Op
from conftest import assert_f64, rand, randomize_params
from replicas import official_dmf as rdmf

ops = torch.ops.dmf_kernels
patch_mod = importlib.import_module("dmf_kernels.patch")  # dmf_kernels.patch is also the function


def test_declaration_is_checked_against_the_schema():
    # A declared input name that the raw jvp op does not take is an import-time error, not a
    # silently misrouted argument.
    with pytest.raises(TypeError, match=r"takes \['x', 'x_dot', 'weight', 'weight_dot', 'eps'\]"):
        Op("bad", fwd=ops.rms_norm_fwd, jvp=ops.rms_norm_jvp, inputs=("x", "w"), params=dict(eps=1e-6),
           outputs=("out",), stats=("rstd",), saved=("x",), backward=None)


def test_public_signatures():
    assert str(inspect.signature(dk.adaln_modulate)) == "(x, shift, scale, eps=1e-06)"
    assert str(inspect.signature(dk.jvp.gated_residual_adaln)) == \
        "(x, x_dot, gate, gate_dot, y, y_dot, shift, shift_dot, scale, scale_dot=None, eps=1e-06)"
    assert str(inspect.signature(dk.jvp.attention)) == \
        "(q, k, v, q_dot=None, k_dot=None, v_dot=None, scale=None, rope_cos=None, rope_sin=None, attn_mask=None, " \
        "enable_gqa=False)"
    assert str(inspect.signature(dk.attention)) == \
        "(q, k, v, scale=None, rope_cos=None, rope_sin=None, attn_mask=None, enable_gqa=False)"
    assert dk.jvp.rms_norm is dk.rms_norm.jvp
    x = rand(2, 3, 8)
    assert_f64(dk.adaln_modulate(x, x[:, 0], x[:, 1], eps=1e-5), dk.reference.adaln_modulate(x, x[:, 0], x[:, 1], 1e-5))
    with pytest.raises(TypeError):
        dk.adaln_modulate(x, x[:, 0])


def test_no_tangent_ops_remain():
    # The *_tangent ops (a fallback for forward-mode AD nothing reached) are gone: the jvp ops
    # cover every path (eager, torch.func, forward_ad, compile; tests/kernels/test_compile.py).
    assert not [n for n in dk.RAW_OPS if n.endswith("_tangent")]
    assert not hasattr(ops, "adaln_modulate_tangent")


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["attention", "gelu_tanh"])
def test_compile_func_jvp_python_ops(fresh_dynamo, name):
    # Custom JVPs can be dropped silently under compile (pytorch issue 192985): compare the tangents.
    if name == "attention":
        fn, inputs = dk.attention, [rand(1, 2, 9, 16, dtype=torch.float32, seed=s) for s in (1, 2, 3)]
    else:
        fn, inputs = dk.gelu_tanh, [rand(3, 40, dtype=torch.float32, seed=1)]
    tangents = [rand(*t.shape, dtype=t.dtype, seed=10 + i) for i, t in enumerate(inputs)]

    def run(*args):
        k = len(args) // 2
        return torch.func.jvp(fn, args[:k], args[k:])

    out, tan = torch.compile(run, fullgraph=True)(*inputs, *tangents)
    ref_out, ref_tan = run(*inputs, *tangents)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tan, ref_tan, rtol=1e-5, atol=1e-5)
    assert tan.abs().max() > 0


def _qk_norm_attention():
    m = rdmf.Attention(48, num_heads=3, qkv_bias=True, qk_norm=True).double()
    return randomize_params(m)


@pytest.mark.usefixtures("rms_statistic_in_input_dtype")
def test_patch_leaves_a_failed_attention_exactly_as_it_was():
    class Scaled(rdmf.Attention):  # a formula ours does not compute: the self-check refuses it
        def forward(self, x, rope=None):
            return 2 * super().forward(x)

    m = _qk_norm_attention()
    m.__class__ = Scaled
    blk = torch.nn.Module()
    blk.attn = m
    before = copy.deepcopy(m)
    with pytest.raises(ValueError, match="recognised nothing to patch"):
        dk.patch(blk)
    assert type(m) is Scaled and type(m.q_norm) is rdmf.RMSNorm and type(m.k_norm) is rdmf.RMSNorm
    assert sorted(m.__dict__) == sorted(before.__dict__) and list(m._modules) == list(before._modules)
    x = rand(2, 5, 48)
    assert_f64(m(x), before(x))


def test_patched_modules_get_every_nn_method(monkeypatch):
    # A helper method added to a dmf_kernels.nn class reaches patched models without a hand-kept list.
    monkeypatch.setattr(dnn.DiTBlock, "a_new_helper", lambda self: "ours", raising=False)
    monkeypatch.setattr(patch_mod, "_PATCHED_CLASSES", {})
    model = randomize_params(rdmf.DMFT(input_size=8, patch_size=2, in_channels=3, hidden_size=48, num_heads=3,
                                       num_classes=10, depth=2, dmf_depth=1).double())
    dk.patch(model)
    assert model.blocks[0].a_new_helper() == "ours"
