"""Loads dmf_kernels._C, which registers the C++ ops torch.ops.dmf_kernels.* (schemas in csrc/ops.cpp),
after checking that this CPU can run the code the build generated."""
import os

import torch


def _check_cpu_arch():
    # Read before importing _C: the build may use AVX2 instructions at load time.
    try:
        from ._build_config import CPU_ARCH
    except ImportError:  # built by CMake or by hand: baseline code
        CPU_ARCH = "none"
    if CPU_ARCH == "avx2" and os.path.exists("/proc/cpuinfo"):
        flags = set()
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
        missing = {"avx2", "fma", "f16c"} - flags
        if flags and missing:
            raise ImportError(
                f"dmf_kernels was built for AVX2 CPUs but this CPU lacks {sorted(missing)}; "
                "rebuild with DMF_KERNELS_CPU_ARCH=none pip install --no-build-isolation ."
            )


_check_cpu_arch()

from . import _C  # noqa: E402,F401  (registers the ops)

ops = torch.ops.dmf_kernels


def build_info() -> dict:
    """What the compiled extension contains: cpu, cuda, cuda_archs, versions, debug."""
    return dict(_C.build_info())


def triton_interpreter() -> bool:
    """Whether TRITON_INTERPRET=1 asks for the Triton kernels on the CPU (tests); read per call,
    since tests set it before importing triton."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
