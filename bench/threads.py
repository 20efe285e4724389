"""Throughput of fastcell on 1 and 2 threads serving independent streams.

The kernels release the GIL for the whole time loop (and a step for its one T = 1 walk), so
threads that each own a StreamState run in parallel; what stays serial is the Python call itself.
Each thread makes `calls` calls; throughput = threads * calls / wall time. The scenarios are
issue 4's: a streaming step (LSTM, B = 1, H = 256) and a whole sequence (GRU, T = 100, H = 64).

    python -m bench.threads
"""

import statistics
import threading
import time

import numpy as np

import fastcell

SCENARIOS = (
    ("LSTM step, B=1, H=256", "lstm", 256, 1, 3000),
    ("GRU sequence, T=100, B=1, H=64", "gru", 64, 100, 300),
)
LAYERS = {"lstm": fastcell.LSTM, "gru": fastcell.GRU}


def _worker(model, T, H, calls, barrier, seed):
    rng = np.random.default_rng(seed)
    if T == 1:
        state, out = model.new_state(1), np.empty((1, H), np.float32)
        x = rng.standard_normal((1, H)).astype(np.float32)

        def call():
            model.step(x, state, out)
    else:
        x = rng.standard_normal((T, 1, H)).astype(np.float32)

        def call():
            model(x)
    call()
    barrier.wait()
    for _ in range(calls):
        call()


def throughput(model, T, H, calls, threads):
    """Calls per second of `threads` threads, each on its own stream."""
    barrier = threading.Barrier(threads + 1)
    pool = [threading.Thread(target=_worker, args=(model, T, H, calls, barrier, i))
            for i in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in pool:
        t.join()
    return threads * calls / (time.perf_counter() - start)


def scaling(rounds=5):
    """[(scenario, 1-thread calls/s, 2-thread calls/s, median ratio)] over interleaved rounds."""
    out = []
    for name, kind, H, T, calls in SCENARIOS:
        model = LAYERS[kind](H, H)
        one, two, ratios = [], [], []
        for _ in range(rounds):
            a = throughput(model, T, H, calls, 1)
            b = throughput(model, T, H, calls, 2)
            one.append(a)
            two.append(b)
            ratios.append(b / a)
        out.append((name, statistics.median(one), statistics.median(two), statistics.median(ratios)))
    return out


if __name__ == "__main__":
    for name, a, b, r in scaling():
        print(f"{name}: 1 thread {a:,.0f} calls/s, 2 threads {b:,.0f} calls/s, ratio {r:.2f}")
