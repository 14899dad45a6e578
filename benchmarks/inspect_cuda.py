"""The CUDA side of the machine-code inspection (inspect_kernels.py): nvcc -ptx and ptxas -v
of every .cu in csrc/sources.txt, and the instantiations the adaLN-family launchers pick
(row_launch, a mirror of csrc/cuda/cuda_common.cuh) with their occupancy."""
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from inspect_common import REF_ROWS, ROOT, _ptx_stats, _ptxas


def cuda_sources():
    srcs = []
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "cuda" and parts[1].endswith(".cu"):
            srcs.append(parts[1])
    return srcs


def _demangle(names):
    r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, r.stdout.splitlines())) if r.returncode == 0 else {n: n for n in names}


def compile_cuda(src, arch):
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    with tempfile.TemporaryDirectory() as d:
        ptxf = Path(d) / "k.ptx"
        comp = arch.removeprefix("sm_")
        r = subprocess.run([nvcc, "-std=c++17", "-O3", "-ptx", f"-arch=compute_{comp}", str(ROOT / src), "-o",
                            str(ptxf)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"nvcc {src} {arch}: {r.stderr[-2000:]}")
        ptx = ptxf.read_text()
    ptxas = shutil.which("ptxas", path=str(Path(nvcc).resolve().parent)) or shutil.which("ptxas")
    regs = _ptxas(ptx, arch, ptxas)
    # split the PTX per entry for the instruction counts
    bodies = {}
    for m in re.finditer(r"\.entry\s+(\S+?)\(", ptx):
        start = m.start()
        end = ptx.find("\n}", start)
        bodies[m.group(1)] = ptx[start:end]
    names = _demangle(list(regs))
    rows = []
    for mangled, info in regs.items():
        rows.append(dict(kernel=_short(names[mangled]), src=Path(src).name, **info,
                         **_ptx_stats(bodies.get(mangled, ""))))
    return rows


def _short(demangled):
    # "void dmf::cuda::(anonymous namespace)::norm_mod_bwd_kernel<__nv_bfloat16, 8, 0, 16>(dmf::...)":
    # <storage type, VEC, TEAM lanes (0: one block per row), EPT>
    s = demangled.removeprefix("void ").replace("(anonymous namespace)::", "").replace("dmf::cuda::", "")
    s = re.sub(r"\([^()]*\)$", "", s)
    return s.replace("__nv_bfloat16", "bf16").replace("__half", "fp16").replace("float", "fp32") \
        .replace("double", "fp64")


def row_launch(dim, vec):
    """(team lanes: 8/16/32, or 0 for one block per row; EPT; threads per team; teams per
    block): mirrors row_launch() in csrc/cuda/cuda_common.cuh (a drift shows up as a missing
    hot instantiation in the gate)."""
    ept = lambda per: 8 if per <= 8 else 16 if per <= 16 else 32  # noqa: E731
    nvec = -(-dim // vec)
    if nvec <= 32 * 4 and nvec * vec <= 32 * 16:
        team = 8 if nvec <= 8 else 16 if nvec <= 16 else 32
        return team, ept(-(-nvec // team) * vec), team, 128 // team
    threads = min(-(-nvec // 32) * 32, 512)
    return 0, ept(-(-nvec // threads) * vec), threads, 1


CHUNK_ROWS = 32  # rows per partial sum of a parameter gradient (kChunkRows, csrc/ops.cpp)
SMS = {"sm_90a": 132, "sm_80": 108, "sm_100a": 148, "sm_120": 170}  # H100 SXM, A100, B200, RTX 5090
THREADS_PER_SM = {"sm_120": 1536}  # 2048 on the others (CUDA programming guide, compute capabilities)


def _occupancy(regs, block_threads, blocks, arch):
    """Blocks per SM limited by 64K registers (allocated per warp in units of 256), 2048
    threads (1536 on sm_120) and 32 blocks; waves of `blocks` over the target's SMs."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    per_sm = min(65536 // (regs_per_warp * -(-block_threads // 32)), THREADS_PER_SM.get(arch, 2048) // block_threads, 32)
    return dict(threads=block_threads, blocks=blocks, per_sm=per_sm,
                waves=-(-blocks // (per_sm * SMS[arch])) if per_sm else 0)


def cuda_hot(crows, arch):
    """The instantiations the launchers pick for the adaLN family at D = 1152 and D = 72
    (16-byte vectors, B*N = 16384 rows), with occupancy from the registers (_occupancy)."""
    by_name = {r["kernel"]: r for r in crows}
    out = []
    for dt, size in (("bf16", 2), ("fp16", 2), ("fp32", 4)):
        vec = 16 // size
        for D in (1152, 72):
            team, ept, threads, per_block = row_launch(D, vec)
            names = [f"{k}_kernel<{dt}, {vec}, {team}, {ept}>" for k in
                     ("norm_mod_fwd", "norm_mod_jvp", "norm_mod_bwd", "rms_norm_fwd", "rms_norm_jvp", "rms_norm_bwd")]
            names += [f"gated_residual_{k}_kernel<{dt}, {vec}>" for k in ("fwd_jvp", "bwd")]
            for name in names:
                r = by_name.get(name)
                row = dict(name=name, dtype=dt, D=D, found=r is not None, r=r)
                if r is not None and "gated_residual" in name:
                    # one block per (chunk of rows, column tile): 32-row chunks in the backward,
                    # 4 in the forward (kFwdChunkRows: no partials); a tile is the row's vectors
                    # rounded up to a warp, at most 512 threads (gated_residual_kernels.cu)
                    nv = -(-D // vec)
                    block_threads = min(-(-nv // 32) * 32, 512)
                    chunk = CHUNK_ROWS if "_bwd" in name else 4
                    row.update(_occupancy(r["regs"], block_threads, (REF_ROWS // chunk) * -(-nv // block_threads),
                                          arch))
                elif r is not None:
                    teams = REF_ROWS // CHUNK_ROWS if "_bwd" in name else REF_ROWS
                    row.update(_occupancy(r["regs"], threads * per_block, -(-teams // per_block), arch))
                out.append(row)
    return out
