"""The CUDA emulation itself: emu_selftest*.cpp (conversions, shuffle semantics, every bug class
it must report, schedules, launcher edge cases) built from this tree and run as a program."""
import os
import subprocess
import sys
from pathlib import Path

from dmf_kernels import cuda_emu


def test_emulator_selftest():
    exe = Path(os.environ.get("DMF_KERNELS_CUDA_EMU_SELFTEST", cuda_emu.DEFAULT_LIBRARY.parent / "emu_selftest"))
    assert exe.exists(), f"{exe} missing: build it with `make cuda-emu` (python csrc/emu/build.py --selftest)"
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 failed" in r.stdout and "FAIL" not in r.stdout, r.stdout


def test_stale_library_is_refused(tmp_path):
    """A library older than a source it is built from (params.h, a kernel) is refused with the
    command that rebuilds it, before it is loaded: one built from another params.h reads the launch
    parameters at the wrong offsets (it segfaulted)."""
    lib = tmp_path / "libdmf_cuda_emu.so"
    lib.write_bytes(b"not a library")
    os.utime(lib, (0, 0))
    assert cuda_emu.newer_source(lib) is not None
    code = "from dmf_kernels import cuda_emu; import sys; cuda_emu.load(sys.argv[1])"
    r = subprocess.run([sys.executable, "-c", code, str(lib)], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, DMF_KERNELS_CUDA_EMU=""))
    assert r.returncode != 0 and "older than" in r.stderr and "make cuda-emu" in r.stderr, r.stderr[-2000:]
    built = cuda_emu.library_path()
    assert cuda_emu.newer_source(built) is None, f"{built} is stale: make cuda-emu"
