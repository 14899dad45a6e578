"""dmf evaluate: FID and IS through torch-fidelity's Inception with a random-weight file equal
what torch-fidelity computes when called directly; the Frechet distance of known Gaussians
matches the closed form; the reference statistics cache; bad references."""
import json
import sys
import types

import numpy as np
import pytest
import torch

from dmf.__main__ import main  # noqa: E402
from dmf.evaluate import frechet_distance, precision_recall  # noqa: E402
from dmf_helpers import make_random_inception  # noqa: E402


def test_frechet_distance_closed_form():
    """Covariances sharing eigenvectors: FD = |m1 - m2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    expect = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expect, rel=1e-10)
    # 1-d: (m1 - m2)^2 + (sigma1 - sigma2)^2
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[1.0]])) == \
        pytest.approx(4 + 1)
    assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0, abs=1e-10)


def _images(seed, n, size=24, shift=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, (n, size, size, 3)).astype(np.int64)
    return np.clip(base + shift, 0, 255).astype(np.uint8)


def _library(monkeypatch):
    """torch_fidelity imported for real, with a stand-in torchvision: its package __init__ imports
    torchvision for datasets and extractors that FID/IS on Inception never use, and torchvision's
    PyPI wheels do not load beside the CPU build of torch."""
    tv = types.ModuleType("torchvision")
    tv.datasets = types.ModuleType("torchvision.datasets")
    tv.datasets.CIFAR10 = tv.datasets.STL10 = tv.datasets.CIFAR100 = object
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.transforms.functional = types.ModuleType("torchvision.transforms.functional")
    for name, mod in (("torchvision", tv), ("torchvision.datasets", tv.datasets),
                      ("torchvision.transforms", tv.transforms),
                      ("torchvision.transforms.functional", tv.transforms.functional)):
        monkeypatch.setitem(sys.modules, name, mod)
    for k in [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
        monkeypatch.delitem(sys.modules, k)
    import torch_fidelity

    return torch_fidelity


class _Uint8Set(torch.utils.data.Dataset):
    def __init__(self, nhwc):
        self.x = torch.from_numpy(nhwc).permute(0, 3, 1, 2)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def test_fid_and_is_equal_the_library(tmp_path, capsys, monkeypatch):
    from PIL import Image

    weights = make_random_inception(tmp_path / "inception.pth")
    gen, ref = _images(0, 4), _images(1, 4, shift=40)     # Inception on the CPU: ~1 s per image
    np.savez(tmp_path / "samples.npz", arr_0=gen, labels=np.zeros(4, np.int64))
    (tmp_path / "ref").mkdir()
    for i, a in enumerate(ref):
        Image.fromarray(a).save(tmp_path / "ref" / f"{i:03d}.png")
    argv = ["evaluate", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref"), "--inception-weights",
            str(weights), "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--batch-size", "6"]
    main(argv)
    out = capsys.readouterr().out
    fid = float(out.splitlines()[0].split()[1])
    assert out.splitlines()[0].startswith("FID ")
    res = json.loads((tmp_path / "samples.metrics.json").read_text())
    assert res["fid"] == pytest.approx(fid, abs=1e-4) and res["n_samples"] == 4
    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 1

    tf = _library(monkeypatch)
    lib = tf.calculate_metrics(input1=_Uint8Set(gen), input2=_Uint8Set(ref), fid=True, isc=True, cuda=False,
                               verbose=False, feature_extractor_weights_path=str(weights), batch_size=6,
                               cache=False, save_cpu_ram=True, isc_splits=4, prc=True,
                               feature_extractor="inception-v3-compat", feature_layer_prc="2048")
    assert fid > 1e-3
    assert res["fid"] == pytest.approx(lib["frechet_inception_distance"], rel=1e-4)
    assert res["inception_score"] == pytest.approx(lib["inception_score_mean"], rel=1e-5)
    assert (res["precision"], res["recall"]) == (lib["precision"], lib["recall"])
    assert out.splitlines()[2].startswith("precision ")

    # the cache answers the second time; precomputed (mu, sigma) give the same FID (2 samples: speed)
    np.savez(tmp_path / "two.npz", images=gen[:2].transpose(0, 3, 1, 2).astype(np.float32) / 255)  # NCHW floats
    main(["evaluate", str(tmp_path / "two.npz")] + argv[2:])
    out = capsys.readouterr().out
    assert "from the cache" in out
    with np.load(cached[0]) as f:
        np.savez(tmp_path / "stats.npz", mu=f["mu"], sigma=f["sigma"])
    main(["evaluate", str(tmp_path / "two.npz"), "--ref", str(tmp_path / "stats.npz")] + argv[4:])
    out2 = capsys.readouterr().out.splitlines()
    assert out2[0] == out.splitlines()[1]
    assert out2[2] == "precision/recall not computed: needs reference images; --ref has statistics only"
    assert "needs more than 3 images" in out.splitlines()[3]          # two samples: no 3rd neighbour


def test_precision_recall_known_sets():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(40, 8, generator=g)
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real + 100, real) == (0.0, 0.0)            # disjoint supports
    half = torch.cat([real[:20] + 1e-3, torch.randn(20, 8, generator=g) + 100])
    precision, _ = precision_recall(half, real)
    assert precision == 0.5                                             # the far half lies in no real ball
    assert precision_recall(real[:3], real) == (None, None)             # 3 rows: no 3rd neighbour
    assert precision_recall(real[:4], real, k=3)[0] is not None


def test_precision_recall_equal_the_library(monkeypatch):
    """Our blocked k-NN rule equals torch-fidelity's calculate_precision_recall_full, k = 3 and 5,
    blocks smaller than either set."""
    tf = _library(monkeypatch)
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    g = torch.Generator().manual_seed(1)
    gen, real = torch.randn(90, 16, generator=g) * 1.2 + 0.3, torch.randn(70, 16, generator=g)
    for k in (3, 5):
        ours = precision_recall(gen, real, k=k, block=16)
        lib = calculate_precision_recall_full(gen, real, neighborhood=k, batch_size=10000)
        assert ours == lib, (k, ours, lib)
        assert k != 3 or (0 < min(ours) and max(ours) < 1), ours      # neither trivially 0 nor 1
    assert tf is not None


def test_bad_references(tmp_path, capsys):
    weights = make_random_inception(tmp_path / "inception.pth")
    np.savez(tmp_path / "samples.npz", arr_0=_images(0, 4))
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(tmp_path / "nothing.npz", foo=np.zeros(3))
    (tmp_path / "torn.npz").write_bytes(b"PK\x03\x04 not really")
    for ref, msg in (("small.npz", "dimension"), ("nothing.npz", "needs images"), ("torn.npz", "not a readable"),
                     ("missing", "does not exist")):
        with pytest.raises(SystemExit) as e:
            main(["evaluate", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / ref), "--inception-weights",
                  str(weights), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and msg in err[0], (ref, err)
    assert not (tmp_path / "samples.metrics.json").exists()
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "small.npz"), "--inception-weights",
              str(tmp_path / "nope.pth")])
    assert e.value.code == 2 and "--inception-weights" in capsys.readouterr().err
