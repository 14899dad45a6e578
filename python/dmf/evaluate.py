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
# Precision and recall (Kynkaanniemi et al. 2019, k = 3) in the same 2048-d pool features, as ADM's
# evaluator reports them beside FID (torch-fidelity's own `prc` defaults to VGG16 features, which need
# torchvision); the k-NN rule is torch-fidelity's calculate_precision_recall_part, in row blocks.

FID_DIMS = 2048
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"   # torch-fidelity's release file


def inception_class():
    import importlib
    import importlib.util
    import sys

    from .errors import DMFError

    if importlib.util.find_spec("torch_fidelity") is None:
        raise DMFError("evaluate needs torch-fidelity: pip install --no-deps torch-fidelity (its torchvision "
                       "dependency is not used, and would pull in another torch)")
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


@torch.no_grad()
def inception_features(net, path, batch=64, device="cpu", progress=True):
    """(pool (N, 2048) float32, logits_unbiased (N, 1008) float64) of an image set."""
    from .image_sets import image_batches
    from .optional import Progress

    n, batches = image_batches(path, batch)
    bar = Progress(n, 0, f"inception {Path(path).name}", enabled=progress)
    pool, logits = [], []
    for x in batches:
        f, lg = net(x.to(device))
        pool.append(f.float().cpu())
        logits.append(lg.double().cpu())
        bar.update(len(x))
    bar.close()
    feats = torch.cat(pool)
    if len(feats) < 2:
        from .errors import DMFError
        raise DMFError(f"{path}: FID needs at least 2 images, got {len(feats)}")
    return feats, torch.cat(logits)


def precision_recall(gen: torch.Tensor, real: torch.Tensor, k: int = 3, block: int = 1024):
    """Improved precision and recall (Kynkaanniemi et al. 2019) of gen (N, D) against real (M, D):
    precision = the fraction of gen rows inside some real row's ball, whose radius is that row's distance
    to its k-th nearest real neighbour (itself not counted); recall the same with the roles swapped.
    None when a set has k rows or fewer (no k-th neighbour). Distances in float32 row blocks:
    block x max(N, M) at a time (1024 x 50000 x 4 B = 205 MB)."""
    gen, real = gen.float(), real.float()
    if min(len(gen), len(real)) <= k:
        return None, None

    def radii(f):
        return torch.cat([torch.cdist(b, f).kthvalue(k + 1, dim=1).values for b in f.split(block)])

    def covered(a, b, radius_b):
        return torch.cat([(torch.cdist(x, b) <= radius_b).any(dim=1) for x in a.split(block)]).float().mean().item()

    return covered(gen, real, radii(real)), covered(real, gen, radii(gen))


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


def reference_stats(net, ref, weights, cache_dir, batch=64, device="cpu", progress=True, log=print,
                    features=False):
    """(mu, sigma, feats or None, cache path or None) of the reference. mu and sigma come from an .npz
    that has them (ADM's reference batches carry the statistics of the whole training set beside a
    10k-image arr_0, and ADM's evaluator uses those; so do we), else from the reference's images.
    feats (its pool features, for precision/recall) only when `features` and it has images. What is
    computed from images is cached in cache_dir, keyed by the reference's files and the Inception
    weights."""
    from .errors import DMFError
    from .image_sets import _npz_keys

    ref = Path(ref)
    if not ref.exists():
        raise DMFError(f"--ref {ref} does not exist")
    keys = _npz_keys(ref) if ref.suffix == ".npz" else set()
    has_images = ref.suffix != ".npz" or bool({"arr_0", "images"} & keys)
    if ref.suffix == ".npz" and ({"mu", "sigma"} <= keys or not has_images):
        if not {"mu", "sigma"} <= keys:
            raise DMFError(f"--ref {ref}: needs images (arr_0 / images) or statistics (mu, sigma), has {sorted(keys)}")
        with np.load(ref) as f:
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
        if mu.shape != (FID_DIMS,) or sigma.shape != (FID_DIMS, FID_DIMS):
            raise DMFError(f"--ref {ref}: statistics of dimension {mu.shape} / {sigma.shape}, but the Inception "
                           f"pool features have {FID_DIMS}")
        if not (features and has_images):
            return mu, sigma, None, None
        _, _, feats, cache = _cached_reference(net, ref, weights, cache_dir, batch, device, progress, log)
        return mu, sigma, feats, cache
    mu, sigma, feats, cache = _cached_reference(net, ref, weights, cache_dir, batch, device, progress, log)
    return mu, sigma, feats if features else None, cache


def _cached_reference(net, ref, weights, cache_dir, batch, device, progress, log):
    cache = Path(cache_dir) / f"{ref.name}-{_identity(ref, weights)}.npz"
    if cache.is_file():
        with np.load(cache) as f:
            if "feats" in f:  # caches written before precision/recall hold mu and sigma only: recomputed
                log(f"reference statistics from the cache {cache}")
                return f["mu"], f["sigma"], torch.from_numpy(f["feats"]), cache
    feats, _ = inception_features(net, ref, batch, device, progress)
    mu, sigma = gaussian(feats)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma, feats=feats.numpy())
    tmp.replace(cache)
    return mu, sigma, feats, cache


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
    k = args.prc_k
    if k < 1:
        raise DMFError("--prc-k must be at least 1")
    mu_r, sigma_r, feats_r, cache = reference_stats(net, args.ref, args.inception_weights,
                                                    args.cache_dir or default_cache_dir(), args.batch_size, device,
                                                    args.progress, features=args.precision_recall)
    feats, logits = inception_features(net, samples, args.batch_size, device, args.progress)
    fid = frechet_distance(*gaussian(feats), mu_r, sigma_r)
    is_mean, is_std = inception_score(logits)
    precision, recall = precision_recall(feats, feats_r, k) if feats_r is not None else (None, None)
    res = dict(fid=fid, inception_score=is_mean, inception_score_std=is_std, precision=precision, recall=recall,
               prc_k=k, n_samples=int(logits.shape[0]), n_ref_images=None if feats_r is None else len(feats_r),
               samples=str(samples.resolve()), ref=str(Path(args.ref).resolve()),
               ref_stats_cache=str(cache) if cache else None, inception_weights=args.inception_weights or "download",
               feature_extractor="torch-fidelity inception-v3-compat, pool 2048")
    out = samples / "metrics.json" if samples.is_dir() else samples.with_name(samples.stem + ".metrics.json")
    out.write_text(json.dumps(res, indent=1))
    print(f"FID {fid:.4f}")
    print(f"IS {is_mean:.3f} +- {is_std:.3f} ({res['n_samples']} samples; {out})")
    if precision is not None:
        print(f"precision {precision:.4f} recall {recall:.4f} (k={k}, {len(feats_r)} reference images)")
    elif args.precision_recall:
        why = (f"needs more than {k} images in each set" if feats_r is not None
               else "needs reference images; --ref has statistics only")
        print(f"precision/recall not computed: {why}")
    return res
