"""The paper's workflow on tiny offline data: image folder -> `dmf prepare` (a random-weight VAE)
-> memory-mapped training with 2 processes -> sampling with 2 processes -> `dmf evaluate` (a
random-weight Inception), each step checked against an independent computation; resumes;
bad input (one line, exit 2, nothing left that looks finished)."""
import json
import sys

import numpy as np
import pytest
import torch

from dmf.__main__ import main  # noqa: E402
from dmf.convert import read  # noqa: E402
from dmf.data import LatentFolder  # noqa: E402
from dmf.errors import DMFError  # noqa: E402
from dmf.prepare import load_image, prepare  # noqa: E402
from dmf.train import TrainConfig, train  # noqa: E402
from dmf_helpers import failure_text, make_image_folder, make_tiny_vae, run_dmf  # noqa: E402

RES = 16                      # pixels; the tiny VAE halves it: latents 4 x 8 x 8


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    make_image_folder(d / "src", classes=3, per_class=4)
    make_tiny_vae(d / "vae")
    prepare(d / "src", d / "lat", RES, str(d / "vae"), batch_size=5, progress=False, log=lambda *a: None)
    return d


def one_line_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("dmf: ")]
    assert e.value.code == 2 and len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, err
    return lines[0]


def test_prepare_layout_and_values(pipe):
    from dmf.vae import encode_moments, load_vae

    meta = json.loads((pipe / "lat" / "dataset.json").read_text())
    assert meta["count"] == 12 and meta["flips"] == 2 and meta["latent_shape"] == [4, 8, 8]
    assert meta["classes"] == ["class_0", "class_1", "class_2"] and meta["scaling_factor"] == pytest.approx(0.18215)
    lat = np.load(pipe / "lat" / "latents.npy", mmap_mode="r")
    assert lat.shape == (12, 2, 8, 8, 8) and lat.dtype == np.float16
    assert np.load(pipe / "lat" / "labels.npy").tolist() == [0] * 4 + [1] * 4 + [2] * 4
    files = (pipe / "lat" / "files.txt").read_text().split()
    assert files[5].endswith("class_1/img_1.png")
    # row 5: the centre crop of its image and the crop's mirror image, encoded directly
    px = torch.from_numpy(load_image(pipe / "src" / "class_1" / "img_1.png", RES)).permute(2, 0, 1)[None]
    vae = load_vae(str(pipe / "vae"))
    for k, img in enumerate((px, px.flip(-1))):
        mean, std = encode_moments(vae, img)
        np.testing.assert_allclose(lat[5, k, :4], mean[0].numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(lat[5, k, 4:], std[0].numpy(), rtol=2e-3, atol=1e-4)
    assert not (pipe / "lat" / ".prepare").exists()


def test_center_crop_is_adm():
    """ADM's center_crop_arr: box-halve while the short side >= 2x, bicubic to the size, centre crop."""
    from PIL import Image

    from dmf.prepare import center_crop

    img = Image.fromarray(np.arange(100 * 70 * 3, dtype=np.uint8).reshape(70, 100, 3) % 251)
    out = center_crop(img, 16)
    # 70 and 35 are >= 32: two halvings to 25 x 17, then 16 / 17 -> 24 x 16, then columns 4 .. 19
    ref = img.resize((50, 35), Image.BOX).resize((25, 17), Image.BOX).resize((24, 16), Image.BICUBIC)
    assert out.shape == (16, 16, 3) and np.array_equal(out, np.asarray(ref)[:, 4:20])


def test_prepare_resumes_after_interruption(pipe, tmp_path, monkeypatch):
    import dmf.prepare as prep

    real, calls = prep.encode_moments, []

    def flaky(vae, px):
        calls.append(len(px))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(vae, px)

    monkeypatch.setattr(prep, "encode_moments", flaky)
    out = tmp_path / "lat"
    with pytest.raises(KeyboardInterrupt):
        prepare(pipe / "src", out, RES, str(pipe / "vae"), batch_size=5, progress=False, log=lambda *a: None)
    assert not (out / "dataset.json").exists()
    with pytest.raises(DMFError, match="unfinished prepare"):
        LatentFolder(out)
    calls.clear()
    monkeypatch.setattr(prep, "encode_moments", lambda vae, px: calls.append(len(px)) or real(vae, px))
    prepare(pipe / "src", out, RES, str(pipe / "vae"), batch_size=5, progress=False, log=lambda *a: None)
    assert calls == [2 * 5, 2 * 2]          # chunks 1 and 2 only (chunk 0 was done), image + flip each
    assert np.array_equal(np.load(out / "latents.npy"), np.load(pipe / "lat" / "latents.npy"))


def test_prepare_bad_inputs(pipe, tmp_path, capsys):
    make_image_folder(tmp_path / "src", classes=2, per_class=2)
    base = ["prepare", str(tmp_path / "src"), str(tmp_path / "out"), "--resolution", str(RES), "--vae",
            str(pipe / "vae"), "--no-progress"]
    (tmp_path / "src" / "class_1" / "empty.png").write_bytes(b"")
    assert "empty.png: not a readable image" in one_line_error(base, capsys)
    (tmp_path / "src" / "class_1" / "empty.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert "empty.png: not a readable image" in one_line_error(base, capsys)
    (tmp_path / "src" / "class_1" / "empty.png").unlink()
    (tmp_path / "src" / "class_9").mkdir()
    (tmp_path / "src" / "class_9" / "notes.txt").write_text("no images here")
    assert "class_9 has no images" in one_line_error(base, capsys)
    (tmp_path / "src" / "class_9" / "notes.txt").unlink()
    (tmp_path / "src" / "class_9").rmdir()
    assert "--vae" in one_line_error(base[:-3] + [str(tmp_path / "novae"), "--no-progress"], capsys)
    assert "not divisible" in one_line_error(base[:3] + ["--resolution", "15"] + base[5:], capsys)
    flat = tmp_path / "flat"
    flat.mkdir()
    (tmp_path / "src" / "class_0" / "img_0.png").rename(flat / "a.png")
    assert "--labels" in one_line_error(["prepare", str(flat), str(tmp_path / "o2"), "--resolution", "16", "--vae",
                                         str(pipe / "vae")], capsys)
    (tmp_path / "labels.txt").write_text("b.png 1\n")
    assert "no label for a.png" in one_line_error(["prepare", str(flat), str(tmp_path / "o2"), "--resolution", "16",
                                                   "--vae", str(pipe / "vae"), "--labels",
                                                   str(tmp_path / "labels.txt")], capsys)
    assert not (tmp_path / "out" / "dataset.json").exists() and not (tmp_path / "o2" / "dataset.json").exists()
    # the flat folder with an edm2 dataset.json
    (tmp_path / "labels.json").write_text(json.dumps({"labels": [["a.png", 2]]}))
    main(["prepare", str(flat), str(tmp_path / "o3"), "--resolution", "16", "--vae", str(pipe / "vae"), "--labels",
          str(tmp_path / "labels.json"), "--no-progress"])
    assert np.load(tmp_path / "o3" / "labels.npy").tolist() == [2] and LatentFolder(tmp_path / "o3").num_classes == 3


def test_train_and_sample_two_processes(pipe, tmp_path):
    """2 ranks (gloo) prepare what 1 process prepares and train from the memory map to the weights
    of 1 process; 2 ranks sample the same npz as 1 process (one thread each: the same arithmetic);
    the PNGs are the npz's arr_0."""
    # prepare split over 2 ranks (chunks 0, 2 and 1) writes what 1 process wrote
    p = run_dmf(["prepare", str(pipe / "src"), str(tmp_path / "lat2"), "--resolution", str(RES), "--vae",
                 str(pipe / "vae"), "--batch-size", "5", "--no-progress"], nproc=2)
    assert p.returncode == 0, failure_text(p.stderr)
    np.testing.assert_allclose(np.load(tmp_path / "lat2" / "latents.npy").astype(np.float32),
                               np.load(pipe / "lat" / "latents.npy").astype(np.float32), rtol=2e-3, atol=1e-4)
    assert json.loads((tmp_path / "lat2" / "dataset.json").read_text())["count"] == 12
    lat = str(pipe / "lat")
    args = ["train", "--stage", "flow", "--data", lat, "--model", "DMFT-Ti/2", "--steps", "3", "--batch-size", "8",
            "--no-progress", "--workers", "1"]
    p = run_dmf(args + ["--out", str(tmp_path / "ddp")], nproc=2)
    assert p.returncode == 0, failure_text(p.stderr)
    one = read(train(TrainConfig(stage="flow", data=lat, model="DMFT-Ti/2", steps=3, batch_size=8, progress=False,
                                 out=str(tmp_path / "one"), workers=0)))
    two = read(tmp_path / "ddp" / "checkpoints" / "last.pt")
    assert two["world_size"] == 2 and two["data_kind"] == "vae" and two["data_info"]["vae"] == str(pipe / "vae")
    for k, v in one["model"].items():
        torch.testing.assert_close(two["model"][k], v, rtol=0, atol=2e-5, msg=lambda m: f"{k}: {m}")
    ck = str(tmp_path / "ddp" / "checkpoints" / "last.pt")
    s = ["sample", "--ckpt", ck, "--steps", "2", "--num-samples", "10", "--batch-size", "4", "--no-progress",
         "--cfg", "1.5", "--g-max", "0.7"]
    p = run_dmf(s + ["--out", str(tmp_path / "s2")], nproc=2, OMP_NUM_THREADS="1")
    assert p.returncode == 0, failure_text(p.stderr)
    threads = torch.get_num_threads()
    try:   # 1 process in this one, with the ranks' single thread
        torch.set_num_threads(1)
        main(s + ["--out", str(tmp_path / "s1.npz")])
    finally:
        torch.set_num_threads(threads)
    a, b = np.load(tmp_path / "s2" / "samples.npz"), np.load(tmp_path / "s1.npz")
    assert a["arr_0"].shape == (10, RES, RES, 3) and a["arr_0"].dtype == np.uint8
    assert a["images"].shape == (10, 3, RES, RES) and a["labels"].tolist() == b["labels"].tolist()
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["images"], b["images"])
    from PIL import Image

    pngs = sorted((tmp_path / "s2" / "images").glob("*.png"))
    assert len(pngs) == 10 and np.array_equal(np.asarray(Image.open(pngs[7])), a["arr_0"][7])
    assert not (tmp_path / "s2" / ".parts").exists() and not (tmp_path / "s1.npz.parts").exists()


def test_sample_rerun_skips_finished_batches(pipe, tmp_path, monkeypatch, capsys):
    import dmf.sample as smp

    ck = train(TrainConfig(stage="dmf", data=str(pipe / "lat"), model="DMFT-Ti/2", steps=2, batch_size=4,
                           progress=False, out=str(tmp_path / "run"), workers=0))
    argv = ["sample", "--ckpt", str(ck), "--steps", "1", "--num-samples", "9", "--batch-size", "4", "--no-progress",
            "--sampler", "restart"]
    main(argv + ["--out", str(tmp_path / "full.npz")])
    real, calls = smp.sample_batch, []

    def flaky(model, idx, *a, **k):
        calls.append(idx.start)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, idx, *a, **k)

    monkeypatch.setattr(smp, "sample_batch", flaky)
    with pytest.raises(SystemExit):
        main(argv + ["--out", str(tmp_path / "part.npz")])
    assert not (tmp_path / "part.npz").exists() and len(list((tmp_path / "part.npz.parts").glob("0*.npz"))) == 1
    calls.clear()
    monkeypatch.setattr(smp, "sample_batch", lambda model, idx, *a, **k: calls.append(idx.start) or
                        real(model, idx, *a, **k))
    main(argv + ["--out", str(tmp_path / "part.npz")])
    assert calls == [4, 8]
    a, b = np.load(tmp_path / "full.npz"), np.load(tmp_path / "part.npz")
    assert all(np.array_equal(a[k], b[k]) for k in ("arr_0", "images", "labels"))


def test_vae_channels_must_match_the_model(pipe, tmp_path, capsys):
    make_tiny_vae(tmp_path / "vae2", latent_channels=2)
    ck = train(TrainConfig(stage="flow", data=str(pipe / "lat"), model="DMFT-Ti/2", steps=1, batch_size=4,
                           progress=False, out=str(tmp_path / "run"), workers=0))
    msg = one_line_error(["sample", "--ckpt", str(ck), "--steps", "1", "--num-samples", "2", "--vae",
                          str(tmp_path / "vae2"), "--out", str(tmp_path / "x.npz")], capsys)
    assert "2 latent channels but the model takes 4" in msg and not (tmp_path / "x.npz").exists()
    prepare(pipe / "src", tmp_path / "lat2", RES, str(tmp_path / "vae2"), batch_size=12, flip=False, progress=False,
            log=lambda *a: None)
    from dmf.convert import convert

    convert(ck, tmp_path / "init.pt", log=lambda *a: None)
    msg = one_line_error(["train", "--stage", "dmf", "--data", str(tmp_path / "lat2"), "--init",
                          str(tmp_path / "init.pt"), "--steps", "1", "--out", str(tmp_path / "r2")], capsys)
    assert "does not fit the model" in msg and not (tmp_path / "r2").exists()


MEMORY_SCRIPT = r"""
import json, resource, sys
import numpy as np
from pathlib import Path
from dmf.data import load_data, loader

out, budget = Path(sys.argv[1]), int(sys.argv[2])
def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
# the memory budget: data + anonymous writable mappings, now + budget (a read-only memory map of a
# file does not count; reading the file into memory would)
resource.setrlimit(resource.RLIMIT_DATA, (vm("VmData") + budget, resource.RLIM_INFINITY))
try:
    np.load(out / "lat" / "latents.npy")
    whole = "loaded"
except MemoryError:
    whole = "MemoryError"
data = load_data(str(out / "lat"))
steps = len(data) // 128 + 2                     # a full epoch and a bit
rss, total = [], 0.0
# the trainer's data path (train.py iterates exactly this loader), rank 1 of 2 as under torchrun
for x, y in loader(data, 256, 0, 1, 2, 0, steps, 0):
    total += float(x[:, :, 0, 0].sum())
    rss.append(vm("RssAnon"))
print(json.dumps({"rss_anon": rss, "whole": whole, "steps": steps, "file_pages": vm("RssFile")}))
"""


def test_memory_map_keeps_resident_memory_flat(tmp_path):
    """An 800 MB latent file (3200 images of 64 x 32 x 32 moments) under a 400 MB memory budget:
    loading it whole fails; reading a full epoch (and more) of 128-image batches through the
    trainer's loader works, and the process's anonymous resident memory does not grow with the
    data read (the pages read are file-backed page cache, reclaimable)."""
    import subprocess

    from dmf.data import LATENT_FORMAT
    from dmf_helpers import NEUTRAL_CWD, env_with_paths

    n, shape = 3200, (64, 32, 32)
    lat = tmp_path / "lat"
    lat.mkdir()
    arr = np.lib.format.open_memmap(lat / "latents.npy", mode="w+", dtype=np.float16,
                                    shape=(n, 1, 2 * shape[0], *shape[1:]))
    arr[::97] = 0.5      # a few rows of data; the rest stays a sparse hole (reads as zeros, costs no disk)
    arr.flush()
    del arr
    np.save(lat / "labels.npy", np.arange(n) % 10)
    (lat / "dataset.json").write_text(json.dumps(dict(format=LATENT_FORMAT, count=n, flips=1, num_classes=10,
                                                      latent_shape=list(shape), scaling_factor=1.0, vae="none")))
    size = (lat / "latents.npy").stat().st_size
    p = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), str(400 << 20)],
                       env=env_with_paths(OMP_NUM_THREADS="1"), cwd=NEUTRAL_CWD, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, failure_text(p.stderr)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert size > 800e6 and res["whole"] == "MemoryError"
    rss = res["rss_anon"]
    assert len(rss) == res["steps"] > n // 128
    growth = max(rss[2:]) - rss[1]           # after the first batches (allocator warm-up)
    assert growth < 40e6, (growth, rss)
    assert res["file_pages"] > 100e6         # the data did go through the mapping


def test_readme_imagenet_commands_parse():
    """Every `dmf` command of the README's "Reproducing the paper on ImageNet" recipe is accepted
    by the CLI's parser as written (the arguments exist and have valid values)."""
    import re
    import shlex

    from dmf.__main__ import parser
    from dmf_helpers import ROOT

    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Reproducing the paper on ImageNet.*?```bash\n(.*?)```", text, re.S).group(1)
    block = block.replace("\\\n", " ").replace("${k}", "1").replace("$k", "1")
    cmds = [seg.split(";")[0] for line in block.splitlines() for seg in line.split("-m dmf ")[1:]]
    assert [c.split()[0] for c in cmds] == ["prepare", "convert", "train", "train", "sample", "evaluate"]
    for c in cmds:
        parser().parse_args(shlex.split(c))
