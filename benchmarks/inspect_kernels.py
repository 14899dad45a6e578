"""GPU machine code without a GPU: compiles every kernel for sm_90a and sm_80 and reports what
decides its speed, then (with --check) fails when a hot configuration regresses.

    .venv-inspect/bin/python benchmarks/inspect_kernels.py [--check] [--targets 90a 80]
    make inspect            # sets up .venv-inspect (triton 3.6, the GPU machines' version)

Triton kernels (attention fwd / jvp / bwd, gelu_tanh dual) are compiled ahead of time through
the launchers' own launch plans (dmf_kernels/attention_triton.py: plan_fwd, plan_jvp,
plan_bwd) on meta tensors, specialised exactly as Triton's JIT would specialise them at launch
(16-byte divisibility of pointers and integers, integer 1 as a constant), at DiT head dims
64, 72, 80, 96, 128, in bf16 / fp16 / fp32, with contiguous q/k/v and with the strided views of
a fused qkv projection; then `ptxas -v` (Triton's bundled ptxas) gives registers and spills.
CUDA kernels (csrc/cuda/*.cu) are compiled by nvcc with -Xptxas -v, every template instance.

Columns: registers per thread, spill stores + loads (bytes), static shared memory, global
loads by width (v4 = 16 bytes per thread for 32-bit lanes, v2, scalar), global stores, cp.async
(asynchronous global->shared copies: Triton's software pipelining), tensor-core instructions
(wgmma on sm_90a, mma.sync on sm_80), and the minimum bytes one call moves at the benchmark
shape (every input read once, every output written once), which gpu_check.sh divides by the
measured time to report achieved bandwidth.

Gate (--check), for the hot configurations (bf16/fp16 attention at every head dim and layout,
the gelu kernel, the CUDA LayerNorm family's 16-byte-vector instances up to 16 elements per
thread): no spills; vectorised global loads (no scalar 16-bit loads in attention); cp.async in
every attention kernel that loops over tiles; tensor-core instructions in every attention
kernel that multiplies. A failure prints the row that broke.
"""
import argparse
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
HEAD_DIMS = (64, 72, 80, 96, 128)
SHAPE = dict(B=32, H=16, N=256)  # DiT-XL/2 at 256 px: 256 tokens, 16 heads
ELEM = {"bf16": 2, "fp16": 2, "fp32": 4}


def _load(name):
    # By path: importing the dmf_kernels package would load the compiled extension, which
    # this environment (triton 3.6) does not need.
    spec = importlib.util.spec_from_file_location(name, ROOT / "dmf_kernels" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ptxas():
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return str(path) if path.exists() else shutil.which("ptxas")


def compile_triton(launch, cap):
    """triton.compile of one Launch for compute capability `cap`, specialised like the JIT."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    fn = launch.kernel
    names = [p.name for p in fn.params]
    by_name = {k: v for k, v in launch.options.items() if k in names}
    options = {k: v for k, v in launch.options.items() if k not in names}
    args = list(launch.args) + [by_name[n] for n in names[len(launch.args):]]
    specs = [("constexpr", a) if p.is_constexpr else
             native_specialize_impl(BaseBackend, a, False, not p.do_not_specialize, not p.do_not_specialize_on_alignment)
             for p, a in zip(fn.params, args)]
    signature = {n: s[0] for n, s in zip(names, specs)}
    constexprs = {(i,): args[i] for i, s in enumerate(specs) if s[0] == "constexpr"}
    attrs = {(i,): BaseBackend.parse_attr(s[1]) for i, s in enumerate(specs) if isinstance(s[1], str)}
    target = GPUTarget("cuda", cap, 32)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)


def ptx_counts(ptx):
    loads = re.findall(r"^\s*(?:@%p\d+\s+)?ld\.global(?:\.[A-Za-z0-9_:]+?)*?(?:\.(v[248]))?\.(?:[busf]\d+)\b", ptx, re.M)
    return dict(
        ld_v4=sum(1 for v in loads if v == "v4") + sum(1 for v in loads if v == "v8"),
        ld_v2=sum(1 for v in loads if v == "v2"),
        ld_scalar=sum(1 for v in loads if not v),
        ld_b16=len(re.findall(r"ld\.global(?:\.[a-z0-9:]+)*\.b16\b", ptx)),
        st=len(re.findall(r"\bst\.global", ptx)),
        cp_async=len(re.findall(r"\bcp\.async\.(?:ca|cg)\.shared", ptx)),
        tc=len(re.findall(r"\bwgmma\.mma_async\.", ptx)) + len(re.findall(r"\bmma\.sync\.", ptx)),
    )


def ptxas_usage(ptx, sm):
    """{kernel: (regs, spill_stores, spill_loads, smem)} from ptxas -v."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([_ptxas(), "-v", f"--gpu-name=sm_{sm}", str(src), "-o", str(Path(d) / "k.o")],
                             capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return parse_ptxas(out.stderr)


def parse_ptxas(text):
    usage, name = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            name = m.group(1)
            usage[name] = dict(regs=0, spill=0, smem=0)
            continue
        if name is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            usage[name]["spill"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            usage[name]["regs"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            usage[name]["smem"] = int(m.group(1))
    return usage


# ---------------------------------------------------------------- Triton configurations


def attention_configs(at, torch, cap):
    B, H, N = SHAPE["B"], SHAPE["H"], SHAPE["N"]
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for dname, dtype in dtypes.items():
        for D in HEAD_DIMS:
            for layout in ("contiguous", "fused_qkv"):
                if dname == "fp32" and layout == "fused_qkv":
                    continue  # fp32 attention is a correctness path, not a hot one
                meta = dict(device="meta", dtype=dtype)
                if layout == "contiguous":
                    q, k, v = (torch.empty(B, H, N, D, **meta) for _ in range(3))
                else:
                    qkv = torch.empty(B, N, 3, H, D, **meta).permute(2, 0, 3, 1, 4)
                    q, k, v = qkv[0], qkv[1], qkv[2]
                o = torch.empty(B, H, N, D, **meta)
                lse = torch.empty(B, H, N, device="meta")
                e, t = ELEM[dname], B * H * N * D
                hot = dname != "fp32"
                key = dict(dtype=dname, D=D, layout=layout, hot=hot)
                yield dict(key, kernel="attn_fwd", launch=at.plan_fwd(q, k, v, 0.1, o, lse, arch=cap)[0],
                           bytes=4 * t * e + B * H * N * 4, loops=True)
                yield dict(key, kernel="attn_jvp", launch=at.plan_jvp(q, k, v, q, k, v, 0.1, o, o, lse, arch=cap)[0],
                           bytes=8 * t * e + B * H * N * 4, loops=True)
                pre, dkdv, dq = at.plan_bwd(o, q, k, v, o, lse, 0.1, o, o, o, lse, arch=cap)
                yield dict(key, kernel="attn_bwd_pre", launch=pre, bytes=2 * t * e + B * H * N * 4, loops=False)
                yield dict(key, kernel="attn_bwd_dkdv", launch=dkdv, bytes=6 * t * e + 2 * B * H * N * 4, loops=True)
                yield dict(key, kernel="attn_bwd_dq", launch=dq, bytes=5 * t * e + 2 * B * H * N * 4, loops=True)


def gelu_configs(gt, Launch, torch):
    n = SHAPE["B"] * SHAPE["N"] * 4 * 1152  # the MLP activation of DiT-XL/2
    for dname, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        a = torch.empty(n, device="meta", dtype=dtype)
        launch = Launch(gt._gelu_tanh_jvp_kernel, (n // gt.BLOCK,), (a, a, a, a, n),
                           dict(BLOCK=gt.BLOCK, num_warps=4))
        yield dict(kernel="gelu_tanh_jvp", dtype=dname, D=4 * 1152, layout="contiguous", hot=True, launch=launch,
                   bytes=4 * n * ELEM[dname], loops=False)


def inspect_triton(cap, sm):
    import torch

    at, gt = _load("attention_triton"), _load("gelu_triton")
    rows = []
    for cfg in list(attention_configs(at, torch, cap)) + list(gelu_configs(gt, at.Launch, torch)):
        launch = cfg.pop("launch")
        ck = compile_triton(launch, cap)
        ptx = ck.asm["ptx"]
        (usage,) = ptxas_usage(ptx, sm).values()
        opts = launch.options
        config = f"{opts.get('BLOCK_M', opts.get('BLOCK', ''))}x{opts.get('BLOCK_N', '')} w{opts.get('num_warps', 4)}" \
                 f" s{opts.get('num_stages', 3)}"
        usage["smem"] = max(usage["smem"], ck.metadata.shared)  # Triton's shared memory is dynamic
        rows.append(dict(cfg, source="triton", config=config, **usage, **ptx_counts(ptx)))
    return rows


# ---------------------------------------------------------------- CUDA kernels


def _demangle(names):
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


def _short(name):
    name = re.sub(r"dmf::cuda::\(anonymous namespace\)::", "", name)
    name = name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16").replace("float", "fp32")
    name = name.replace("double", "fp64")
    return re.sub(r"\(.*\)$", "", name).replace("dmf::NormModFwdParams", "").strip()


def inspect_cuda(sm):
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).exists():
        return []
    sources = [line.split()[1] for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines()
               if line.startswith("cuda ") and line.split()[1].endswith(".cu")]
    rows = []
    for cu in sources:
        with tempfile.TemporaryDirectory() as d:
            arch = f"-gencode=arch=compute_{sm},code=sm_{sm}"
            res = subprocess.run([nvcc, "-std=c++17", "-O3", "-c", str(ROOT / cu), "-o", f"{d}/k.o", arch,
                                  "-Xptxas", "-v"], capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(res.stderr)
            usage = parse_ptxas(res.stderr)
            ptx_res = subprocess.run([nvcc, "-std=c++17", "-O3", "-ptx", str(ROOT / cu), "-o", f"{d}/k.ptx",
                                      f"-arch=compute_{sm}"], capture_output=True, text=True)
            ptx = Path(f"{d}/k.ptx").read_text() if ptx_res.returncode == 0 else ""
        bodies = dict(re.findall(r"\.entry (\S+)\((.*?)\n}\n", ptx, re.S)) if ptx else {}
        names = _demangle(list(usage))
        for mangled, u in usage.items():
            pretty = _short(names[mangled])
            m = re.search(r"<([^,>]+), (\d+), (true|false), (\d+)>", pretty)
            hot = bool(m) and ((m.group(1) in ("bf16", "fp16") and m.group(2) == "8") or
                               (m.group(1) == "fp32" and m.group(2) == "4")) and int(m.group(4)) <= 16
            rows.append(dict(source="cuda", kernel=pretty, dtype=m.group(1) if m else "", D="", layout=Path(cu).name,
                             hot=hot, config="", loops=False, bytes=None, **u,
                             **ptx_counts(bodies.get(mangled, ""))))
    return rows


# ---------------------------------------------------------------- gate and tables


# Known and documented, not gated: on sm_80 (triton 3.6, mma.sync) the dK/dV kernel spills
# 80-15000 bytes in every tile configuration tried (64x32 to 32x32, 4 or 8 warps); it needs the
# FA2-style restructuring (5 GEMMs, atomic dQ) that is still to come.
KNOWN = {("80", "attn_bwd_dkdv")}


def gate(row, sm):
    """Why a hot row fails the gate, or None."""
    if not row["hot"] or (sm, row["kernel"]) in KNOWN:
        return None
    if row["spill"]:
        return f"spills {row['spill']} bytes"
    if row["source"] == "cuda":
        return None if row["ld_v4"] or row["ld_v2"] or "gated_residual" in row["kernel"] else "no vector loads"
    if row["ld_v4"] + row["ld_v2"] == 0:
        return "no vectorised global loads"
    if row["kernel"].startswith("attn"):
        if row["ld_b16"]:
            return f"{row['ld_b16']} scalar 16-bit global loads"
        if row["loops"] and row["cp_async"] == 0:
            return "no cp.async (the tile loop is not pipelined)"
        if row["loops"] and row["tc"] == 0:
            return "no tensor-core instructions"
    return None


def table(rows, sm):
    head = ("| source | kernel | dtype | D | layout | config | regs | spill B | smem B | ld v4 | ld v2 | ld scalar "
            "| st | cp.async | tensor-core | MB/call | gate |")
    lines = [f"# Kernel inspection: sm_{sm}", "",
             "Generated by `benchmarks/inspect_kernels.py` (triton 3.6 + its ptxas; nvcc -Xptxas -v). Shape for "
             f"MB/call: B={SHAPE['B']}, H={SHAPE['H']}, N={SHAPE['N']} (attention), B*N*4*1152 elements (gelu). "
             "tensor-core counts wgmma on sm_90a, mma.sync on sm_80. Hot rows are gated in CI.", "",
             head, "|" + "---|" * head.count("|")[:-1] if False else "|" + "|".join(["---"] * 17) + "|"]
    for r in rows:
        why = gate(r, sm)
        mark = ("FAIL: " + why) if why else ("ok" if r["hot"] else "")
        mb = f"{r['bytes'] / 1e6:.1f}" if r.get("bytes") else ""
        lines.append(f"| {r['source']} | {r['kernel']} | {r['dtype']} | {r['D']} | {r['layout']} | {r['config']} | "
                     f"{r['regs']} | {r['spill']} | {r['smem']} | {r['ld_v4']} | {r['ld_v2']} | {r['ld_scalar']} | "
                     f"{r['st']} | {r['cp_async']} | {r['tc']} | {mb} | {mark} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="*", default=["90a", "80"])
    ap.add_argument("--check", action="store_true", help="exit 1 if a hot configuration fails the gate")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--only", choices=["triton", "cuda"], default=None, help="one source only (no tables written)")
    args = ap.parse_args(argv)
    failed = []
    for sm in args.targets:
        cap = int(sm.rstrip("a"))
        rows = (inspect_triton(cap, sm) if args.only != "cuda" else []) + (inspect_cuda(sm) if args.only != "triton" else [])
        path = Path(args.out) / f"inspect_sm{sm}.md"
        if args.only:
            path = Path(tempfile.gettempdir()) / f"inspect_sm{sm}_{args.only}.md"
        path.write_text(table(rows, sm))
        bad = [(r, gate(r, sm)) for r in rows if gate(r, sm)]
        print(f"sm_{sm}: {len(rows)} kernels, {sum(r['hot'] for r in rows)} hot, {len(bad)} failing -> {path}")
        failed += [(sm, r, why) for r, why in bad]
    for sm, r, why in failed:
        print(f"GATE sm_{sm}: {r['source']} {r['kernel']} {r['dtype']} D={r['D']} {r['layout']} {r['config']}: {why}",
              file=sys.stderr)
    if args.check and failed:
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    main()
