"""Throughput of the dmf paper workflow's non-model stages, on this machine (CPU-sized):

    python -m benchmarks.bench_dmf_pipeline [--ckpt runs/demo/dmf/checkpoints/last.pt] [--out DIR]

1. `dmf prepare`: images/s at 256 px through an AutoencoderKL of the SD-VAE's architecture (diffusers'
   default config: 4 levels of 128-512 channels, 4 latent channels) with random weights, image + flip.
2. The training data loader over a memory-mapped latent folder (4x32x32 posterior moments, float16,
   written directly: 8192 images): seconds per global batch of 256 with the trainer's worker count,
   against a digits training step (`make demo` on this CPU: flow 0.137 s, DMF 0.357 s per step).
3. `dmf sample`: samples/s of the digits DMF checkpoint at 1 and 4 steps (when --ckpt exists).
Needs diffusers and PIL. Writes DIR/pipeline.md.
"""
import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def run_dmf(args):
    env_paths = [str(ROOT), str(ROOT / "python")]
    p = subprocess.run([sys.executable, "-m", "dmf", *args], capture_output=True, text=True, cwd=tempfile.gettempdir(),
                       env={"PYTHONPATH": ":".join(env_paths), "PATH": "/usr/bin:/bin"}, timeout=3600)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    return p.stdout


def prepare_rate(work: Path, n_images: int) -> float:
    from diffusers import AutoencoderKL
    from dmf_helpers import make_image_folder

    make_image_folder(work / "src", classes=2, per_class=n_images // 2, size=300)
    torch.manual_seed(0)
    AutoencoderKL().save_pretrained(work / "sd_vae_random")   # the SD-VAE architecture, random weights
    out = run_dmf(["prepare", str(work / "src"), str(work / "lat"), "--resolution", "256", "--vae",
                   str(work / "sd_vae_random"), "--batch-size", "4", "--no-progress"])
    return float(re.search(r"([0-9.]+) images/s", out).group(1))


def loader_rate(work: Path, n: int = 8192, batch: int = 256, steps: int = 40):
    from dmf.data import LATENT_FORMAT, LatentFolder, default_workers, loader

    d = work / "synthetic_latents"
    d.mkdir()
    lat = np.lib.format.open_memmap(d / "latents.npy", mode="w+", dtype=np.float16, shape=(n, 1, 8, 32, 32))
    lat[:] = np.random.default_rng(0).standard_normal(lat.shape).astype(np.float16)
    lat.flush()
    np.save(d / "labels.npy", np.arange(n, dtype=np.int64) % 1000)
    (d / "dataset.json").write_text(json.dumps(dict(
        format=LATENT_FORMAT, count=n, flips=1, latent_shape=[4, 32, 32], dtype="float16", vae="synthetic",
        scaling_factor=0.18215, shift_factor=0.0, resolution=256, num_classes=1000)))
    data = LatentFolder(d)
    workers = default_workers(data)
    it = iter(loader(data, batch, 0, 0, 1, 0, steps + 5, workers))
    for _ in range(5):   # worker start-up and prefetch
        next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    return (time.perf_counter() - t0) / steps, workers


def sample_rates(work: Path, ckpt: Path, n: int = 1000):
    rates = {}
    for steps in (1, 4):
        out = run_dmf(["sample", "--ckpt", str(ckpt), "--steps", str(steps), "--num-samples", str(n),
                       "--batch-size", "250", "--no-progress", "--out", str(work / f"s{steps}.npz")])
        rates[steps] = float(re.search(r"([0-9.]+) samples/s", out).group(1))
    return rates


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=str(ROOT / "runs/demo/dmf/checkpoints/last.pt"))
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = [f"- `dmf prepare`, SD-VAE-architecture AutoencoderKL (random weights), 256 px, image + flip: "
                f"{prepare_rate(work, args.images):.3f} images/s ({args.images} images, batch 4)"]
        s, workers = loader_rate(work)
        rows.append(f"- training loader, memory-mapped 4x32x32 float16 moments (8192 images), global batch 256, "
                    f"{workers} worker(s): {s * 1e3:.1f} ms per batch")
        if Path(args.ckpt).is_file():
            r = sample_rates(work, Path(args.ckpt))
            rows.append(f"- `dmf sample`, digits DMF checkpoint, 1000 samples: {r[1]:.0f} samples/s at 1 step, "
                        f"{r[4]:.0f} at 4 steps")
    text = (f"# dmf pipeline throughput ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{torch.get_num_threads()} threads)\n\n" + "\n".join(rows) + "\n")
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "pipeline.md").write_text(text)


if __name__ == "__main__":
    main()
