#!/usr/bin/env python3
"""Build the emulated-CUDA test library: every .cu of csrc/sources.txt plus emu_backend.cpp,
compiled by g++ as C++17 against the stand-in CUDA headers of csrc/emu, linked into
<out>/libdmf_cuda_emu.so (loaded by dmf_kernels.cuda_emu).

    python csrc/emu/build.py                       # build-emu/release
    python csrc/emu/build.py --variant sanitize    # build-emu/sanitize: ASan + UBSan
    python csrc/emu/build.py --src /tmp/mutant/csrc --out /tmp/mutant/lib   # another source tree
    python csrc/emu/build.py --selftest            # also <out>/emu_selftest (tests/cuda_emu/emu_selftest*.cpp)

Variants:
- release: -O2, plus UBSan's alignment check (a misaligned 16-byte vector access is undefined
  behaviour in C++ and a "misaligned address" fault on a GPU; x86 would silently allow it).
  The UBSan runtime loads as a normal shared library, no preload needed.
- mutant: -O0 with the alignment check, for the mutation check (quick to compile).
- sanitize: -O1 -g with AddressSanitizer and all of UBSan, aborting at the first report. Python
  must preload the ASan runtime: LD_PRELOAD=$(g++ -print-file-name=libasan.so)
  ASAN_OPTIONS=detect_leaks=0 (the tests' make target does this).
Objects are rebuilt when a source or header of the tree is newer; compiles run in parallel.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# -ftrivial-auto-var-init=pattern: uninitialised locals (a kernel's register accumulators) start
# as 0xFE bytes, not as whatever a reused fiber stack holds (often zeros, which would hide them)
COMMON = ["-std=c++17", "-fPIC", "-fno-strict-aliasing", "-ftrivial-auto-var-init=pattern", "-Wall", "-Wextra",
          "-Wno-unknown-pragmas", "-Wno-unused-parameter"]
VARIANTS = {
    "release": ["-O2", "-fsanitize=alignment", "-fno-sanitize-recover=alignment"],
    "sanitize": ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                 "-fno-sanitize-recover=all"],
    # tests/cuda_emu/mutants.py: compiles 5x faster than -O2 (norm_mod 2 s vs 11 s), and a
    # mutant's tests stop at the first failure
    "mutant": ["-O0", "-fsanitize=alignment", "-fno-sanitize-recover=alignment"],
}
LIB_NAME = "libdmf_cuda_emu.so"


def cuda_sources(src: Path) -> list[Path]:
    out = []
    for line in (src / "sources.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and not parts[0].startswith("#") and parts[0] == "cuda" and parts[1].endswith(".cu"):
            out.append(src.parent / parts[1])
    if not out:
        raise SystemExit(f"build.py: no .cu files listed in {src / 'sources.txt'}")
    return out


def headers(src: Path) -> list[Path]:
    return [p for p in src.rglob("*") if p.suffix in (".h", ".cuh")]


def compile_one(cxx: str, flags: list[str], src: Path, source: Path, obj: Path, newest_header: float) -> str | None:
    if obj.exists() and obj.stat().st_mtime >= max(source.stat().st_mtime, newest_header):
        return None
    cmd = [cxx, *COMMON, *flags, f"-I{src / 'emu'}", "-x", "c++", "-c", str(source), "-o", str(obj)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}"
    return None


def check_tls(lib: Path) -> None:
    """Every TLS symbol must be a function-local static (a kernel's __shared__ variable, or the
    emulator's anchor): the emulator fills the whole TLS block with NaN bits before each block,
    which would corrupt any other thread_local state in the library."""
    r = subprocess.run(["readelf", "-sW", str(lib)], capture_output=True, text=True)
    if r.returncode != 0:
        return  # no readelf: nothing to check with
    bad = [f.split()[-1] for f in r.stdout.splitlines() if " TLS " in f and not f.split()[-1].startswith("_ZZ")]
    if bad:
        raise SystemExit(f"build.py: {lib} has thread_local state besides __shared__ variables: {bad[:5]}")


# the emulator's self-test program: its sources and their shared header
SELFTEST_DIR = REPO / "tests" / "cuda_emu"
SELFTEST = [SELFTEST_DIR / n for n in ("emu_selftest.cpp", "emu_selftest_sync.cpp", "emu_selftest_launchers.cpp")]
SELFTEST_HEADER = SELFTEST_DIR / "emu_selftest.h"


def build(variant: str, src: Path, out: Path, cxx: str, jobs: int, selftest: bool = False) -> Path:
    flags = VARIANTS[variant]
    out.mkdir(parents=True, exist_ok=True)
    kernel_sources = cuda_sources(src)
    sources = [*kernel_sources, src / "emu" / "emu_backend.cpp"] + (SELFTEST if selftest else [])
    newest = max(p.stat().st_mtime for p in [*headers(src), Path(__file__)] + ([SELFTEST_HEADER] if selftest else []))
    objs = [out / (s.name + ".o") for s in sources]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        errors = [e for e in pool.map(lambda so: compile_one(cxx, flags, src, *so, newest), zip(sources, objs)) if e]
    if errors:
        sys.stderr.write("\n".join(errors))
        raise SystemExit(f"build.py: {len(errors)} of {len(sources)} compiles failed")
    lib = out / LIB_NAME
    if not lib.exists() or lib.stat().st_mtime < max(o.stat().st_mtime for o in objs):
        cmd = [cxx, "-shared", *flags, "-o", str(lib), *map(str, objs), "-ldl"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"build.py: link failed\n$ {' '.join(cmd)}\n{r.stderr}")
    check_tls(lib)
    if selftest:
        exe = out / "emu_selftest"
        kernel_objs = [out / (s.name + ".o") for s in [*kernel_sources, *SELFTEST]]
        if not exe.exists() or exe.stat().st_mtime < max(o.stat().st_mtime for o in kernel_objs):
            cmd = [cxx, *flags, "-o", str(exe), *map(str, kernel_objs), "-ldl"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"build.py: selftest link failed\n$ {' '.join(cmd)}\n{r.stderr}")
    return lib


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="release")
    ap.add_argument("--src", type=Path, default=REPO / "csrc", help="the csrc folder to build from")
    ap.add_argument("--out", type=Path, default=None, help="default: build-emu/<variant>")
    ap.add_argument("--cxx", default=os.environ.get("CXX", "g++"))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--selftest", action="store_true", help="also build <out>/emu_selftest")
    args = ap.parse_args(argv)
    out = args.out or REPO / "build-emu" / args.variant
    lib = build(args.variant, args.src.resolve(), out, args.cxx, args.jobs, args.selftest)
    print(lib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
