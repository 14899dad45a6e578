"""Optional dependencies degrade: without matplotlib a run ends with exit code 0 and its
checkpoint (loss.png skipped with one line), PNG grids need no matplotlib; without tqdm, plain
progress lines; without scikit-learn, diffusers or torch-fidelity, one line saying what to install."""
import subprocess
import sys

import numpy as np

from dmf.optional import png_bytes
from dmf_helpers import NEUTRAL_CWD, env_with_paths

# a Python that cannot import the named modules (as if they were not installed)
BLOCK = """
import sys
for name in {names!r}:
    sys.modules[name] = None
from dmf.__main__ import main
main({argv!r})
"""


def run_without(names, argv):
    return subprocess.run([sys.executable, "-c", BLOCK.format(names=names, argv=argv)], env=env_with_paths(),
                          cwd=NEUTRAL_CWD, capture_output=True, text=True, timeout=300)


def test_train_and_sample_without_matplotlib_or_tqdm(tmp_path):
    out = tmp_path / "run"
    p = run_without(["matplotlib", "tqdm"], ["train", "--stage", "flow", "--model", "DMFT-Ti/4", "--steps", "3",
                                             "--batch-size", "8", "--log-every", "1", "--out", str(out)])
    assert p.returncode == 0, p.stderr
    assert (out / "checkpoints" / "last.pt").is_file() and not (out / "loss.png").exists()
    assert "Traceback" not in p.stderr
    notes = [line for line in p.stderr.splitlines() if line.startswith("dmf: ")]
    assert len(notes) == 2 and any("matplotlib" in n and "loss.png" in n for n in notes) and \
        any("tqdm" in n for n in notes)
    assert "train flow: 3/3" in p.stderr            # the plain progress line at the end
    for name in ("grid.png", "s.npz"):
        p = run_without(["matplotlib"], ["sample", "--ckpt", str(out / "checkpoints" / "last.pt"), "--steps", "2",
                                         "--num-samples", "4", "--out", str(tmp_path / name)])
        assert p.returncode == 0 and (tmp_path / name).stat().st_size > 100, p.stderr
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_libraries_say_what_to_install(tmp_path):
    cases = [(["sklearn"], ["train", "--stage", "flow", "--steps", "1", "--out", str(tmp_path / "a")], "scikit-learn"),
             (["diffusers"], ["prepare", str(tmp_path), str(tmp_path / "b"), "--resolution", "16", "--vae", "x"],
              "pip install diffusers"),
             (["torch_fidelity"], ["evaluate", str(tmp_path), "--ref", str(tmp_path)], "torch-fidelity")]
    (tmp_path / "c0").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "c0" / "x.png")
    for names, argv, hint in cases:
        p = run_without(names, argv)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and hint in lines[0] and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_png_writer_round_trip():
    from PIL import Image
    import io

    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(rgb)))), rgb)
    gray = rgb[..., 0]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(gray)))), gray)
