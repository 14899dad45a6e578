"""dmf train --fsdp (FSDP2, checkpoints through torch.distributed.checkpoint), gloo on the CPU:
a 2-rank run (with --act-ckpt) resumed from its step-2 sharded checkpoint, killed with SIGKILL in
its step-4 save (shards written, not committed: a test-only hook in dmf.sharding) and resumed again,
equals the uninterrupted run bit for bit;
resumed on 1 process (--fsdp without torchrun) or on 4 ranks it matches to rounding; one process
samples from the sharded checkpoint and `dmf convert` writes it as today's single file; a DDP
checkpoint is not resumed with --fsdp (nor the reverse), refused with one line before loading."""
import shutil

import pytest
import torch

from dmf import sharding
from dmf.convert import model_from_checkpoint, read
from dmf.errors import DMFError
from dmf.train import TrainConfig, train
from dmf_helpers import failure_text, run_dmf

ARGS = ["--stage", "dmf", "--model", "DMFT-Ti/4", "--batch-size", "8", "--omega", "0.3", "--g-max", "0.9",
        "--no-progress", "--ckpt-every", "2", "--fsdp"]


def tensors(ck):
    out = {f"model.{k}": v for k, v in ck["model"].items()}
    out.update({f"ema.{k}": v for k, v in ck["ema"].items()})
    for name, st in ck["opt"]["state"].items():
        out.update({f"opt.{name}.{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
    return out


def run(args, nproc, **env):
    proc = run_dmf(["train", *ARGS, *args], nproc=nproc, timeout=600, **env)
    assert proc.returncode == 0, failure_text(proc.stderr)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "full"
    run(["--steps", "4", "--out", str(out), "--act-ckpt"], 2)
    return out


def resumed(full, tmp_path, nproc, killed=False):
    out = tmp_path / f"resumed{nproc}"
    step2 = full / "checkpoints" / f"{sharding.PREFIX}00000002"
    shutil.copytree(step2, out / "checkpoints" / step2.name)
    shutil.copy(full / "metrics.jsonl", out / "metrics.jsonl")
    # --act-ckpt follows the command line (it does not change the numbers, only their rounding):
    # the 2-rank resume keeps it (bit for bit), the 1-process one runs without
    args = ["--steps", "4", "--out", str(out), "--resume", *(["--act-ckpt"] if nproc == 2 else [])]
    if killed:  # kill -9 of rank 0 in step 4's save: every rank's shards written, not committed
        proc = run_dmf(["train", *ARGS, *args], nproc=nproc, timeout=600, DMF_TEST_SIGKILL_BEFORE_COMMIT="4")
        assert proc.returncode != 0 and "SIGKILL" in proc.stderr, failure_text(proc.stderr)
        torn = out / "checkpoints" / f".tmp-{sharding.PREFIX}00000004"
        assert (torn / ".metadata").is_file() and not (torn / "meta.pt").exists()
        assert sharding.latest(out / "checkpoints").name == step2.name
    run(args, nproc)
    return read(sharding.latest(out / "checkpoints"))


def test_resume_equals_uninterrupted(full, tmp_path):
    a, b = read(sharding.latest(full / "checkpoints")), resumed(full, tmp_path, 2, killed=True)
    assert a["step"] == b["step"] == 4 and a["world_size"] == b["world_size"] == 2
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and any(k.startswith("opt.") for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert [s for s, _ in sharding.complete(full / "checkpoints")] == [2, 4]


@pytest.mark.parametrize("nproc", [1, 4])
def test_resume_at_another_world_size(full, tmp_path, nproc):
    a, b = read(sharding.latest(full / "checkpoints")), resumed(full, tmp_path, nproc)
    assert b["step"] == 4 and b["world_size"] == nproc
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    step2 = read(full / "checkpoints" / f"{sharding.PREFIX}00000002")
    moved = 0
    for k, v in ta.items():
        # rounding differs (other shard sums and batch slices); a lost optimizer state differs by ~lr
        torch.testing.assert_close(tb[k], v, rtol=0, atol=2e-5, msg=lambda m: f"{k}: {m}")
        moved += k.startswith("model.") and (v - step2["model"][k[6:]]).abs().max().item() > 1e-4
    assert moved > 10  # steps 3 and 4 really trained


def test_sample_and_convert_the_sharded_checkpoint(full, tmp_path):
    ck = sharding.latest(full / "checkpoints")
    proc = run_dmf(["sample", "--ckpt", str(ck), "--steps", "1", "--n", "4", "--out", str(tmp_path / "s.npz")])
    assert proc.returncode == 0, failure_text(proc.stderr)
    assert (tmp_path / "s.npz").is_file()
    proc = run_dmf(["convert", str(ck), str(tmp_path / "one.pt")])
    assert proc.returncode == 0, failure_text(proc.stderr)
    model, _ = model_from_checkpoint(tmp_path / "one.pt")
    ema = read(ck)["ema"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, ema[k]), k


TINY = dict(stage="flow", model="DMFT-Ti/4", batch_size=4, progress=False, steps=1, ckpt_every=1)


def test_ddp_and_fsdp_checkpoints_are_not_mixed(tmp_path):
    train(TrainConfig(out=str(tmp_path / "ddp"), **TINY))
    with pytest.raises(DMFError, match="no complete sharded checkpoint .*last.pt is a DDP / single-process "
                                       "checkpoint: resume it without --fsdp"):
        train(TrainConfig(out=str(tmp_path / "ddp"), fsdp=True, **dict(TINY, steps=2)), resume=True)
    train(TrainConfig(out=str(tmp_path / "fsdp"), fsdp=True, **TINY))
    with pytest.raises(DMFError, match="is an --fsdp checkpoint: resume with --fsdp"):
        train(TrainConfig(out=str(tmp_path / "fsdp"), **dict(TINY, steps=2)), resume=True)
    assert not (tmp_path / "fsdp" / "checkpoints" / "last.pt").exists()
