"""Benchmark harness shared by the bench_*.py files: timing, memory, result files.

A benchmark file exposes `cases(device, dtype, quick)`, yielding `Case`s; run.py collects
them, times every provider in the same process, and writes
benchmarks/results/<device>_<date>.{json,md,png}.

Timing: CUDA events (GPU) or perf_counter (CPU) around single calls after warm-up;
median of the samples. Peak memory: torch.cuda.max_memory_allocated on GPU; on CPU the
peak of live tensor bytes seen by the profiler's memory events.
"""
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass
class Case:
    op: str             # e.g. "adaln_modulate"
    mode: str           # "fwd", "bwd", "fwd+jvp"
    provider: str       # "dmf", "dmf_func_jvp", "eager", "compile"
    shape: str          # e.g. "B8 N256 D1152"
    dtype: str
    # builds inputs; returns (timed closure, minimum bytes read + written, flops or 0)
    make: Callable[[], tuple]


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device, min_time_s, max_reps, warmup, min_reps=5):
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    start_all = time.perf_counter()
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() - start_all < min_time_s):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            samples.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    q1, _, q3 = statistics.quantiles(samples, n=4) if len(samples) >= 2 else (samples[0],) * 3
    return statistics.median(samples), len(samples), q1, q3


@contextlib.contextmanager
def _quiet_c_stderr():
    """The profiler's C++ side prints two USDT lines per use straight to fd 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cpu_peak_bytes(fn):
    """Peak of live CPU tensor bytes during fn, above what was live when it started.

    From the profiler's allocation timeline: per-op memory deltas are not enough, since a
    free that happens inside an op (e.g. the temporaries of a Python custom op) is booked
    into that op's own total at its start time, which hides the true peak."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with _quiet_c_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                                    with_stack=True) as prof:
        fn()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    if not sizes:
        return 0
    totals = [sum(s) for s in sizes]
    return max(totals) - totals[0]


def peak_bytes(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return cpu_peak_bytes(fn)


def copy_bandwidth(device, nbytes=256 << 20):
    """Measured device-to-device copy bandwidth (read + write), GB/s: the roofline for
    memory-bound kernels."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device, 0.5, 200, 3)[0]
    return 2 * nbytes / ms / 1e6


def pin_cpu_allocator():
    """glibc serves large blocks with fresh mmaps and moves that threshold as the process
    allocates, so the same CPU op timed twice can differ 5x (measured: 1.2 vs 5.7 ms) by
    whether its outputs page-fault. Fixing the mmap threshold at 32 MiB (its maximum) and
    never trimming makes every provider reuse heap memory: stable, and the same rule for
    eager, torch.compile and ours. Blocks of 32 MiB and more are mmapped whatever the
    threshold, so mmap is switched off too: swiglu's backward at (8, 256, 4096) fp32 writes a
    32 MiB gradient and took 9.8 ms, 8193 page faults per call, against 2.7 ms without."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
        libc.mallopt(M_MMAP_MAX, 0)
        return True
    except (OSError, AttributeError):
        return False


def run_cases(cases, device, quick, log=print, stream=None, smoke=False):
    """Times every case; a failing case is a row with its error. stream: a path to which each
    row is appended as a JSON line the moment it is measured (a run killed by a time limit
    keeps what it measured). smoke: one warm-up call and one timed call per case, for tests that
    check that every case builds and runs (their times mean nothing; ~3x fewer calls than quick)."""
    rows = []
    min_time = 0.3 if quick else 1.0
    max_reps = 1 if smoke else 50 if quick else 200
    warmup = 1 if smoke else 3 if device == "cpu" else 10
    for case in cases:
        row = {k: getattr(case, k) for k in ("op", "mode", "provider", "shape", "dtype")}
        try:
            fn, row["bytes_moved"], row["flops"] = case.make()
            ms, reps, q1, q3 = time_fn(fn, device, min_time, max_reps, warmup, min_reps=min(5, max_reps))
            row.update(ms=ms, reps=reps, iqr_ms=[q1, q3], peak_mb=peak_bytes(fn, device) / 2**20)
            row["gbps"] = row["bytes_moved"] / ms / 1e6 if row["bytes_moved"] else None
            row["tflops"] = row["flops"] / ms / 1e9 if row["flops"] else None
        except Exception as e:  # a provider that fails is reported, not hidden
            row.update(ms=None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        rows.append(row)
        log(format_row(row))
        if stream:
            with open(stream, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")
        fn = None
        if device == "cuda":
            torch.cuda.empty_cache()
    add_ratios(rows)
    return rows


def add_ratios(rows):
    """vs_eager / vs_compile / vs_sdpa: the baseline's time over this row's (>1: faster than
    the baseline; vs_sdpa against the fastest SDPA backend of the same case);
    jvp_over_fwd: our fwd+jvp time over our forward time of the same case (for a training
    step, mode jvp+bwd: our jvp+bwd over our fwd+bwd)."""
    by_key = {}
    for r in rows:
        by_key.setdefault((r["op"], r["mode"], r["shape"], r["dtype"]), {})[r["provider"]] = r
    for (op, mode, shape, dtype), group in by_key.items():
        sdpa = [b["ms"] for p, b in group.items() if p.startswith("sdpa") and b.get("ms")]
        base_mode = {"fwd+jvp": "fwd", "jvp+bwd": "fwd+bwd"}.get(mode)
        own_fwd = by_key.get((op, base_mode, shape, dtype), {}).get("dmf")
        for r in group.values():
            for base in ("eager", "compile"):
                b = group.get(base)
                ok = r.get("ms") and b is not None and b.get("ms")
                r[f"vs_{base}"] = b["ms"] / r["ms"] if ok else None
            r["vs_sdpa"] = min(sdpa) / r["ms"] if sdpa and r.get("ms") else None
            ok = base_mode and r["provider"] == "dmf" and own_fwd and own_fwd.get("ms") and r.get("ms")
            r["jvp_over_fwd"] = r["ms"] / own_fwd["ms"] if ok else None


def format_row(r):
    if r.get("ms") is None:
        return f"{r['op']:<22} {r['mode']:<8} {r['provider']:<13} {r['shape']:<18} {r['dtype']:<9} FAILED {r.get('error')}"
    gb = f"{r['gbps']:8.1f} GB/s" if r.get("gbps") else ""
    tf = f"{r['tflops']:7.1f} TFLOP/s" if r.get("tflops") else ""
    return (f"{r['op']:<22} {r['mode']:<8} {r['provider']:<13} {r['shape']:<18} {r['dtype']:<9} "
            f"{r['ms']:9.3f} ms {gb} {tf} peak {r['peak_mb']:8.1f} MB")


def markdown(rows, meta):
    lines = [f"# Benchmark results: {meta['device_name']} ({meta['date']})", "",
             f"torch {meta['torch']}, triton {meta.get('triton')}, dmf_kernels build {meta['build_info']}", ""]
    if meta.get("copy_gbps"):
        lines += [f"Measured device copy bandwidth: {meta['copy_gbps']:.0f} GB/s", ""]
    lines += ["Times are medians; the JSON file has each row's interquartile range (`iqr_ms`).", ""]
    lines += ["| op | mode | shape | dtype | provider | median ms | GB/s | TFLOP/s | peak MB | eager/this | "
              "compile/this | best SDPA/this | jvp/own fwd |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        if r.get("ms") is None:
            lines.append(f"| {r['op']} | {r['mode']} | {r['shape']} | {r['dtype']} | {r['provider']} | failed: "
                         f"{r.get('error', '')[:80]} | | | | | |")
            continue
        lines.append(
            f"| {r['op']} | {r['mode']} | {r['shape']} | {r['dtype']} | {r['provider']} | {r['ms']:.3f} | "
            f"{fmt(r.get('gbps'), '.1f')} | {fmt(r.get('tflops'), '.1f')} | {r['peak_mb']:.1f} | "
            f"{fmt(r['vs_eager'] if r['provider'] != 'eager' else None, '.2f')} | "
            f"{fmt(r['vs_compile'] if r['provider'] != 'compile' else None, '.2f')} | "
            f"{fmt(r['vs_sdpa'] if not r['provider'].startswith('sdpa') else None, '.2f')} | "
            f"{fmt(r.get('jvp_over_fwd'), '.2f')} |")
    return "\n".join(lines) + "\n"


def plot(rows, path, title):
    """One panel per op: speed-up over eager PyTorch (log scale) per (mode, shape), one bar
    per provider."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in rows if r.get("vs_eager") and r["provider"] != "eager"]
    if not rows:
        return None
    ops = list(dict.fromkeys(r["op"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colors = dict(zip(providers, plt.get_cmap("tab10").colors))
    cols = 2
    nrows = (len(ops) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(14, 3.6 * nrows), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        mine = [r for r in rows if r["op"] == op]
        groups = list(dict.fromkeys((r["mode"], r["shape"], r["dtype"]) for r in mine))
        provs = [p for p in providers if any(r["provider"] == p for r in mine)]
        width = 0.8 / len(provs)
        for i, prov in enumerate(provs):
            xs, ys = [], []
            for g, key in enumerate(groups):
                match = [r for r in mine if (r["mode"], r["shape"], r["dtype"]) == key and r["provider"] == prov]
                if match:
                    xs.append(g + (i - (len(provs) - 1) / 2) * width)
                    ys.append(match[0]["vs_eager"])
            ax.bar(xs, ys, width, color=colors[prov], label=prov)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{m}\n{sh}" for m, sh, _ in groups], fontsize=7)
        ax.set_title(op, fontsize=10)
        ax.set_ylabel("speed-up over eager (x)")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(ops):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_results(rows, device, extra_meta=None, stem=None):
    RESULTS.mkdir(parents=True, exist_ok=True)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import dmf_kernels

    name = device_name(device)
    meta = dict(device=device, device_name=name, date=datetime.date.today().isoformat(),
                torch=torch.__version__, triton=triton_version, build_info=dmf_kernels.build_info(),
                threads=torch.get_num_threads(), **(extra_meta or {}))
    stem = stem or f"{slug(name)}_{meta['date']}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (RESULTS / f"{stem}.md").write_text(markdown(rows, meta))
    png = plot(rows, RESULTS / f"{stem}.png", f"dmf-kernels on {name}")
    return RESULTS / f"{stem}.json", RESULTS / f"{stem}.md", png


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def compiled(fn):
    return torch.compile(fn, dynamic=False)


def as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def standard_cases(op, shape, dtype, make_inputs, ours, ref, dual):
    """The fwd / bwd / fwd+jvp cases of one op at one shape, for every provider.

    make_inputs() -> (primals, tangents); ours(*primals) and ref(*primals) compute the op
    (ours: dmf_kernels, ref: eager PyTorch as DiT code writes it); dual(primals, tangents)
    is our one-pass primal+tangent API. Bytes are the minimum traffic: every input read
    once and every output written once.
    """
    dname = str(dtype).replace("torch.", "")

    def fwd(fn):
        def make():
            p, _ = make_inputs()
            with torch.no_grad():
                moved = nbytes(*p) + nbytes(*as_tuple(fn(*p)))

            def run():
                with torch.no_grad():
                    return fn(*p)

            return run, moved, 0

        return make

    def bwd(fn):
        def make():
            p, _ = make_inputs()
            p = [t.requires_grad_() for t in p]
            outs = as_tuple(fn(*p))
            grads = [torch.randn_like(o) for o in outs]
            moved = nbytes(*grads) + 2 * nbytes(*p)  # read what the backward needs, write the grads
            return (lambda: torch.autograd.grad(outs, p, grads, retain_graph=True)), moved, 0

        return make

    def jvp(fn, one_pass=False):
        def make():
            p, t = make_inputs()
            with torch.no_grad():
                moved = nbytes(*p) + nbytes(*(x for x in t if x is not None)) + 2 * nbytes(*as_tuple(ref(*p)))
            if one_pass:
                def run():
                    with torch.no_grad():
                        return dual(p, t)
            else:
                zt = [torch.zeros_like(x) if tt is None else tt for x, tt in zip(p, t)]

                def run():
                    with torch.no_grad():
                        return fn(tuple(p), tuple(zt))
            return run, moved, 0

        return make

    def func_jvp(f):
        return lambda p, t: torch.func.jvp(f, p, t)

    compiled_ref = compiled(ref)
    compiled_jvp = compiled(lambda p, t: torch.func.jvp(ref, p, t))
    providers = {
        "fwd": [("dmf", fwd(ours)), ("eager", fwd(ref)), ("compile", fwd(compiled_ref))],
        "bwd": [("dmf", bwd(ours)), ("eager", bwd(ref)), ("compile", bwd(compiled_ref))],
        "fwd+jvp": [("dmf", jvp(None, one_pass=True)), ("dmf_func_jvp", jvp(func_jvp(ours))),
                    ("eager", jvp(func_jvp(ref))), ("compile", jvp(compiled_jvp))],
    }
    for mode, provs in providers.items():
        for prov, make in provs:
            yield Case(op, mode, prov, shape, dname, make)
