"""Shared by the machine-code inspection (inspect_kernels.py, inspect_triton.py,
inspect_cuda.py): paths, targets, reference shapes, PTX instruction statistics and the
ptxas -v report."""
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = {"sm_90a": 90, "sm_80": 80}
# The wheel's further archs (B200, RTX 50 class; make wheel): the CUDA kernels only, since the
# wheel holds no Triton code (Triton compiles on the user's machine) and the Triton gate's
# wgmma / cp.async criteria are Hopper / Ampere ones.
CUDA_ONLY_TARGETS = {"sm_100a": 100, "sm_120": 120}
HEAD_DIMS = (64, 72, 80, 96, 128)
# Reference shape for bytes moved: DiT-XL/2 at 256 px (N = 256 tokens), 16 heads, B = 32.
REF_B, REF_H, REF_N = 32, 16, 256
# adaLN family reference: B * N = 16384 rows.
REF_ROWS = 16384


def _ptx_stats(ptx):
    def widths(op):
        hist = {}
        for m in re.finditer(r"\b" + op + r"((?:\.[a-z0-9_]+)*)\s", ptx):
            mods = m.group(1)
            vec = re.search(r"\.v(\d)", mods)
            ty = re.search(r"\.[bufs](\d+)\b", mods)
            if not ty:
                continue
            bits = (int(vec.group(1)) if vec else 1) * int(ty.group(1))
            hist[bits] = hist.get(bits, 0) + 1
        return hist

    return dict(
        ld=widths(r"ld\.global"),
        st=widths(r"st\.global"),
        cp_async=len(re.findall(r"\bcp\.async\.c[ag]\.", ptx)) + len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),
        wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
        mma=len(re.findall(r"\bmma\.sync", ptx)),
    )


def _ptxas_path():
    import triton

    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return str(p) if p.exists() else shutil.which("ptxas")


def _ptxas(ptx, arch, ptxas=None):
    """{entry: dict(regs, spill_st, spill_ld, smem)} from ptxas -v."""
    ptxas = ptxas or _ptxas_path()
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "k.ptx"
        f.write_text(ptx)
        r = subprocess.run([ptxas, "-v", "--gpu-name", arch, str(f), "-o", str(Path(d) / "k.o")],
                           capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed: {r.stderr[-2000:]}")
    return _parse_ptxas_log(r.stderr + r.stdout)


def _parse_ptxas_log(log):
    res, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = m.group(1)
            res[cur] = dict(regs=0, spill_st=0, spill_ld=0, smem=0)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            res[cur]["spill_st"], res[cur]["spill_ld"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            res[cur]["regs"] = int(m.group(1))
            m2 = re.search(r"(\d+) bytes smem", line)
            if m2:
                res[cur]["smem"] = int(m2.group(1))
    return res
