"""Shared by the Triton attention tests (test_attention_triton.py, test_attention_triton_rope.py):
the tdev fixture, inputs, the GPU's tile shapes and a launch recorder."""
import os

import pytest

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
