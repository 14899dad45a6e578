"""hustvl/LightningDiT parity (issue 15): the replica in tests/replicas/lightningdit.py is the float64
oracle for our modules (dmf_kernels.nn with LightningDiT's options, its state_dicts loaded with
strict=True), for dmf_kernels.patch on the replica in every flag combination (use_qknorm,
use_swiglu, use_rope, use_rmsnorm, wo_shift), and for model_jvp of both: forward, gradients and
torch.func.jvp / forward_ad tangents; head dim 64 and 72, token counts 17 and 257 (no tile
multiple). Also: the crash of the unpatched attention forward (issue 15), the model's own
@torch.compile decorators, a rotary embedding that is not LightningDiT's, bad rope tables."""
import copy
import functools
import itertools
import types

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import dmf_kernels as dk
from dmf_kernels import nn as dnn
from conftest import assert_f64, rand, randomize_params
from replicas import lightningdit as rl

FLAGS = ("use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm", "wo_shift")
COMBOS = [dict(zip(FLAGS, v)) for v in itertools.product([False, True], repeat=len(FLAGS))]


def combo_id(f):
    return "-".join(k[4:] if k.startswith("use_") else k for k, v in f.items() if v) or "plain"


@pytest.fixture(autouse=True)
def eager_replica(monkeypatch):
    """The replica's @torch.compile decorators run eagerly (compiling every block on 2 CPU cores would
    take minutes; one test below keeps them), and its RMSNorm keeps float64 for float64 input (the
    original computes in fp32: a 1e-7 relative difference; these tests compare formulas)."""
    def forward(self, x):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return (x.to(acc) * torch.rsqrt(x.to(acc).pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight
    monkeypatch.setattr(rl.RMSNorm, "forward", forward)
    # SDPA has no forward-mode AD on the CPU: the reference takes its math path
    monkeypatch.setattr(rl, "F", types.SimpleNamespace(silu=torch.nn.functional.silu,
                                                       scaled_dot_product_attention=math_sdpa))
    with torch.compiler.set_stance("force_eager"):
        yield


def math_sdpa(q, k, v, dropout_p=0.0):
    return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v


def qk_kind(f):
    return ("rms" if f["use_rmsnorm"] else "layer") if f["use_qknorm"] else False


def ours_block(D, H, f):
    return dnn.DiTBlock(D, H, qk_norm=qk_kind(f), norm="rms" if f["use_rmsnorm"] else "layer",
                        mlp="swiglu" if f["use_swiglu"] else "gelu", wo_shift=f["wo_shift"])


def rope_pair(head_dim, n):
    """Our rotary embedding and the replica's, tables cut to n rows (any token count)."""
    side = int((n - 1) ** 0.5) + 1
    ours, ref = dnn.RotaryEmbedding2D(head_dim // 2, side), rl.VisionRotaryEmbeddingFast(head_dim // 2, side)
    assert torch.equal(ours.freqs_cos, ref.freqs_cos) and torch.equal(ours.freqs_sin, ref.freqs_sin)
    for m in (ours, ref):
        m.freqs_cos, m.freqs_sin = m.freqs_cos[:n].double(), m.freqs_sin[:n].double()
    return ours, ref


def named(module):
    """Trainable parameters in one order for both models (registration orders differ)."""
    params = dict((n, p) for n, p in module.named_parameters() if p.requires_grad)
    return [params[n] for n in sorted(params)]


def check_jvp(f_ours, f_ref, primals, tangents, params_ours, params_ref, what, tol=1e-9):
    r_out, r_tan = torch.func.jvp(f_ref, primals, tangents)
    assert_f64(f_ours(*primals), r_out, f"{what}: forward", tol, tol)
    out, tan = torch.func.jvp(f_ours, primals, tangents)
    assert_f64(tan, r_tan, f"{what}: func.jvp tangent", tol, tol)
    with fwAD.dual_level():
        o = f_ours(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents)])
        assert_f64(fwAD.unpack_dual(o).tangent, r_tan, f"{what}: forward_ad tangent", tol, tol)
    out, tan = dk.model_jvp(f_ours, primals, tangents)
    assert_f64(out, r_out, f"{what}: model_jvp primal", tol, tol)
    assert_f64(tan, r_tan, f"{what}: model_jvp tangent", tol, tol)
    assert not tan.requires_grad
    w = r_tan.detach() / r_tan.abs().max().item()  # (eager func.jvp tangents carry a graph)
    for a, b in zip(torch.autograd.grad((out * w).sum(), params_ours),
                    torch.autograd.grad((f_ref(*primals) * w).sum(), params_ref)):
        assert_f64(a, b, f"{what}: grad through the model_jvp primal", tol, tol * max(1.0, b.abs().max().item()))


FULL = dict(use_qknorm=True, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False)
# every combination at head dim 64 and 17 tokens; head dim 72 and 257 tokens for the full configuration
BLOCK_CASES = [(f, 64, 17) for f in COMBOS] + [(dict(FULL, wo_shift=w), 72, n) for w in (False, True) for n in (17, 257)]


@pytest.mark.parametrize("f,head_dim,n", BLOCK_CASES, ids=[f"{combo_id(f)}-{d}-{n}" for f, d, n in BLOCK_CASES])
def test_block_matches_lightningdit(f, head_dim, n):
    H = 2
    D = H * head_dim
    ref = randomize_params(rl.LightningDiTBlock(D, H, **{k: v for k, v in f.items() if k != "use_rope"}).double())
    ours = ours_block(D, H, f).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    rope_ours, rope_ref = rope_pair(head_dim, n) if f["use_rope"] else (None, None)
    x, c = rand(2, n, D, seed=1), rand(2, D, seed=2)
    xd, cd = rand(2, n, D, seed=3), rand(2, D, seed=4)
    check_jvp(lambda x, c: ours(x, c, rope_ours), lambda x, c: ref(x, c, rope_ref), (x, c), (xd, cd),
              named(ours), named(ref), combo_id(f))
    # the final layer (RMSNorm with weight or LayerNorm)
    fref = randomize_params(rl.FinalLayer(D, 2, 3, use_rmsnorm=f["use_rmsnorm"]).double())
    fours = dnn.FinalLayer(D, 2, 3, norm="rms" if f["use_rmsnorm"] else "layer").double()
    fours.load_state_dict(fref.state_dict(), strict=True)
    check_jvp(fours, fref, (x, c), (xd, cd), named(fours), named(fref), "final layer")


def small_model(f, head_dim=64, depth=2):
    torch.manual_seed(0)
    m = rl.LightningDiT(input_size=8, patch_size=2, in_channels=3, hidden_size=2 * head_dim, depth=depth,
                        num_heads=2, num_classes=10, **f)
    return randomize_params(m.double())


def model_inputs(b=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(b, generator=g, dtype=torch.float64)
    return (x, t), (torch.randn(x.shape, generator=g, dtype=torch.float64), torch.ones_like(t)), \
        torch.tensor([1, 10][:b])


@pytest.mark.parametrize("f", COMBOS, ids=combo_id)
def test_patched_lightningdit_matches_original(f):
    ref = small_model(f)
    model = copy.deepcopy(ref)
    report = dk.patch(model)
    depth = 2
    assert not report.skipped, str(report)
    assert report.count("block") == depth and report.count("attention") == depth
    assert report.count("swiglu_mlp" if f["use_swiglu"] else "mlp") == depth
    assert report.count("final_layer") == 1 and report.count("rope") == int(f["use_rope"])
    qk = 2 * depth if f["use_qknorm"] else 0
    assert report.count("rms_norm" if f["use_rmsnorm"] else "layer_norm") == qk
    assert list(model.state_dict()) == list(ref.state_dict())
    primals, tangents, y = model_inputs()
    check_jvp(functools.partial(model, y=y), functools.partial(ref, y=y), primals, tangents,
              named(model), named(ref),
              combo_id(f))


def test_unpatched_children_of_a_skipped_block_keep_their_forward():
    """Issue 15's crash: a block left alone must call its own attention with its own arguments."""
    f = dict(use_qknorm=False, use_swiglu=False, use_rope=True, use_rmsnorm=True, wo_shift=False)
    ref = small_model(f)
    model = copy.deepcopy(ref)
    model.blocks[0].register_forward_hook(lambda *a: None)  # a hook on a block's submodule: block left alone
    model.blocks[0].norm1.register_forward_hook(lambda *a: None)
    report = dk.patch(model)
    assert "blocks.0" in report.skipped and "blocks.0.attn" in report.skipped and "blocks.0.mlp" in report.skipped
    assert "its block blocks.0 was left alone" in report.skipped["blocks.0.attn"]
    assert type(model.blocks[0].attn) is rl.Attention and type(model.blocks[0].mlp) is not type(model.blocks[1].mlp)
    assert report.count("block") == 1
    primals, tangents, y = model_inputs()
    check_jvp(functools.partial(model, y=y), functools.partial(ref, y=y), primals, tangents,
              named(model), named(ref),
              "partly patched")


class ConjugateRope(rl.VisionRotaryEmbeddingFast):
    """The opposite rotation: same buffers, another formula."""

    def forward(self, t):
        return t * self.freqs_cos - rl.rotate_half(t) * self.freqs_sin


def test_foreign_rotary_embedding_leaves_attention_alone():
    f = dict(use_qknorm=False, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=True)
    ref = small_model(f)
    ref.feat_rope.__class__ = ConjugateRope
    model = copy.deepcopy(ref)
    report = dk.patch(model)
    assert "feat_rope" in report.skipped and report.count("attention") == 0 and report.count("block") == 0
    assert "rotary embedding feat_rope is not recognised" in report.skipped["blocks.0.attn"]
    primals, tangents, y = model_inputs()
    r_out, r_tan = torch.func.jvp(functools.partial(ref, y=y), primals, tangents)
    out, tan = dk.model_jvp(functools.partial(model, y=y), primals, tangents)
    assert_f64(out, r_out, "forward")
    assert_f64(tan, r_tan, "tangent", 1e-9, 1e-9)


def test_patch_with_the_models_own_torch_compile():
    """The replica's @torch.compile decorators active (embedders compile; patched blocks run ours)."""
    f = dict(use_qknorm=True, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=True)
    ref = small_model(f, head_dim=16, depth=1).float()
    model = copy.deepcopy(ref)
    with torch.compiler.set_stance("default"):
        report = dk.patch(model)
        assert not report.skipped, str(report)
        assert sorted(report.uncompiled) == ["t_embedder", "y_embedder"], str(report)
        primals, tangents, y = model_inputs()
        primals, tangents = [p.float() for p in primals], [t.float() for t in tangents]
        out, tan = dk.model_jvp(functools.partial(model, y=y), tuple(primals), tuple(tangents))
    with torch.compiler.set_stance("force_eager"):
        r_out, r_tan = torch.func.jvp(functools.partial(ref, y=y), tuple(primals), tuple(tangents))
    torch.testing.assert_close(out, r_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tan, r_tan, rtol=1e-3, atol=1e-3)


def test_state_dict_of_lightningdit_loads_into_our_modules():
    f = dict(use_qknorm=True, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False)
    ref = small_model(f)
    blocks = torch.nn.ModuleList([ours_block(128, 2, f) for _ in range(2)]).double()
    blocks.load_state_dict(ref.blocks.state_dict(), strict=True)
    rope = dnn.RotaryEmbedding2D(32, 4).double()
    rope.load_state_dict(ref.feat_rope.state_dict(), strict=True)
    assert [n for n, _ in blocks[0].named_parameters()] == [n for n, _ in ref.blocks[0].named_parameters()]


def test_attention_rope_argument_errors():
    attn = dnn.Attention(128, 2).double()
    x = rand(2, 16, 128, seed=5)
    with pytest.raises(TypeError, match="rope must be None, a dmf_kernels.nn.RotaryEmbedding2D"):
        attn(x, rope=rl.VisionRotaryEmbeddingFast(32, 4))  # not checked by patch
    rope = dnn.RotaryEmbedding2D(32, 3)  # 9 tokens, x has 16
    with pytest.raises(ValueError, match="rope_cos"):
        attn(x, rope=rope)


class RefPreNormBlock(torch.nn.Module):
    """The pre-norm block without adaLN (in-context conditioning), from the replica's parts."""

    def __init__(self, D, H):
        super().__init__()
        self.norm1 = rl.RMSNorm(D)
        self.norm2 = rl.RMSNorm(D)
        self.attn = rl.Attention(D, num_heads=H, qkv_bias=True, qk_norm=True, use_rmsnorm=True)
        self.mlp = rl.SwiGLUFFN(D, int(2 / 3 * 4 * D))

    def forward(self, x, rope=None):
        x = x + self.attn(self.norm1(x), rope=rope)
        return x + self.mlp(self.norm2(x))


@pytest.mark.parametrize("head_dim,n", [(64, 17), (72, 257)])
def test_prenorm_block(head_dim, n):
    D = 2 * head_dim
    ref = randomize_params(RefPreNormBlock(D, 2).double())
    ours = dnn.PreNormBlock(D, 2).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    rope_ours, rope_ref = rope_pair(head_dim, n)
    x, xd = rand(2, n, D, seed=1), rand(2, n, D, seed=2)
    check_jvp(lambda x: ours(x, rope_ours), lambda x: ref(x, rope_ref), (x,), (xd,), named(ours), named(ref),
              "pre-norm block")
    out, tan = ours.forward_jvp(x, xd, rope=rope_ours)
    assert not tan.requires_grad and ours.forward_jvp(x, None, rope=rope_ours)[1] is None


def test_rotary_embedding_module():
    ours, ref = dnn.RotaryEmbedding2D(32, 4), rl.VisionRotaryEmbeddingFast(32, 4)
    assert ours.freqs_cos.shape == (16, 64) and list(ours.state_dict()) == ["freqs_cos", "freqs_sin"]
    torch.testing.assert_close(ours.freqs_cos, ref.freqs_cos, rtol=0, atol=0)
    t, td = rand(2, 3, 16, 64, seed=3), rand(2, 3, 16, 64, seed=4)
    ours, ref = ours.double(), ref.double()
    r_out, r_tan = torch.func.jvp(ref, (t,), (td,))
    out, tan = torch.func.jvp(ours, (t,), (td,))
    assert_f64(out, r_out, "rope")
    assert_f64(tan, r_tan, "rope tangent")
    with pytest.raises(ValueError, match="even"):
        dnn.RotaryEmbedding2D(31, 4)


def test_instance_level_forward_is_left_alone():
    """A forward set on the instance would shadow the patched class's: such a module is left alone."""
    f = dict(use_qknorm=False, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False)
    model = small_model(f)
    blk = model.blocks[0]
    blk.forward = types.MethodType(rl.LightningDiTBlock.forward._torchdynamo_orig_callable, blk)
    report = dk.patch(model)
    assert "forward is set on the instance" in report.skipped["blocks.0"] and report.count("block") == 1
