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
