"""Interleaved timing: every competitor of one comparison timed in rounds, each round running
every competitor's batch of calls once in a rotating order, so drift on a shared machine hits
both sides of a ratio alike."""

import gc
import math
import statistics
import time


def _per_call(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def measure(fns, batch_ms, budget_s, min_rounds, max_rounds, settle_s=0.0):
    """Interleaved timing of {name: fn}. Returns {name: [seconds per call, one per round]}.
    settle_s: a pause before each batch, so that the threads a competitor left spinning (thread
    pools spin a while after a call) have parked before the next one's batch starts."""
    calls, round_s = {}, 0.0
    for name, fn in fns.items():
        # Warm-up (caches, lazy initialisation, branch predictors): one call, then calls timed
        # one by one for at least a batch's length; the fastest sets the calibration.
        fn()
        t_end = time.perf_counter() + batch_ms / 1e3
        t1 = _per_call(fn, 1)
        while time.perf_counter() < t_end:
            t1 = min(t1, _per_call(fn, 1))
        calls[name] = max(1, math.ceil(batch_ms / 1e3 / max(t1, 1e-9)))
        round_s += calls[name] * t1
    rounds = int(min(max_rounds, max(min_rounds, budget_s / max(round_s, 1e-9))))
    names = list(fns)
    samples = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                if settle_s:
                    time.sleep(settle_s)
                samples[name].append(_per_call(fns[name], calls[name]))
    finally:
        gc.enable()
    return samples


def paired_ratio(num, den, num_steps=1, den_steps=1):
    """Median over rounds of (num per step) / (den per step)."""
    return statistics.median((a / num_steps) / (b / den_steps) for a, b in zip(num, den))


def command_line(doc, measure, table, targets, rounds, argv=None):
    """A small benchmark's command: --rounds, then its table and each target met or missed."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=rounds)
    args = p.parse_args(argv)
    results = measure(args.rounds)
    print("\n".join(table(results)))
    for what, value, ok in targets(results):
        print(f"{'met ' if ok else 'MISS'} {what}: {value}")
