"""What a frame costs through the Batcher against the pool's own step (issue 20), at the Silero
VAD's size (LSTMCell(128, 128), float32, one thread): n streams open (1,000 and 4,000), one frame
per stream per round.

- "pool.step": one pool.step(ids, x, out) over the n streams (the engine's own cost);
- "submit + result": one thread submits one frame per stream (batcher.submit(sid, frame)), then
  waits for each result in turn (handle.result()): what a service pays per frame that reaches the
  engine one at a time;
- "submit_many + result": the n frames in one submit_many(ids, frames), one result;
- "submit_async": an asyncio task awaits n submit_async(sid, frame) gathered at once.

Interleaved rounds, medians, per frame. The target: submit + result ≤ 1/0.6 of pool.step
(both per frame) at 1,000 and at 4,000 streams.

    python -m bench.batcher_cost [--rounds 15]
"""

import asyncio
import statistics
import time

import numpy as np

import fastcell
from bench.pool_step import I, silero_cell
from bench.timing import command_line

SIZES = (1_000, 4_000)
TARGET = 1 / 0.6


def measure(rounds=15, sizes=SIZES):
    """{n: {row: seconds per frame}}, medians over interleaved rounds."""
    from threadpoolctl import threadpool_limits

    out = {}
    with threadpool_limits(1):
        for n in sizes:
            cell = silero_cell()
            pool = fastcell.StreamPool(cell, n)
            ids = np.array([pool.open() for _ in range(n)], np.int64)
            sids = [int(s) for s in ids]
            x = np.random.default_rng(1).standard_normal((n, I)).astype(np.float32)
            frames = list(x)
            y = np.empty((n, pool.output_size), np.float32)
            batcher = fastcell.Batcher(pool, max_batch=n, max_delay=0.05)
            loop = asyncio.new_event_loop()

            def submit_result():
                handles = [batcher.submit(s, f) for s, f in zip(sids, frames)]
                for h in handles:
                    h.result()

            def submit_many():
                batcher.submit_many(ids, x).result()

            async def gathered():
                return await asyncio.gather(*[batcher.submit_async(s, f)
                                              for s, f in zip(sids, frames)])

            rows = {"pool.step": lambda: pool.step(ids, x, y),
                    "submit + result": submit_result,
                    "submit_many + result": submit_many,
                    "submit_async": lambda: loop.run_until_complete(gathered())}
            times = {name: [] for name in rows}
            for call in rows.values():
                call()                                  # warm up
            try:
                for r in range(rounds):
                    names = list(rows)
                    for name in names[r % len(names):] + names[:r % len(names)]:
                        t0 = time.perf_counter()
                        rows[name]()
                        times[name].append((time.perf_counter() - t0) / n)
            finally:
                batcher.close()
                loop.close()
            out[n] = {name: statistics.median(v) for name, v in times.items()}
    return out


def table(results):
    L = ["| streams | how frames reach the pool | µs per frame | ÷ pool.step |", "|--:|---|--:|--:|"]
    for n, t in results.items():
        base = t["pool.step"]
        for name, s in t.items():
            L.append(f"| {n:,} | {name} | {s * 1e6:.2f} | {s / base:.2f}× |")
    return L


def targets(results):
    return [(f"{n:,} streams: submit + result ≤ {TARGET:.2f}× pool.step per frame",
             f"{t['submit + result'] / t['pool.step']:.2f}×",
             t["submit + result"] / t["pool.step"] <= TARGET) for n, t in results.items()]


def main(argv=None):
    command_line(__doc__, measure, table, targets, 15, argv)


if __name__ == "__main__":
    main()
