"""`dmf train --fsdp`: FSDP2 (torch.distributed.fsdp.fully_shard) instead of DDP, and its
checkpoints through torch.distributed.checkpoint (DCP).

- Sharding: each DiT block is its own unit, then the root (the recipe of PyTorch's FSDP2
  tutorial); parameters, gradients and AdamW state are split over the ranks. The EMA is a dict of
  tensors sharded like the parameters (DTensors), so it is split too.
- Checkpoints: every rank writes its shards of {"model", "opt", "ema"} into
  checkpoints/.tmp-sharded-stepNNNNNNNN/ (DCP), then rank 0 adds meta.pt (step, config,
  model_args: everything that is not a tensor) and renames the directory to
  checkpoints/sharded-stepNNNNNNNN/. The rename is the commit: a run killed mid-save leaves a
  .tmp- directory, which resume ignores (and the next save of that step replaces). The state
  dicts are keyed by parameter names (DCP's get_state_dict), not by rank, so a checkpoint
  written by 2 ranks resumes on 1 or 4.
- Either kind resumes the other: `--resume --fsdp` of a DDP run loads its last.pt's full tensors
  into the shards, `--resume` without --fsdp consolidates a sharded checkpoint (the optimizer's
  state re-keyed from names to indices); the newest checkpoint of either kind is the one resumed.
- Reading: `read_sharded(dir)` consolidates one into the single-file checkpoint's dict in one
  process (no process group), so `dmf sample`, `dmf convert` and `dmf evaluate` take the
  directory where they take a .pt file; `dmf convert DIR OUT.pt` writes today's single file.
"""
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import DMFError

PREFIX = "sharded-step"
_KEEP = 2  # complete checkpoints kept (the newest); older ones are removed after a commit


def init_single_process():
    """--fsdp without torchrun: a process group of one (FSDP2 needs one)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def shard(model):
    """fully_shard per DiT block, then the root; returns the model (sharded in place)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def make_ema(model) -> dict:
    """The EMA: a copy of the model's state dict, parameters as DTensors sharded like the model's."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def ema_update(ema: dict, model, a: float):
    names = [n for n, _ in model.named_parameters()]
    torch._foreach_lerp_([ema[n] for n in names], [p.detach() for _, p in model.named_parameters()], a)


def complete(ckdir) -> list:
    """The committed checkpoints in ckdir, oldest first: (step, path)."""
    ckdir = Path(ckdir)
    found = []
    if ckdir.is_dir():
        for p in ckdir.iterdir():
            m = re.fullmatch(PREFIX + r"(\d+)", p.name)
            if m and p.is_dir() and (p / "meta.pt").is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest(ckdir):
    found = complete(ckdir)
    return found[-1][1] if found else None


def _state(model, opt, ema):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, opt_sd = get_state_dict(model, opt)
    return {"model": model_sd, "opt": opt_sd, "ema": ema}


def save(ckdir, step, model, opt, ema, meta, rank):
    """Every rank writes its shards; rank 0 commits (see the module docstring). Collective."""
    import torch.distributed.checkpoint as dcp

    ckdir = Path(ckdir)
    final = ckdir / f"{PREFIX}{step:08d}"
    tmp = ckdir / f".tmp-{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-save
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(_state(model, opt, ema), checkpoint_id=str(tmp))
    dist.barrier()
    _test_kill_before_commit(step, rank)
    if rank == 0:
        with open(tmp / "meta.pt", "wb") as f:
            torch.save(dict(meta, step=step, sharded=True), f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # the same step saved again (a resumed run's last step)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in complete(ckdir)[:-_KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _test_kill_before_commit(step, rank):
    """Test-only: with DMF_TEST_SIGKILL_BEFORE_COMMIT=N in the environment, rank 0 kills itself with
    SIGKILL at step N's save, after every rank has written its shards and before the commit (a real
    kill -9 mid-save, tests/dmf/test_dmf_fsdp.py). No run sets it otherwise."""
    at = os.environ.get("DMF_TEST_SIGKILL_BEFORE_COMMIT")
    if at is not None and rank == 0 and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def load(ck, model, opt, ema) -> int:
    """Loads a checkpoint into the sharded model, optimizer and EMA (any world size) and returns its
    step: a sharded one (ck["sharded_path"]; each rank reads its shards), or the single-file dict of
    a DDP / one-process run (every rank holds the full tensors and keeps its shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    if "sharded_path" in ck:
        import torch.distributed.checkpoint as dcp
        state = _state(model, opt, ema)
        dcp.load(state, checkpoint_id=ck["sharded_path"])
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["opt"])
        return int(read_meta(ck["sharded_path"])["step"])
    full = StateDictOptions(full_state_dict=True)
    # the EMA is sharded like the parameters: load it into the model, take its shards, then the weights
    set_model_state_dict(model, ck["ema"], options=full)
    ema.update(make_ema(model))
    set_state_dict(model, opt, model_state_dict=ck["model"], optim_state_dict=opt_by_name(ck["opt"], names(model)),
                   options=full)
    return int(ck["step"])


def names(model) -> list:
    """The trainer's optimizer's parameters by name, in its order (the grad-requiring ones)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def opt_by_name(sd: dict, names: list) -> dict:
    """A torch.optim state dict keyed by parameter index (DDP, one process) -> keyed by name (DCP's)."""
    if len(names) != sum(len(g["params"]) for g in sd["param_groups"]):
        raise DMFError(f"the checkpoint's optimizer has {sum(len(g['params']) for g in sd['param_groups'])} "
                       f"parameters, the model {len(names)}")
    return {"state": {names[i]: v for i, v in sd["state"].items()},
            "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in sd["param_groups"]]}


def opt_by_index(sd: dict, names: list) -> dict:
    """The reverse of opt_by_name: a consolidated sharded checkpoint's optimizer for a plain one."""
    at = {n: i for i, n in enumerate(names)}
    missing = [n for g in sd["param_groups"] for n in g["params"] if n not in at]
    if missing or len(at) != sum(len(g["params"]) for g in sd["param_groups"]):
        raise DMFError(f"the checkpoint's optimizer does not fit the model ({', '.join(missing[:3]) or 'count'})")
    return {"state": {at[n]: v for n, v in sd["state"].items()},
            "param_groups": [dict(g, params=[at[n] for n in g["params"]]) for g in sd["param_groups"]]}


def read_meta(path) -> dict:
    return torch.load(Path(path) / "meta.pt", map_location="cpu", weights_only=True)


def is_sharded(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "meta.pt").is_file() and (path / ".metadata").is_file()


def read_sharded(path) -> dict:
    """A sharded checkpoint consolidated in this process: the single-file checkpoint's dict
    (model and ema state dicts of full tensors; opt keyed by parameter name, as DCP saves it)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(path)
    if not is_sharded(path):
        raise DMFError(f"{path}: not a complete sharded checkpoint (no meta.pt / .metadata)")
    with tempfile.TemporaryDirectory() as d:
        dcp_to_torch_save(str(path), os.path.join(d, "full.pt"))
        tensors = torch.load(os.path.join(d, "full.pt"), map_location="cpu", weights_only=True)
    return dict(read_meta(path), **tensors)
