"""Machine-code inspection of every kernel without a GPU (`make inspect`, run in CI).

Triton compiles ahead of time for a target with no device attached, and ptxas reports
registers and spills, so most of what decides GPU speed is visible on a CPU machine:

* Triton attention kernels: the launchers in dmf_kernels/attention_triton.py are called
  with meta tensors and their kernel launches are recorded (so the table shows exactly the
  tiles, warps, stages and argument specialisation the launchers pick), then each launch is
  compiled for sm_90a and sm_80 with the argument specialisation Triton's own binder
  computes (an integer stride is "divisible by 16" only when it is a multiple of 16; that
  is what decides vector loads and cp.async).
* CUDA kernels (csrc/cuda/*.cu): nvcc -ptx, then ptxas -v per entry.

Writes benchmarks/results/inspect_<target>.md, one row per kernel configuration:
registers, spill bytes, shared memory, global load/store widths, cp.async, wgmma / mma
counts, and the compulsory bytes one call moves at a reference shape (each tensor read or
written once; re-reads of K/V by other query tiles hit L2 and are not counted), which
benchmarks/gpu_check.sh divides by measured time to get achieved bandwidth.

`--check` gates the hot configurations (see HOT / gate()) and exits 1 with the rows that
broke. Needs triton 3.6 (the GPU machines' version), run from its own venv (Makefile).
"""
import argparse
import concurrent.futures as cf
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = {"sm_90a": 90, "sm_80": 80}
HEAD_DIMS = (64, 72, 80, 96, 128)
# Reference shape for bytes moved: DiT-XL/2 at 256 px (N = 256 tokens), 16 heads, B = 32.
REF_B, REF_H, REF_N = 32, 16, 256
# adaLN family reference: B * N = 16384 rows.
REF_ROWS = 16384


# ---------------------------------------------------------------- Triton


_STANDALONE = "_dmf_kernels_triton_only"


def _load_triton_module(name):
    # Load the Triton module files alone: importing dmf_kernels would load the compiled
    # extension, built against the main venv. They live in a stand-in package whose __init__
    # never runs, so their relative imports (the launchers import the kernel files) resolve
    # to the files beside them and to nothing else.
    import types

    if _STANDALONE not in sys.modules:
        pkg = types.ModuleType(_STANDALONE)
        pkg.__path__ = [str(ROOT / "dmf_kernels")]
        sys.modules[_STANDALONE] = pkg
    sys.modules.pop(f"{_STANDALONE}.{name}", None)  # a fresh copy: callers patch its launch hooks
    return importlib.import_module(f"{_STANDALONE}.{name}")


def _load_attention_triton():
    return _load_triton_module("attention_triton")


class _Recorder:
    """Stands in for a @triton.jit kernel in the launcher module: records kernel[grid](...)."""

    def __init__(self, name, fn, log):
        self.name, self.fn, self.log = name, fn, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, self.fn, grid, args, kwargs))
        return launch


class _FakePtr:
    # What Triton's binder needs of a tensor: data_ptr (torch allocations are 256-byte
    # aligned; 0 stands for that) and dtype.
    def __init__(self, t):
        self.dtype = t.dtype

    def data_ptr(self):
        return 0


def _layout_tensors(torch, layout, B, H, N, D, dtype, count):
    if layout == "contig":
        return [torch.empty(B, H, N, D, dtype=dtype, device="meta") for _ in range(count)]
    # fused qkv projection (B, N, 3, H, D), viewed as (B, H, N, D): strides (3HDN, D, 3HD, 1)
    out = []
    for _ in range(0, count, 3):
        proj = torch.empty(B, N, 3, H, D, dtype=dtype, device="meta")
        out += [proj[:, :, i].permute(0, 2, 1, 3) for i in range(3)]
    return out[:count]


def triton_launches(cc=90, B=REF_B, H=REF_H, N=REF_N):
    """[(kernel, dtype, D, layout, name, fn, grid, args, kwargs, bytes)] for every launch the
    launchers make for compute capability cc (their tile choice may depend on it)."""
    import torch

    at = _load_attention_triton()
    at._capability = lambda t: (cc // 10, cc % 10)
    log = []
    for name in ("_attn_fwd_kernel", "_attn_jvp_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel",
                 "_attn_bwd_dq_kernel"):
        setattr(at, name, _Recorder(name, getattr(at, name), log))
    out = []
    # fp32 follows torch.get_float32_matmul_precision(): "highest" -> ieee, "high" -> tf32x3
    old_prec = torch.get_float32_matmul_precision()
    for dtype, prec in ((torch.bfloat16, None), (torch.float16, None), (torch.float32, "highest"),
                        (torch.float32, "high")):
        if prec:
            torch.set_float32_matmul_precision(prec)
        label = str(dtype).replace("torch.", "") + {"highest": "/ieee", "high": "/tf32x3", None: ""}[prec]
        es = dtype.itemsize
        for D in HEAD_DIMS if not prec else (64, 72):  # fp32 is not hot: two head dims, contiguous
            row = B * H * N * D * es  # one (B, H, N, D) tensor
            stat = B * H * N * 4  # lse / delta
            for layout in ("contig", "fused") if not prec else ("contig",):
                q, k, v = _layout_tensors(torch, layout, B, H, N, D, dtype, 3)
                qd, kd, vd = _layout_tensors(torch, layout, B, H, N, D, dtype, 3)
                scale = D ** -0.5
                tab = torch.empty(N, D, dtype=torch.float32, device="meta")
                rope, tab_bytes = (tab, tab), 2 * N * D * 4  # rotary tables (cos, sin), fp32
                calls = [
                    (lambda: at.attention_fwd(q, k, v, scale), {"_attn_fwd_kernel": 4 * row + stat}),
                    (lambda: at.attention_jvp(q, k, v, qd, kd, vd, scale), {"_attn_jvp_kernel": 8 * row + stat}),
                    (lambda: at.attention_bwd(torch.empty(B, H, N, D, dtype=dtype, device="meta"), q, k, v,
                                              torch.empty(B, H, N, D, dtype=dtype, device="meta"),
                                              torch.empty(B, H, N, dtype=torch.float32, device="meta"), scale),
                     {"_attn_bwd_preprocess_kernel": 2 * row + stat,
                      "_attn_bwd_dkdv_kernel": 6 * row + 2 * stat,  # q k v do read, dk dv written
                      "_attn_bwd_dq_kernel": 5 * row + 2 * stat}),
                ]
                if not prec:  # the rope variants (rows "+rope"): 16-bit only, the hot ones
                    calls += [
                        (lambda: at.attention_fwd(q, k, v, scale, rope=rope),
                         {"_attn_fwd_kernel": 4 * row + stat + tab_bytes}),
                        (lambda: at.attention_jvp(q, k, v, qd, kd, vd, scale, rope=rope),
                         {"_attn_jvp_kernel": 8 * row + stat + tab_bytes}),
                        (lambda: at.attention_bwd(torch.empty(B, H, N, D, dtype=dtype, device="meta"), q, k, v,
                                                  torch.empty(B, H, N, D, dtype=dtype, device="meta"),
                                                  torch.empty(B, H, N, dtype=torch.float32, device="meta"), scale,
                                                  rope=rope),  # its preprocess launch is the plain one's
                         {"_attn_bwd_dkdv_kernel": 6 * row + 2 * stat + tab_bytes,
                          "_attn_bwd_dq_kernel": 5 * row + 2 * stat + tab_bytes}),
                    ]
                for call, nbytes in calls:
                    log.clear()
                    call()
                    for name, fn, grid, args, kwargs in log:
                        if name not in nbytes:
                            continue
                        suffix = "+rope" if kwargs.get("ROPE") else ""
                        out.append(dict(kernel=name.strip("_").removesuffix("_kernel") + suffix,
                                        dtype=label, D=D, layout=layout, fn=fn,
                                        grid=grid, args=args, kwargs=kwargs, bytes=nbytes[name]))
    torch.set_float32_matmul_precision(old_prec)
    # gelu_tanh's one-pass dual (the MLP activation of DiT-XL/2: B * N * 4 * 1152 elements)
    gt = _load_triton_module("gelu_triton")
    gt._gelu_tanh_jvp_kernel = _Recorder("_gelu_tanh_jvp_kernel", gt._gelu_tanh_jvp_kernel, log)
    n = B * N * 4 * 1152
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        log.clear()
        a = torch.empty(n, dtype=dtype, device="meta")
        gt.gelu_tanh_jvp(a, a)
        for name, fn, grid, args, kwargs in log:
            out.append(dict(kernel="gelu_tanh_jvp", dtype=str(dtype).replace("torch.", ""), D=4 * 1152,
                            layout="contig", fn=fn, grid=grid, args=args, kwargs=kwargs,
                            bytes=4 * n * dtype.itemsize))
    return out


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


_LAUNCHES = []  # set before the worker pool forks (JIT functions do not pickle)


def compile_triton(i, cc):
    """Compiles recorded launch i for compute capability cc; returns its row."""
    launch = _LAUNCHES[i]
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch["fn"]
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [_FakePtr(a) if hasattr(a, "data_ptr") else a for a in launch["args"]]
    kwargs = dict(launch["kwargs"])
    kwargs.setdefault("debug", False)
    bound, spec, _ = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, None)
    k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    ptx = k.asm["ptx"]
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    info = next(iter(_ptxas(ptx, arch).values()))
    info["smem"] = max(info["smem"], k.metadata.shared)
    kw = launch["kwargs"]
    cfg = f"{kw.get('BLOCK_M', '')}x{kw.get('BLOCK_N', '')} w{kw.get('num_warps', 4)} s{kw.get('num_stages', 3)}"
    if "BLOCK_N" not in kw:
        cfg = f"{kw.get('BLOCK_M')} w{kw.get('num_warps', 4)}"
    return dict(kernel=launch["kernel"], dtype=launch["dtype"], D=launch["D"], layout=launch["layout"], cfg=cfg,
                bytes=launch["bytes"], **info, **_ptx_stats(ptx))


# ---------------------------------------------------------------- CUDA


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
SMS = {"sm_90a": 132, "sm_80": 108}  # H100 SXM, A100


def _occupancy(regs, block_threads, blocks, arch):
    """Blocks per SM limited by 64K registers (allocated per warp in units of 256), 2048
    threads and 32 blocks; waves of `blocks` over the target's SMs."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    per_sm = min(65536 // (regs_per_warp * -(-block_threads // 32)), 2048 // block_threads, 32)
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


# ---------------------------------------------------------------- tables and gate


def _fmt_w(hist):
    if not hist:
        return "-"
    return " ".join(f"{b}b×{n}" for b, n in sorted(hist.items(), reverse=True))


def _fmt_bytes(n):
    return f"{n / 2**20:.1f} MiB"


TRITON_COLS = ["kernel", "dtype", "D", "layout", "cfg", "regs", "spill", "smem", "ld.global", "st.global",
               "cp.async", "wgmma", "mma", "bytes/call"]
CUDA_COLS = ["kernel", "src", "regs", "spill", "smem", "ld.global", "st.global"]


def _triton_cells(r):
    return [r["kernel"], r["dtype"], str(r["D"]), r["layout"], r["cfg"], str(r["regs"]),
            str(r["spill_st"] + r["spill_ld"]), str(r["smem"]), _fmt_w(r["ld"]), _fmt_w(r["st"]), str(r["cp_async"]),
            str(r["wgmma"]), str(r["mma"]), _fmt_bytes(r["bytes"])]


def _cuda_cells(r):
    return [r["kernel"], r["src"], str(r["regs"]), str(r["spill_st"] + r["spill_ld"]), str(r["smem"]),
            _fmt_w(r["ld"]), _fmt_w(r["st"])]


HOT_COLS = ["kernel", "D", "regs", "spill", "ld.global", "threads/block", "blocks", "blocks/SM", "waves"]


def _hot_cells(h):
    r = h["r"]
    if r is None:
        return [h["name"], str(h["D"]), "missing", "", "", "", "", "", ""]
    return [h["name"], str(h["D"]), str(r["regs"]), str(r["spill_st"] + r["spill_ld"]), _fmt_w(r["ld"]),
            str(h.get("threads", "")), str(h.get("blocks", "")), str(h.get("per_sm", "")), str(h.get("waves", ""))]


def _md_row(cells):
    return "| " + " | ".join(cells) + " |"


def write_table(arch, trows, crows, path):
    lines = [f"# Kernel inspection, {arch}", "",
             "Generated by `make inspect` (benchmarks/inspect_kernels.py, triton 3.6, nvcc -Xptxas -v); do not edit.",
             f"bytes/call: compulsory HBM traffic at B={REF_B}, H={REF_H}, N={REF_N} (each tensor once).",
             "ld/st.global: access width in bits × instruction count in the PTX (128b = one 16-byte vector).",
             "spill: spill store + load bytes; smem: bytes of shared memory per program / block.", "",
             "## Triton attention", "", _md_row(TRITON_COLS), _md_row(["---"] * len(TRITON_COLS))]
    lines += [_md_row(_triton_cells(r)) for r in trows]
    lines += ["", "## CUDA (adaLN family)", "", "Template arguments: <dtype, VEC, team (warp/block), EPT>.", "",
              _md_row(CUDA_COLS), _md_row(["---"] * len(CUDA_COLS))]
    lines += [_md_row(_cuda_cells(r)) for r in crows]
    lines += ["", f"## CUDA hot launches (B*N = {REF_ROWS} rows; {SMS[arch]} SMs)", "",
              "The instantiation each launcher picks at D = 1152 and D = 72 (16-byte vectors); "
              f"backward kernels run one team per {CHUNK_ROWS}-row chunk.", "",
              _md_row(HOT_COLS), _md_row(["---"] * len(HOT_COLS))]
    lines += [_md_row(_hot_cells(h)) for h in cuda_hot(crows, arch)]
    path.write_text("\n".join(lines) + "\n")


def _hot_triton(r):
    return r["dtype"] in ("bfloat16", "float16")


# A spill in a hot kernel fails the gate on every target. A CUDA backward needing a second
# wave at B*N=16384, D=1152 fails it on the targets listed here: sm_90a (H100/H200, our GPU
# machines); on sm_80 norm_mod_bwd needs 87 registers (4 blocks of 160 threads per SM, 512
# teams on 108 SMs: two waves), known and listed in the table.
ONE_WAVE_TARGETS = ("sm_90a",)


def gate(trows, crows, arch):
    """Failures: (reason, table row) for the hot configurations."""
    bad = []
    for r in trows:
        if not _hot_triton(r):
            continue
        cells = _md_row(_triton_cells(r))
        if r["spill_st"] + r["spill_ld"]:
            bad.append(("spills", cells))
        if r["ld"] and max(r["ld"]) < 64 and r["kernel"] != "attn_bwd_preprocess":
            bad.append(("no vectorised global loads", cells))
        if r["kernel"] == "gelu_tanh_jvp":  # elementwise: 16-byte loads, nothing to pipeline or multiply
            if not r["ld"] or max(r["ld"]) < 128:
                bad.append(("no 16-byte global loads", cells))
            continue
        if r["kernel"] != "attn_bwd_preprocess":
            if r["wgmma"] + r["mma"] == 0:
                bad.append(("no tensor-core ops", cells))
            if r["cp_async"] == 0:
                bad.append(("no cp.async (loads not pipelined)", cells))
    for h in cuda_hot(crows, arch) if crows else ():  # crows empty: --only triton
        if h["dtype"] == "fp32":
            continue
        cells = _md_row(_hot_cells(h))
        r = h["r"]
        if r is None:
            bad.append(("hot CUDA instantiation not compiled (row_launch drifted?)", cells))
            continue
        if r["spill_st"] + r["spill_ld"]:
            bad.append(("spills", cells))
        if not r["ld"] or max(r["ld"]) < 128:
            bad.append(("no 16-byte global loads", cells))
        if h["D"] == 1152 and "_bwd" in h["name"] and h.get("waves", 0) > 1 and arch in ONE_WAVE_TARGETS:
            bad.append(("backward needs more than one wave at B*N=16384", cells))
    return bad


def bandwidth(out_dir, reps=20):
    """On a CUDA GPU (benchmarks/gpu_check.sh): each Triton attention kernel's device time
    at the reference shape (torch.profiler, per kernel name) against the bytes/call
    estimate above; writes bandwidth_<gpu>.md. Contiguous inputs, bf16 and fp16."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from dmf_kernels import attention_triton as at

    est = {}
    for r in triton_launches():
        if r["layout"] == "contig":
            est[(r["kernel"], r["dtype"], r["D"])] = r["bytes"]
    B, H, N = REF_B, REF_H, REF_N
    lines = [f"# Achieved bandwidth, {torch.cuda.get_device_name()}", "",
             f"B={B}, H={H}, N={N}, contiguous; bytes from inspect_kernels.py (compulsory traffic).", "",
             "| kernel | dtype | D | us/call | est. bytes | GB/s |", "| --- | --- | --- | --- | --- | --- |"]
    for dtype in (torch.bfloat16, torch.float16):
        for D in HEAD_DIMS:
            q, k, v, qd, kd, vd, g = (torch.randn(B, H, N, D, device="cuda", dtype=dtype) for _ in range(7))
            o, lse = at.attention_fwd(q, k, v, D ** -0.5)
            calls = [lambda: at.attention_fwd(q, k, v, D ** -0.5),
                     lambda: at.attention_jvp(q, k, v, qd, kd, vd, D ** -0.5),
                     lambda: at.attention_bwd(g, q, k, v, o, lse, D ** -0.5)]
            for c in calls:
                c()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(reps):
                    for c in calls:
                        c()
                torch.cuda.synchronize()
            for ev in prof.key_averages():
                name = ev.key.strip("_").removesuffix("_kernel")
                nbytes = est.get((name, str(dtype).replace("torch.", ""), D))
                if nbytes is None:
                    continue
                us = getattr(ev, "device_time", None) or getattr(ev, "cuda_time", 0.0)  # average, us
                lines.append(f"| {name} | {str(dtype)[6:]} | {D} | {us:.1f} | {_fmt_bytes(nbytes)} | "
                             f"{nbytes / (us * 1e-6) / 1e9 if us else 0:.0f} |")
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower()
    path = Path(out_dir) / f"bandwidth_{gpu}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="fail when a hot configuration regresses")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--no-fp32", action="store_true", help="skip fp32 Triton rows (faster)")
    ap.add_argument("--only", choices=("triton", "cuda"), help="inspect one family only")
    ap.add_argument("--bandwidth", action="store_true",
                    help="on a CUDA GPU: measure each attention kernel against its bytes estimate")
    args = ap.parse_args(argv)
    if args.bandwidth:
        sys.path.insert(0, str(ROOT))
        bandwidth(args.out)
        return 0
    import triton

    if not triton.__version__.startswith("3.6"):
        print(f"inspect_kernels: expected triton 3.6 (the GPU machines'), got {triton.__version__}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failures = []
    for arch in args.targets.split(","):
        cc = TARGETS[arch]
        launches = triton_launches(cc) if args.only != "cuda" else []
        if args.no_fp32:
            launches = [x for x in launches if not x["dtype"].startswith("float32")]
        _LAUNCHES[:] = launches
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("fork")) as ex:
            tfut = [ex.submit(compile_triton, i, cc) for i in range(len(launches))]
            cfut = [ex.submit(compile_cuda, src, arch) for src in cuda_sources()] if args.only != "triton" else []
            trows = [f.result() for f in tfut]
            crows = [r for f in cfut for r in f.result()]
        crows.sort(key=lambda r: (r["src"], r["kernel"]))
        write_table(arch, trows, crows, out / f"inspect_{arch}.md")
        print(f"inspect_kernels: {arch}: {len(trows)} Triton, {len(crows)} CUDA rows -> {out}/inspect_{arch}.md")
        failures += [(arch, *f) for f in gate(trows, crows, arch)]
    if failures:
        hdr = _md_row(TRITON_COLS)
        print(f"\ninspect_kernels: {len(failures)} hot configuration(s) regressed\n  Triton columns: {hdr}\n"
              f"  CUDA columns: {_md_row(CUDA_COLS)}", file=sys.stderr)
        for arch, why, row in failures:
            print(f"  [{arch}] {why}: {row}", file=sys.stderr)
        if args.check:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
