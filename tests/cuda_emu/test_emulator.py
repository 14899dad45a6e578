"""The CUDA emulation itself: emu_selftest*.cpp (conversions, shuffle semantics, every bug class
it must report, schedules, launcher edge cases) built from this tree and run as a program."""
import os
import subprocess
from pathlib import Path

from dmf_kernels import cuda_emu


def test_emulator_selftest():
    exe = Path(os.environ.get("DMF_KERNELS_CUDA_EMU_SELFTEST", cuda_emu.DEFAULT_LIBRARY.parent / "emu_selftest"))
    assert exe.exists(), f"{exe} missing: build it with `make cuda-emu` (python csrc/emu/build.py --selftest)"
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 failed" in r.stdout and "FAIL" not in r.stdout, r.stdout
