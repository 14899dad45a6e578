"""Builds dmf_kernels and its compiled extension dmf_kernels._C against the installed torch.

    pip install --no-build-isolation .        # or -e . for development

Environment switches:
    DMF_KERNELS_SKIP_CUDA=1    build the CPU kernels only
    DMF_KERNELS_FORCE_CUDA=1   build the CUDA kernels even if torch is a CPU build (needs nvcc);
                               the result then only loads against a CUDA torch
    TORCH_CUDA_ARCH_LIST       CUDA archs, default "8.0;9.0a" (A100, H100/H200)
    DEBUG=1                    -O0 -g, assertions on
    MAX_JOBS                   parallel compile jobs (ninja)
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # pragma: no cover - only hit by isolated builds
    sys.exit(
        "dmf_kernels builds against an installed torch: install torch first, then "
        f"`pip install --no-build-isolation .` ({e})"
    )

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;9.0a"


def flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def read_sources():
    kinds = {"cpu": [], "cuda": []}
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            kind, path = line.split()
            kinds[kind].append(path)
    return kinds


def find_cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home is None and shutil.which("nvcc"):
        home = str(Path(shutil.which("nvcc")).resolve().parent.parent)
    if home is None and Path("/usr/local/cuda/bin/nvcc").exists():
        home = "/usr/local/cuda"
    return home


def want_cuda():
    if flag("DMF_KERNELS_SKIP_CUDA"):
        return False
    has_nvcc = find_cuda_home() is not None
    if flag("DMF_KERNELS_FORCE_CUDA"):
        if not has_nvcc:
            sys.exit("DMF_KERNELS_FORCE_CUDA=1 but no nvcc was found (set CUDA_HOME)")
        return True
    # Decided from the toolchain and the torch build, not torch.cuda.is_available():
    # a GPU-less build machine still builds the CUDA kernels for a CUDA torch.
    return has_nvcc and torch.version.cuda is not None


def extension():
    sources = read_sources()
    debug = flag("DEBUG")
    cuda = want_cuda()
    opt = ["-O0", "-g", "-UNDEBUG"] if debug else ["-O3", "-DNDEBUG"]
    cxx = opt + ["-std=c++17", "-fopenmp", "-DDMF_BUILD_TOOL=\"setuptools\""]
    files = sources["cpu"]
    if not cuda:
        return CppExtension(
            "dmf_kernels._C", files, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    cuda_version = torch.version.cuda or ""
    cxx += [f'-DDMF_CUDA_ARCHS="{archs}"', f'-DDMF_CUDA_VERSION="{cuda_version}"', "-DDMF_WITH_CUDA"]
    nvcc = opt + ["-std=c++17", "-lineinfo"]
    if debug:
        nvcc += ["-G"]
    return CUDAExtension(
        "dmf_kernels._C",
        files + sources["cuda"],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="dmf-kernels",
    version="0.1.0",
    description="Fused CUDA/Triton kernels for forward-mode JVP through diffusion transformers (Decoupled MeanFlow)",
    packages=find_packages(include=["dmf_kernels", "dmf_kernels.*"]) + ["dmf"],
    package_dir={"dmf": "python/dmf"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton"], "bench": ["matplotlib"], "test": ["pytest", "pytest-benchmark"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
