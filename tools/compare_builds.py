"""One thread against an earlier build: the same LSTM calls timed in two source trees (each built in
place), alternating child processes round by round, so drift on a shared machine hits both alike.

    python tools/compare_builds.py /tmp/old-tree            # this tree against that one
    python tools/compare_builds.py /tmp/old-tree --rounds 9

A ratio is the median over rounds of (this tree's time / the other's): 1.02 is 2% slower here.
Each child times every shape at threads=1 (the other tree may predate threads=) and prints JSON.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
SHAPES = (("sequence", 100, 1, 256), ("sequence", 100, 1, 512), ("sequence", 100, 1, 1024),
          ("sequence", 50, 16, 256), ("sequence", 20, 64, 512),
          ("step", 1, 1, 512), ("step", 1, 1, 1024))
FORMATS = ("float32", "int8")

CHILD = r"""
import json, sys, time
import numpy as np
import fastcell

def per_call(fn, budget):
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < budget / 4:
        fn(); n += 1
    best = float("inf")
    for _ in range(5):                   # the best of 5 batches: the least disturbed
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best

out = {}
for mode, T, B, H in json.loads(sys.argv[1]):
    rng = np.random.default_rng(0)
    base = fastcell.LSTM(H, H)
    x = rng.standard_normal((T, B, H)).astype(np.float32)
    for fmt in json.loads(sys.argv[2]):
        m = base if fmt == "float32" else fastcell.quantize(base, fmt)
        if mode == "step":
            state, y = m.new_state(B), np.empty((B, H), np.float32)
            fn = lambda: m.step(x[0], state, y)
        else:
            fn = lambda: m(x)
        out[f"{mode} T={T} B={B} H={H} {fmt}"] = per_call(fn, float(sys.argv[3]))
print(json.dumps(out))
"""


def child(tree, budget):
    env = dict(os.environ, PYTHONPATH=str(tree), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(SHAPES), json.dumps(FORMATS),
                        str(budget)], env=env, cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("other", type=Path, help="the other source tree, built in place")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--budget", type=float, default=0.2, help="seconds per call timed, per round")
    args = p.parse_args()
    trees = {"this": HERE, "other": args.other.resolve()}
    times = {k: [] for k in trees}
    for r in range(args.rounds):
        for k in (("this", "other") if r % 2 == 0 else ("other", "this")):
            times[k].append(child(trees[k], args.budget))
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    print(f"| call (1 thread) | this tree µs | other µs | this / other (median of {args.rounds} rounds) |")
    print("|---|--:|--:|--:|")
    for name in times["this"][0]:
        a = statistics.median(t[name] for t in times["this"])
        b = statistics.median(t[name] for t in times["other"])
        ratio = statistics.median(x[name] / y[name] for x, y in zip(times["this"], times["other"]))
        print(f"| {name} | {a * 1e6:,.1f} | {b * 1e6:,.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
