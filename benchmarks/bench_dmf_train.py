"""DMF training steps: what a user pays per optimizer step, ours against the official way.

    python -m benchmarks.run --only bench_dmf_train [--quick]
    python -m benchmarks.bench_dmf_train [--quick]        # the same, plus the ratio summary

Modes (op `dmf_train`; all include loss and backward, the *step* modes also AdamW):
    fm step    a flow-matching training step (stage 1)
    dmf step   a whole DMF step (stage 2): FM branch + MF branch, 0.5 * (fm + mf), backward, AdamW
    fwd+bwd    the FM branch alone (forward with logvar, log-variance loss, backward)
    jvp+bwd    the MF branch alone (one JVP with tangents (v, 1, 0), loss on u vs stopgrad target, backward)
Providers: `dmf` = dmf.DMFT + dmf_kernels.model_jvp (the trainer's code path); `eager` = the official
model (tests/replicas/official_dmf.py) with torch.func.jvp and math attention for the DMF step and
MF branch (SDPA has no forward-mode rule), SDPA for the FM step and FM branch. The `jvp/own fwd`
column of our jvp+bwd row is MF branch / FM branch; the summary adds DMF step / FM step.
Shapes: DMFT-S/2 on CPU at the digits geometry (8x8x1, 16 tokens, batch 128) and at N = 256
(32x32x4); DMFT-B/2 and XL/2 at N = 256 on a GPU (bf16 autocast, fp32 weights, as the trainer).
"""
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import dmf_kernels as dk
from dmf import DMFT_models
from dmf.loss import dmf_loss, draw, flow_loss, log_lv_loss, mf_branch
from dmf.train import AMP_MODES, amp_enabled

from .harness import Case

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from replicas import official_dmf  # noqa: E402

MODES = ("fm step", "dmf step", "fwd+bwd", "jvp+bwd")


def shapes(device, quick):
    """(model name, label, input_size, channels, num_classes, batch)."""
    if device == "cuda":
        return [("DMFT-B/2", "N256", 32, 4, 1000, 32), ("DMFT-XL/2", "N256", 32, 4, 1000, 32)]
    return [("DMFT-S/2", "digits N16", 8, 1, 10, 32 if quick else 128), ("DMFT-S/2", "N256", 32, 4, 1000, 4 if quick else 8)]


def _sdpa(q, k, v):  # the official attn op with torch_sdpa: (B, L, H, D)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def build(name, size, channels, classes, device, provider, sdpa):
    torch.manual_seed(0)
    ctor = DMFT_models[name]
    ours = ctor(input_size=size, in_channels=channels, num_classes=classes, use_logvar=True)
    with torch.no_grad():  # nonzero adaLN / final layers: the zero init would skip real work
        for p in ours.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    if provider == "dmf":
        return ours.to(device)
    spec = ctor.keywords
    ref = official_dmf.DMFT(input_size=size, in_channels=channels, num_classes=classes, use_logvar=True,
                            depth=spec["depth"], hidden_size=spec["hidden_size"], patch_size=spec["patch_size"],
                            num_heads=spec["num_heads"], dmf_depth=ours.dmf_depth)
    ref.load_state_dict(ours.state_dict())
    if sdpa:
        for blk in ref.blocks:
            blk.attn.attn = _sdpa
    return ref.to(device)


def cases(device, dtype, quick):
    for name, label, size, ch, classes, B in shapes(device, quick):
        for mode in MODES:
            for prov in ("dmf", "eager"):
                yield Case("dmf_train", mode, prov, f"{name} {label} B{B}", str(dtype).replace("torch.", ""),
                           functools.partial(_make, name, size, ch, classes, B, mode, prov, device, dtype))


def _make(name, size, ch, classes, B, mode, prov, device, dtype):
    # the eager FM step and FM branch may use SDPA; anything under torch.func.jvp needs math attention
    model = build(name, size, ch, classes, device, prov, sdpa=mode in ("fm step", "fwd+bwd"))
    jvp = dk.model_jvp if prov == "dmf" else torch.func.jvp
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, ch, size, size, generator=g).to(device)
    y = torch.randint(0, classes, (B,), generator=g).to(device)
    d = draw(g, x.shape).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))
    def loss_fn():
        if mode == "fm step":
            return flow_loss(model, x, y, d, classes)
        if mode == "dmf step":
            return dmf_loss(model, model, x, y, d, classes, jvp=jvp)[0]
        if mode == "fwd+bwd":
            x_t = (1 - d.t_fm) * x + d.t_fm * d.noise_fm
            u, lv = model(x_t, d.t_fm, d.t_fm, y, return_logvar=True)
            return log_lv_loss(u, d.noise_fm - x, lv).mean()
        x_t = (1 - d.t_mf) * x + d.t_mf * d.noise_mf
        return mf_branch(model, x_t, d.t_mf, d.r_mf, y, d.noise_mf - x, jvp)[0].mean()

    def step():
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn()
        loss.backward()
        if mode.endswith("step"):
            opt.step()
        opt.zero_grad(set_to_none=True)

    return step, 0, 0


def summary(rows):
    """Ratios per shape: MF branch / FM branch and DMF step / FM step, ours and official."""
    by = {(r["shape"], r["mode"], r["provider"]): r.get("ms") for r in rows}
    lines = ["| shape | MF/FM branch (ours) | MF/FM branch (official) | DMF/FM step (ours) | DMF/FM step (official) | "
             "official DMF step / ours |", "|---|---|---|---|---|---|"]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        def ratio(a, b):
            return f"{a / b:.2f}" if a and b else ""
        g = lambda m, p: by.get((shape, m, p))  # noqa: E731
        lines.append(f"| {shape} | {ratio(g('jvp+bwd', 'dmf'), g('fwd+bwd', 'dmf'))} | "
                     f"{ratio(g('jvp+bwd', 'eager'), g('fwd+bwd', 'eager'))} | "
                     f"{ratio(g('dmf step', 'dmf'), g('fm step', 'dmf'))} | "
                     f"{ratio(g('dmf step', 'eager'), g('fm step', 'eager'))} | "
                     f"{ratio(g('dmf step', 'eager'), g('dmf step', 'dmf'))} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    import argparse

    from .harness import pin_cpu_allocator, run_cases, write_results

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--amp", choices=AMP_MODES, default="auto",
                    help="bf16 autocast: auto = on CUDA only (as dmf train); bf16 also on the CPU")
    args = ap.parse_args(argv)
    amp = amp_enabled(args.amp, args.device)
    dtype = torch.bfloat16 if amp else torch.float32
    if args.device == "cpu":
        pin_cpu_allocator()
    rows = run_cases(list(cases(args.device, dtype, args.quick)), args.device, args.quick)
    paths = write_results(rows, args.device, dict(quick=args.quick, suite="bench_dmf_train"),
                          stem=f"dmf_train_{args.device}{'_bf16' if amp and args.device == 'cpu' else ''}_"
                               f"{__import__('datetime').date.today().isoformat()}")
    text = summary(rows)
    with open(paths[1], "a") as f:
        f.write("\n## Ratios\n\n" + text)
    print("\n" + text)
    print("wrote", ", ".join(str(p) for p in paths if p))


if __name__ == "__main__":
    main()
