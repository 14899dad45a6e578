"""Triton kernel of gelu_tanh's one-pass primal + tangent (see gelu.py for the formulas).

Elementwise and memory-bound: per element it reads a and a_dot and writes g and g_dot
(8 bytes in bf16), so the tile only needs to be wide enough for 16-byte vector accesses and
enough bytes in flight: 1024 elements per program, 4 warps = 8 elements per thread.
"""
import contextlib

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _tanh(z):
    # tanh(z) = 1 - 2 / (exp(2z) + 1): exact at both tails in fp32 (exp overflows to inf -> 1,
    # underflows to 0 -> -1), no libdevice dependency (the interpreter runs it too).
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit
def _gelu_tanh_jvp_kernel(a_ptr, ad_ptr, g_ptr, gd_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # n may exceed 2^31 (B * N * 4D at large batch)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ad = tl.load(ad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    k: tl.constexpr = 0.7978845608028654  # sqrt(2 / pi)
    c: tl.constexpr = 0.044715
    t = _tanh(k * (a + c * a * a * a))
    g = 0.5 * a * (1.0 + t)
    dg = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * k * (1.0 + 3.0 * c * a * a)
    tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(gd_ptr + offs, (dg * ad).to(gd_ptr.dtype.element_ty), mask=mask)


def gelu_tanh_jvp(a: torch.Tensor, a_dot: torch.Tensor):
    a, a_dot = a.contiguous(), a_dot.contiguous()
    g, g_dot = torch.empty_like(a), torch.empty_like(a)
    n = a.numel()
    if n:
        with torch.cuda.device(a.device) if a.is_cuda else contextlib.nullcontext():
            _gelu_tanh_jvp_kernel[(triton.cdiv(n, BLOCK),)](a, a_dot, g, g_dot, n, BLOCK=BLOCK, num_warps=4)
    return g, g_dot

