"""python -m dmf prepare SRC OUT --resolution 256 --vae NAME_OR_PATH: images -> a memory-mapped
latent folder for `dmf train --data OUT`.

SRC is an ImageFolder tree (one subfolder per class, classes numbered in sorted order, images found
recursively) or, with --labels FILE, a flat folder; FILE is edm2's dataset.json ({"labels":
[[relative path, label], ...]}), a JSON object {relative path: label}, or text lines "path label"
(comma, tab or space separated). Each image is centre-cropped as ADM/edm2 do (box-halve while the
short side is >= 2x the target, bicubic to the target, centre crop), then encoded by the VAE in
[-1, 1] together with its horizontal flip (--no-flip: the image alone).

OUT holds:
    latents.npy   (N, F, 2C, h, w) float16 (or --dtype float32): the VAE posterior's mean and std,
                  as edm2 / REPA / the official DMF code keep them, so training draws a fresh latent
                  z = mean + std * eps every step; F = 2 orientations (image, flip), F = 1 with --no-flip
    labels.npy    (N,) int64
    files.txt     the source images in row order
    dataset.json  format, count, flips, latent shape, dtype, VAE name and scale/shift factors, resolution,
                  classes; written last, so a folder without it is unfinished
float16 halves the disk and page cache of float32; its rounding (relative 2^-11 of the unscaled
latent) is far below the posterior noise the trainer adds.

Resumable: the work is cut into chunks of --batch-size images; each finished chunk is flushed and
recorded (OUT/.prepare/done.<rank>.txt), a rerun encodes only the chunks not recorded. Under
torchrun (one node) rank r takes chunks r, r + world, ...
"""
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .data import LATENT_FORMAT
from .errors import DMFError
from .optional import Progress, require

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif"}
DTYPES = ("float16", "float32")


def _images_under(d: Path):
    return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _read_labels_file(path: Path) -> dict:
    if not path.is_file():
        raise DMFError(f"--labels {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            obj = json.loads(text)
            pairs = obj["labels"] if isinstance(obj, dict) and isinstance(obj.get("labels"), list) else \
                list(obj.items())
        else:
            pairs = [line.replace(",", " ").replace("\t", " ").split() for line in text.splitlines() if line.strip()]
            pairs = [p for p in pairs if not (len(p) == 2 and p[1] == "label")]  # a header line
        out = {str(Path(name)): int(label) for name, label in pairs}
    except (ValueError, TypeError, KeyError, AttributeError):
        raise DMFError(f"--labels {path}: expected edm2's dataset.json, a {{path: label}} JSON object or "
                       "lines 'path label'") from None
    if any(v < 0 for v in out.values()):
        raise DMFError(f"--labels {path}: labels must be non-negative integers")
    return out


def list_source(src, labels_file=None):
    """(image paths, labels (N,) int64, class names) in a fixed order."""
    src = Path(src)
    if not src.is_dir():
        raise DMFError(f"SRC {src} is not a folder")
    if labels_file is not None:
        labels = _read_labels_file(Path(labels_file))
        files = _images_under(src)
        if not files:
            raise DMFError(f"SRC {src} has no images ({', '.join(sorted(IMAGE_EXTS))})")
        rel = [str(f.relative_to(src)) for f in files]
        missing = [r for r in rel if r not in labels]
        if missing:
            raise DMFError(f"--labels {labels_file} has no label for {missing[0]}" +
                           (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
        y = np.array([labels[r] for r in rel], np.int64)
        return files, y, [str(c) for c in range(int(y.max()) + 1)]
    classes = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DMFError(f"SRC {src} has no class subfolders (ImageFolder layout); for a flat folder pass --labels FILE")
    files, ys = [], []
    for k, c in enumerate(classes):
        imgs = _images_under(src / c)
        if not imgs:
            raise DMFError(f"class folder {src / c} has no images ({', '.join(sorted(IMAGE_EXTS))})")
        files += imgs
        ys += [k] * len(imgs)
    return files, np.array(ys, np.int64), classes


def center_crop(img, size: int):
    """ADM's center_crop_arr (also edm2's center-crop-dhariwal) on a PIL image -> uint8 (size, size, 3)."""
    from PIL import Image

    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    y0, x0 = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y0:y0 + size, x0:x0 + size]


def load_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            img = im.convert("RGB")
    except Exception as e:  # empty, truncated, not an image
        raise DMFError(f"{path}: not a readable image ({type(e).__name__})") from None
    if min(img.size) < 1:
        raise DMFError(f"{path}: empty image")
    return center_crop(img, size)


def _plan_key(files, y, resolution, vae, flip, dtype) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([resolution, vae, flip, dtype]).encode())
    for f, k in zip(files, y.tolist()):
        h.update(f"{f}\t{k}\n".encode())
    return h.hexdigest()


def _done_chunks(state: Path) -> set:
    done = set()
    for f in state.glob("done.*.txt"):
        done.update(int(x) for x in f.read_text().split())
    return done


def prepare(src, out, resolution: int, vae_name: str, labels=None, batch_size: int = 32, flip: bool = True,
            dtype: str = "float16", device: str = "", progress: bool = True, threads: int = 4, log=print):
    if resolution < 8 or batch_size < 1 or threads < 1:
        raise DMFError("need --resolution >= 8, --batch-size >= 1 and --threads >= 1")
    if dtype not in DTYPES:
        raise DMFError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    require("PIL", "reading images", "pillow")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    files, y, classes = list_source(src, labels)
    F = 2 if flip else 1
    out = Path(out)
    state = out / ".prepare"
    key = _plan_key([str(p) for p in files], y, resolution, vae_name, flip, dtype)
    if (out / "dataset.json").is_file():
        meta = json.loads((out / "dataset.json").read_text())
        if meta.get("plan") == key:
            log(f"{out}: already prepared ({meta['count']} images)")
            return out
        raise DMFError(f"{out} already holds a finished dataset of another source or settings; choose another OUT")
    if world > 1:
        if device.startswith("cuda"):   # one GPU per rank, as train does
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        from . import vae as vae_mod

        vae = vae_mod.load_vae(vae_name, device)
        f = vae_mod.downsampling(vae)
        if resolution % f:
            raise DMFError(f"--resolution {resolution} is not divisible by the VAE's downsampling factor {f}")
        C, h = vae.config.latent_channels, resolution // f
        stale = (state / "plan.json").is_file() and json.loads((state / "plan.json").read_text()).get("plan") != key
        if world > 1:
            dist.barrier()   # every rank has read the old plan before rank 0 replaces it
        if rank == 0:
            if stale:
                log(f"{out}: unfinished work of another source or settings: starting over")
                for p in state.glob("*"):
                    p.unlink()
            if not (state / "plan.json").is_file():
                state.mkdir(parents=True, exist_ok=True)
                np.lib.format.open_memmap(out / "latents.npy", mode="w+", dtype=dtype,
                                          shape=(len(files), F, 2 * C, h, h)).flush()
                np.save(out / "labels.npy", y)
                (out / "files.txt").write_text("".join(f"{p}\n" for p in files))
                (state / "plan.json").write_text(json.dumps({"plan": key}))  # last: the arrays exist
        if world > 1:
            dist.barrier()
        lat = np.load(out / "latents.npy", mmap_mode="r+")
        n_chunks = -(-len(files) // batch_size)
        done = _done_chunks(state)
        mine = [c for c in range(n_chunks) if c % world == rank and c not in done]
        bar = Progress(n_chunks, n_chunks - len([c for c in range(n_chunks) if c not in done]), "prepare",
                       enabled=progress and rank == 0)
        t0, n_done = time.perf_counter(), 0
        with ThreadPoolExecutor(threads) as pool, open(state / f"done.{rank}.txt", "a") as rec:
            for c in mine:
                rows = range(c * batch_size, min((c + 1) * batch_size, len(files)))
                # PIL decodes and resizes without the GIL: threads overlap the reads
                px = np.stack(list(pool.map(lambda i: load_image(files[i], resolution), rows)))
                px = torch.from_numpy(px).permute(0, 3, 1, 2)           # (b, 3, R, R) uint8
                if flip:
                    px = torch.cat([px, px.flip(-1)])
                mean, std = encode_moments(vae, px)
                mom = torch.cat([mean, std], dim=1).view(F, len(rows), 2 * C, h, h).transpose(0, 1)
                lat[rows.start:rows.stop] = mom.numpy().astype(dtype)
                lat.flush()
                rec.write(f"{c}\n")    # recorded only after its rows are on disk
                rec.flush()
                os.fsync(rec.fileno())
                n_done += len(rows)
                bar.update(world if world > 1 else 1)
        bar.close()
        rate = n_done / max(time.perf_counter() - t0, 1e-9)
        if world > 1:
            dist.barrier()
        if rank == 0:
            left = sorted(set(range(n_chunks)) - _done_chunks(state))
            if left:
                raise DMFError(f"{out}: chunks {left[:5]} were not written; run prepare again to finish")
            scale, shift = vae_mod.factors(vae)
            meta = dict(format=LATENT_FORMAT, count=len(files), flips=F, latent_shape=[C, h, h], dtype=dtype,
                        vae=str(vae_name), scaling_factor=scale, shift_factor=shift, resolution=resolution,
                        num_classes=len(classes), classes=classes, source=str(Path(src).resolve()), plan=key)
            tmp = out / ".dataset.json.tmp"
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, out / "dataset.json")
            for p in state.glob("*"):
                p.unlink()
            state.rmdir()
            log(f"wrote {out}: {len(files)} images x {F} orientations -> latents {C}x{h}x{h} ({dtype}), "
                f"{len(classes)} classes; {rate:.1f} images/s on rank 0 ({world} process(es))")
    finally:
        if world > 1:
            dist.destroy_process_group()
    return out


def encode_moments(vae, px):
    from .vae import encode_moments as enc

    return enc(vae, px)


def main(args):
    prepare(args.src, args.out, args.resolution, args.vae, args.labels, args.batch_size, not args.no_flip,
            args.dtype, args.device, not args.no_progress, args.threads)
