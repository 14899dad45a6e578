"""Attention: ours vs SDPA's backends (forward, backward) and vs torch.func.jvp over the
math path, eager and compiled (fwd+jvp: the only way PyTorch can take a forward-mode
derivative of attention). DiT-B/2 (H = 12, D = 64) and DiT-XL/2 (H = 16, D = 72) at
N = 256 and 1024 with about 64k tokens per batch on a GPU (small batches on CPU, where
"dmf" is the blockwise PyTorch path). TFLOP/s count 4 B H N^2 D for the forward, 2.5x that
for the backward and 3x for the JVP (six products per tile instead of two).

Rotary embedding rows (issue 15): provider "dmf_rope" is dmf_kernels.attention with
LightningDiT-style (N, D) tables, q and k rotated inside the kernels; "eager_rope" the math
path after rotating q and k with reference.rope. Against "dmf" they give rope's cost.
On CPU the extra shape B8 H12 N256 D64 is the one the issue's budget (fwd+jvp with rope at
most 10% slower than without) is measured at.

Mask and grouped-query rows (issues 22, 24): "dmf_keymask" a boolean key-padding mask
(B, 1, 1, N) with the last quarter of the keys masked (PixArt's encoder mask), "dmf_mask" a
random boolean (B, 1, N, N) mask (a quarter masked), "dmf_gqa" k and v with H / 4 heads
(enable_gqa; the bytes and FLOP counts are the plain rows', so compare times). Against "dmf" they give each feature's cost."""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import dmf_kernels as dk
from dmf_kernels import reference as ref

from .harness import Case, compiled, nbytes

SDPA_BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_math": SDPBackend.MATH}


def shapes(device, quick):
    """(B, H, N, D)"""
    if device == "cuda":
        return [(256, 12, 256, 64), (256, 16, 256, 72), (64, 12, 1024, 64), (64, 16, 1024, 72)]
    return [(1, 16, 256, 72), (1, 16, 1024, 72)] if quick else [(2, 12, 256, 64), (2, 16, 256, 72),
                                                               (1, 16, 1024, 72), (8, 12, 256, 64)]


def rope_tables(N, D, device):
    """LightningDiT-like tables: one angle per pair (interleaved), cos and sin of it."""
    theta = torch.rand(N, D // 2, device=device, dtype=torch.float32).mul_(6.28).repeat_interleave(2, -1)
    return theta.cos(), theta.sin()


def sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def cases(device, dtype, quick):
    for B, H, N, D in shapes(device, quick):
        shape = f"B{B} H{H} N{N} D{D}"
        dname = str(dtype).replace("torch.", "")
        fwd_flops = 4 * B * H * N * N * D

        def inputs(B=B, H=H, N=N, D=D):
            prim = [torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(3)]
            return prim, [torch.randn_like(t) for t in prim]

        def fwd(fn, inputs=inputs, flops=fwd_flops):
            def make():
                p, _ = inputs()

                def run():
                    with torch.no_grad():
                        return fn(*p)

                return run, 2 * nbytes(*p[:1]) + nbytes(*p[1:]), flops

            return make

        def bwd(fn, inputs=inputs, flops=fwd_flops):
            def make():
                p, _ = inputs()
                p = [t.requires_grad_() for t in p]
                o = fn(*p)
                g = torch.randn_like(o)
                return (lambda: torch.autograd.grad(o, p, g, retain_graph=True)), 3 * nbytes(*p) + nbytes(o, g), \
                    int(2.5 * flops)

            return make

        def jvp(fn, inputs=inputs, flops=fwd_flops, dual=False):
            def make():
                p, t = inputs()
                moved = 2 * nbytes(*p) + 2 * nbytes(p[0])

                def run():
                    with torch.no_grad():
                        return dk.jvp.attention(*p, *t) if dual else fn(tuple(p), tuple(t))

                return run, moved, 3 * flops

            return make

        func_jvp = lambda f: (lambda p, t: torch.func.jvp(f, p, t))  # noqa: E731
        fwd_providers = [("dmf", dk.attention)]
        if device == "cuda":
            fwd_providers += [(name, sdpa(b)) for name, b in SDPA_BACKENDS.items() if name != "sdpa_math"]
        else:
            fwd_providers += [("sdpa_flash", sdpa(SDPBackend.FLASH_ATTENTION))]
        fwd_providers += [("eager", ref.attention), ("compile", compiled(ref.attention))]
        cos, sin = rope_tables(N, D, device)
        dmf_rope = lambda q, k, v, c=cos, s=sin: dk.attention(q, k, v, None, c, s)  # noqa: E731
        eager_rope = lambda q, k, v, c=cos, s=sin: ref.attention(q, k, v, None, c, s)  # noqa: E731
        fwd_providers += [("dmf_rope", dmf_rope), ("eager_rope", eager_rope)]
        keymask = (torch.arange(N, device=device) < N - N // 4).expand(B, 1, 1, N)
        mask = torch.rand(B, 1, N, N, device=device) > 0.25
        dmf_keymask = lambda q, k, v, m=keymask: dk.attention(q, k, v, attn_mask=m)  # noqa: E731
        dmf_mask = lambda q, k, v, m=mask: dk.attention(q, k, v, attn_mask=m)  # noqa: E731
        dmf_gqa = lambda q, k, v: dk.attention(q, k, v, enable_gqa=True)  # noqa: E731

        def gqa_inputs(B=B, H=H, N=N, D=D):
            hkv = max(1, H // 4)
            prim = [torch.randn(B, h, N, D, device=device, dtype=dtype) for h in (H, hkv, hkv)]
            return prim, [torch.randn_like(t) for t in prim]

        features = [("dmf_keymask", dmf_keymask, inputs), ("dmf_mask", dmf_mask, inputs),
                    ("dmf_gqa", dmf_gqa, gqa_inputs)]
        for prov, fn in fwd_providers:
            yield Case("attention", "fwd", prov, shape, dname, fwd(fn))
        for prov, fn, inp in features:
            yield Case("attention", "fwd", prov, shape, dname, fwd(fn, inp))
        for prov, fn in fwd_providers:
            yield Case("attention", "bwd", prov, shape, dname, bwd(fn))
        for prov, fn, inp in features:
            yield Case("attention", "bwd", prov, shape, dname, bwd(fn, inp))
        for prov, m, g in (("dmf_keymask", keymask, False), ("dmf_mask", mask, False), ("dmf_gqa", None, True)):
            yield Case("attention", "fwd+jvp", prov, shape, dname, jvp(
                lambda p, t, m=m, g=g: dk.jvp.attention(*p, *t, attn_mask=m, enable_gqa=g),
                gqa_inputs if g else inputs))
        yield Case("attention", "fwd+jvp", "dmf", shape, dname, jvp(None, dual=True))
        yield Case("attention", "fwd+jvp", "dmf_rope", shape, dname,
                   jvp(lambda p, t, c=cos, s=sin: dk.jvp.attention(*p, *t, None, c, s)))
        yield Case("attention", "fwd+jvp", "eager_rope", shape, dname, jvp(func_jvp(eager_rope)))
        yield Case("attention", "fwd+jvp", "dmf_func_jvp", shape, dname, jvp(func_jvp(dk.attention)))
        yield Case("attention", "fwd+jvp", "eager", shape, dname, jvp(func_jvp(ref.attention)))
        yield Case("attention", "fwd+jvp", "compile", shape, dname,
                   jvp(compiled(lambda p, t: torch.func.jvp(ref.attention, p, t))))
