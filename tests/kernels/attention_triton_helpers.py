"""Shared by the Triton attention tests (test_attention_triton.py, test_attention_triton_rope.py):
the tdev fixture, inputs, the GPU's tile shapes and a launch recorder."""
import os

import pytest
import torch

from conftest import rand

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@pytest.fixture


def tdev(device):
    if device == "cpu" and not INTERPRET:
        pytest.skip("Triton kernels on CPU need TRITON_INTERPRET=1 (make test runs this file with it)")
    from dmf_kernels import attention_triton

    attention_triton.POISON_OUTPUTS = True
    yield device
    attention_triton.POISON_OUTPUTS = False


def qkv(B, H, NQ, NK, D, device, seed=0, scale=1.0):
    return [rand(B, H, n, D, device=device, seed=seed + i, scale=scale) for i, n in enumerate((NQ, NK, NK))]


def _gpu_default_tiles(rope=False):
    """Each distinct (kind, BLOCK_M, BLOCK_N) the launchers pick on sm_80 / sm_90a, with a head
    dim that picks it: the interpreter checks the tile shapes a GPU will run."""
    from dmf_kernels import attention_triton as at

    seen = {}
    for cap in ((8, 0), (9, 0)):
        for D in (64, 72, 80, 96, 128):
            for kind in ("fwd", "jvp", "bwd_dkdv", "bwd_dq"):
                bm, bn, _ = at._default_blocks(kind, D, False, cap, rope)
                seen.setdefault((kind, bm, bn), D)
    return [(kind, bm, bn, D) for (kind, bm, bn), D in sorted(seen.items())]


class _Recorder:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((grid, kwargs))


def _record_launches(monkeypatch, at):
    log = []
    for name in ("_attn_fwd_kernel", "_attn_jvp_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel",
                 "_attn_bwd_dq_kernel"):
        monkeypatch.setattr(at, name, _Recorder(log))
    return log


def ref_attention(q, k, v, scale=None, rope_cos=None, rope_sin=None, attn_mask=None, enable_gqa=False):
    """The float64 eager reference of every attention feature, written out (SDPA's math
    formulation): softmax(q k^T * scale + bias) v, q and k rotated first with tables, kv head
    h // g for query head h under GQA (k, v repeated), bias 0 / -inf for a boolean mask and
    the mask itself for a float one; a row whose bias is -inf everywhere (fully masked) is
    zero by design (SDPA gives NaN), with zero derivatives: its scores are replaced before
    the softmax, so no NaN reaches the backward either."""
    from dmf_kernels import reference as ref

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if rope_cos is not None:
        q, k = ref.rope(q, rope_cos, rope_sin), ref.rope(k, rope_cos, rope_sin)
    if enable_gqa and k.shape[1] != q.shape[1]:
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if attn_mask is None:
        return torch.softmax(s, -1) @ v
    bias = torch.where(attn_mask, 0.0, float("-inf")).to(s.dtype) if attn_mask.dtype == torch.bool \
        else attn_mask.to(s.dtype)
    dead = (bias == float("-inf")).all(-1, keepdim=True).expand(s.shape)
    s = torch.where(dead, 0.0, s + bias)
    return torch.where(dead, 0.0, torch.softmax(s, -1)) @ v


def assert_nan_close(a, r, what=""):
    """The same NaN pattern as the float64 reference r, the other elements close (a loose
    bound by dtype: these tests are about edges, test_attention*.py bound the precision)."""
    assert a.shape == r.shape, f"{what}: shape {tuple(a.shape)}, expected {tuple(r.shape)}"
    an, rn = a.isnan(), r.isnan()
    assert torch.equal(an, rn), f"{what}: NaN at {an.nonzero().tolist()[:8]}..., reference {rn.nonzero().tolist()[:8]}..."
    tol = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 3e-2}[a.dtype]
    scale = max(1.0, r[~rn].abs().max().item()) if (~rn).any() else 1.0
    torch.testing.assert_close(a[~an].double(), r[~rn], rtol=0, atol=tol * scale, msg=what)
