"""Loads dmf_kernels._C, which registers the C++ ops torch.ops.dmf_kernels.* (schemas in csrc/ops.cpp),
after checking that this torch and this CPU can run what the build generated."""
import os

import torch


def _build_config():
    try:
        from . import _build_config as config
    except ImportError:  # built by CMake or by hand: baseline code, no recorded torch
        return {}
    return {k: v for k, v in vars(config).items() if k.isupper()}


def _minor(version):
    return tuple(version.split("+")[0].split(".")[:2])


def torch_mismatch(built_torch, built_cuda, torch_version, torch_cuda):
    """The one-line reason _C cannot load into this torch, or None. _C is bound to the C++ ABI of
    the torch it was compiled against, which holds within a minor release (2.14.0 / 2.14.1) and
    not across; CUDA kernels need a CUDA torch of the same CUDA major (libcudart.so.<major>)."""
    fix = ("install the dmf-kernels wheel built for it, or build from source against it: "
           "pip install --no-build-isolation dmf-kernels")
    if built_torch and _minor(built_torch) != _minor(torch_version):
        return f"dmf_kernels was built for torch {built_torch} but torch {torch_version} is installed: {fix}"
    if built_cuda and not torch_cuda:
        return (f"dmf_kernels was built with CUDA {built_cuda} kernels for torch {built_torch} but torch "
                f"{torch_version} is a CPU build: {fix}")
    if built_cuda and torch_cuda and built_cuda.split(".")[0] != torch_cuda.split(".")[0]:
        return (f"dmf_kernels was built for torch {built_torch} (CUDA {built_cuda}) but torch {torch_version} "
                f"uses CUDA {torch_cuda}: {fix}")
    return None


def _check_torch(config):
    # Before importing _C: against another torch its load fails with an undefined symbol at best.
    why = torch_mismatch(config.get("TORCH_VERSION"), config.get("CUDA_VERSION"), torch.__version__,
                         torch.version.cuda)
    if why:
        raise ImportError(why)


def _check_cpu_arch(config):
    # Read before importing _C: the build may use AVX2 instructions at load time.
    if config.get("CPU_ARCH", "none") == "avx2" and os.path.exists("/proc/cpuinfo"):
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


_check_torch(_build_config())
_check_cpu_arch(_build_config())


def _load_other_build(path):
    # DMF_KERNELS_C_LIB: another build of _C loaded in its place, e.g. make sanitize-cpu's ASan + UBSan
    # build (build-asan/), which must not replace the package's own
    import importlib.util
    import sys
    spec = importlib.util.spec_from_file_location(f"{__package__}._C", path)
    if spec is None:
        raise ImportError(f"DMF_KERNELS_C_LIB={path} is not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


if os.environ.get("DMF_KERNELS_C_LIB"):
    _C = _load_other_build(os.environ["DMF_KERNELS_C_LIB"])
else:
    from . import _C  # noqa: E402,F401  (registers the ops)

ops = torch.ops.dmf_kernels


def build_info() -> dict:
    """What the compiled extension contains: cpu, cuda, cuda_archs, versions, debug."""
    return dict(_C.build_info())


def triton_interpreter() -> bool:
    """Whether TRITON_INTERPRET=1 asks for the Triton kernels on the CPU (tests); read per call,
    since tests set it before importing triton."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
