"""Per-rank memory of training state and step time, DDP vs FSDP2 (issue 23).

    torchrun --nproc_per_node W benchmarks/bench_fsdp.py --mode fsdp|ddp --out rows.jsonl [--steps N]
    python benchmarks/bench_fsdp.py --computed      # the table for DMFT-XL/2, LightningDMF-XL/1, 3B DiT

Measured: after one optimizer step of `dmf train`'s DMF loss on DMFT-S/2 (latents --input-size
squared x 4, 1000 classes; the trainable parameters do not depend on the input size), the bytes
each rank holds in parameters, gradients, AdamW state and EMA (local shards for FSDP2:
DTensor.to_local()), and the median step time over --steps steps (global batch --batch, split
over the ranks). DDP's all-reduce buckets (one more gradient-sized
buffer per rank) are not tensors we can see: the computed table adds them.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))


def local_bytes(tensors):
    from torch.distributed.tensor import DTensor
    n = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if isinstance(t, DTensor) else t
        n += t.numel() * t.element_size()
    return n


def measured(args):
    from dmf import sharding
    from dmf.loss import dmf_loss, draw
    from dmf.model import DMFT_models
    from dmf.train import step_generator

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    else:
        sharding.init_single_process()
    torch.manual_seed(0)
    model = DMFT_models["DMFT-S/2"](input_size=args.input_size, in_channels=4, num_classes=1000, use_logvar=True)
    if args.mode == "fsdp":
        sharding.shard(model)
        ema = sharding.make_ema(model)
        ema_tensors = list(ema.values())
        wrapped = model
    else:
        import copy
        ema = copy.deepcopy(model).requires_grad_(False)
        ema_tensors = list(ema.state_dict().values())
        wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    b = args.batch // world
    times = []
    for step in range(args.steps + 1):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(args.batch, 4, args.input_size, args.input_size, generator=g)[rank * b:(rank + 1) * b]
        y = torch.randint(0, 1000, (args.batch,), generator=g)[rank * b:(rank + 1) * b]
        d = draw(step_generator(0, step), (args.batch, 4, args.input_size, args.input_size)).shard(rank, world)
        t0 = time.perf_counter()
        loss, _ = dmf_loss(wrapped, model, x, y, d, 1000, 0.3, 0.0, 0.9)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            if args.mode == "fsdp":
                sharding.ema_update(ema, model, 1e-3)
            else:
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1e-3)
        if step:  # the first step builds the optimizer state
            times.append(time.perf_counter() - t0)
    row = dict(mode=args.mode, world=world, model="DMFT-S/2", input_size=args.input_size, global_batch=args.batch,
               params=local_bytes(model.parameters()), grads=local_bytes(p.grad for p in params),
               adamw=local_bytes(v for st in opt.state.values() for v in st.values()
                                 if isinstance(v, torch.Tensor) and v.dim()),
               ema=local_bytes(ema_tensors), step_s_median=statistics.median(times), steps=args.steps)
    row["total"] = row["params"] + row["grads"] + row["adamw"] + row["ema"]
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(json.dumps(rows[0]))
    dist.destroy_process_group()


def computed():
    """fp32 params + grads + AdamW (2 moments) + EMA = 20 bytes per parameter; DDP adds its buckets
    (4 bytes per parameter); FSDP2 divides by the world size and holds, transiently, the unsharded
    parameters of the units in flight (one block, two with prefetch) and their gradients."""
    from dmf.model import DMFT

    configs = {
        "DMFT-XL/2 (32x32x4 latents)": dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                                             num_heads=16, num_classes=1000, use_logvar=True),
        "LightningDMF-XL/1 (16x16x32 VA-VAE latents)": dict(input_size=16, patch_size=1, in_channels=32,
                                                             hidden_size=1152, depth=28, num_heads=16,
                                                             num_classes=1000, use_logvar=True, use_swiglu=True,
                                                             use_rope=True, use_rmsnorm=True),
        "3B DiT (D 2304, 32 blocks)": dict(input_size=32, patch_size=2, in_channels=4, hidden_size=2304, depth=32,
                                           num_heads=18, num_classes=1000, use_logvar=True),
    }
    lines = ["| model | parameters | DDP per GPU | FSDP2 per GPU (8 GPUs) | + unsharded units in flight (2 blocks) |",
             "|---|---|---|---|---|"]
    for name, kw in configs.items():
        with torch.device("meta"):
            m = DMFT(**kw)
        n = sum(p.numel() for p in m.parameters() if p.requires_grad)
        block = sum(p.numel() for p in m.blocks[0].parameters())
        gib = 2 ** 30
        lines.append(f"| {name} | {n / 1e6:.0f} M | {24 * n / gib:.2f} GiB | {20 * n / 8 / gib:.2f} GiB | "
                     f"{2 * 8 * block / gib:.3f} GiB |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("ddp", "fsdp"), default="fsdp")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--input-size", type=int, default=16, help="latent side (16: 64 tokens at patch 2)")
    ap.add_argument("--out", default="fsdp_rows.jsonl")
    ap.add_argument("--computed", action="store_true")
    a = ap.parse_args()
    print(computed()) if a.computed else measured(a)
