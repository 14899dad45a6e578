"""The "dmf_kernels" attention backend in diffusers' registry (dmf_kernels/_diffusers.py): its
contract against F.scaled_dot_product_attention in float64 on random inputs, forward, backward and
tangent, and its refusals."""
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

pytest.importorskip("diffusers", reason="diffusers is not installed (make build installs it: DMF_DEPS)")

from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn  # noqa: E402

from dmf_kernels import _diffusers  # noqa: E402

MEMBER = _diffusers.register()


def bnhd(B=2, N=7, H=3, D=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, H, D, generator=g, dtype=dtype)


def ref(q, k, v, **kw):  # diffusers' layout through the math reference (the one with forward AD)
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              **kw).transpose(1, 2)


def test_registered_as_a_diffusers_backend():
    assert _diffusers.register() is MEMBER  # idempotent
    assert AttentionBackendName("dmf_kernels") is MEMBER and MEMBER.value == "dmf_kernels"
    assert "dmf_kernels" in {m.value for m in AttentionBackendName.__members__.values()}
    assert AttentionBackendName.NATIVE.value == "native"  # the existing members are untouched


@pytest.mark.parametrize("nq,nk,scale", [(7, 7, None), (5, 9, 0.3)])
def test_forward_backward_tangent_match_sdpa(nq, nk, scale):
    q, k, v = bnhd(N=nq, seed=1), bnhd(N=nk, seed=2), bnhd(N=nk, seed=3)
    tq, tk, tv = bnhd(N=nq, seed=4), bnhd(N=nk, seed=5), bnhd(N=nk, seed=6)
    ours = lambda q, k, v: dispatch_attention_fn(q, k, v, scale=scale, backend=MEMBER)  # noqa: E731
    theirs = lambda q, k, v: ref(q, k, v, scale=scale)  # noqa: E731
    o, do = torch.func.jvp(ours, (q, k, v), (tq, tk, tv))
    o_ref, do_ref = torch.func.jvp(theirs, (q, k, v), (tq, tk, tv))
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(do, do_ref, rtol=1e-10, atol=1e-12)
    g = bnhd(N=nq, seed=7)
    grads = torch.autograd.grad(ours(*(t.requires_grad_() for t in (q, k, v))), (q, k, v), g)
    grads_ref = torch.autograd.grad(theirs(q, k, v), (q, k, v), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ratio", [2, 4])
def test_grouped_query_heads(ratio):
    q, k, v = bnhd(H=4, seed=1), bnhd(H=4 // ratio, seed=2), bnhd(H=4 // ratio, seed=3)
    o = dispatch_attention_fn(q, k, v, enable_gqa=True, backend=MEMBER)
    torch.testing.assert_close(o, ref(q, k, v, enable_gqa=True), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="must share batch and heads"):
        dispatch_attention_fn(q, k, v, backend=MEMBER)
    with pytest.raises(ValueError, match="must be a multiple of"):
        dispatch_attention_fn(bnhd(H=3), bnhd(H=2), bnhd(H=2), enable_gqa=True, backend=MEMBER)


def test_masks():
    q, k, v = bnhd(seed=1), bnhd(N=5, seed=2), bnhd(N=5, seed=3)
    for full in (torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 1, 1, 5, dtype=torch.float64)):
        # a mask that masks nothing changes nothing
        torch.testing.assert_close(dispatch_attention_fn(q, k, v, attn_mask=full, backend=MEMBER), ref(q, k, v),
                                   rtol=1e-10, atol=1e-12)
    pad = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)  # a (B, NK) key-padding mask
    bias = torch.randn(2, 3, 7, 5, dtype=torch.float64)  # additive, per head
    for mask, mask4 in ((pad, pad[:, None, None, :]), (bias, bias)):
        ours = lambda q, k, v: dispatch_attention_fn(q, k, v, attn_mask=mask, backend=MEMBER)  # noqa: E731
        theirs = lambda q, k, v: ref(q, k, v, attn_mask=mask4)  # noqa: E731
        tangents = (bnhd(seed=4), bnhd(N=5, seed=5), bnhd(N=5, seed=6))
        for a, b in zip(torch.func.jvp(ours, (q, k, v), tangents), torch.func.jvp(theirs, (q, k, v), tangents)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_refusals():
    q = bnhd()
    with pytest.raises(ValueError, match="dropout_p must be 0"):
        dispatch_attention_fn(q, q, q, dropout_p=0.1, backend=MEMBER)
    with pytest.raises(ValueError, match="is_causal"):
        dispatch_attention_fn(q, q, q, is_causal=True, backend=MEMBER)
    with pytest.raises(NotImplementedError, match="context parallelism"):
        _diffusers.backend(q, q, q, _parallel_config=object())
    with pytest.raises(TypeError, match="attn_mask must be a Tensor or None"):
        _diffusers.backend(q, q, q, attn_mask=[1, 2])


def test_processor_fallback_routes_sdpa_and_pickles():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    v = torch.randn_like(x)
    with sdpa_kernel(SDPBackend.MATH):
        expected = torch.func.jvp(attn, (x,), (v,))
    assert _diffusers.uses_sdpa_directly(attn.processor)
    attn.processor.__class__ = _diffusers.processor_class(AttnProcessor2_0)
    assert isinstance(attn.processor, AttnProcessor2_0)
    seen = []
    real = _diffusers.sdpa
    _diffusers.sdpa = lambda *a, **kw: seen.append(1) or real(*a, **kw)
    try:
        got = torch.func.jvp(attn, (x,), (v,))
    finally:
        _diffusers.sdpa = real
    assert seen, "the processor did not reach our op"
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    again = pickle.loads(pickle.dumps(attn))
    assert type(again.processor) is type(attn.processor)
