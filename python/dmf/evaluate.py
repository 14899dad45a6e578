"""Digits quality metrics: Frechet distance in the features of a small digits classifier, and
that classifier's accuracy on class-conditional samples.

The classifier (an MLP on the 64 pixels) is trained once with a fixed seed on the whole digits
set and cached; features are its 64-d penultimate layer. FD is between Gaussian fits of real and
generated features, as FID does with Inception features.
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import load_digits


class DigitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.SiLU(), nn.Linear(256, 64), nn.SiLU())
        self.head = nn.Linear(64, 10)

    def features(self, x):  # x: (B, 1, 8, 8) in model space [-1, 1] -> (B, 64)
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def train_classifier(seed: int = 0, steps: int = 600) -> DigitsNet:
    """Full-batch AdamW on all 1797 digits with small input noise (samples are never exactly clean)."""
    data = load_digits()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DigitsNet()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-2)
    for _ in range(steps):
        x = data.x + 0.1 * torch.randn(data.x.shape, generator=g)
        loss = F.cross_entropy(net(x), data.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def classifier(cache_dir, seed: int = 0) -> DigitsNet:
    """The cached classifier under cache_dir (trained and saved on first use)."""
    path = Path(cache_dir) / f"digits_classifier_seed{seed}.pt"
    net = DigitsNet()
    if path.is_file():
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return net.eval()
        except Exception:  # a torn or stale cache file: retrain below
            pass
    net = train_classifier(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return net


def gaussian(feats: torch.Tensor):
    f = feats.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)); tr (S1 S2)^(1/2) from the eigenvalues of the
    symmetric PSD matrix S1^(1/2) S2 S1^(1/2), which has the same spectrum as S1 S2."""
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


@torch.no_grad()
def score(net: DigitsNet, samples: torch.Tensor, labels: torch.Tensor, real_stats) -> dict:
    """samples (N, 1, 8, 8) in model space, labels (N,) their conditioning classes."""
    x = samples.float().clamp(-1, 1)
    feats = net.features(x)
    acc = (net.head(feats).argmax(1) == labels).float().mean().item()
    return {"fd": frechet_distance(*real_stats, *gaussian(feats)), "acc": acc}


@torch.no_grad()
def real_stats(net: DigitsNet):
    return gaussian(net.features(load_digits().x))


@torch.no_grad()
def real_floor(net: DigitsNet, n: int, seed: int = 0) -> float:
    """FD of n real digits (drawn without replacement) against all of them: what a perfect
    generator would score with n samples (FD is biased upwards at small n)."""
    data = load_digits()
    idx = torch.randperm(len(data.y), generator=torch.Generator().manual_seed(seed))[:n]
    return frechet_distance(*real_stats(net), *gaussian(net.features(data.x[idx])))


# ---------------------------------------------------------------------------------------------
# FID and Inception Score on image sets: python -m dmf evaluate SAMPLES --ref REF
#
# Features come from torch-fidelity's InceptionV3 (`inception-v3-compat`: the TF-FID graph ported
# to PyTorch, with TF1's bilinear resize to 299), the network behind the FID numbers of ADM, edm2 and
# the DMF paper; FID uses its 2048-d pool features, IS its `logits_unbiased`. clean-fid and
# pytorch-fid were not chosen: both import torchvision for their Inception and clean-fid downloads
# a TorchScript file at run time. torch-fidelity's own package __init__ also imports torchvision
# (for datasets and the VGG/CLIP/DINOv2 extractors), whose PyPI wheels do not load beside a CPU
# build of torch ("operator torchvision::nms does not exist"), so when that import fails the
# Inception module is loaded from the installed package without its __init__ (it needs only torch).
# The statistics are computed here: mean and covariance in float64, FID as below (exact for PSD
# covariances, no complex sqrtm), IS as torch-fidelity computes it (10 splits, shuffle seed 2020).
# Precision/recall: torch-fidelity computes them in VGG16 features, which need torchvision: not offered.

FID_DIMS = 2048
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"   # torch-fidelity's release file


def inception_class():
    import importlib
    import importlib.util
    import sys

    from .errors import DMFError

    if importlib.util.find_spec("torch_fidelity") is None:
        raise DMFError("evaluate needs torch-fidelity: pip install --no-deps torch-fidelity (its torchvision "
                       "dependency is not used) or pip install .[dmf]")
    name = "torch_fidelity.feature_extractor_inceptionv3"
    try:
        return importlib.import_module(name).FeatureExtractorInceptionV3
    except Exception:  # the package __init__ failed on torchvision: load the module without it
        pass
    stub = importlib.util.module_from_spec(importlib.util.find_spec("torch_fidelity"))  # not executed
    saved = sys.modules.get("torch_fidelity")
    sys.modules["torch_fidelity"] = stub
    try:
        return importlib.import_module(name).FeatureExtractorInceptionV3
    finally:  # a later `import torch_fidelity` tries the real package again
        if saved is None:
            sys.modules.pop("torch_fidelity", None)
        else:
            sys.modules["torch_fidelity"] = saved


def inception(weights=None, device="cpu"):
    from .errors import DMFError

    cls = inception_class()
    if weights is not None and not Path(weights).is_file():
        raise DMFError(f"--inception-weights {weights} does not exist")
    try:
        net = cls("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights)
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        hint = "" if weights else f"; offline, pass --inception-weights PATH (torch-fidelity's {INCEPTION_FILE})"
        raise DMFError(f"cannot load the Inception weights ({type(e).__name__}: {msg}){hint}") from None
    return net.to(device).eval()


def _npz_keys(path):
    import zipfile

    from .errors import DMFError

    try:
        with zipfile.ZipFile(path) as zf:
            return {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    except (OSError, zipfile.BadZipFile):
        raise DMFError(f"{path}: not a readable .npz file") from None


def _npz_batches(path, key, batch):
    """Rows of one array of an uncompressed .npz (np.savez, ADM), `batch` at a time, without
    reading the whole array (a 50k x 256 x 256 x 3 arr_0 is 9.8 GB)."""
    import zipfile

    from .errors import DMFError

    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        shape, fortran, dtype = _npy_header(f)
        if fortran:
            raise DMFError(f"{path}: {key} is stored in Fortran order")
        row = int(np.prod(shape[1:])) * dtype.itemsize
        for i in range(0, shape[0], batch):
            k = min(batch, shape[0] - i)
            yield np.frombuffer(f.read(k * row), dtype).reshape(k, *shape[1:])


def _to_nchw_uint8(a: np.ndarray, layout: str) -> torch.Tensor:
    if layout == "nhwc":
        a = a.transpose(0, 3, 1, 2)
    if a.dtype != np.uint8:  # float images in [0, 1]
        a = np.clip(np.floor(a.astype(np.float32) * 255 + 0.5), 0, 255).astype(np.uint8)
    t = torch.from_numpy(np.ascontiguousarray(a))
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    elif t.shape[1] == 4:
        t = t[:, :3]
    return t


def image_batches(path, batch=64):
    """(count, iterator of uint8 (b, 3, H, W) batches) of a folder of images or an .npz with
    arr_0 (uint8 NHWC, ADM) or images (float NCHW in [0, 1])."""
    from .errors import DMFError
    from .prepare import IMAGE_EXTS

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise DMFError(f"{path}: no images")

        def gen():
            from PIL import Image

            size = None
            for i in range(0, len(files), batch):
                arrs = []
                for f in files[i:i + batch]:
                    try:
                        with Image.open(f) as im:
                            a = np.asarray(im.convert("RGB"))
                    except Exception as e:
                        raise DMFError(f"{f}: not a readable image ({type(e).__name__})") from None
                    if size is not None and a.shape != size:
                        raise DMFError(f"{f}: size {a.shape[:2]} differs from the others' {size[:2]}")
                    size = a.shape
                    arrs.append(a)
                yield _to_nchw_uint8(np.stack(arrs), "nhwc")
        return len(files), gen()
    if path.suffix != ".npz" or not path.is_file():
        raise DMFError(f"{path}: expected a folder of images or an .npz file")
    keys = _npz_keys(path)
    key, layout = ("arr_0", "nhwc") if "arr_0" in keys else ("images", "nchw") if "images" in keys else (None, None)
    if key is None:
        raise DMFError(f"{path}: no images in it (needs arr_0 (N, H, W, C) uint8 or images (N, C, H, W)); keys "
                       f"{sorted(keys)}")
    it = _npz_batches(path, key, batch)
    first = next(it)
    if first.ndim != 4 or first.shape[3 if layout == "nhwc" else 1] not in (1, 3, 4):
        raise DMFError(f"{path}: {key} of shape {first.shape[1:]} per row is not {layout.upper()} images")
    n = _npz_len(path, key)

    def gen():
        yield _to_nchw_uint8(first, layout)
        for a in it:
            yield _to_nchw_uint8(a, layout)
    return n, gen()


def _npz_len(path, key) -> int:
    import zipfile

    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        return int(_npy_header(f)[0][0])


def _npy_header(f):
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(f)


@torch.no_grad()
def inception_stats(net, path, batch=64, device="cpu", progress=True):
    """(mu (2048,), sigma (2048, 2048), logits_unbiased (N, 1008)) of an image set, float64."""
    from .optional import Progress

    n, batches = image_batches(path, batch)
    bar = Progress(n, 0, f"inception {Path(path).name}", enabled=progress)
    pool, logits = [], []
    for x in batches:
        f, lg = net(x.to(device))
        pool.append(f.double().cpu())
        logits.append(lg.double().cpu())
        bar.update(len(x))
    bar.close()
    feats = torch.cat(pool).numpy()
    if len(feats) < 2:
        from .errors import DMFError
        raise DMFError(f"{path}: FID needs at least 2 images, got {len(feats)}")
    return feats.mean(0), np.cov(feats, rowvar=False), torch.cat(logits)


def inception_score(logits: torch.Tensor, splits=10, seed=2020):
    """torch-fidelity's isc_features_to_metric: exp(E KL(p(y|x) || p(y))) over `splits` shuffled splits."""
    n = logits.shape[0]
    splits = min(splits, n)   # fewer samples than splits: torch-fidelity gives NaN, here each split is 1 sample
    logits = logits[np.random.RandomState(seed).permutation(n)].double()
    p, log_p = logits.softmax(dim=1), logits.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        pc, lpc = p[i * n // splits:(i + 1) * n // splits], log_p[i * n // splits:(i + 1) * n // splits]
        q = pc.mean(dim=0, keepdim=True)
        scores.append((pc * (lpc - q.log())).sum(dim=1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def _identity(path: Path, weights) -> str:
    import hashlib

    h = hashlib.sha256(f"{path.resolve()}|{weights and Path(weights).resolve()}".encode())
    if weights:
        st = Path(weights).stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:24]


def reference_stats(net, ref, weights, cache_dir, batch=64, device="cpu", progress=True, log=print):
    """(mu, sigma) of the reference: given in an .npz (mu, sigma: ADM's reference batches carry the
    statistics of the whole training set beside a 10k-image arr_0, and ADM's evaluator uses those;
    so do we), or computed from its images and cached in cache_dir (keyed by the reference's files
    and the Inception weights)."""
    from .errors import DMFError

    ref = Path(ref)
    if not ref.exists():
        raise DMFError(f"--ref {ref} does not exist")
    keys = _npz_keys(ref) if ref.suffix == ".npz" else set()
    if ref.suffix == ".npz" and ({"mu", "sigma"} <= keys or not {"arr_0", "images"} & keys):
        if not {"mu", "sigma"} <= keys:
            raise DMFError(f"--ref {ref}: needs images (arr_0 / images) or statistics (mu, sigma), has {sorted(keys)}")
        with np.load(ref) as f:
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
        if mu.shape != (FID_DIMS,) or sigma.shape != (FID_DIMS, FID_DIMS):
            raise DMFError(f"--ref {ref}: statistics of dimension {mu.shape} / {sigma.shape}, but the Inception "
                           f"pool features have {FID_DIMS}")
        return mu, sigma, None
    cache = Path(cache_dir) / f"{ref.name}-{_identity(ref, weights)}.npz"
    if cache.is_file():
        with np.load(cache) as f:
            log(f"reference statistics from the cache {cache}")
            return f["mu"], f["sigma"], cache
    mu, sigma, _ = inception_stats(net, ref, batch, device, progress)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma)
    tmp.replace(cache)
    return mu, sigma, cache


def default_cache_dir() -> Path:
    import os

    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dmf" / "fid"


def main(args):
    """python -m dmf evaluate SAMPLES --ref REF [--inception-weights PATH]: prints `FID <value>`."""
    import json

    from .errors import DMFError

    samples = Path(args.samples)
    if not samples.exists():
        raise DMFError(f"SAMPLES {samples} does not exist")
    if args.batch_size < 1:
        raise DMFError("--batch-size must be at least 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    net = inception(args.inception_weights, device)
    mu_r, sigma_r, cache = reference_stats(net, args.ref, args.inception_weights, args.cache_dir or default_cache_dir(),
                                           args.batch_size, device, args.progress)
    mu, sigma, logits = inception_stats(net, samples, args.batch_size, device, args.progress)
    fid = frechet_distance(mu, sigma, mu_r, sigma_r)
    is_mean, is_std = inception_score(logits)
    res = dict(fid=fid, inception_score=is_mean, inception_score_std=is_std, n_samples=int(logits.shape[0]),
               samples=str(samples.resolve()), ref=str(Path(args.ref).resolve()),
               ref_stats_cache=str(cache) if cache else None, inception_weights=args.inception_weights or "download",
               feature_extractor="torch-fidelity inception-v3-compat, pool 2048")
    out = samples / "metrics.json" if samples.is_dir() else samples.with_name(samples.stem + ".metrics.json")
    out.write_text(json.dumps(res, indent=1))
    print(f"FID {fid:.4f}")
    print(f"IS {is_mean:.3f} +- {is_std:.3f} ({res['n_samples']} samples; {out})")
    return res
