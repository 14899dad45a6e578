"""Sampling: the flow-map Euler rule and the official restart sampler for DMF models, the Euler flow
sampler for flow models, classifier-free guidance with a guidance interval; PNG grids, PNG folders
and .npz files, in one process or under torchrun.

Time runs from t = 1 (noise) to t = 0 (data) on the grid t_i = linspace(1, 0, K + 1), optionally
shifted, t' = s t / (1 + (s - 1) t). A flow map jumps x <- x + (t_{i+1} - t_i) u(x, t_i, t_{i+1});
a flow model takes the same step with its instantaneous velocity u(x, t_i, t_i). The restart
sampler (official samplers.py) jumps to data, x0 = x - t_i u(x, t_i, 0), then re-noises to t_{i+1}
with fresh noise. Guidance u = u_null + cfg (u_cond - u_null) applies while g_min <= t_i <= g_max.

Sample i's noise (the initial noise and the restart sampler's fresh noise) comes from its own
generator seeded by (seed, i), and the labels of all n samples from (seed, n): so the result does
not depend on the number of processes or the batch size, and a rerun can skip finished samples.
"""
import json
import math
import os
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .errors import DMFError
from .optional import Progress, write_png

SAMPLERS = ("euler", "restart")


def time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def _guided(model, x, t, r, y, cfg, null_class, on):
    if cfg == 1.0 or not on:
        return model(x, t, r, y)
    u_c, u_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([r, r]),
                     torch.cat([y, torch.full_like(y, null_class)])).chunk(2)
    return u_u + cfg * (u_c - u_u)


@torch.no_grad()
def euler(model, noise, y, steps: int, flow_map: bool, shift: float = 1.0, cfg: float = 1.0, null_class=None,
          g_min: float = 0.0, g_max: float = 1.0):
    """x: noise (B, C, H, W) at t = 1 -> samples at t = 0. flow_map: u(x, t_i, t_{i+1}) (DMF),
    else u(x, t_i, t_i) (flow model). cfg > 1 mixes in the null-class prediction for t_i in
    [g_min, g_max] (classifier-free guidance; DMF models trained with model guidance need none)."""
    x = noise
    B = x.shape[0]
    ts = time_grid(steps, shift)
    for i in range(steps):
        t = torch.full((B,), float(ts[i]), device=x.device, dtype=x.dtype)
        r = torch.full((B,), float(ts[i + 1]), device=x.device, dtype=x.dtype) if flow_map else t
        u = _guided(model, x, t, r, y, cfg, null_class, g_min <= float(ts[i]) <= g_max)
        x = x + float(ts[i + 1] - ts[i]) * u                 # dt < 0: towards data
    return x


@torch.no_grad()
def restart(model, noise, y, steps: int, fresh_noise, shift: float = 1.0, cfg: float = 1.0, null_class=None,
            g_min: float = 0.0, g_max: float = 1.0):
    """The official restart sampler: x0 = x - t_i u(x, t_i, 0), then x = (1 - t_{i+1}) x0 + t_{i+1} n_i
    with fresh noise n_i = fresh_noise(i) (B, C, H, W) for i < K - 1."""
    x = noise
    B = x.shape[0]
    ts = time_grid(steps, shift)
    zero = torch.zeros(B, device=x.device, dtype=x.dtype)
    for i in range(steps):
        t = torch.full((B,), float(ts[i]), device=x.device, dtype=x.dtype)
        x = x - float(ts[i]) * _guided(model, x, t, zero, y, cfg, null_class, g_min <= float(ts[i]) <= g_max)
        if i < steps - 1:
            x = (1 - float(ts[i + 1])) * x + float(ts[i + 1]) * fresh_noise(i).to(x.device, x.dtype)
    return x


def balanced_labels(n: int, num_classes: int, g: torch.Generator) -> torch.Tensor:
    """n labels with every class equally often (up to one), in random order."""
    y = torch.arange(n) % num_classes
    return y[torch.randperm(n, generator=g)]


def all_labels(n: int, num_classes: int, seed: int, label=None) -> torch.Tensor:
    if label is not None:
        return torch.full((n,), label, dtype=torch.long)
    return balanced_labels(n, num_classes, torch.Generator().manual_seed(seed))


def sample_generators(seed: int, idx):
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 4, int(i)]).generate_state(1)[0]))
            for i in idx]


@torch.no_grad()
def sample_batch(model, idx, y, steps: int, flow_map: bool, shape, seed: int, sampler="euler", shift=1.0, cfg=1.0,
                 g_min=0.0, g_max=1.0, device="cpu"):
    """Model-space samples (len(idx), C, H, W) of the samples numbered idx (labels y)."""
    gens = sample_generators(seed, idx)
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
    y = y.to(device)
    null = model.num_classes
    if sampler == "restart":
        fresh = lambda i: torch.stack([torch.randn(shape, generator=g) for g in gens])  # noqa: E731
        return restart(model, noise, y, steps, fresh, shift, cfg, null, g_min, g_max).float().cpu()
    return euler(model, noise, y, steps, flow_map, shift, cfg, null, g_min, g_max).float().cpu()


@torch.no_grad()
def generate(model, n: int, steps: int, flow_map: bool, shape, num_classes: int, seed: int = 0, label=None,
             shift=1.0, cfg=1.0, batch=500, device="cpu", sampler="euler", g_min=0.0, g_max=1.0):
    """(samples (n, C, H, W) in model space, labels (n,)) in memory, deterministic in seed."""
    y = all_labels(n, num_classes, seed, label)
    out = [sample_batch(model, range(i, min(i + batch, n)), y[i:i + batch], steps, flow_map, shape, seed, sampler,
                        shift, cfg, g_min, g_max, device) for i in range(0, n, batch)]
    return torch.cat(out), y


def to_uint8(images):
    """float images in [0, 1] -> uint8 (round to nearest, as edm2's x * 127.5 + 128 on [-1, 1])."""
    a = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    return np.clip(np.floor(a * 255 + 0.5), 0, 255).astype(np.uint8)


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


def nhwc(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> ADM's arr_0: uint8 (N, H, W, C), C = 1 or 3."""
    return to_uint8(images.permute(0, 2, 3, 1))


def save_samples(images: torch.Tensor, labels: torch.Tensor, path):
    """images (N, C, H, W) in [0, 1] -> a .png grid, or an .npz with arr_0 (uint8 NHWC, ADM),
    images (float32 NCHW in [0, 1]) and labels."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        np.savez(path, arr_0=nhwc(images), images=images.float().numpy().astype(np.float32), labels=labels.numpy())
    elif path.suffix == ".png":
        save_grid(images, path)
    else:
        raise DMFError(f"--out must end in .png or .npz, got {path.name}")


def write_npz_streaming(path, parts, n: int, keys):
    """An .npz (uncompressed, like np.savez) assembled from part files without holding all samples
    in memory: for each key, the .npy header for n rows, then each part's rows in order."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key in keys:
            with np.load(parts[0]) as first:
                dtype, row = first[key].dtype, first[key].shape[1:]
            with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                         "fortran_order": False, "shape": (n, *row)})
                for p in parts:
                    with np.load(p) as part:
                        f.write(np.ascontiguousarray(part[key]).tobytes())
    os.replace(tmp, path)


def _setup_dist(device):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        if device.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def main(args):
    """python -m dmf sample --ckpt CKPT --steps K --n N [--sampler euler|restart] [--cfg S] --out FILE|DIR"""
    from .convert import model_from_checkpoint
    from .data import to_images
    from .train import weights_sha256

    out = Path(args.out)
    if out.suffix not in (".png", ".npz", ""):
        raise DMFError(f"--out must end in .png or .npz, or be a folder, got {out.name}")
    if args.steps < 1 or args.n < 1 or args.batch_size < 1:
        raise DMFError("--steps, --n and --batch-size must be at least 1")
    if args.sampler not in SAMPLERS:
        raise DMFError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {args.sampler!r}")
    if not (args.cfg >= 1.0 and 0 <= args.g_min <= args.g_max <= 1):
        raise DMFError("need --cfg >= 1 and 0 <= --g-min <= --g-max <= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, info = model_from_checkpoint(args.ckpt, ema=not args.no_ema, device="cpu")
    num_classes = model.num_classes
    if args.cls is not None and not 0 <= args.cls < num_classes:
        raise DMFError(f"--class must be in [0, {num_classes}), got {args.cls}")
    flow_map = info["stage"] != "flow"
    if args.sampler == "restart" and not flow_map:
        raise DMFError("--sampler restart needs a DMF checkpoint (a flow map u(x, t, 0)); this is a flow model")
    kind = info.get("data_kind", "raw")
    rank, world, device = _setup_dist(device)
    try:
        vae = None
        if kind == "vae" or args.vae:   # --vae also decodes a converted SiT/DiT (its data kind is unknown)
            from . import vae as vae_mod

            data_info = info.get("data_info") or {}
            name = args.vae or data_info.get("vae")
            if not name:
                raise DMFError(f"{args.ckpt}: a latent model without the VAE's name: pass --vae")
            vae = vae_mod.load_vae(name, device)
            if vae.config.latent_channels != model.in_channels:
                raise DMFError(f"--vae {name} has {vae.config.latent_channels} latent channels but the model takes "
                               f"{model.in_channels}")
            scale, shift = float(data_info.get("scaling_factor", vae_mod.factors(vae)[0])), \
                float(data_info.get("shift_factor", vae_mod.factors(vae)[1]) or 0.0)
        model.to(device)
        shape = (model.in_channels, model.input_size, model.input_size)
        y_all = all_labels(args.n, num_classes, args.seed, args.cls)
        kw = dict(steps=args.steps, flow_map=flow_map, shape=shape, seed=args.seed, sampler=args.sampler,
                  shift=args.shift, cfg=args.cfg, g_min=args.g_min, g_max=args.g_max, device=device)

        def images_of(idx):
            x = sample_batch(model, idx, y_all[idx.start:idx.stop], **kw)
            return vae_mod.decode(vae, x, scale, shift) if vae is not None else to_images(x, kind)

        if out.suffix == ".png":   # a small grid in memory, rank 0 only
            if rank == 0:
                imgs = torch.cat([images_of(range(i, min(i + args.batch_size, args.n)))
                                  for i in range(0, args.n, args.batch_size)])
                save_samples(imgs, y_all, out)
                print(f"wrote {args.n} samples ({args.sampler}, {args.steps} steps) to {out}")
            return

        # .npz or a folder: global batches of --batch-size, rank r takes batches r, r + world, ...;
        # each finished batch is a part file (atomic), so a rerun skips it
        folder = out if out.suffix == "" else None
        npz = folder / "samples.npz" if folder else out
        parts_dir = (folder / ".parts") if folder else out.with_name(out.name + ".parts")
        meta = dict(ckpt=str(Path(args.ckpt).resolve()), weights=weights_sha256(model.state_dict()), n=args.n,
                    batch=args.batch_size, **{k: v for k, v in kw.items() if k not in ("device", "shape")},
                    label=args.cls, vae=args.vae or (info.get("data_info") or {}).get("vae"))
        n_batches = -(-args.n // args.batch_size)
        if rank == 0:
            old = parts_dir / "meta.json"
            if old.is_file() and json.loads(old.read_text()) != meta:
                print(f"{parts_dir}: parts of other settings: starting over", flush=True)
                shutil.rmtree(parts_dir)
            parts_dir.mkdir(parents=True, exist_ok=True)
            (parts_dir / "meta.json").write_text(json.dumps(meta))
            if folder:
                (folder / "images").mkdir(parents=True, exist_ok=True)
        if world > 1:
            dist.barrier()
        part = lambda j: parts_dir / f"{j:06d}.npz"  # noqa: E731
        todo = [j for j in range(rank, n_batches, world) if not part(j).is_file()]
        bar = Progress(n_batches, n_batches - len(todo) * world, "sample", enabled=rank == 0 and args.progress)
        t0, made = time.perf_counter(), 0
        for j in todo:
            idx = range(j * args.batch_size, min((j + 1) * args.batch_size, args.n))
            imgs = images_of(idx)
            arr = nhwc(imgs)
            if folder:
                for i, a in zip(idx, arr):
                    write_png(folder / "images" / f"{i:06d}.png", a)
            tmp = parts_dir / f".{j:06d}.tmp{os.getpid()}.npz"
            np.savez(tmp, arr_0=arr, images=imgs.float().numpy(), labels=y_all[idx.start:idx.stop].numpy())
            os.replace(tmp, part(j))
            made += len(idx)
            bar.update(world)
        bar.close()
        rate = made / max(time.perf_counter() - t0, 1e-9)
        if world > 1:
            dist.barrier()
        if rank == 0:
            missing = [j for j in range(n_batches) if not part(j).is_file()]
            if missing:
                raise DMFError(f"{parts_dir}: batches {missing[:5]} are missing; run sample again to finish")
            write_npz_streaming(npz, [part(j) for j in range(n_batches)], args.n, ("arr_0", "images", "labels"))
            shutil.rmtree(parts_dir)
            where = f"{folder}/images/*.png and {npz}" if folder else str(npz)
            print(f"wrote {args.n} samples ({'flow map' if flow_map else 'flow'} {args.sampler}, {args.steps} steps"
                  f"{f', cfg {args.cfg} on t in [{args.g_min}, {args.g_max}]' if args.cfg != 1 else ''}) to {where}; "
                  f"{rate:.1f} samples/s on rank 0 of {world}", flush=True)
    finally:
        if world > 1:
            dist.destroy_process_group()
