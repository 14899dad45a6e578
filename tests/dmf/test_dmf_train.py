"""dmf train: a resumed run equals an uninterrupted one bit for bit; DDP with 2 CPU processes
(torchrun, gloo) gives the parameters of 1 process on the same global batch, although the
MF branch's JVP runs on the unwrapped module (and the 2 processes checkpoint activations,
--act-ckpt); a non-finite loss stops and keeps the last good
checkpoint."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmf.convert import read
from dmf.errors import DMFError
from dmf.train import TrainConfig, train
from dmf_helpers import NEUTRAL_CWD, env_with_paths, failure_text

# DMFT-Ti/4 on the 8x8 digits: 4 tokens, a few ms per step
TINY = dict(model="DMFT-Ti/4", batch_size=8, progress=False, log_every=1, omega=0.3, g_max=0.9)


def tensors(ck):
    out = {f"model.{k}": v for k, v in ck["model"].items()}
    out.update({f"ema.{k}": v for k, v in ck["ema"].items()})
    for i, st in ck["opt"]["state"].items():
        out.update({f"opt.{i}.{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
    return out


def test_resume_equals_uninterrupted(tmp_path):
    full = train(TrainConfig(stage="dmf", steps=5, out=str(tmp_path / "full"), ckpt_every=2, **TINY))
    train(TrainConfig(stage="dmf", steps=3, out=str(tmp_path / "part"), ckpt_every=2, **TINY))
    # an interrupted run: the metrics file has rows past the checkpoint, which resume drops
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 0.0}) + "\n")
    part = train(TrainConfig(stage="dmf", steps=5, out=str(tmp_path / "part"), ckpt_every=2, **TINY), resume=True)
    a, b = read(full), read(part)
    assert a["step"] == b["step"] == 5
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and any(k.startswith("opt.") for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    rows = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    full_rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in full_rows]
    assert (tmp_path / "part" / "loss.png").is_file()
    assert not list((tmp_path / "part" / "checkpoints").glob(".*tmp*"))  # atomic writes leave no temp files


def test_ddp_two_processes_equal_one(tmp_path):
    args = ["--stage", "dmf", "--model", "DMFT-Ti/4", "--steps", "3", "--batch-size", "8", "--omega", "0.3",
            "--g-max", "0.9", "--no-progress", "--ckpt-every", "100"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "dmf", "train", *args, "--act-ckpt", "--out", str(tmp_path / "ddp")], env=env_with_paths(),
                          cwd=NEUTRAL_CWD, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failure_text(proc.stderr)
    one = read(train(TrainConfig(stage="dmf", steps=3, out=str(tmp_path / "one"), omega=0.3, g_max=0.9,
                                 model="DMFT-Ti/4", batch_size=8, progress=False, ckpt_every=100)))
    two = read(tmp_path / "ddp" / "checkpoints" / "last.pt")
    assert two["world_size"] == 2 and one["world_size"] == 1
    init = read(train(TrainConfig(stage="dmf", steps=1, out=str(tmp_path / "init"), lr=1e-12, model="DMFT-Ti/4",
                                  batch_size=8, progress=False)))
    moved = 0
    for k, v in one["model"].items():
        # rounding differs (half-batch means, 1 vs 2 threads, the 2-process run's activation
        # checkpointing sums gradients in another order); a missed all-reduce differs by ~lr
        torch.testing.assert_close(two["model"][k], v, rtol=0, atol=2e-5, msg=lambda m: f"{k}: {m}")
        moved += (v - init["model"][k]).abs().max().item() > 1e-3
    assert moved > 10  # the runs really trained


def test_non_finite_loss_keeps_last_good_checkpoint(tmp_path):
    cfg = TrainConfig(stage="flow", steps=6, out=str(tmp_path / "nan"), lr=1e30, ckpt_every=1,
                      **{k: v for k, v in TINY.items() if k not in ("omega", "g_max")})
    with pytest.raises(DMFError, match="non-finite loss at step (\\d)"):
        train(cfg)
    ck = read(tmp_path / "nan" / "checkpoints" / "last.pt")
    assert 1 <= ck["step"] < 6
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_batch_not_divisible_by_world(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(DMFError, match="not divisible by the world size 3"):
        train(TrainConfig(stage="flow", steps=1, out=str(tmp_path / "w"), **TINY))
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_lr_decay_schedule(tmp_path):
    from dmf.train import lr_at

    cfg = TrainConfig(steps=10, lr=1e-3, lr_decay=0.5)
    assert [round(lr_at(cfg, k) / 1e-3, 6) for k in range(10)] == [1, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2]
    assert lr_at(TrainConfig(steps=10, lr=1e-3), 9) == 1e-3  # default: constant
    ck = read(train(TrainConfig(stage="flow", steps=4, out=str(tmp_path / "run"), lr_decay=0.5, **TINY)))
    assert ck["opt"]["param_groups"][0]["lr"] == pytest.approx(lr_at(ck_cfg := TrainConfig(steps=4, lr_decay=0.5), 3))
    assert ck_cfg.lr * 0.49 < ck["opt"]["param_groups"][0]["lr"] < ck_cfg.lr * 0.51
    with pytest.raises(DMFError, match="lr_decay"):
        train(TrainConfig(stage="flow", steps=4, out=str(tmp_path / "bad"), lr_decay=1.5, **TINY))


def test_no_logvar_from_a_converted_checkpoint(tmp_path):
    """A converted checkpoint carries a (zero) logvar head; --no-logvar training from it drops
    the head instead of refusing the weights."""
    from dmf.convert import convert

    train(TrainConfig(stage="flow", steps=2, out=str(tmp_path / "flow"), **TINY))
    convert(tmp_path / "flow" / "checkpoints" / "last.pt", tmp_path / "init.pt")
    ck = read(train(TrainConfig(stage="dmf", steps=2, out=str(tmp_path / "dmf"), init=str(tmp_path / "init.pt"),
                                use_logvar=False, **TINY)))
    assert ck["step"] == 2 and not any(k.startswith("logvar_linear.") for k in ck["model"])


def test_amp_bf16_on_cpu(tmp_path):
    """--amp bf16 runs the CPU steps under bf16 autocast (the DMF step's JVP included): the same
    run as fp32 up to bf16 rounding, not bit-equal; "auto" keeps fp32 on the CPU; bad values refused."""
    from dmf.train import amp_enabled

    assert amp_enabled("auto", "cuda:0") and not amp_enabled("auto", "cpu") and amp_enabled("bf16", "cpu")
    assert not amp_enabled("off", "cuda")
    runs, last = {}, {}
    for amp in ("off", "auto", "bf16"):
        ck = read(train(TrainConfig(stage="dmf", steps=3, out=str(tmp_path / amp), amp=amp, **TINY)))
        assert ck["config"]["amp"] == amp
        runs[amp] = tensors(ck)
        last[amp] = json.loads((tmp_path / amp / "metrics.jsonl").read_text().splitlines()[-1])
    for k, v in runs["off"].items():
        assert torch.equal(v, runs["auto"][k]), k
    for key in ("fm_mse", "mf_mse"):  # step 3 (at step 1 the zero-initialised output layer hides precision)
        a, b = last["off"][key], last["bf16"][key]
        assert a != b and abs(a - b) < 0.05 * abs(a), (key, a, b)
    with pytest.raises(DMFError, match="--amp"):
        train(TrainConfig(stage="flow", steps=1, out=str(tmp_path / "bad"), amp="fp8", **TINY))


def test_teacher_velocity_run_and_resume(tmp_path):
    """--mf-velocity teacher: the frozen --init model is the teacher (a resumed run reads the file
    again and replays the uninterrupted run); without --init, or with a bad value: refused."""
    from dmf.convert import convert

    train(TrainConfig(stage="flow", steps=2, out=str(tmp_path / "flow"), **TINY))
    convert(tmp_path / "flow" / "checkpoints" / "last.pt", tmp_path / "init.pt")
    kw = dict(stage="dmf", mf_velocity="teacher", init=str(tmp_path / "init.pt"), ckpt_every=2, **TINY)
    full = read(train(TrainConfig(steps=4, out=str(tmp_path / "full"), **kw)))
    train(TrainConfig(steps=2, out=str(tmp_path / "part"), **kw))
    part = read(train(TrainConfig(steps=4, out=str(tmp_path / "part"), **kw), resume=True))
    assert full["config"]["mf_velocity"] == "teacher" and Path(full["config"]["init"]).is_absolute()
    assert full["teacher_sha256"] == part["teacher_sha256"] and len(full["teacher_sha256"]) == 64
    ta, tb = tensors(full), tensors(part)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    # the --init file replaced by another flow model: resuming would silently change the teacher
    train(TrainConfig(stage="flow", steps=3, out=str(tmp_path / "flow2"), **TINY))
    convert(tmp_path / "flow2" / "checkpoints" / "last.pt", tmp_path / "init.pt")
    with pytest.raises(DMFError, match="weights changed since the run started"):
        train(TrainConfig(steps=6, out=str(tmp_path / "part"), **kw), resume=True)
    data = tensors(read(train(TrainConfig(**dict(kw, mf_velocity="data", steps=4, out=str(tmp_path / "data"))))))
    assert any(not torch.equal(ta[k], data[k]) for k in ta if k.startswith("model."))
    with pytest.raises(DMFError, match="--mf-velocity teacher needs"):
        train(TrainConfig(stage="dmf", steps=1, out=str(tmp_path / "noinit"), mf_velocity="teacher", **TINY))
    with pytest.raises(DMFError, match="--mf-velocity must be"):
        train(TrainConfig(stage="dmf", steps=1, out=str(tmp_path / "bad"), mf_velocity="model", **TINY))
