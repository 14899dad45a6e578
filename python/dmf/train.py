"""Training: stage "flow" (flow matching) and stage "dmf" (FM branch + MeanFlow branch on the fused JVP).

    python -m dmf train --stage flow --steps 1000 --out runs/flow
    python -m dmf convert runs/flow/checkpoints/last.pt runs/flow.dmf.pt
    python -m dmf train --stage dmf --init runs/flow.dmf.pt --steps 500 --out runs/dmf
    torchrun --nproc_per_node 2 -m dmf train ...        # DDP: gloo on CPU, nccl on GPU
    torchrun --nproc_per_node 2 -m dmf train --fsdp ... # FSDP2, sharded checkpoints (dmf/sharding.py)

Determinism: every step's data order, noise, times and label dropout are drawn for the whole
global batch from a generator seeded by (seed, step); each rank takes its slice. So a resumed
run replays an uninterrupted one exactly, and N ranks see the same global batch as one process.
"""
import copy
import hashlib
import os
import platform
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from dmf_kernels.nn import act_ckpt

from . import convert as ckpt
from . import sharding
from .data import default_workers, load_data, loader
from .errors import DMFError
from .loss import dmf_loss, draw, flow_loss
from .optional import Progress
from .run_log import Metrics


@dataclass
class TrainConfig:
    stage: str = "flow"           # "flow": flow matching; "dmf": Decoupled MeanFlow
    model: str = ""               # a DMFT_models name; default: DMFT-Ti/2 on digits, DMFT-S/2 otherwise
    data: str = "digits"          # "digits", a .pt/.npz file of (N, C, H, W) images or latents + labels,
                                  # or a latent folder from `dmf prepare` (memory-mapped)
    steps: int = 1000             # total optimizer steps of the run (a resumed run continues up to it)
    batch_size: int = 128         # global batch, split over DDP ranks
    seed: int = 0
    out: str = "runs/dmf"
    init: str = ""                # start from this checkpoint's weights (ours, or converted)
    dmf_depth: int = -1           # encoder blocks conditioned on t; -1: the model's default
    use_logvar: bool = True       # stage dmf: the log-variance head of the robust loss
    qk_norm: bool = False
    # optimizer; the paper: lr 1e-4, EMA 0.9999 at ImageNet scale. On digits (minutes on a CPU)
    # lr 3e-4 with a plain 0.999 EMA learned nothing visible; 1e-3 with the EMA warm-up did.
    lr: float = 1e-3
    beta2: float = 0.95
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True       # decay min(ema_decay, (1 + k) / (10 + k)) at step k
    lr_decay: float = 0.0         # linear decay of lr to 0 over this last fraction of the run; 0: constant
    # time proposals (official: FM P_mean 0, MF P_mean_t 0.4, P_mean_r -1.2, all std 1)
    P_mean: float = 0.0
    P_std: float = 1.0
    P_mean_t: float = 0.4
    P_std_t: float = 1.0
    P_mean_r: float = -1.2
    P_std_r: float = 1.0
    cfg_prob: float = 0.1         # label dropout
    omega: float = 0.0            # model guidance strength (official 0.6 at 256px); 0: off
    g_min: float = 0.0
    g_max: float = 0.7
    mf_velocity: str = "data"     # MF branch's v: "data" (official: noise - x) or "teacher" (the
                                  # frozen --init model's u(x_t, t, t))
    ckpt_every: int = 500
    log_every: int = 10
    device: str = ""              # default cuda if available
    amp: str = "auto"             # bf16 autocast: "auto" (on CUDA only), "bf16" (also on CPU), "off"
    progress: bool = True
    workers: int = -1             # DataLoader worker processes; -1: 0 for in-memory data, up to 4 for a folder
    fsdp: bool = False            # FSDP2 instead of DDP, sharded checkpoints (dmf.sharding)
    act_ckpt: bool = False        # recompute each block's activations in the backward (dmf_kernels.nn.act_ckpt)


MF_VELOCITIES = ("data", "teacher")
AMP_MODES = ("auto", "bf16", "off")


def step_generator(seed: int, step: int, stream: int = 2) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, stream, step]).generate_state(1)[0]))


def amp_enabled(amp: str, device: str) -> bool:
    """bf16 autocast for this run. "auto": on CUDA only, since CPUs without native bf16 emulate
    it; "bf16" on a CPU with AVX512-BF16/AMX made the digits model's steps about 2x faster (2 cores:
    flow 0.225 -> 0.11-0.125 s, DMF 0.544 -> 0.25-0.31 s, the range is this VM's day-to-day speed)."""
    return amp == "bf16" or (amp == "auto" and device.startswith("cuda"))


def cpu_has_native_bf16() -> bool:
    """bf16 dot products in hardware (x86: AVX512-BF16 or AMX). oneDNN's own check is not enough:
    it also says yes where bf16 is emulated on plain AVX512."""
    try:
        if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def weights_sha256(sd: dict) -> str:
    """A fingerprint of a state dict's tensors (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def ema_decay(cfg: TrainConfig, k: int) -> float:
    return min(cfg.ema_decay, (1 + k) / (10 + k)) if cfg.ema_warmup else cfg.ema_decay


def lr_at(cfg: TrainConfig, k: int) -> float:
    """lr of step k: constant, then (with lr_decay = f) linearly to 0 over the last f * steps."""
    if cfg.lr_decay <= 0:
        return cfg.lr
    return cfg.lr * min(1.0, (cfg.steps - k) / (cfg.lr_decay * cfg.steps))


def model_args_for(cfg: TrainConfig, data) -> dict:
    from .model import DMFT_models

    name = cfg.model or ("DMFT-Ti/2" if cfg.data == "digits" else "DMFT-S/2")
    if name not in DMFT_models:
        raise DMFError(f"unknown model {name!r}; known: {', '.join(DMFT_models)}")
    ctor = DMFT_models[name]
    args = dict(ctor.keywords, input_size=data.shape[1], in_channels=data.shape[0], num_classes=data.num_classes,
                use_logvar=cfg.stage == "dmf" and cfg.use_logvar, qk_norm=cfg.qk_norm)
    # sizes without their own split: about 2/3 of the blocks see t (XL/2: 20 of 28 in the paper)
    args.setdefault("dmf_depth", round(2 * args["depth"] / 3))
    if cfg.dmf_depth >= 0:
        args["dmf_depth"] = cfg.dmf_depth
    return args


def check_fits(model_args, data):
    c, h, w = data.shape
    if (model_args["in_channels"], model_args["input_size"]) != (c, h) or h != w:
        raise DMFError(f"data of shape {data.shape} does not fit the model (in_channels {model_args['in_channels']}, "
                       f"input_size {model_args['input_size']})")
    if h % model_args["patch_size"]:
        raise DMFError(f"image size {h} is not divisible by the patch size {model_args['patch_size']}")
    if data.num_classes > model_args["num_classes"]:
        raise DMFError(f"data has labels up to {data.num_classes - 1} but the model has {model_args['num_classes']} "
                       "classes")
    if not 0 <= model_args["dmf_depth"] <= model_args["depth"]:
        raise DMFError(f"dmf_depth must be in [0, depth] = [0, {model_args['depth']}], got {model_args['dmf_depth']}")


def init_weights(cfg: TrainConfig):
    """(model_args, state dict) from --init: a dmf checkpoint, or our stage-1 checkpoint (converted
    in memory: its EMA weights, plus a zero-initialised logvar head for stage dmf)."""
    ck = ckpt.read(cfg.init)
    if ck.get("format") != ckpt.FORMAT:
        raise DMFError(f"{cfg.init}: not a dmf checkpoint; convert it first: python -m dmf convert {cfg.init} OUT.pt")
    args = dict(ck["model_args"])
    if cfg.stage == "dmf":
        args["use_logvar"] = cfg.use_logvar
    if cfg.dmf_depth >= 0:
        args["dmf_depth"] = cfg.dmf_depth
    sd = ck["ema"] if ck.get("ema") is not None else ck["model"]
    return args, sd


def setup_dist(cfg):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.batch_size < world or cfg.batch_size % world:
        raise DMFError(f"--batch-size {cfg.batch_size} is not divisible by the world size {world}")
    if world > 1:
        if device == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def validate(cfg: TrainConfig):
    if cfg.stage not in ("flow", "dmf"):
        raise DMFError(f"--stage must be flow or dmf, got {cfg.stage!r}")
    if cfg.workers < -1:
        raise DMFError(f"--workers must be -1 (auto) or at least 0, got {cfg.workers}")
    for name in ("steps", "batch_size", "ckpt_every", "log_every"):
        if getattr(cfg, name) < 1:
            raise DMFError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if not (cfg.lr > 0 and 0 <= cfg.ema_decay < 1 and cfg.grad_clip > 0 and 0 <= cfg.cfg_prob <= 1
            and 0 <= cfg.lr_decay <= 1):
        raise DMFError("need lr > 0, ema_decay in [0, 1), grad_clip > 0, cfg_prob in [0, 1] and lr_decay in [0, 1]")
    if cfg.mf_velocity not in MF_VELOCITIES:
        raise DMFError(f"--mf-velocity must be one of {', '.join(MF_VELOCITIES)}, got {cfg.mf_velocity!r}")
    if cfg.amp not in AMP_MODES:
        raise DMFError(f"--amp must be one of {', '.join(AMP_MODES)}, got {cfg.amp!r}")


def train(cfg: TrainConfig, resume: bool = False):
    validate(cfg)
    out = Path(cfg.out)
    last = out / "checkpoints" / "last.pt"
    ck = None
    if resume:
        ck = _resume_checkpoint(cfg, last)
        if ck.get("format") != ckpt.FORMAT or ("opt" not in ck and not ck.get("sharded")) or ck.get("config") is None:
            raise DMFError(f"{ck.get('sharded_path', last)}: not a dmf training checkpoint")
        saved = TrainConfig(**{f.name: ck["config"][f.name] for f in fields(TrainConfig) if f.name in ck["config"]})
        if saved.stage != cfg.stage:
            raise DMFError(f"--resume: {last} is a stage-{saved.stage} run, not stage {cfg.stage}")
        # the checkpoint's config wins (same data order and hyper-parameters); only the length,
        # the output directory, the progress bar and what does not change the numbers (workers,
        # sharding, activation checkpointing) follow the command line
        cfg = TrainConfig(**dict(asdict(saved), steps=cfg.steps, out=cfg.out, progress=cfg.progress,
                                 workers=cfg.workers, fsdp=cfg.fsdp, act_ckpt=cfg.act_ckpt))
        validate(cfg)
    if cfg.mf_velocity == "teacher":
        if not (cfg.stage == "dmf" and cfg.init):
            raise DMFError("--mf-velocity teacher needs --stage dmf and --init (the flow model is the teacher)")
        if not resume:  # saved absolute: --resume reads the teacher again from any directory
            cfg = TrainConfig(**dict(asdict(cfg), init=str(Path(cfg.init).resolve())))
    data = load_data(cfg.data)
    if cfg.init and not resume:
        model_args, init_sd = init_weights(cfg)
    else:
        model_args, init_sd = (ck["model_args"], None) if ck else (model_args_for(cfg, data), None)
    check_fits(model_args, data)
    weights = {"init": init_sd}   # _train pops these: no second copy of the weights for the whole run
    if cfg.mf_velocity == "teacher":
        weights["teacher"] = init_sd if init_sd is not None else init_weights(cfg)[1]
        weights["teacher_sha256"] = weights_sha256(weights["teacher"])
        if ck is not None and ck.get("teacher_sha256") not in (None, weights["teacher_sha256"]):
            raise DMFError(f"--resume reads the teacher again from --init {cfg.init}, whose weights changed "
                           "since the run started")
    del init_sd
    rank, world, device = setup_dist(cfg)
    if cfg.fsdp and world == 1:
        sharding.init_single_process()
    try:
        return _train(cfg, data, model_args, weights, ck, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _resume_checkpoint(cfg, last):
    """The checkpoint --resume continues: the newer of last.pt (one process / DDP) and the newest
    complete sharded one (--fsdp; its metadata, the tensors load once the model is built), on a tie
    the one of this run's kind. Either kind resumes with or without --fsdp (dmf.sharding.load and
    _load_single)."""
    sharded = sharding.latest(last.parent)
    single = ckpt.read(last) if last.is_file() else None
    if sharded is None and single is None:
        raise DMFError(f"--resume: no checkpoint in {last.parent} (neither last.pt nor a complete "
                       f"{sharding.PREFIX}* directory)")
    meta = sharding.read_meta(sharded) if sharded is not None else None
    if single is None or (meta is not None and (int(meta["step"]), cfg.fsdp) > (int(single.get("step", -1)),
                                                                                  not cfg.fsdp)):
        return dict(meta, sharded_path=str(sharded))
    return single


def _load_single(ck, model, opt, ema) -> int:
    """A checkpoint into the unsharded model, optimizer and EMA module; returns its step. A sharded
    one (an --fsdp run resumed without --fsdp) is consolidated here, its optimizer re-keyed."""
    if "sharded_path" in ck:
        ck = sharding.read_sharded(ck["sharded_path"])
        ck["opt"] = sharding.opt_by_index(ck["opt"], sharding.names(model))
    model.load_state_dict(ck["model"])
    ema.load_state_dict(ck["ema"])
    opt.load_state_dict(ck["opt"])
    return int(ck["step"])


def _load_init(model, model_args, init_sd, what):
    if not model_args.get("use_logvar"):  # --no-logvar from a checkpoint that has the head: drop it
        init_sd = {k: v for k, v in init_sd.items() if not k.startswith("logvar_linear.")}
    try:
        missing, unexpected = model.load_state_dict(init_sd, strict=False)
    except RuntimeError as e:  # same names, other shapes
        raise DMFError(f"{what}: weights do not fit ({str(e).splitlines()[-1].strip()[:160]})") from None
    bad = [k for k in missing if not k.startswith("logvar_linear.")] + list(unexpected)
    if bad:
        raise DMFError(f"{what}: weights do not fit ({', '.join(bad[:3])})")


def _train(cfg, data, model_args, weights, ck, rank, world, device):
    out = Path(cfg.out)
    last = out / "checkpoints" / "last.pt"
    torch.manual_seed(cfg.seed)  # weight init: the same on every rank (DDP also broadcasts rank 0's)
    model = ckpt.build_model(model_args)
    init_sd = weights.pop("init")
    if init_sd is not None:
        _load_init(model, model_args, init_sd, f"--init {cfg.init}")
    del init_sd
    teacher = None
    if "teacher" in weights:  # --mf-velocity teacher: the frozen flow model (its r = t path only)
        teacher = ckpt.build_model(dict(model_args, use_logvar=False))
        _load_init(teacher, dict(model_args, use_logvar=False), weights.pop("teacher"), f"--init {cfg.init} (teacher)")
        teacher.requires_grad_(False).eval().to(device)
    model.to(device)
    if cfg.act_ckpt:  # before sharding (either order works; the EMA copy below never runs a backward)
        act_ckpt(model)
    if cfg.fsdp:
        sharding.shard(model)
        ema = sharding.make_ema(model)
    else:
        ema = copy.deepcopy(model).requires_grad_(False).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay)
    step = 0
    if ck is not None:
        step = sharding.load(ck, model, opt, ema) if cfg.fsdp else _load_single(ck, model, opt, ema)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 and not cfg.fsdp else model
    amp = amp_enabled(cfg.amp, device)
    shape = (cfg.batch_size, *data.shape)
    times = dict(P_mean=cfg.P_mean, P_std=cfg.P_std, P_mean_t=cfg.P_mean_t, P_std_t=cfg.P_std_t,
                 P_mean_r=cfg.P_mean_r, P_std_r=cfg.P_std_r, cfg_prob=cfg.cfg_prob)
    meta = {"format": ckpt.FORMAT, "model_args": model_args, "stage": cfg.stage, "data_kind": data.kind,
            "config": asdict(cfg), "world_size": world, "teacher_sha256": weights.get("teacher_sha256"),
            "data_info": getattr(data, "info", {})}

    def save():
        if cfg.fsdp:  # every rank writes its shards
            return sharding.save(last.parent, step, model, opt, ema, meta, rank)
        if rank == 0:
            ckpt.save_atomic(dict(meta, model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                                  step=step), last)

    metrics = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        metrics = Metrics(out, step)
        n_params = sum(p.numel() for p in params)
        print(f"stage {cfg.stage}: {n_params / 1e6:.2f}M parameters, data {cfg.data} {data.describe()}, "
              f"batch {cfg.batch_size} on {world} x {device}, steps {step} -> {cfg.steps}", flush=True)
    bar = Progress(cfg.steps, step, f"train {cfg.stage}") if rank == 0 and cfg.progress else None

    model.train()
    workers = default_workers(data) if cfg.workers < 0 else cfg.workers
    batches = iter(loader(data, cfg.batch_size, cfg.seed, rank, world, step, cfg.steps, workers))
    t_last, s_last, wait = time.perf_counter(), step, 0.0
    saved = None
    while step < cfg.steps:
        # the global batch and its random numbers, then this rank's slice
        t_wait = time.perf_counter()
        x, y = next(batches)                                       # (b, C, H, W), (b,)
        wait += time.perf_counter() - t_wait
        x, y = x.to(device), y.to(device)
        d = draw(step_generator(cfg.seed, step), shape, **times).shard(rank, world).to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            if cfg.stage == "flow":
                loss, logs = flow_loss(ddp, x, y, d, model_args["num_classes"]), {}
            else:
                loss, logs = dmf_loss(ddp, model, x, y, d, model_args["num_classes"], cfg.omega, cfg.g_min,
                                      cfg.g_max, teacher=teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        stats = torch.stack([loss.detach().float()] + [v.float() for v in logs.values()])
        if world > 1:  # every rank takes the same stop/continue decision
            dist.all_reduce(stats)
            stats /= world
        if not torch.isfinite(stats).all():
            raise DMFError(f"non-finite loss at step {step}: stopping; {last} keeps the last good checkpoint")
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        opt.step()
        with torch.no_grad():
            a = 1 - ema_decay(cfg, step)
            if cfg.fsdp:
                sharding.ema_update(ema, model, a)
            else:
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), a)
        step += 1

        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
            now = time.perf_counter()
            row = {"step": step, "loss": stats[0].item(), **{k: stats[i + 1].item() for i, k in enumerate(logs)},
                   "steps_per_s": (step - s_last) / (now - t_last), "data_wait_s": wait / (step - s_last)}
            t_last, s_last, wait = now, step, 0.0
            metrics.log(row)
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.4f}", it_s=f"{row['steps_per_s']:.2f}")
        if bar is not None:
            bar.update(1)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            saved = save()
            if rank == 0:
                metrics.plot()
    if bar is not None:
        bar.close()
    if cfg.fsdp:
        last = saved or sharding.latest(last.parent)
    if rank == 0:
        print(f"saved {last} (step {step})", flush=True)
    return last


def main(args):
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    train(cfg, resume=args.resume)
