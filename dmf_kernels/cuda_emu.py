"""Run the CUDA kernels (csrc/cuda/*.cu) on CPU tensors, under the SIMT emulation of csrc/emu.

For testing without a GPU: the library built by ``csrc/emu/build.py`` (``make test-cuda-emu``
builds it) holds the real ``.cu`` kernels compiled by g++ against the emulation headers. Once
enabled, every C++ op (``adaln_modulate``, ``gated_residual_adaln``, ``gated_residual``,
``rms_norm``: forward, backward, JVP) called on CPU tensors runs those CUDA kernels instead of
the CPU kernels, thread by thread under the chosen schedule; an emulator report (a barrier
some threads never reach, a shuffle whose mask names an exited lane, ...) raises a
RuntimeError that says where. Attention and GELU are Triton/PyTorch code and are unaffected.

    from dmf_kernels import cuda_emu
    with cuda_emu.enabled(schedule="priority", seed=3):
        out = dmf_kernels.adaln_modulate(x, shift, scale)   # the CUDA kernel, on the CPU

Schedules: ``round_robin`` (threads in index order, each until its next sync point),
``reverse``, ``random`` (a seeded random ready thread at every switch) and ``priority`` (a
seeded random priority per thread; the highest-priority ready thread runs).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

from . import _C  # the package __init__ loaded it (after its CPU check)

SCHEDULES = {"round_robin": 0, "reverse": 1, "random": 2, "priority": 3}
_REPO = Path(__file__).resolve().parent.parent
DEFAULT_LIBRARY = _REPO / "build-emu" / "release" / "libdmf_cuda_emu.so"

_lib: ctypes.CDLL | None = None
_lib_path: Path | None = None
_active: str | None = None


def library_path() -> Path:
    """The emulation library: ``$DMF_KERNELS_CUDA_EMU_LIB``, else build-emu/release in the source tree."""
    return Path(os.environ.get("DMF_KERNELS_CUDA_EMU_LIB", DEFAULT_LIBRARY))


def newer_source(lib: Path) -> Path | None:
    """In a source checkout, a source of the emulation library (csrc/emu/build.py's rule: every header
    under csrc/, the .cu kernels, emu_backend.cpp) newer than `lib`, else None. Seen: after params.h
    lost a field, a library left from before segfaulted in rms_norm_fwd_kernel while _C was current."""
    src = _REPO / "csrc"
    if not (src / "emu").is_dir():
        return None
    built = Path(lib).stat().st_mtime
    sources = [*src.rglob("*.h"), *src.rglob("*.cuh"), *(src / "cuda").glob("*.cu"), src / "emu" / "emu_backend.cpp"]
    return next((p for p in sources if p.stat().st_mtime > built), None)


def load(path: str | os.PathLike | None = None) -> ctypes.CDLL:
    """Load the emulation library once; later calls without a path return it (a second, different
    path is an error: one library per process)."""
    global _lib, _lib_path
    if path is None and _lib is not None:
        return _lib
    path = Path(path) if path is not None else library_path()
    if _lib is not None:
        if path.resolve() != _lib_path:
            raise RuntimeError(f"dmf_kernels.cuda_emu: {_lib_path} is already loaded; cannot also load {path}")
        return _lib
    if not path.exists():
        raise FileNotFoundError(
            f"dmf_kernels.cuda_emu: no emulation library at {path}; build it with "
            "`make cuda-emu` (or `python csrc/emu/build.py`)")
    stale = newer_source(path)
    if stale is not None:
        raise RuntimeError(
            f"dmf_kernels.cuda_emu: {path} is older than {stale}: rebuild it with `make cuda-emu` (a library built "
            "from another params.h reads the launch parameters at the wrong offsets)")
    lib = ctypes.CDLL(str(path))
    lib.dmf_emu_backend.restype = ctypes.c_void_p
    lib.dmf_emu_set_schedule.argtypes = [ctypes.c_int, ctypes.c_ulonglong]
    lib.dmf_emu_set_schedule.restype = ctypes.c_int
    lib.dmf_emu_launch_count.restype = ctypes.c_ulonglong
    lib.dmf_emu_row_launch.argtypes = [ctypes.c_longlong, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.dmf_emu_row_launch.restype = None
    _lib, _lib_path = lib, path.resolve()
    return lib


def set_schedule(schedule: str = "round_robin", seed: int = 0) -> None:
    """Choose the thread schedule of the next launches (deterministic for a given seed)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"dmf_kernels.cuda_emu: schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"dmf_kernels.cuda_emu: seed must be in [0, 2**64), got {seed}")
    load().dmf_emu_set_schedule(SCHEDULES[schedule], int(seed))


def enable(schedule: str = "round_robin", seed: int = 0, path: str | os.PathLike | None = None) -> None:
    """From now on, C++ ops on CPU tensors run the CUDA kernels under the emulation."""
    global _active
    lib = load(path)
    set_schedule(schedule, seed)
    _C._set_cpu_backend(lib.dmf_emu_backend())
    _active = f"{schedule}:{seed}"


def disable() -> None:
    """Back to the CPU kernels."""
    global _active
    _C._set_cpu_backend(0)
    _active = None


def active() -> str | None:
    """``"schedule:seed"`` while enabled, else None."""
    return _active


@contextlib.contextmanager
def enabled(schedule: str = "round_robin", seed: int = 0, path: str | os.PathLike | None = None):
    """Context manager form of enable()/disable(); restores the previous state."""
    previous = _active
    enable(schedule, seed, path)
    try:
        yield
    finally:
        if previous is None:
            disable()
        else:
            name, prev_seed = previous.split(":")
            enable(name, int(prev_seed), path)


def launch_count() -> int:
    """Kernel launches the emulation has run (a test can check the emulated kernels ran)."""
    return int(load().dmf_emu_launch_count())


def row_launch(dim: int, vec: int) -> tuple[int, int, int, int]:
    """The launch shape the CUDA launchers pick for rows of ``dim`` elements read ``vec`` at a
    time (``row_launch`` of cuda_common.cuh, compiled): (team, ept, threads, rows_per_block),
    team 0 meaning one block per row."""
    out = (ctypes.c_int * 4)()
    load().dmf_emu_row_launch(int(dim), int(vec), out)
    return tuple(out)
