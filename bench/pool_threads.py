"""A StreamPool of a big model stepping a few streams, on 1 and 2 threads (issue 19): a step of
fewer than 64 rows cannot split by rows, so each layer splits by hidden units (each thread its
slice of the weights, a barrier a step), as a model's own step does. LSTM, I = H, float32 and
int8, interleaved rounds; the host's cores probed before and after (bench.team.cores_given).

    python -m bench.pool_threads
"""

import statistics

import numpy as np

import fastcell
from bench.team import cores_given
from bench.timing import measure

SHAPES = [(H, fmt, rows) for H in (512, 1024) for fmt in ("float32", "int8") for rows in (1, 8)]


def main():
    rng = np.random.default_rng(0)
    fns, keep = {}, []
    for H, fmt, rows in SHAPES:
        model = fastcell.LSTM(H, H)
        model = model if fmt == "float32" else fastcell.quantize(model, fmt)
        x = rng.standard_normal((rows, H)).astype(np.float32)
        for n in (1, 2):
            pool = fastcell.StreamPool(model, capacity=rows, threads=n)
            ids, out = [pool.open() for _ in range(rows)], np.empty((rows, H), np.float32)
            keep.append(pool)
            fns[(H, fmt, rows, n)] = lambda p=pool, i=ids, x=x, o=out: p.step(i, x, out=o)
    before = cores_given()
    r = measure(fns, batch_ms=20, budget_s=20, min_rounds=9, max_rounds=21, settle_s=0.002)
    print(f"host gave {before:.2f}/{cores_given():.2f} cores")
    print("| model | streams a step | 1 thread µs | 2 threads µs | 2 threads / 1 thread |")
    print("|---|--:|--:|--:|--:|")
    for H, fmt, rows in SHAPES:
        a, b = r[(H, fmt, rows, 1)], r[(H, fmt, rows, 2)]
        print(f"| LSTM H={H} {fmt} | {rows} | {statistics.median(a) * 1e6:,.1f} | "
              f"{statistics.median(b) * 1e6:,.1f} | "
              f"{statistics.median(u / v for u, v in zip(a, b)):.2f}× |")


if __name__ == "__main__":
    main()
