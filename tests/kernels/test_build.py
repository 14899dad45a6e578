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


# ---------------------------------------------------------------- the built extension

# Set by `make cuda-build` / `make test-cu` to the archs the wheel was built for: the build must then
# have CUDA kernels for exactly these; unset (the CPU venv), the build must be what it says it is.
EXPECT_ARCHS = os.environ.get("DMF_KERNELS_EXPECT_CUDA_ARCHS")


def test_build_info_matches_this_torch_and_the_requested_archs():
    import dmf_kernels
    from dmf_kernels import _build_config

    info = dmf_kernels.build_info()
    assert info["torch_version"] == torch.__version__.split("+")[0], info
    assert _build_config.TORCH_VERSION == torch.__version__
    if EXPECT_ARCHS is not None:
        assert info["cuda"], f"a CUDA build was expected (archs {EXPECT_ARCHS}) but _C has no CUDA kernels: {info}"
        assert info["cuda_archs"] == EXPECT_ARCHS, info
    if info["cuda"]:
        assert info["cuda_version"] == torch.version.cuda == _build_config.CUDA_VERSION, info
    else:
        assert info["cuda_archs"] == info["cuda_version"] == "" and _build_config.CUDA_VERSION is None, info


def test_every_raw_op_has_a_kernel_on_each_device_the_build_has():
    import dmf_kernels

    cuda = dmf_kernels.build_info()["cuda"]
    # RAW_OPS is declared in Python; every op C++ registered a CPU kernel for must be in it (the
    # Triton / PyTorch ops have a CompositeExplicitAutograd kernel instead).
    cpp = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("dmf_kernels::")
           and torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU")}
    assert cpp == set(dmf_kernels.RAW_OPS) and len(cpp) >= 24, sorted(cpp ^ set(dmf_kernels.RAW_OPS))
    for op in dmf_kernels.RAW_OPS:
        name = f"dmf_kernels::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), f"{name} has no CPU kernel"
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
        assert has_cuda == cuda, f"{name}: CUDA kernel registered: {has_cuda}, build_info cuda: {cuda}"


def test_torch_mismatch_names_both_versions():
    from dmf_kernels._extension import torch_mismatch

    assert torch_mismatch("2.14.1+cu130", "13.0", "2.14.0+cu130", "13.0") is None  # same minor: same ABI
    assert torch_mismatch("2.13.0+cpu", None, "2.13.0+cu130", "13.0") is None  # CPU kernels in a CUDA torch
    assert torch_mismatch(None, None, "2.14.1", None) is None  # CMake build: nothing recorded
    why = torch_mismatch("2.14.1+cu130", "13.0", "2.13.0+cpu", None)
    assert "built for torch 2.14.1+cu130 but torch 2.13.0+cpu is installed" in why and "\n" not in why
    assert "is a CPU build" in torch_mismatch("2.14.1+cu130", "13.0", "2.14.1+cpu", None)
    assert "uses CUDA 12.8" in torch_mismatch("2.14.1+cu130", "13.0", "2.14.1+cu128", "12.8")


def test_a_build_for_another_torch_refuses_to_import_with_one_line(tmp_path):
    # The real package with only its recorded torch changed, imported in a fresh process: the
    # check must run before _C loads (which would fail with an undefined symbol, or worse).
    import shutil

    import dmf_kernels

    pkg = tmp_path / "dmf_kernels"
    shutil.copytree(Path(dmf_kernels.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    config = (pkg / "_build_config.py").read_text()
    (pkg / "_build_config.py").write_text(config.replace(f"TORCH_VERSION = {torch.__version__!r}",
                                                         "TORCH_VERSION = '2.3.1'"))
    r = subprocess.run([sys.executable, "-c", "import dmf_kernels"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == (
        f"ImportError: dmf_kernels was built for torch 2.3.1 but torch {torch.__version__} is installed: "
        "install the dmf-kernels wheel built for it, or build from source against it: "
        "pip install --no-build-isolation dmf-kernels"), r.stderr
