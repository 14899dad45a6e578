"""Training data: the 8x8 digits set inside scikit-learn (the embedded default), or a tensor file.

Every dataset is held in memory as `x` (N, C, H, W) float32 in model space and `y` (N,) int64,
plus `kind`, the rule that maps model space back to [0, 1] images for PNG/npz outputs:
    digits  pixels 0..16     -> x = pixel / 8 - 1          (image = pixel / 16)
    unit    floats in [0, 1] -> x = 2 * v - 1              (uint8 files are divided by 255 first)
    raw     anything else (e.g. VAE latents) is used as is  (images: min-max scaled per sample)
"""
from dataclasses import dataclass
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

    @property
    def shape(self):
        return tuple(self.x.shape[1:])


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


def load_data(name: str) -> Dataset:
    return load_digits() if name == "digits" else load_file(name)


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
