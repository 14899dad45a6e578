"""Sampling: the flow-map Euler rule for DMF models (1, 2, 4, any K steps) and the Euler flow
sampler for flow models; PNG grids and .npz files.

Time runs from t = 1 (noise) to t = 0 (data) on the grid t_i = linspace(1, 0, K + 1), optionally
shifted, t' = s t / (1 + (s - 1) t). A flow map jumps x <- x + (t_{i+1} - t_i) u(x, t_i, t_{i+1});
a flow model takes the same step with its instantaneous velocity u(x, t_i, t_i).
"""
import math
from pathlib import Path

import numpy as np
import torch

from .errors import DMFError


def time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


@torch.no_grad()
def euler(model, noise, y, steps: int, flow_map: bool, shift: float = 1.0, cfg: float = 1.0, null_class=None):
    """x: noise (B, C, H, W) at t = 1 -> samples at t = 0. flow_map: u(x, t_i, t_{i+1}) (DMF),
    else u(x, t_i, t_i) (flow model). cfg > 1 mixes in the null-class prediction (classifier-free
    guidance; DMF models trained with model guidance need none)."""
    x = noise
    B = x.shape[0]
    ts = time_grid(steps, shift)
    for i in range(steps):
        t = torch.full((B,), float(ts[i]), device=x.device, dtype=x.dtype)
        r = torch.full((B,), float(ts[i + 1]), device=x.device, dtype=x.dtype) if flow_map else t
        if cfg == 1.0:
            u = model(x, t, r, y)
        else:
            u_c, u_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([r, r]),
                             torch.cat([y, torch.full_like(y, null_class)])).chunk(2)
            u = u_u + cfg * (u_c - u_u)
        x = x + float(ts[i + 1] - ts[i]) * u                 # dt < 0: towards data
    return x


def balanced_labels(n: int, num_classes: int, g: torch.Generator) -> torch.Tensor:
    """n labels with every class equally often (up to one), in random order."""
    y = torch.arange(n) % num_classes
    return y[torch.randperm(n, generator=g)]


@torch.no_grad()
def generate(model, n: int, steps: int, flow_map: bool, shape, num_classes: int, seed: int = 0, label=None,
             shift=1.0, cfg=1.0, batch=500, device="cpu"):
    """(samples (n, C, H, W) in model space, labels (n,)), deterministic in seed."""
    g = torch.Generator().manual_seed(seed)
    y = torch.full((n,), label, dtype=torch.long) if label is not None else balanced_labels(n, num_classes, g)
    noise = torch.randn((n, *shape), generator=g)
    out = []
    for i in range(0, n, batch):
        out.append(euler(model, noise[i:i + batch].to(device), y[i:i + batch].to(device), steps, flow_map, shift,
                         cfg, num_classes).float().cpu())
    return torch.cat(out), y


def save_grid(images: torch.Tensor, path, nrow=None, scale=4):
    """images (N, C, H, W) in [0, 1] -> one PNG grid (C = 1 gray, C = 3 RGB, else the first channel)."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    imgs = images[:, :3] if c >= 3 else images[:, :1]
    canvas = torch.ones(imgs.shape[1], rows * (h + 1) + 1, nrow * (w + 1) + 1)
    for i in range(n):
        rr, cc = divmod(i, nrow)
        canvas[:, 1 + rr * (h + 1):1 + rr * (h + 1) + h, 1 + cc * (w + 1):1 + cc * (w + 1) + w] = imgs[i]
    arr = to_uint8(canvas.permute(1, 2, 0).numpy())
    write_png(path, np.repeat(np.repeat(arr, scale, 0), scale, 1))


def save_samples(images: torch.Tensor, labels: torch.Tensor, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        np.savez(path, images=images.float().numpy().astype(np.float32), labels=labels.numpy())
    elif path.suffix == ".png":
        save_grid(images, path)
    else:
        raise DMFError(f"--out must end in .png or .npz, got {path.name}")


def main(args):
    """python -m dmf sample --ckpt CKPT --steps K --n N [--class C] [--seed S] --out FILE"""
    from .convert import model_from_checkpoint
    from .data import to_images

    if Path(args.out).suffix not in (".png", ".npz"):
        raise DMFError(f"--out must end in .png or .npz, got {Path(args.out).name}")
    if args.steps < 1 or args.n < 1:
        raise DMFError("--steps and --n must be at least 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, info = model_from_checkpoint(args.ckpt, ema=not args.no_ema, device=device)
    num_classes = model.num_classes
    if args.cls is not None and not 0 <= args.cls < num_classes:
        raise DMFError(f"--class must be in [0, {num_classes}), got {args.cls}")
    flow_map = info["stage"] != "flow"
    shape = (model.in_channels, model.input_size, model.input_size)
    x, y = generate(model, args.n, args.steps, flow_map, shape, num_classes, args.seed, args.cls, args.shift,
                    args.cfg, device=device)
    save_samples(to_images(x, info.get("data_kind", "raw")), y, args.out)
    print(f"wrote {args.n} samples ({'flow map' if flow_map else 'flow'} Euler, {args.steps} steps) to {args.out}")
