"""Build configuration: what setup.py decides, checked without compiling."""
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def setup_py(*args, **env):
    return subprocess.run([sys.executable, "setup.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_force_cuda_fails_with_a_reason_when_cuda_cannot_be_built():
    r = setup_py("--version", DMF_KERNELS_FORCE_CUDA="1")
    if torch.version.cuda is None:
        assert r.returncode != 0
        assert "torch" in r.stderr and "CPU build" in r.stderr, r.stderr
    else:  # a CUDA torch: the forced build is possible iff a toolkit is found
        assert r.returncode == 0 or "no CUDA toolkit" in r.stderr, r.stderr


def test_bad_cpu_arch_is_rejected():
    r = setup_py("--version", DMF_KERNELS_CPU_ARCH="sse9")
    assert r.returncode != 0 and "DMF_KERNELS_CPU_ARCH must be avx2, native or none" in r.stderr
