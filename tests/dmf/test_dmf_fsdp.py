"""dmf train --fsdp (FSDP2, checkpoints through torch.distributed.checkpoint), gloo on the CPU:
a 2-rank run (with --act-ckpt) resumed from its step-2 sharded checkpoint, killed with SIGKILL in
its step-4 save (shards written, not committed: a test-only hook in dmf.sharding) and resumed again,
equals the uninterrupted run bit for bit;
resumed on 1 process (--fsdp without torchrun) or on 4 ranks it matches to rounding; one process
samples from the sharded checkpoint and `dmf convert` writes it as today's single file; a
one-process checkpoint resumes with --fsdp and an --fsdp one without, both matching the
uninterrupted run."""
import shutil

import pytest
import torch

from dmf import sharding
from dmf.checkpoint import build_model
from dmf.convert import model_from_checkpoint, read
from dmf.errors import DMFError
from dmf.train import TrainConfig, train
from dmf_helpers import failure_text, run_dmf

ARGS = ["--stage", "dmf", "--model", "DMFT-Ti/4", "--batch-size", "8", "--omega", "0.3", "--g-max", "0.9",
        "--no-progress", "--ckpt-every", "2", "--fsdp"]


def tensors(ck):
    out = {f"model.{k}": v for k, v in ck["model"].items()}
    out.update({f"ema.{k}": v for k, v in ck["ema"].items()})
    opt = ck["opt"]
    if not ck.get("sharded"):  # a one-process checkpoint: its optimizer keyed by index, here by name
        opt = sharding.opt_by_name(opt, sharding.names(build_model(ck["model_args"])))
    for name, st in opt["state"].items():
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


def newest(out):
    """The newest checkpoint of a run directory, either kind, as the single-file dict."""
    last, sharded = out / "checkpoints" / "last.pt", sharding.latest(out / "checkpoints")
    cks = ([read(last)] if last.is_file() else []) + ([read(sharded)] if sharded is not None else [])
    return max(cks, key=lambda ck: ck["step"])


def test_ddp_and_fsdp_checkpoints_resume_each_other(tmp_path):
    """A one-process run resumed with --fsdp, and an --fsdp run resumed without, each match the
    uninterrupted one-process run (model, EMA and AdamW state, to rounding): nothing lost or
    half-loaded in either direction."""
    train(TrainConfig(out=str(tmp_path / "ref"), **dict(TINY, steps=3)))
    ref = newest(tmp_path / "ref")
    for first, then in ((False, True), (True, False)):
        out = tmp_path / f"fsdp{int(first)}-then-{int(then)}"
        train(TrainConfig(out=str(out), fsdp=first, **dict(TINY, steps=2)))
        train(TrainConfig(out=str(out), fsdp=then, **dict(TINY, steps=3)), resume=True)
        ck = newest(out)
        assert ck["step"] == 3 and ck["config"]["fsdp"] == then
        assert ((out / "checkpoints" / "last.pt").is_file(), sharding.latest(out / "checkpoints") is not None) == (True, True)
        ta, tb = tensors(ref), tensors(ck)
        assert ta.keys() == tb.keys() and sum(k.startswith("opt.") for k in ta) > 10
        for k, v in ta.items():
            torch.testing.assert_close(tb[k], v, rtol=0, atol=1e-6, msg=lambda m: f"{first}->{then} {k}: {m}")
    with pytest.raises(DMFError, match="--resume: no checkpoint in .* \\(neither last.pt nor a complete sharded-step"):
        train(TrainConfig(out=str(tmp_path / "none"), **dict(TINY, steps=2)), resume=True)
