"""The MeanFlow training step through diffusers transformers: patched vs eager math-SDPA JVP.

    python -m benchmarks.bench_diffusers [--device cpu|cuda] [--quick]

Models: real diffusers classes at small shapes (tests/kernels/diffusers_models.py builders, random
weights), a Flux-like FluxTransformer2DModel (double + single blocks, RoPE, text tokens joined to
the image tokens) and a Wan-like WanTransformer3DModel (3-D RoPE, cross-attention to text).
Step (`jvp+bwd`): (u, du/dt) = jvp(model, (x, t), (v, 1)); loss = |u - stopgrad(v - t du/dt)|^2;
backward. Providers:
    eager_math       the unpatched model under torch.func.jvp with sdpa_kernel(MATH): the only way
                     PyTorch's attention takes a forward-mode tangent (the CPU flash and every fast
                     GPU backend refuse it), N x N matrices per head
    dmf_func_jvp     dmf_kernels.patch(model), then torch.func.jvp (the training code unchanged)
    dmf_model_jvp    dmf_kernels.patch(model), then dmf_kernels.model_jvp (tangents detached)
Columns: median step time (ms, with the interquartile range), peak memory above what was live
before the step (CPU: the profiler's allocation timeline; CUDA: allocator stats), and eager/this
for both. Results: benchmarks/results/diffusers_<device>_<date>.{json,md}.
"""
import argparse
import copy
import datetime
import json
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import dmf_kernels as dk

from .harness import RESULTS, device_name, peak_bytes, pin_cpu_allocator, time_fn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "kernels"))
from diffusers_models import build  # noqa: E402


def configs(device, quick):
    """(label, builder name, builder options, batch)."""
    if device == "cuda":
        return [("Flux-like: 2 double + 4 single blocks, 8 heads x 64, 1024 image + 64 text tokens", "flux",
                 dict(heads=8, head_dim=64, layers=(2, 4), hw=(32, 32), text=64, channels=16), 4),
                ("Wan-like: 4 blocks, 8 heads x 64, 4 x 16 x 16 latent tokens, 64 text tokens", "wan",
                 dict(heads=8, head_dim=64, layers=4, fhw=(4, 32, 32), text=64, ffn=2048), 4)]
    hw = (16, 16) if quick else (24, 24)
    return [(f"Flux-like: 2 double + 4 single blocks, 4 heads x 32, {hw[0] * hw[1]} image + 32 text tokens", "flux",
             dict(heads=4, head_dim=32, layers=(2, 4), hw=hw, text=32, channels=16), 2),
            ("Wan-like: 2 blocks, 4 heads x 32, 4 x 8 x 8 latent tokens (256), 32 text tokens", "wan",
             dict(heads=4, head_dim=32, layers=2, fhw=(4, 16, 16), text=32, ffn=512), 2)]


def step_fn(model, call, x, t, v, provider):
    ones = torch.ones_like(t)
    tb = t.view(-1, *[1] * (x.dim() - 1))

    def step():
        f = lambda x, t: call(model, x, t)  # noqa: E731
        if provider == "eager_math":
            with sdpa_kernel(SDPBackend.MATH):
                u, du = torch.func.jvp(f, (x, t), (v, ones))
        elif provider == "dmf_func_jvp":
            u, du = torch.func.jvp(f, (x, t), (v, ones))
        else:
            u, du = dk.model_jvp(f, (x, t), (v, ones))
        loss = ((u - (v - tb * du).detach()) ** 2).mean()
        loss.backward()
        for p in model.parameters():
            p.grad = None
    return step


def run(device, quick, log=print):
    rows = []
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    for label, name, kw, B in configs(device, quick):
        eager, call, x, t = build(name, dtype=dtype, B=B, **kw)
        eager = eager.to(device)
        ours = copy.deepcopy(eager)
        report = dk.patch(ours)
        x, t = x.to(device), t.to(device)
        v = torch.randn_like(x)
        base = None
        for provider in ("eager_math", "dmf_func_jvp", "dmf_model_jvp"):
            model = eager if provider == "eager_math" else ours
            step = step_fn(model, call, x, t, v, provider)
            ms, reps, q1, q3 = time_fn(step, device, 1.0 if quick else 3.0, 20 if quick else 50, 2)
            peak = peak_bytes(step, device)
            row = dict(model=label, provider=provider, dtype=str(dtype).replace("torch.", ""), B=B, ms=ms,
                       iqr=(q1, q3), reps=reps, peak_mb=peak / 2**20)
            if provider == "eager_math":
                base = row
            row["speedup"] = base["ms"] / ms
            row["memory_ratio"] = peak / 2**20 / base["peak_mb"] if base["peak_mb"] else float("nan")
            rows.append(row)
            log(f"{label[:10]:10s} {provider:14s} {ms:9.1f} ms  peak {row['peak_mb']:8.1f} MiB  "
                f"x{row['speedup']:.2f} time, {row['memory_ratio']:.2f} memory")
        rows[-1]["patch_report"] = str(report)
    return rows


def markdown(rows, meta):
    out = [f"# MeanFlow step (jvp+bwd) through diffusers transformers, {meta['device_name']}", "",
           f"{meta['date']}; torch {meta['torch']}, diffusers {meta['diffusers']}, {meta['threads']} threads. "
           f"{meta['note']}", "",
           "| model | provider | dtype | B | ms (median) | IQR | peak MiB | eager/this time | this/eager memory |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['provider']} | {r['dtype']} | {r['B']} | {r['ms']:.1f} | "
                   f"{r['iqr'][0]:.1f}-{r['iqr'][1]:.1f} | {r['peak_mb']:.1f} | {r['speedup']:.2f} | "
                   f"{r['memory_ratio']:.2f} |")
    out += ["", "What patch did (per model):", ""]
    out += ["```\n" + r["patch_report"] + "\n```" for r in rows if "patch_report" in r]
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--note", default="", help="written into the results, e.g. 'CPU shared with other jobs'")
    args = ap.parse_args()
    if args.device == "cpu":
        pin_cpu_allocator()
    import diffusers

    torch.manual_seed(0)
    rows = run(args.device, args.quick)
    meta = dict(device=args.device, device_name=device_name(args.device), date=datetime.date.today().isoformat(),
                torch=torch.__version__, diffusers=diffusers.__version__, threads=torch.get_num_threads(),
                quick=args.quick, note=args.note, build_info=dk.build_info())
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"diffusers_{args.device}_{meta['date']}" + ("_quick" if args.quick else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (RESULTS / f"{stem}.md").write_text(markdown(rows, meta))
    print(f"wrote {RESULTS / stem}.md")


if __name__ == "__main__":
    main()
