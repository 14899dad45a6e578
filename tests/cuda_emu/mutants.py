#!/usr/bin/env python3
"""Mutation check of the CUDA emulation harness: copies of csrc/ with one known GPU bug class
injected each must FAIL the emulated kernel tests. A mutant that survives means the harness
cannot see that bug class: this script then exits 1 (CI fails).

    python tests/cuda_emu/mutants.py                 # every mutant
    python tests/cuda_emu/mutants.py --only sync     # mutants whose name contains "sync"

Each mutant is an exact text replacement in one source file (it must match exactly once, so a
refactor that moves the code makes the mutant stale and fails loudly instead of testing
nothing). It counts as caught only when the run fails AND shows `expect` (wrong numbers, the
emulator's report, UBSan's report), so a crash for another reason is not taken for a catch.
`tests` narrows the pytest run to the cases that exercise the mutated kernel, only
to save time; `-x` stops at the first failure.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "csrc" / "emu" / "build.py"
TESTS = "tests/cuda_emu/test_launch_classes.py"


@dataclass
class Mutant:
    name: str
    bug: str
    file: str
    old: str
    new: str
    tests: str  # pytest -k expression
    expect: str  # regex the failure must show: the bug is caught for the right reason, not by a crash
    schedule: str = "priority:1"


MUTANTS = [
    Mutant("sync_removed", "the first __syncthreads of a block reduction removed: shared memory is "
           "overwritten while a slow warp still reads the previous sums",
           "csrc/cuda/cuda_common.cuh",
           "  __syncthreads();  // smem may still be read from the previous reduction\n", "",
           "adaln_modulate_class and team0", "kernel err|non-finite"),
    Mutant("second_sync_removed", "the __syncthreads between writing and reading the warp sums removed",
           "csrc/cuda/cuda_common.cuh",
           "    smem[32 + wid] = b;\n  }\n  __syncthreads();\n", "    smem[32 + wid] = b;\n  }\n",
           "rms_norm_class and team0", "kernel err|non-finite"),
    Mutant("mask_wrong_team", "a shuffle mask naming the first team of the warp instead of the caller's",
           "csrc/cuda/cuda_common.cuh",
           "((1u << TEAM) - 1u) << (lane & ~unsigned(TEAM - 1))", "((1u << TEAM) - 1u)",
           "rms_norm_class and (team8 or team16)", "is not in its mask"),
    Mutant("mask_whole_warp", "a whole-warp mask for a sub-warp team (names the lanes of teams that returned "
           "past the last row)",
           "csrc/cuda/cuda_common.cuh",
           "const unsigned mask = TEAM == 32 ? 0xffffffffu :", "const unsigned mask = true ? 0xffffffffu :",
           "rms_norm_class and (team8 or team16)", "which has exited"),
    Mutant("shuffle_width", "a shuffle width of half the team (the upper half's partial sums are never added)",
           "csrc/cuda/cuda_common.cuh",
           "v += __shfl_xor_sync(mask, v, o, TEAM);", "v += __shfl_xor_sync(mask, v, o, TEAM / 2);",
           "rms_norm_class", "kernel err|non-finite"),
    Mutant("column_bound_off_by_one", "an off-by-one column bound (one vector past the row end is read)",
           "csrc/cuda/rms_norm_kernels.cu",
           "    if (c < D) {\n      load_vec<T, VEC>(base + c, v[it]);", "    if (c <= D) {\n      load_vec<T, VEC>(base + c, v[it]);",
           "rms_norm_class", "kernel err|non-finite"),
    Mutant("alignment_check_dropped", "the 16-byte alignment check before vector loads dropped (misaligned "
           "16-byte accesses: UBSan's alignment check in the emulation build reports them)",
           "csrc/cuda/cuda_common.cuh",
           "    if (p != nullptr && !aligned16(p)) return false;\n", "",
           "misaligned", "misaligned address"),
    Mutant("team_row_index", "a wrong team/row index (blockDim.x for blockDim.y)",
           "csrc/cuda/cuda_common.cuh",
           "int64_t(blockIdx.x) * blockDim.y + threadIdx.y", "int64_t(blockIdx.x) * blockDim.x + threadIdx.y",
           "rms_norm_class", "kernel err|non-finite"),
    Mutant("idle_lanes_return", "lanes without columns return before the row reduction",
           "csrc/cuda/rms_norm_kernels.cu",
           "  A ss = 0, unused = 0;\n", "  if (int64_t(lane) * VEC >= D) return;\n  A ss = 0, unused = 0;\n",
           "rms_norm_class", "exited"),
    Mutant("accumulator_uninitialised", "a partial-sum accumulator never zeroed (register arrays are not "
           "initialised on a GPU)",
           "csrc/cuda/gated_residual_kernels.cu",
           "  for (int k = 0; k < VEC; ++k) acc[k] = A(0);\n", "  for (int k = 0; k < VEC; ++k) (void)0;\n",
           "gated_residual_tiles", "kernel err|non-finite"),
    Mutant("partial_group_dropped", "rows of a partial last parameter group never written (the grid sized "
           "by whole groups)",
           "csrc/cuda/gated_residual_kernels.cu",
           "const int64_t items = ceil_div(p.rows, p.rows_per_group) *", "const int64_t items = (p.rows / p.rows_per_group) *",
           "selftest", "FAIL gated_residual forward"),
    # norm_mod's RMS kind skips the mean's team reduction under a branch that must be uniform.
    Mutant("rms_skip_divergent", "the rms kind's skipped mean reduction made lane-dependent: a team reduction "
           "(barrier / shuffles) reached by some lanes of the team only",
           "csrc/cuda/norm_mod_kernels.cu",
           "  if (!rms) {  // uniform per launch", "  if (!rms || lane == 0) {  // uniform per launch",
           "rms_adaln_modulate_class and (team16 or team0)",
           "deadlock|different __syncthreads|is not in its mask|exited|kernel err|non-finite"),
    # swiglu, rope
    Mutant("swiglu_half_index", "swiglu's second half read one element early (b = x[H - 1 + j]: an off-by-one "
           "half index)",
           "csrc/cuda/swiglu_kernels.cu",
           "  load_vec<T, VEC>(xa + H, b);\n#pragma unroll\n  for (int k = 0; k < VEC; ++k) s[k] = sigmoid(a[k]);",
           "  load_vec<T, VEC>(xa + H - 1, b);\n#pragma unroll\n  for (int k = 0; k < VEC; ++k) s[k] = sigmoid(a[k]);",
           "swiglu_class", "kernel err|non-finite|misaligned address"),
    Mutant("swiglu_flat_index", "swiglu's flat thread index split with H instead of H / VEC vectors per row "
           "(rows past the first VEC-th never written)",
           "csrc/cuda/swiglu_kernels.cu",
           "  const int64_t H = p.dim, nvec = H / VEC;  // VEC divides H (vec_ok) or is 1\n",
           "  const int64_t H = p.dim, nvec = H;\n",
           "swiglu_class", "kernel err|non-finite"),
    Mutant("rope_pair_partner", "rope's pair partner taken as the next element (k + 1) % VEC instead of k ^ 1",
           "csrc/cuda/rope_kernels.cu",
           "    const int q = k ^ 1;\n", "    const int q = (k + 1) % VEC;\n",
           "rope_class", "kernel err|non-finite"),
    Mutant("rope_table_column", "rope's table offset without the thread's column (every thread reads the first "
           "vector of its position's cos / sin row)",
           "csrc/cuda/rope_kernels.cu",
           "  const int64_t tab = (r % p.seq) * D + c;\n", "  const int64_t tab = (r % p.seq) * D;\n",
           "rope_class", "kernel err|non-finite"),
]


def apply(m: Mutant, tree: Path) -> None:
    path = tree / m.file
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(f"mutant {m.name}: the text to replace occurs {count} times in {m.file} (stale mutant)")
    path.write_text(text.replace(m.old, m.new))


def run_mutant(m: Mutant, base_objs: Path, work: Path, python: str) -> tuple[bool, str, float]:
    t0 = time.time()
    tree = work / m.name
    shutil.copytree(REPO / "csrc", tree / "csrc")  # copy2: mtimes kept, so unchanged objects are reused
    out = tree / "build"
    shutil.copytree(base_objs, out)
    apply(m, tree)
    b = subprocess.run([python, str(BUILD), "--variant", "mutant", "--src", str(tree / "csrc"), "--out", str(out),
                        "--selftest", "--jobs", "1"], capture_output=True, text=True)
    if b.returncode != 0:  # a mutant that does not compile proves nothing
        return False, f"did not build:\n{b.stdout}{b.stderr}", time.time() - t0
    if m.tests == "selftest":
        r = subprocess.run([str(out / "emu_selftest")], capture_output=True, text=True, timeout=600)
    else:
        env = dict(os.environ, DMF_KERNELS_CUDA_EMU_LIB=str(out / "libdmf_cuda_emu.so"),
                   DMF_KERNELS_CUDA_EMU=m.schedule)
        # --capture=sys: a sanitizer report (fd 2, then exit) stays visible
        r = subprocess.run([python, "-m", "pytest", TESTS, "-x", "-q", "-p", "no:cacheprovider", "--capture=sys",
                            "-k", m.tests],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    output = r.stdout + r.stderr
    caught = r.returncode != 0 and re.search(m.expect, output) is not None
    text = output.splitlines()
    lines = [ln for ln in text if "runtime error" in ln] + \
        [ln for ln in text if ln.startswith("E ") or ln.startswith("FAIL")]
    return caught, (lines[0] if lines else "\n".join(text[-3:])), time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="run the mutants whose name contains this")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="mutants built and tested at once")
    args = ap.parse_args(argv)
    selected = [m for m in MUTANTS if args.only in m.name]
    base = REPO / "build-emu" / "mutant"
    b = subprocess.run([args.python, str(BUILD), "--variant", "mutant", "--out", str(base), "--selftest"],
                       capture_output=True, text=True)
    if b.returncode != 0:
        sys.stderr.write(b.stdout + b.stderr)
        return 1
    survivors = []
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="dmf-mutants-") as tmp, \
            ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = pool.map(lambda m: (m, *run_mutant(m, base, Path(tmp), args.python)), selected)
        for m, caught, detail, secs in results:
            print(f"{'caught  ' if caught else 'SURVIVED'} {m.name:24s} {secs:5.1f}s  {m.bug}\n    -> {detail[:300]}",
                  flush=True)
            if not caught:
                survivors.append(m.name)
    print(f"wall time {time.time() - t0:.0f} s")
    print(f"mutants: {len(selected) - len(survivors)} of {len(selected)} caught")
    if survivors:
        print(f"SURVIVED (the emulated tests cannot see these bugs): {', '.join(survivors)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
