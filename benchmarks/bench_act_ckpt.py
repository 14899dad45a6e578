"""What activation checkpointing (`dmf train --act-ckpt`, dmf_kernels.nn.act_ckpt) saves, and
what it costs, on one process (issue 23).

    python benchmarks/bench_act_ckpt.py [--model DMFT-S/2] [--input-size 32] [--batch 8] [--steps 3]
    python benchmarks/bench_act_ckpt.py --paired-time --threads 1 --batch 2 --steps 6   # the step-time ratio

One training step of `dmf train`'s DMF loss (FM branch, model guidance, the MF branch's
model_jvp, backward, AdamW), fp32, with and without checkpointing, each in a fresh process
(MALLOC_MMAP_THRESHOLD_ fixed so freed tensors go back to the OS and the resident size follows
the live tensors). Per mode:
- saved MB: the bytes of the tensors autograd saves for the backward outside checkpointed regions
  (saved_tensors_hooks; one storage counted once; the parameters' own storages not counted). The
  inputs a checkpointed block keeps (x, c, the pending residual) are held by the checkpoint, not
  saved through the hooks: the next number counts them;
- kept MB: resident memory after the loss (before the backward) minus before the forward: the
  activations the step holds at its peak point, whatever holds them;
- peak MB: the step's peak resident memory (VmHWM, reset before the step) minus before it;
- step s: the median step time over --steps steps after one warm-up step (the two modes run one
  after the other: on a shared machine --paired-time gives the ratio).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))


def rss_mb(field="VmRSS"):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def reset_peak():
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size


def one_mode(args):
    import torch
    from dmf.loss import dmf_loss, draw
    from dmf.model import DMFT_models
    from dmf_kernels.nn import act_ckpt

    torch.manual_seed(0)
    model = DMFT_models[args.model](input_size=args.input_size, in_channels=4, num_classes=1000, use_logvar=True)
    if args.mode == "ckpt":
        act_ckpt(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    shape = (args.batch, 4, args.input_size, args.input_size)
    x, y = torch.randn(shape, generator=g), torch.randint(0, 1000, (args.batch,), generator=g)
    rows = []
    for step in range(args.steps + 1):
        d = draw(g, shape)
        seen = {}
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(t):
            try:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in params:
                    seen[ptr] = t.untyped_storage().nbytes()
            except RuntimeError:
                seen[id(t)] = t.numel() * t.element_size()
            return t

        opt.zero_grad(set_to_none=False)  # gradients allocated since the first step: not counted as activations
        base = rss_mb()
        reset_peak()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = dmf_loss(model, model, x, y, d, 1000, omega=0.6, g_max=0.7)
        kept = rss_mb() - base
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        rows.append(dict(saved_mb=sum(seen.values()) / 2**20, kept_mb=kept, peak_mb=rss_mb("VmHWM") - base, step_s=dt))
    timed = rows[1:]
    out = {k: statistics.median(r[k] for r in timed) for k in timed[0]}
    out.update(mode=args.mode, model=args.model, input_size=args.input_size, batch=args.batch,
               threads=torch.get_num_threads(), step_s_all=[r["step_s"] for r in timed])
    print(json.dumps(out))


def paired_time(args):
    """Step time with / without checkpointing in one process, steps alternating (a shared, loaded
    machine slows both alike): the median of the per-pair ratios."""
    import copy

    import torch
    from dmf.loss import dmf_loss, draw
    from dmf.model import DMFT_models
    from dmf_kernels.nn import act_ckpt

    torch.manual_seed(0)
    plain = DMFT_models[args.model](input_size=args.input_size, in_channels=4, num_classes=1000, use_logvar=True)
    ckpt = copy.deepcopy(plain)
    act_ckpt(ckpt)
    models = {"plain": plain, "ckpt": ckpt}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    g = torch.Generator().manual_seed(1)
    shape = (args.batch, 4, args.input_size, args.input_size)
    x, y = torch.randn(shape, generator=g), torch.randint(0, 1000, (args.batch,), generator=g)
    times = {k: [] for k in models}
    cpu = {k: [] for k in models}
    for step in range(args.steps + 1):
        d = draw(g, shape)
        for k in (("plain", "ckpt") if step % 2 else ("ckpt", "plain")):
            t0, c0 = time.perf_counter(), time.process_time()
            loss, _ = dmf_loss(models[k], models[k], x, y, d, 1000, omega=0.6, g_max=0.7)
            loss.backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    ratio = lambda ts: statistics.median(c / p for c, p in zip(ts["ckpt"][1:], ts["plain"][1:]))  # noqa: E731
    # CPU time of the process (with --threads 1: the compute itself, whatever else runs on the machine)
    print(json.dumps(dict(model=args.model, input_size=args.input_size, batch=args.batch, threads=torch.get_num_threads(),
                          plain_s=times["plain"][1:], ckpt_s=times["ckpt"][1:], ratio_median=ratio(times),
                          plain_cpu_s=cpu["plain"][1:], ckpt_cpu_s=cpu["ckpt"][1:], cpu_ratio_median=ratio(cpu))))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="DMFT-S/2")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--mode", choices=("ckpt", "plain"))
    p.add_argument("--paired-time", action="store_true", help="only the step-time ratio, steps alternating")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    args = p.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.paired_time:
        return paired_time(args)
    if args.mode:
        return one_mode(args)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    res = {}
    for mode in ("plain", "ckpt"):
        cmd = [sys.executable, __file__, "--mode", mode, "--model", args.model, "--input-size", str(args.input_size),
               "--batch", str(args.batch), "--steps", str(args.steps)]
        res[mode] = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
        print(json.dumps(res[mode]), flush=True)
    a, b = res["plain"], res["ckpt"]
    print(f"{args.model} {args.input_size}x{args.input_size}x4, batch {args.batch}: kept {a['kept_mb']:.0f} -> "
          f"{b['kept_mb']:.0f} MB, peak {a['peak_mb']:.0f} -> {b['peak_mb']:.0f} MB, saved-tensor bytes "
          f"{a['saved_mb']:.0f} -> {b['saved_mb']:.0f} MB, step {a['step_s']:.2f} -> {b['step_s']:.2f} s "
          f"(x{b['step_s'] / a['step_s']:.2f})")


if __name__ == "__main__":
    main()
