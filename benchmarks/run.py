"""Runs the benchmark suite and writes benchmarks/results/<device>_<date>.{json,md,png}.

    python -m benchmarks.run --quick          # CPU-sized quick run (the README's main job)
    python -m benchmarks.run --device cuda    # real DiT shapes on a GPU (see gpu_check.sh)
"""
import argparse
import importlib

import torch

from .harness import copy_bandwidth, device_name, pin_cpu_allocator, run_cases, write_results

SUITES = ["bench_adaln", "bench_gated_residual", "bench_rms_norm", "bench_attention", "bench_dit", "bench_dmf_train",
          "bench_swiglu", "bench_rope", "bench_lightningdit"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    ap.add_argument("--only", nargs="*", default=None, help="suites to run, e.g. bench_adaln")
    ap.add_argument("--stem", default=None, help="results file name stem (default <device>_<date>)")
    ap.add_argument("--providers", nargs="*", default=None,
                    help="only these providers, e.g. dmf eager (skips the torch.compile baselines' compile time)")
    ap.add_argument("--stream", default=None, help="append each row to this JSON-lines file as it is measured")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    torch.manual_seed(0)
    pinned = pin_cpu_allocator() if args.device == "cpu" else False
    print(f"# dmf-kernels benchmarks on {device_name(args.device)} ({args.device}, {dtype}, "
          f"{torch.get_num_threads()} CPU threads)")
    copy_gbps = copy_bandwidth(args.device)
    print(f"# device copy bandwidth {copy_gbps:.1f} GB/s")
    rows = []
    for name in args.only or SUITES:
        suite = importlib.import_module(f"benchmarks.{name}")
        cases = [c for c in suite.cases(args.device, dtype, args.quick)
                 if args.providers is None or c.provider in args.providers]
        rows += run_cases(cases, args.device, args.quick, stream=args.stream)
    paths = write_results(rows, args.device, dict(copy_gbps=copy_gbps, quick=args.quick, pinned_malloc=pinned),
                          stem=args.stem)
    print("\n" + paths[1].read_text())
    print("wrote", ", ".join(str(p) for p in paths if p))


if __name__ == "__main__":
    main()
