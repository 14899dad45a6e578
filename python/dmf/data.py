"""Training data: the 8x8 digits set inside scikit-learn (the embedded default), a tensor file, or
a latent folder written by `python -m dmf prepare` (read through a memory map, never loaded whole).

Small sets are held in memory as `x` (N, C, H, W) float32 in model space and `y` (N,) int64,
plus `kind`, the rule that maps model space back to [0, 1] images for PNG/npz outputs:
    digits  pixels 0..16     -> x = pixel / 8 - 1          (image = pixel / 16)
    unit    floats in [0, 1] -> x = 2 * v - 1              (uint8 files are divided by 255 first)
    raw     anything else (e.g. VAE latents) is used as is  (images: min-max scaled per sample)
    vae     a latent folder: x = (z - shift_factor) * scaling_factor, z ~ N(mean, std^2) of the VAE
            posterior drawn afresh every step (images: decoded by the VAE named in dataset.json)

Every training batch is a pure function of (seed, step): `StepBatches` serves rank r's slice of
step k's global batch, so a DataLoader with workers, a resumed run and any number of DDP ranks
all see the same numbers.
"""
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import DMFError


@dataclass
class Dataset:
    x: torch.Tensor       # (N, C, H, W) float32, model space
    y: torch.Tensor       # (N,) int64 class labels in [0, num_classes)
    num_classes: int
    kind: str             # "digits", "unit" or "raw": how to_images maps back
    info: dict = field(default_factory=dict)

    @property
    def shape(self):
        return tuple(self.x.shape[1:])

    def __len__(self):
        return len(self.y)

    def describe(self) -> str:
        return str(tuple(self.x.shape))

    def read(self, idx: torch.Tensor, step: int, seed: int, rank: int, world: int):
        """(x, y) of the items idx (this rank's slice of step `step`'s global batch)."""
        return self.x[idx], self.y[idx]


LATENT_FORMAT = "dmf-latents-1"


class LatentFolder:
    """A folder from `python -m dmf prepare`: latents.npy (N, F, 2C, h, w) with the VAE posterior's
    mean and std (F = 2: the image and its horizontal flip), labels.npy (N,), dataset.json. Item i
    is image i // F in orientation i % F. Rows are read through np.load(mmap_mode="r") opened lazily
    in each process (DataLoader workers included): only the pages of the rows a batch needs are
    read, and they stay reclaimable page cache, not process memory."""

    kind = "vae"

    def __init__(self, path):
        self.path = Path(path)
        meta = self.path / "dataset.json"
        if not meta.is_file():
            state = " (an unfinished prepare: run it again to finish)" if (self.path / ".prepare").is_dir() else ""
            raise DMFError(f"{self.path}: not a dmf latent folder: no dataset.json{state}")
        try:
            self.info = json.loads(meta.read_text())
        except (OSError, ValueError) as e:
            raise DMFError(f"{meta}: unreadable ({type(e).__name__})") from None
        if self.info.get("format") != LATENT_FORMAT:
            raise DMFError(f"{meta}: format {self.info.get('format')!r}, expected {LATENT_FORMAT!r}")
        try:
            lat = np.load(self.path / "latents.npy", mmap_mode="r")
            self.y_np = np.load(self.path / "labels.npy")
        except (OSError, ValueError) as e:
            raise DMFError(f"{self.path}: latents.npy / labels.npy unreadable ({type(e).__name__}: {e})") from None
        n, f, c2, h, w = lat.shape if lat.ndim == 5 else (0,) * 5
        if lat.ndim != 5 or c2 % 2 or n != self.info["count"] or f != self.info["flips"] or self.y_np.shape != (n,):
            raise DMFError(f"{self.path}: latents.npy of shape {lat.shape} and labels.npy of shape "
                           f"{self.y_np.shape} do not match dataset.json (count {self.info['count']})")
        self.n_images, self.flips = n, f
        self._shape = (c2 // 2, h, w)
        self.num_classes = int(self.info["num_classes"])
        self.scale, self.shift = float(self.info["scaling_factor"]), float(self.info.get("shift_factor") or 0.0)
        self.y = torch.from_numpy(self.y_np.astype(np.int64))
        self._lat = None   # opened on first read, in the process that reads (workers fork after __init__)

    @property
    def shape(self):
        return self._shape

    def __len__(self):
        return self.n_images * self.flips

    def describe(self) -> str:
        return f"({self.n_images} images x {self.flips} orientations, latents {self._shape}, memory-mapped)"

    def __getstate__(self):  # DataLoader workers (spawn) get the path, not the mapping
        return dict(self.__dict__, _lat=None)

    def read(self, idx: torch.Tensor, step: int, seed: int, rank: int, world: int):
        if self._lat is None:
            self._lat = np.load(self.path / "latents.npy", mmap_mode="r")
        idx = idx.numpy()
        img, orient = idx // self.flips, idx % self.flips
        order = np.argsort(img, kind="stable")          # read the file forwards
        mom = np.empty((len(idx), *self._lat.shape[2:]), np.float32)
        mom[order] = self._lat[img[order], orient[order]]
        mom = torch.from_numpy(mom)
        mean, std = mom.chunk(2, dim=1)
        # the posterior draw of the whole global batch from (seed, step), then this rank's slice
        b = len(idx)
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 3, step]).generate_state(1)[0]))
        eps = torch.randn((b * world, *self._shape), generator=g)[rank * b:(rank + 1) * b]
        x = (mean + std * eps - self.shift) * self.scale
        return x, self.y[torch.from_numpy(img)]


class StepBatches(torch.utils.data.Dataset):
    """Item k: this rank's slice of the global batch of optimizer step start + k (batch_indices)."""

    def __init__(self, data, batch: int, seed: int, rank: int, world: int, start: int, stop: int):
        self.data, self.batch, self.seed, self.rank, self.world = data, batch, seed, rank, world
        self.start, self.stop = start, stop

    def __len__(self):
        return max(0, self.stop - self.start)

    def __getitem__(self, k):
        step = self.start + k
        b = self.batch // self.world
        idx = batch_indices(len(self.data), self.batch, step, self.seed)[self.rank * b:(self.rank + 1) * b]
        return self.data.read(idx, step, self.seed, self.rank, self.world)


def loader(data, batch: int, seed: int, rank: int, world: int, start: int, stop: int, workers: int):
    """Batches of steps start .. stop - 1 in order; workers > 0 prefetch them in other processes."""
    ds = StepBatches(data, batch, seed, rank, world, start, stop)
    kw = dict(num_workers=workers, prefetch_factor=4, persistent_workers=False) if workers > 0 else {}
    return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, **kw)


def default_workers(data) -> int:
    """In-memory sets need none; a memory map gets up to 4 reader processes, at most half the cores
    (each step's read is small next to a training step; the rest of the cores train)."""
    if not isinstance(data, LatentFolder):
        return 0
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def load_digits() -> Dataset:
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise DMFError("the digits set needs scikit-learn: pip install scikit-learn") from None
    d = sk_digits()
    x = torch.from_numpy(d.images.astype(np.float32)).unsqueeze(1) / 8.0 - 1.0  # (1797, 1, 8, 8) in [-1, 1]
    return Dataset(x, torch.from_numpy(d.target.astype(np.int64)), 10, "digits")


def _read_file(path: Path):
    """(images, labels) as numpy/torch arrays from a .pt or .npz file."""
    if path.suffix == ".npz":
        try:
            f = np.load(path, allow_pickle=False)
        except Exception as e:
            raise DMFError(f"{path}: not a readable .npz file ({type(e).__name__})") from None
        obj = {k: f[k] for k in f.files}
    elif path.suffix == ".pt":
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DMFError(f"{path}: not a readable tensor file ({type(e).__name__}: {str(e).splitlines()[0][:120]})") \
                from None
    else:
        raise DMFError(f"{path}: data files must be .pt or .npz")
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        return obj[0], obj[1]
    if not isinstance(obj, dict):
        raise DMFError(f"{path}: expected a dict with images/latents and labels, got {type(obj).__name__}")
    xs = [k for k in ("images", "latents", "x") if k in obj]
    ys = [k for k in ("labels", "y") if k in obj]
    if not xs or not ys:
        raise DMFError(f"{path}: needs keys 'images' (or 'latents' / 'x') and 'labels' (or 'y'), has {sorted(obj)}")
    return obj[xs[0]], obj[ys[0]]


def load_file(path) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise DMFError(f"data file {path} does not exist")
    x, y = _read_file(path)
    x, y = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x), torch.as_tensor(
        np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    if x.ndim != 4:
        raise DMFError(f"{path}: images must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[2] != x.shape[3]:
        raise DMFError(f"{path}: images must be square (H == W), got shape {tuple(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DMFError(f"{path}: labels must be (N,) with N = {x.shape[0]}, got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.numel() == 0 or int(y.min()) < 0:
        raise DMFError(f"{path}: labels must be non-negative integers")
    if x.dtype == torch.uint8:
        x, kind = x.float() / 255.0, "unit"
    else:
        x = x.float()
        if not torch.isfinite(x).all():
            raise DMFError(f"{path}: images contain NaN or inf")
        kind = "unit" if x.min() >= 0 and x.max() <= 1 else "raw"
    if kind == "unit":
        x = 2 * x - 1
    return Dataset(x.contiguous(), y.long(), int(y.max()) + 1, kind)


def load_data(name: str):
    if name == "digits":
        return load_digits()
    return LatentFolder(name) if Path(name).is_dir() else load_file(name)


def to_images(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Model-space samples (N, C, H, W) -> float32 images in [0, 1]."""
    x = x.float()
    if kind in ("digits", "unit"):
        return ((x + 1) / 2).clamp(0, 1)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-8)


def batch_indices(n: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """The global batch of optimizer step `step`: positions step*batch ... of an endless
    sequence of epochs, each a permutation of range(n) drawn from (seed, epoch). A pure
    function of its arguments, so a resumed run (and every DDP rank) sees the same batches."""
    pos = torch.arange(step * batch, (step + 1) * batch)
    epochs = pos // n
    out = torch.empty(batch, dtype=torch.long)
    for e in epochs.unique().tolist():
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 1, e]).generate_state(1)[0]))
        perm = torch.randperm(n, generator=g)
        sel = epochs == e
        out[sel] = perm[pos[sel] % n]
    return out
