"""dmf_kernels.patch on replicas of facebookresearch/DiT and the official DMF code: outputs,
gradients and tangents equal the unpatched model's (float64), state_dict unchanged, plain
torch.func.jvp / forward_ad and model_jvp both work, the report, what is left alone, errors."""
import copy
import functools

import pytest
import torch
import torch.nn as tnn
import torch.autograd.forward_ad as fwAD

import dmf_kernels as dk
from conftest import assert_f64, randomize_params
from replicas import dit as rdit
from replicas import official_dmf as rdmf
from replicas import timm_layers

pytestmark = pytest.mark.usefixtures("rms_statistic_in_input_dtype")
SMALL = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=48, num_heads=3, num_classes=10)



def build(kind, depth=3, qk_norm=False):
    if kind == "dit":
        model = rdit.DiT(**SMALL, depth=depth)
    else:
        model = rdmf.DMFT(**SMALL, depth=depth, dmf_depth=2, qk_norm=qk_norm)
    return randomize_params(model.double())


def call(kind, model, y):
    return functools.partial(model, y=y)


def inputs(kind, b=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(b, generator=g, dtype=torch.float64)
    primals = (x, t) if kind == "dit" else (x, t, t * 0.5)
    tangents = tuple(torch.randn(p.shape, generator=g, dtype=torch.float64) for p in primals)
    return primals, tangents, torch.tensor([1, 10][:b])


@pytest.mark.parametrize("kind,qk_norm", [("dit", False), ("dmf", False), ("dmf", True)])
def test_patched_model_matches_original(kind, qk_norm):
    ref = build(kind, qk_norm=qk_norm)
    model = copy.deepcopy(ref)
    report = dk.patch(model)
    assert report.count("block") == 3 and report.count("attention") == 3 and report.count("mlp") == 3
    assert report.count("final_layer") == 1 and report.count("rms_norm") == (6 if qk_norm else 0)
    assert not report.skipped
    assert list(model.state_dict()) == list(ref.state_dict())
    model.load_state_dict(ref.state_dict(), strict=True)
    primals, tangents, y = inputs(kind)
    f_ref, f = call(kind, ref, y), call(kind, model, y)
    assert_f64(f(*primals), f_ref(*primals), "forward")
    params = [p for p in model.parameters() if p.requires_grad]
    params_ref = [p for p in ref.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(f(*primals).square().sum(), params),
                    torch.autograd.grad(f_ref(*primals).square().sum(), params_ref)):
        assert_f64(a, b, "grad", rtol=1e-9, atol=1e-9)
    r_out, r_tan = torch.func.jvp(f_ref, primals, tangents)
    out, tan = torch.func.jvp(f, primals, tangents)           # unchanged training code
    assert_f64(tan, r_tan, "func.jvp tangent", rtol=1e-9, atol=1e-9)
    with fwAD.dual_level():
        o = f(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents)])
        assert_f64(fwAD.unpack_dual(o).tangent, r_tan, "forward_ad tangent", rtol=1e-9, atol=1e-9)
    out, tan = dk.model_jvp(f, primals, tangents)             # the one-line change
    assert_f64(out, r_out, "model_jvp primal")
    assert_f64(tan, r_tan, "model_jvp tangent", rtol=1e-9, atol=1e-9)
    assert not tan.requires_grad
    w = r_tan.detach()
    w = w / w.abs().max()  # unit scale, like the other checks
    for a, b in zip(torch.autograd.grad((out * w).sum(), params),
                    torch.autograd.grad((r_out * w).sum(), params_ref)):
        assert_f64(a, b, "grad through the model_jvp primal", rtol=1e-9, atol=1e-9)


def test_patched_model_copies_and_reloads():
    model = build("dmf", qk_norm=True)
    dk.patch(model)
    clone = copy.deepcopy(model)  # an EMA copy keeps the patched forward, bound to the copy
    assert clone.blocks[0].forward.__self__ is clone.blocks[0]
    primals, _, y = inputs("dmf")
    assert_f64(clone(*primals, y=y), model(*primals, y=y))
    fresh = rdmf.DMFT(**SMALL, depth=3, dmf_depth=2, qk_norm=True).double()
    fresh.load_state_dict(model.state_dict(), strict=True)
    import io
    buf = io.BytesIO()
    torch.save(model, buf)  # a whole pickled model comes back patched
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.blocks[0]._dmf_kernels_patched == "block" and isinstance(loaded.blocks[0], rdmf.DiTBlock)
    primals, tangents, y = inputs("dmf")
    assert_f64(loaded(*primals, y=y), model(*primals, y=y))
    assert_f64(dk.model_jvp(functools.partial(loaded, y=y), primals, tangents)[1],
               dk.model_jvp(functools.partial(model, y=y), primals, tangents)[1])


class GemmaRMSNorm(rdmf.RMSNorm):
    """Looks like the official RMSNorm (a `scale`, an `eps`) but multiplies by (1 + scale)."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.scale)


class ScaleNormAttention(timm_layers.Attention):
    """timm's scale_norm: a norm before proj, which our forward would drop."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.norm = tnn.LayerNorm(self.qkv.in_features)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = torch.softmax(q @ k.transpose(-1, -2) * self.scale, -1) @ v
        return self.proj(self.norm(x.transpose(1, 2).reshape(B, N, C)))


def test_look_alikes_are_left_alone():
    model = build("dmf", depth=3, qk_norm=True)
    model.blocks[0].attn.q_norm = GemmaRMSNorm(16).double()
    model.blocks[1].attn = ScaleNormAttention(48, 3, qkv_bias=True).double()
    model.blocks[2].attn.q_bias = tnn.Parameter(torch.zeros(48, dtype=torch.float64))
    tnn.utils.weight_norm(model.final_layer.linear)  # legacy weight_norm: a forward pre-hook
    primals, tangents, y = inputs("dmf")
    with torch.no_grad():
        before = model(*primals, y=y)
    with pytest.raises(ValueError, match="recognised nothing to patch") as e:
        dk.patch(model)  # nothing left: the attention and MLP of a block left alone keep their forward
    why = str(e.value)
    assert "blocks.0.attn: q_norm: its own forward and ours differ" in why
    assert "blocks.1.attn: unexpected submodules ['norm']" in why
    assert "blocks.2.attn: unexpected parameters ['q_bias']" in why
    assert "final_layer: linear has forward hooks" in why
    assert "blocks.0.mlp: its block blocks.0 was left alone" in why
    assert not any(getattr(m, "_dmf_kernels_patched", None) for m in model.modules())
    with torch.no_grad():
        assert_f64(model(*primals, y=y), before)


def test_leaves_alone_what_it_does_not_understand():
    model = build("dit", depth=2)
    model.blocks[0].attn = timm_layers.Attention(48, 3, qkv_bias=True, qk_norm=True, norm_layer=GemmaRMSNorm).double()
    model.blocks[1].mlp.act = tnn.GELU()  # exact GELU
    report = dk.patch(model)
    assert "differ" in report.skipped["blocks.0.attn"]
    assert "GELU(approximate='tanh')" in report.skipped["blocks.1.mlp"]
    assert "could not be patched" in report.skipped["blocks.0"] and "could not be patched" in report.skipped["blocks.1"]
    # the attention of block 1 and the MLP of block 0 would be patchable, but their blocks are not
    assert report.skipped["blocks.1.attn"] == "its block blocks.1 was left alone"
    assert report.skipped["blocks.0.mlp"] == "its block blocks.0 was left alone"
    assert report.patched == {"final_layer": "final_layer"}
    assert "left alone: blocks.0.attn" in str(report)
    primals, tangents, y = inputs("dit")
    ref = copy.deepcopy(model)
    ref.load_state_dict(model.state_dict())
    # still equal to the unpatched model where patched, untouched elsewhere
    assert_f64(model(*primals, y=y), ref(*primals, y=y))


def test_layernorm_qk_norm_is_patched():
    """timm's / LightningDiT's qk-norm without RMSNorm: LayerNorm(head_dim) with weight and bias."""
    ref = build("dit", depth=2)
    for b in ref.blocks:
        b.attn = timm_layers.Attention(48, 3, qkv_bias=True, qk_norm=True).double()
    randomize_params(ref, seed=3)
    model = copy.deepcopy(ref)
    report = dk.patch(model)
    assert report.count("layer_norm") == 4 and report.count("block") == 2 and not report.skipped
    primals, tangents, y = inputs("dit")
    r_out, r_tan = torch.func.jvp(call("dit", ref, y), primals, tangents)
    out, tan = dk.model_jvp(call("dit", model, y), primals, tangents)
    assert_f64(out, r_out, "forward", 1e-9, 1e-9)
    assert_f64(tan, r_tan, "tangent", 1e-9, 1e-9)


def test_dropout_is_left_alone():
    model = build("dit", depth=1)
    model.blocks[0].attn.attn_drop.p = 0.1
    report = dk.patch(model)
    assert "dropout" in report.skipped["blocks.0.attn"]


def test_patch_recognises_nothing():
    with pytest.raises(ValueError, match="recognised nothing to patch in Sequential: no module has the attributes"):
        dk.patch(tnn.Sequential(tnn.Linear(4, 4), tnn.ReLU()))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        dk.patch(lambda x: x)


def test_model_built_from_dmf_kernels_nn_needs_no_patch():
    from dmf import DMFT
    report = dk.patch(DMFT(**SMALL, depth=2, dmf_depth=1))
    assert report.count("block") == 2 and not report.skipped


def test_patched_model_compiled_jvp_matches_eager():
    torch._dynamo.reset()
    model = build("dit", depth=2)
    dk.patch(model)
    primals, tangents, y = inputs("dit")
    f = functools.partial(model, y=y)
    eager = dk.model_jvp(f, primals, tangents)
    comp = torch.compile(lambda *a: dk.model_jvp(f, a[:2], a[2:]))(*primals, *tangents)
    # DiT's timestep embedding is fp32 arithmetic, which Inductor rounds differently (~1e-7)
    torch.testing.assert_close(comp[1], eager[1], rtol=1e-5, atol=1e-5 * eager[1].abs().max().item())
    assert eager[1].abs().max() > 0
