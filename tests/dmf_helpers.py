"""Small offline fixtures for the dmf pipeline tests: image folders drawn with PIL, a tiny
random-weight AutoencoderKL saved with save_pretrained, a random-weight Inception file in the
format torch-fidelity's FeatureExtractorInceptionV3 loads, and a subprocess runner for torchrun."""
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def make_image_folder(root: Path, classes=3, per_class=5, size=20, seed=0) -> Path:
    """ImageFolder layout: root/class_k/img_i.png, each class its own colour and shape, sizes and
    aspect ratios varied so the centre crop has work to do."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for k in range(classes):
        d = root / f"class_{k}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = size + int(rng.integers(0, size)), size + int(rng.integers(0, size // 2))
            img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
            draw = ImageDraw.Draw(img)
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            colour = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0))[k % 4]
            (draw.ellipse if k % 2 else draw.rectangle)([x0, y0, x0 + w // 2, y0 + h // 2], fill=colour)
            img.save(d / f"img_{i}.png")
    return root


def make_tiny_vae(path: Path, latent_channels=4, seed=0) -> Path:
    """An AutoencoderKL with 2 resolution levels (downsampling 2), 8/16 channels, random weights."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, latent_channels=latent_channels,
                        norm_num_groups=4, sample_size=16)
    vae.save_pretrained(path)
    return path


def make_random_inception(path: Path, seed=0) -> Path:
    """torch-fidelity's InceptionV3 with random weights, saved as the state dict its
    feature_extractor_weights_path loads. Convolutions get He-normal weights so activations keep
    their scale through the 94 layers (the default init shrinks them towards zero)."""
    import torch

    from dmf.evaluate import inception_class

    cls = inception_class()
    torch.manual_seed(seed)
    real_load = cls.load_state_dict
    try:  # build without the pretrained weights (no download, no file)
        cls.load_state_dict = lambda self, sd, *a, **k: None
        mod = sys.modules[cls.__module__]
        real_url, mod.load_state_dict_from_url = mod.load_state_dict_from_url, lambda *a, **k: None
        net = cls("inception-v3-compat", ["2048"])
    finally:
        cls.load_state_dict = real_load
        mod.load_state_dict_from_url = real_url
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


def package_paths():
    """Where this test process imports dmf_kernels and dmf from: the source tree (make build) or
    site-packages (pip install .): subprocesses import the same ones."""
    import dmf
    import dmf_kernels

    return [str(Path(m.__file__).resolve().parents[1]) for m in (dmf_kernels, dmf)]


# Subprocesses start outside the source tree: `python -m` / `-c` put the working directory first on
# sys.path, where the checkout's dmf_kernels (without _C after a plain pip install) would shadow the
# installed one.
NEUTRAL_CWD = tempfile.gettempdir()


def env_with_paths(**extra):
    # PYTHONFAULTHANDLER: a subprocess (a torchrun rank, the dmf CLI) that dies on SIGSEGV / SIGABRT /
    # SIGBUS / SIGFPE / SIGILL writes every thread's Python stack to its stderr ("Fatal Python error"),
    # which failure_text shows first; without it a crashed rank leaves only "exitcode: -11".
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*package_paths(), os.environ.get("PYTHONPATH", "")]),
               PYTHONFAULTHANDLER="1")
    env.update(extra)
    return env


# Where a crash dump starts: c10's C++ frames (SIGSEGV(11), PID: ..., Thread ...: a worker that switched
# them on) or faulthandler's Python frames.
FAULT = re.compile(r"^(SIG[A-Z]+\(\d+\), PID: \d+, Thread \d+:|Fatal Python error: )", re.M)


def failure_text(stderr, tail=3000, dump=6000, most=30000):
    """A failed subprocess's stderr for an assertion message: the crash dumps first (each thread's
    C++ frames, faulthandler's Python frames; each section up to `dump` characters, `most` in all:
    torchrun's own traceback and the ranks' warnings after them would push them out of a plain tail),
    then the last `tail` characters."""
    starts = [m.start() for m in FAULT.finditer(stderr)]
    if not starts:
        return stderr[-tail:]
    sections = [stderr[a:min(a + dump, b)] for a, b in zip(starts, starts[1:] + [len(stderr)])]
    return "\n".join(["crash dumps:", "\n".join(sections)[:most], f"... stderr's last {tail} characters:",
                      stderr[-tail:]])


def run_dmf(args, nproc=1, timeout=600, **env):
    """`python -m dmf ARGS` (nproc > 1: under torchrun, gloo on the CPU) -> CompletedProcess."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "dmf", *args]
    else:
        cmd = [sys.executable, "-m", "dmf", *args]
    return subprocess.run(cmd, env=env_with_paths(**env), cwd=NEUTRAL_CWD, capture_output=True, text=True,
                          timeout=timeout)
