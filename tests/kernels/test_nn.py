"""dmf_kernels.nn: every module's forward and forward_jvp against the reference codebases'
layers (tests/replicas, float64, random weights), state_dict compatibility, None tangents,
the fused block stack, no tangent activations saved for backward, compile, bad input."""
import warnings

import pytest
import torch
import torch.nn as tnn

from dmf_kernels import nn as dnn
from conftest import assert_f64, rand
from replicas import dit as rdit
from replicas import official_dmf as rdmf
from replicas import timm_layers

B, N, D, H = 2, 17, 72, 3   # head dim 24; N odd
pytestmark = pytest.mark.usefixtures("rms_statistic_in_input_dtype")


def randomise(*modules, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale + (1.0 if p.dim() == 1 and
                        p.shape[0] == D // H else 0.0))
    return modules


def pair(ours, ref, device):
    ref = ref.double().to(device)
    randomise(ref)
    ours = ours.double().to(device)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def jvp_matches(ours, ref, primals, tangents, rtol=1e-10, atol=1e-10):
    """forward, func.jvp of the reference vs forward_jvp (explicit), func.jvp and forward_ad of
    ours; backward through the dual primal vs backward of the reference."""
    r_out, r_tan = torch.func.jvp(ref, primals, tuple(torch.zeros_like(p) if t is None else t
                                                      for p, t in zip(primals, tangents)))
    assert_f64(ours(*primals), r_out, "forward", rtol, atol)
    out, tan = ours.forward_jvp(*primals, *tangents)
    assert_f64(out, r_out, "forward_jvp primal", rtol, atol)
    assert_f64(tan, r_tan, "forward_jvp tangent", rtol, atol)
    assert not tan.requires_grad
    full = tuple(torch.zeros_like(p) if t is None else t for p, t in zip(primals, tangents))
    _, tan2 = torch.func.jvp(ours, primals, full)
    assert_f64(tan2, r_tan, "func.jvp tangent", rtol, atol)
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        o = ours(*[fwAD.make_dual(p, t) for p, t in zip(primals, full)])
        assert_f64(fwAD.unpack_dual(o).tangent, r_tan, "forward_ad tangent", rtol, atol)
    w = rand(*r_out.shape, device=r_out.device, seed=99)
    g_ours = torch.autograd.grad((ours.forward_jvp(*primals, *tangents)[0] * w).sum(), list(ours.parameters()))
    g_ref = torch.autograd.grad((ref(*primals) * w).sum(), list(ref.parameters()))
    for (name, _), a, b in zip(ours.named_parameters(), g_ours, g_ref):
        assert_f64(a, b, f"grad of {name}", rtol, atol)


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
def test_attention_matches_official(device, qk_norm):
    ours, ref = pair(dnn.Attention(D, H, qk_norm=qk_norm), rdmf.Attention(D, H, qkv_bias=True, qk_norm=qk_norm),
                     device)
    x, xd = rand(B, N, D, device=device, seed=1), rand(B, N, D, device=device, seed=2)
    jvp_matches(ours, ref, (x,), (xd,))


def test_attention_matches_timm(device):
    ours, ref = pair(dnn.Attention(D, H), timm_layers.Attention(D, H, qkv_bias=True), device)
    jvp_matches(ours, ref, (rand(B, N, D, device=device, seed=3),), (rand(B, N, D, device=device, seed=4),))


def test_mlp_matches_timm(device):
    ours, ref = pair(dnn.Mlp(D, 4 * D), timm_layers.Mlp(D, 4 * D, act_layer=lambda: tnn.GELU(approximate="tanh")),
                     device)
    jvp_matches(ours, ref, (rand(B, N, D, device=device, seed=5),), (rand(B, N, D, device=device, seed=6),))


@pytest.mark.parametrize("cond", ["BD", "B1D"])
@pytest.mark.parametrize("present", ["both", "x", "c"])
def test_dit_block(device, cond, present):
    """(B, D) conditioning against facebookresearch/DiT's block, (B, 1, D) against the official DMF's."""
    ref = rdit.DiTBlock(D, H) if cond == "BD" else rdmf.DiTBlock(D, H)
    ours, ref = pair(dnn.DiTBlock(D, H), ref, device)
    x, c = rand(B, N, D, device=device, seed=7), rand(B, *((D,) if cond == "BD" else (1, D)), device=device, seed=8)
    xd, cd = rand(*x.shape, device=device, seed=9), rand(*c.shape, device=device, seed=10)
    jvp_matches(ours, ref, (x, c), (xd if present != "c" else None, cd if present != "x" else None))


def test_final_layer(device):
    ours, ref = pair(dnn.FinalLayer(D, 2, 4), rdmf.FinalLayer(D, 2, 4), device)
    x, c = rand(B, N, D, device=device, seed=11), rand(B, 1, D, device=device, seed=12)
    jvp_matches(ours, ref, (x, c), (rand(*x.shape, device=device, seed=13), None))


def test_timestep_and_label_embedders(device):
    ours, ref = pair(dnn.TimestepEmbedder(D), rdit.TimestepEmbedder(D), device)
    t, td = torch.rand(5, dtype=torch.float64, device=device), rand(5, device=device, seed=14)
    r_out, r_tan = torch.func.jvp(ref, (t,), (td,))
    assert_f64(ours(t), r_out)
    out, tan = ours.forward_jvp(t, td)
    assert_f64(out, r_out, "embedding")
    assert_f64(tan, r_tan, "embedding tangent")
    assert ours.forward_jvp(t, None)[1] is None
    lab = dnn.LabelEmbedder(10, D).double().to(device)
    lab.load_state_dict(rdmf.LabelEmbedder(10, D).double().state_dict(), strict=True)
    y = torch.tensor([0, 10, 3], device=device)
    emb, emb_dot = lab.forward_jvp(y)
    assert emb_dot is None and torch.equal(emb, lab.embedding_table.weight[y])


@pytest.mark.parametrize("final", [False, True])
def test_dit_blocks_fused_stack_equals_sequential(device, final):
    """dit_blocks fuses each block's last residual with the next norm; the result must equal
    running the blocks one after the other (then the final layer), forward, JVP and grads."""
    blocks = tnn.ModuleList([dnn.DiTBlock(D, H, qk_norm=True) for _ in range(3)]).double().to(device)
    fl = dnn.FinalLayer(D, 2, 3).double().to(device)
    randomise(blocks, fl)
    x, xd = rand(B, N, D, device=device, seed=15), rand(B, N, D, device=device, seed=16)
    cs = [rand(B, D, device=device, seed=17 + i) for i in range(3)]
    cds = [rand(B, D, device=device, seed=20), None, None]

    def seq(x, *cs):
        for b, c in zip(blocks, cs):
            x = b(x, c)
        return fl(x, cs[-1]) if final else x

    def fused(x, *cs):
        return dnn.dit_blocks(blocks, x, list(cs), fl if final else None, cs[-1] if final else None)

    full = [xd] + [torch.zeros_like(c) if cd is None else cd for c, cd in zip(cs, cds)]
    r_out, r_tan = torch.func.jvp(seq, (x, *cs), tuple(full))
    out, tan = torch.func.jvp(fused, (x, *cs), tuple(full))
    assert_f64(out, r_out, "stack")
    assert_f64(tan, r_tan, "stack tangent")
    o2, t2 = dnn.dit_blocks_jvp(blocks, x, cs, xd, cds, fl if final else None, cs[-1] if final else None, None)
    assert_f64(o2, r_out, "dit_blocks_jvp")
    assert_f64(t2, r_tan, "dit_blocks_jvp tangent")
    params = list(blocks.parameters()) + list(fl.parameters())
    g1 = torch.autograd.grad(o2.square().sum(), params, allow_unused=True)
    g2 = torch.autograd.grad(seq(x, *cs).square().sum(), params, allow_unused=True)
    for a, b in zip(g1, g2):
        if b is not None:
            assert_f64(a, b, "stack grads")


def saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_dual_pass_saves_no_tangent_activations():
    """The dual pass records the primal exactly as a plain forward does: the bytes autograd
    saves for backward are those of the forward (eager torch.func.jvp of the same block saves
    its tangent activations too)."""
    block = dnn.DiTBlock(D, H, qk_norm=True)
    ref = rdmf.DiTBlock(D, H, qk_norm=True)
    ref.load_state_dict(block.state_dict())
    x, xd = torch.randn(B, 64, D), torch.randn(B, 64, D)
    c, cd = torch.randn(B, 1, D), torch.randn(B, 1, D)
    plain = saved_bytes(lambda: block(x, c))
    dual = saved_bytes(lambda: block.forward_jvp(x, c, xd, cd))
    eager = saved_bytes(lambda: torch.func.jvp(ref, (x, c), (xd, cd)))
    assert dual == plain, (dual, plain)
    assert eager > 1.5 * plain  # the measurement does see tangent activations


def test_modules_under_compile(device):
    torch._dynamo.reset()
    block = dnn.DiTBlock(48, 3, qk_norm=True).to(device)
    randomise(block)
    block.float()
    x, xd = rand(2, 9, 48, device=device, dtype=torch.float32, seed=30), rand(2, 9, 48, device=device,
                                                                                dtype=torch.float32, seed=31)
    c, cd = rand(2, 48, device=device, dtype=torch.float32, seed=32), rand(2, 48, device=device,
                                                                             dtype=torch.float32, seed=33)
    eager = torch.func.jvp(block, (x, c), (xd, cd))
    compiled = torch.compile(lambda *a: torch.func.jvp(block, a[:2], a[2:]))(x, c, xd, cd)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-4)
    assert compiled[1].abs().max() > 0


def test_compiled_block_under_eager_func_jvp(monkeypatch):
    """PyTorch does not compile a compiled function called inside an eager torch.func.jvp (pytorch
    issue 128711): the compiled block runs eagerly, right, and says so once (model_jvp and a
    compiled function around torch.func.jvp do compile)."""
    from dmf_kernels.nn import functional as fn
    from torch._dynamo.utils import counters
    import dmf_kernels as dk
    torch._dynamo.reset()
    monkeypatch.setattr(fn, "_warned_compiled_under_transform", False)
    block = dnn.DiTBlock(16, 2).double()
    randomise(block)
    x, xd = rand(2, 5, 16, dtype=torch.float64, seed=40), rand(2, 5, 16, dtype=torch.float64, seed=41)
    c, cd = rand(2, 16, dtype=torch.float64, seed=42), rand(2, 16, dtype=torch.float64, seed=43)
    eager = torch.func.jvp(block, (x, c), (xd, cd))
    block.compile(backend="aot_eager")
    with pytest.warns(UserWarning, match=r"ran eagerly under torch.func.jvp.*dmf_kernels.model_jvp"):
        out = torch.func.jvp(block, (x, c), (xd, cd))
    for a, b in zip(out, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    counters.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = dk.model_jvp(block, (x, c), (xd, cd))
    assert not [w for w in caught if "ran eagerly" in str(w.message)]  # model_jvp compiles
    assert counters["stats"]["unique_graphs"] > 0
    for a, b in zip(out, eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bad_input():
    block = dnn.DiTBlock(D, H)
    x = torch.randn(B, N, D)
    with pytest.raises(ValueError, match=r"c must have shape \(B, D\) = \(2, 72\) or \(B, 1, D\)"):
        block(x, torch.randn(B, N, D))
    with pytest.raises(ValueError, match=r"x_dot must have the shape of its primal \(2, 17, 72\)"):
        block.forward_jvp(x, torch.randn(B, D), torch.randn(B, N, D + 1), None)
    with pytest.raises(TypeError, match=r"c_dot must have its primal's dtype and device"):
        block.forward_jvp(x, torch.randn(B, D), None, torch.randn(B, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        dnn.Attention(70, 3)
    with pytest.raises(ValueError, match=r"PatchEmbed: x must have shape \(B, 4, 8, 8\)"):
        dnn.PatchEmbed(8, 2, 4, D)(torch.randn(1, 3, 8, 8))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_dit_block_bf16_three_way_cuda():
    """bf16 on a GPU: block output and tangent error vs float64 at most ~2x eager bf16's."""
    from conftest import assert_three_way
    ref = rdmf.DiTBlock(96, 4).double().cuda()
    randomise(ref, scale=0.1)
    ours = dnn.DiTBlock(96, 4).double().cuda()
    ours.load_state_dict(ref.state_dict())
    x, xd = rand(4, 257, 96, device="cuda", seed=40), rand(4, 257, 96, device="cuda", seed=41)
    c, cd = rand(4, 1, 96, device="cuda", seed=42), rand(4, 1, 96, device="cuda", seed=43)
    r64 = torch.func.jvp(ref, (x, c), (xd, cd))
    ref_bf, ours_bf = ref.bfloat16(), ours.bfloat16()
    args = tuple(t.bfloat16() for t in (x, c, xd, cd))
    e = torch.func.jvp(ref_bf, args[:2], args[2:])
    k = ours_bf.forward_jvp(*args)
    for i in range(2):
        assert_three_way(k[i], e[i], r64[i], torch.bfloat16, ["out", "tangent"][i])
