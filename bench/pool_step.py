"""What a StreamPool step costs against the two ways it replaces, at the Silero VAD's size
(LSTMCell(128, 128)): n = 1,250 streams out of 20,000 open, stepped by id, against a fixed
new_state(batch=n) (no gather or scatter at all) and against n StreamStates stepped one by one.

Interleaved rounds, medians, one thread on every side unless the row says two (the pool's own
workers). Per stream-step times, and the ratios the issue sets targets on: pool / fixed batch
(<= 1.15) and pool / one by one (<= 0.5).

    python -m bench.pool_step [--rounds 30]
"""

import statistics
import time

import numpy as np

import fastcell
from bench.timing import command_line

I = H = 128
OPEN, N = 20_000, 1_250
ONE_BY_ONE = 100      # one-by-one steps per round (their cost per step does not depend on n)


def silero_cell(seed=0):
    rng = np.random.default_rng(seed)
    k = 1 / np.sqrt(H)
    return fastcell.LSTMCell(*(rng.uniform(-k, k, s).astype(np.float32)
                               for s in [(4 * H, I), (4 * H, H), (4 * H,), (4 * H,)]))


def measure(rounds=30, formats=("float32", "int8")):
    """[(format, {row: seconds per stream-step})], medians over interleaved rounds."""
    from threadpoolctl import threadpool_limits

    out = []
    with threadpool_limits(1):
        for fmt in formats:
            cell = silero_cell()
            if fmt != "float32":
                cell = fastcell.quantize(cell, fmt)
            rng = np.random.default_rng(1)
            x = rng.standard_normal((N, I)).astype(np.float32)
            y = np.empty((N, H), np.float32)
            fixed = cell.new_state(N)
            pools, picks = {}, {}
            for threads in (1, 2):
                pool = fastcell.StreamPool(cell, OPEN, threads=threads)
                ids = np.array([pool.open() for _ in range(OPEN)])
                pools[threads], picks[threads] = pool, rng.permutation(ids)[:N]
            singles = [cell.new_state(1) for _ in range(ONE_BY_ONE)]
            x1, y1 = x[0].copy(), np.empty(H, np.float32)

            def one_by_one():
                for s in singles:
                    cell.step(x1, s, y1)

            rows = {
                "fixed new_state(batch=n), 1 thread": (lambda: cell.step(x, fixed, y), N),
                "pool, 1 thread": (lambda: pools[1].step(picks[1], x, y), N),
                "pool, 2 threads": (lambda: pools[2].step(picks[2], x, y), N),
                "one StreamState per stream, one by one": (one_by_one, ONE_BY_ONE),
            }
            times = {name: [] for name in rows}
            for _ in range(rounds):
                for name, (call, steps) in rows.items():
                    t0 = time.perf_counter()
                    call()
                    times[name].append((time.perf_counter() - t0) / steps)
            out.append((fmt, {name: statistics.median(v) for name, v in times.items()}))
    return out


def table(results):
    """Markdown lines: per stream-step times and the ratios to the fixed batch."""
    L = ["| format | how the streams are stepped | µs per stream-step | ÷ fixed batch |",
         "|---|---|--:|--:|"]
    for fmt, t in results:
        base = t["fixed new_state(batch=n), 1 thread"]
        for name, s in t.items():
            L.append(f"| {fmt} | {name} | {s * 1e6:.2f} | {s / base:.2f}× |")
    return L


def targets(results):
    """[(what, measured, met)] for the issue's two ratios (float32)."""
    out = []
    for fmt, t in results:
        pool = t["pool, 1 thread"]
        r1 = pool / t["fixed new_state(batch=n), 1 thread"]
        r2 = pool / t["one StreamState per stream, one by one"]
        out.append((f"{fmt}: pool step of {N:,} of {OPEN:,} streams ≤ 1.15× fixed batch",
                    f"{r1:.2f}×", r1 <= 1.15))
        out.append((f"{fmt}: pool step ≤ 0.5× one-by-one steps", f"{r2:.2f}×", r2 <= 0.5))
    return out


def main(argv=None):
    command_line(__doc__, measure, table, targets, 30, argv)


if __name__ == "__main__":
    main()
