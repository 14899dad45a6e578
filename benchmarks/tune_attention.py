"""Sweeps the Triton attention kernels' launch configs (BLOCK_M, BLOCK_N, num_warps,
num_stages) at DiT shapes on a GPU and prints the fastest per kernel and shape, so that
the defaults in dmf_kernels/attention_triton.py (_default_blocks) can be set from
measurements. Writes benchmarks/results/<gpu>_<date>_attention_tuning.json.

    python -m benchmarks.tune_attention            # bf16, DiT-B/2 and DiT-XL/2 shapes
"""
import datetime
import itertools
import json
import time

import torch

from dmf_kernels import attention_triton as at

from .harness import RESULTS, slug, time_fn

SHAPES = [(64, 16, 256, 72), (64, 16, 1024, 72), (64, 12, 1024, 64)]  # DiT-XL/2 first (the issues' shape)
CONFIGS = {
    "fwd": list(itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3])),
    "jvp": list(itertools.product([32, 64, 128], [32, 64], [4, 8], [2, 3])),
    # the dK/dV kernel (block_m: query chunk, block_n: keys per program) with dQ at its default,
    # then the dQ kernel with dK/dV at its default
    "bwd_dkdv": list(itertools.product([16, 32, 64], [64, 128], [4, 8], [2])),
    "bwd_dq": list(itertools.product([64, 128], [16, 32, 64], [4, 8], [2])),
}


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=400, help="stop sweeping after this many seconds")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    dtype = torch.bfloat16
    results = []
    name = slug(torch.cuda.get_device_name())
    path = RESULTS / f"{name}_{datetime.date.today().isoformat()}_attention_tuning.json"

    def write():  # after every shape and kind: a run cut short keeps what it measured
        path.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), dtype=str(dtype), rows=results),
                                   indent=1))

    for B, H, N, D in SHAPES:
        q, k, v, qd, kd, vd, do = (torch.randn(B, H, N, D, device="cuda", dtype=dtype) for _ in range(7))
        scale = D ** -0.5
        o, lse = at.attention_fwd(q, k, v, scale)
        runs = {
            "fwd": lambda bm, bn, w, s: at.attention_fwd(q, k, v, scale, block_m=bm, block_n=bn, num_warps=w,
                                                         num_stages=s),
            "jvp": lambda bm, bn, w, s: at.attention_jvp(q, k, v, qd, kd, vd, scale, block_m=bm, block_n=bn,
                                                         num_warps=w, num_stages=s),
            "bwd_dkdv": lambda bm, bn, w, s: at.attention_bwd(
                do, q, k, v, o, lse, scale, block_m=bm, block_n=bn, num_warps=w, num_stages=s,
                dq_blocks=at._default_blocks("bwd_dq", D, False, torch.cuda.get_device_capability())),
            "bwd_dq": lambda bm, bn, w, s: at.attention_bwd(do, q, k, v, o, lse, scale, num_stages=s,
                                                            dq_blocks=(bm, bn, w)),
        }
        for kind, configs in CONFIGS.items():
            best = None
            for bm, bn, w, s in configs:
                if time.perf_counter() - t_start > args.budget_s:
                    print(f"tune_attention: budget of {args.budget_s:.0f} s spent; stopping")
                    write()
                    print("wrote", path)
                    return
                try:
                    ms = time_fn(lambda: runs[kind](bm, bn, w, s), "cuda", 0.2, 50, 3)[0]
                except Exception as e:  # out of shared memory / registers: not a candidate
                    print(f"{kind} B{B} H{H} N{N} D{D} ({bm},{bn},{w},{s}) failed: {type(e).__name__}")
                    continue
                row = dict(kind=kind, shape=[B, H, N, D], block_m=bm, block_n=bn, num_warps=w, num_stages=s, ms=ms)
                results.append(row)
                if best is None or ms < best["ms"]:
                    best = row
            print(f"best {kind:8s} B{B} H{H} N{N} D{D}: {best}")
            write()
    print("wrote", path)


if __name__ == "__main__":
    main()
