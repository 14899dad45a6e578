"""Before/after timing of two source trees (e.g. a refactor), each with its own extension built in place,
interleaved per case so that drift over the run cancels.

    git worktree add /tmp/before <rev> && (cd /tmp/before && python setup.py build_ext --inplace)
    python benchmarks/before_after.py /tmp/before . --suites bench_adaln bench_attention \
        --providers dmf eager --rounds 2 --out rows.jsonl

One long-lived process per tree runs that tree's own harness (`run_cases`, quick mode) on the case
keys the driver sends it; the two sides alternate per case in ABBA order. Include the `eager`
provider: it runs the same PyTorch code on both sides, so its ratios are the noise floor. Prints a
markdown table (median over rounds, new/old) and appends every row to --out.
"""
import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time


def worker(suites, providers):
    import torch

    from benchmarks import harness

    torch.manual_seed(0)
    harness.pin_cpu_allocator()
    cases = {}
    for s in suites:
        for c in importlib.import_module(f"benchmarks.{s}").cases("cpu", torch.float32, True):
            if c.provider in providers:
                cases[json.dumps([s, c.op, c.mode, c.provider, c.shape])] = c
    print(json.dumps(sorted(cases)), flush=True)
    for line in sys.stdin:
        row = harness.run_cases([cases[line.strip()]], "cpu", True, log=lambda *a: None)[0]
        print(json.dumps(row), flush=True)


def table(rows):
    by = {}
    for r in rows:
        if r.get("ms"):
            by.setdefault((r["op"], r["mode"], r["provider"], r["shape"]), {"old": [], "new": []})[r["side"]].append(r["ms"])
    out = ["| op | mode | provider | shape | old ms | new ms | new/old |", "|---|---|---|---|---|---|---|"]
    for k, v in sorted(by.items()):
        if v["old"] and v["new"]:
            o, n = statistics.median(v["old"]), statistics.median(v["new"])
            out.append(f"| {' | '.join(k)} | {o:.3f} | {n:.3f} | {n / o:.2f} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--suites", nargs="+", required=True)
    ap.add_argument("--providers", nargs="+", default=["dmf", "eager"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--keys", default=None, help="a file of case keys (one JSON list per line) to run alone")
    ap.add_argument("--out", default="before_after.jsonl")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.suites, set(args.providers))

    def spawn(tree):
        tree = os.path.abspath(tree)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, os.path.join(tree, "python")]))
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), tree, tree, "--worker", "--suites",
                              *args.suites, "--providers", *args.providers], cwd=tree, env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return p, set(json.loads(p.stdout.readline()))

    (old, old_keys), (new, new_keys) = spawn(args.old), spawn(args.new)
    keys = sorted(old_keys & new_keys)
    if args.keys:
        wanted = set(open(args.keys).read().split("\n")) - {""}
        keys = [k for k in keys if k in wanted]
    print(f"{len(keys)} common cases; old only {len(old_keys - new_keys)}, new only {len(new_keys - old_keys)}",
          file=sys.stderr)
    rows = []
    with open(args.out, "a") as f:
        for r in range(args.rounds):
            for i, k in enumerate(keys):
                sides = [("old", old), ("new", new)] if (i + r) % 2 == 0 else [("new", new), ("old", old)]
                for side, p in sides:
                    p.stdin.write(k + "\n")
                    p.stdin.flush()
                    row = dict(json.loads(p.stdout.readline()), side=side, round=r, t=time.time())
                    rows.append(row)
                    f.write(json.dumps(row) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
