"""python -m dmf: sampling outputs (flow-map Euler rule, npz/png, labels) and the bad-input paths
(one line on stderr, exit code 2, no traceback, nothing trained)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dmf.__main__ import main
from dmf.convert import model_from_checkpoint
from dmf.sample import euler, time_grid
from dmf.train import TrainConfig, train
from dmf_helpers import NEUTRAL_CWD, package_paths



@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    kw = dict(model="DMFT-Ti/4", batch_size=8, progress=False)
    flow = train(TrainConfig(stage="flow", steps=2, out=str(d / "flow"), **kw))
    dmf = train(TrainConfig(stage="dmf", steps=2, out=str(d / "dmf"), **kw))
    return d, flow, dmf


def run_cli(argv, capsys):
    """(exit code, stderr) of an in-process CLI call."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


def assert_one_line_error(code, err):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, err


def test_time_grid_and_flow_map_step():
    assert torch.allclose(time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    s = time_grid(2, shift=3.0)
    assert torch.allclose(s, torch.tensor([1.0, 0.75, 0.0], dtype=torch.float64))  # 3 * 0.5 / (1 + 2 * 0.5)
    calls = []

    def model(x, t, r, y):
        calls.append((t[0].item(), r[0].item()))
        return x * 0 + t.view(-1, 1, 1, 1) + 10 * r.view(-1, 1, 1, 1)

    x0 = torch.zeros(2, 1, 2, 2)
    out = euler(model, x0, torch.zeros(2, dtype=torch.long), 2, flow_map=True)
    assert calls == [(1.0, 0.5), (0.5, 0.0)]
    assert torch.allclose(out, x0 - 0.5 * (1 + 5) - 0.5 * 0.5)  # x <- x + (t_{i+1} - t_i) u(x, t_i, t_{i+1})
    calls.clear()
    euler(model, x0, torch.zeros(2, dtype=torch.long), 2, flow_map=False)
    assert calls == [(1.0, 1.0), (0.5, 0.5)]


def test_sample_outputs(ckpts, tmp_path, capsys):
    d, flow, dmf = ckpts
    main(["sample", "--ckpt", str(dmf), "--steps", "1", "--n", "20", "--seed", "3", "--out", str(tmp_path / "a.npz")])
    f = np.load(tmp_path / "a.npz")
    assert f["images"].shape == (20, 1, 8, 8) and f["images"].dtype == np.float32
    assert f["images"].min() >= 0 and f["images"].max() <= 1
    assert sorted(np.bincount(f["labels"], minlength=10)) == [2] * 10  # balanced
    # 1 step of the flow map from the EMA weights, by hand
    model, _ = model_from_checkpoint(dmf)
    y = torch.arange(20) % 10
    y = y[torch.randperm(20, generator=torch.Generator().manual_seed(3))]
    # sample i's noise from its own generator, seeded by (seed, i)
    noise = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(
        int(np.random.SeedSequence([3, 4, i]).generate_state(1)[0]))) for i in range(20)])
    with torch.no_grad():
        x = noise - model(noise, torch.ones(20), torch.zeros(20), y)
    assert np.array_equal(f["labels"], y.numpy())
    np.testing.assert_allclose(f["images"], ((x + 1) / 2).clamp(0, 1).numpy(), atol=1e-5)
    assert f["arr_0"].shape == (20, 8, 8, 1) and f["arr_0"].dtype == np.uint8   # ADM layout
    np.testing.assert_array_equal(f["arr_0"][..., 0], np.floor(f["images"][:, 0] * 255 + 0.5).astype(np.uint8))
    main(["sample", "--ckpt", str(flow), "--steps", "3", "--n", "6", "--class", "7", "--out", str(tmp_path / "b.npz")])
    assert (np.load(tmp_path / "b.npz")["labels"] == 7).all()
    main(["sample", "--ckpt", str(dmf), "--steps", "2", "--n", "6", "--no-ema", "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").stat().st_size > 100


def test_bad_inputs(ckpts, tmp_path, capsys):
    d, flow, dmf = ckpts
    out = str(tmp_path / "run")
    base = ["train", "--stage", "flow", "--steps", "1", "--out", out, "--no-progress"]
    assert_one_line_error(*run_cli(base + ["--model", "DMFT-Q/2"], capsys))
    assert_one_line_error(*run_cli(base + ["--model", "DMFT-Ti/4", "--dmf-depth", "7"], capsys))
    assert_one_line_error(*run_cli(base + ["--batch-size", "0"], capsys))
    assert_one_line_error(*run_cli(base[:-1] + ["--stage", "mf"], capsys))
    assert_one_line_error(*run_cli(base + ["--resume"], capsys))
    # datasets of the wrong shape, unreadable files
    np.savez(tmp_path / "flat.npz", images=np.zeros((5, 8, 8), np.float32), labels=np.zeros(5, np.int64))
    np.savez(tmp_path / "nolabels.npz", images=np.zeros((5, 1, 8, 8), np.float32))
    np.savez(tmp_path / "labels.npz", images=np.zeros((5, 1, 8, 8), np.float32), labels=np.zeros(4, np.int64))
    (tmp_path / "junk.pt").write_bytes(b"not a file")
    for f in ("flat.npz", "nolabels.npz", "labels.npz", "junk.pt", "missing.npz"):
        assert_one_line_error(*run_cli(base + ["--data", str(tmp_path / f)], capsys))
    # a 6x6 image does not divide into patches of 4
    np.savez(tmp_path / "six.npz", images=np.zeros((5, 1, 6, 6), np.float32), labels=np.zeros(5, np.int64))
    assert_one_line_error(*run_cli(base + ["--data", str(tmp_path / "six.npz"), "--model", "DMFT-Ti/4"], capsys))
    # corrupt and foreign checkpoints
    raw = Path(dmf).read_bytes()
    (tmp_path / "torn.pt").write_bytes(raw[: len(raw) // 2])
    torch.save({"args": __import__("argparse").Namespace(a=1)}, tmp_path / "pickle.pt")  # needs weights_only=False
    torch.save({"a": torch.zeros(2)}, tmp_path / "foreign.pt")
    for f in ("torn.pt", "pickle.pt", "foreign.pt", "missing.pt"):
        assert_one_line_error(*run_cli(["sample", "--ckpt", str(tmp_path / f), "--steps", "1", "--n", "2", "--out",
                                        str(tmp_path / "s.png")], capsys))
        assert_one_line_error(*run_cli(base + ["--init", str(tmp_path / f)], capsys))
        assert_one_line_error(*run_cli(["convert", str(tmp_path / f), str(tmp_path / "c.pt")], capsys))
    assert_one_line_error(*run_cli(["sample", "--ckpt", str(dmf), "--steps", "1", "--n", "2", "--class", "10",
                                    "--out", str(tmp_path / "s.png")], capsys))
    assert_one_line_error(*run_cli(["sample", "--ckpt", str(dmf), "--steps", "1", "--n", "2", "--out",
                                    str(tmp_path / "s.jpg")], capsys))
    # resuming a flow run as stage dmf
    assert_one_line_error(*run_cli(["train", "--stage", "dmf", "--steps", "3", "--out", str(d / "flow"), "--resume"],
                                   capsys))
    assert not (tmp_path / "run").exists() and not (tmp_path / "c.pt").exists()


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    """The real entry point, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "dmf", "train", "--stage", "dmf", "--steps", "1", "--model", "nope",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": os.pathsep.join(package_paths()), "PATH": "/usr/bin:/bin"},
                          cwd=NEUTRAL_CWD)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("dmf train: error: unknown model 'nope'; known: " + ", ".join(
        __import__("dmf").DMFT_models))
