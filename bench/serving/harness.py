"""What a run of the serving benchmark means: the accounting (every frame served once, in its
stream's order; every session opened and closed), the statistics of a trial and whether N
streams were held, the parity check before any timing, and the search for the largest N held.
"""

import gc
import itertools
import math
import threading
import time

import numpy as np

import fastcell
from bench.parity import PARITY_TOL, REDUCED_TOL
from bench.pool_step import silero_cell
from bench.serving.drivers import run_engine
from bench.serving.load import PERIOD, H, I

P99_LIMIT = 0.005
# The network engines' p99 runs from the client's scheduled send to its reply: both ways through
# the sockets, and the clients' own delays, on the same two cores (issue 20's target for /mux).
P99_LIMIT_NETWORK = 0.010
# A complete run (the parity check) waits for its last frame however busy the machine is; only an
# engine that stopped answering reaches this bound.
COMPLETE_DRAIN = 60.0


def check_accounting(sched, run, complete=True):
    """Raises AssertionError unless no frame was served twice, each stream's frames were served in
    order (never two in one tick), and (complete) every frame was served and every session opened
    and closed as scheduled. Returns a summary dict."""
    served = ~np.isnan(run.done)
    assert run.hits.max(initial=0) <= 1, "a frame was served twice"
    assert np.array_equal(served, run.hits == 1), "result time and serve count disagree"
    o = run.order[sched.by_sess]
    g = sched.sess[sched.by_sess]
    ok = served[sched.by_sess]
    same = (g[1:] == g[:-1]) & ok[1:] & ok[:-1]
    assert np.all(o[1:][same] > o[:-1][same]), "a stream's frames were served out of order"
    # A stream's served frames are a prefix of its frames (served in order, none skipped).
    assert not np.any((g[1:] == g[:-1]) & ok[1:] & ~ok[:-1]), "a stream's frame was skipped"
    summary = dict(frames=len(sched.t), served=int(served.sum()), sessions=sched.sessions,
                   opened=run.opened, closed=run.closed, scheduled_closes=len(sched.closes))
    if complete:
        assert served.all(), f"{int((~served).sum())} frames never served"
        assert run.opened == sched.sessions, f"opened {run.opened} of {sched.sessions} sessions"
        assert run.closed == len(sched.closes), f"closed {run.closed} of {len(sched.closes)}"
    return summary


def stats(sched, run):
    m = sched.measured()
    lat = run.done[m] - sched.t[m]
    dropped = int(np.isnan(lat).sum())
    lat = np.where(np.isnan(lat), np.inf, lat)      # a dropped frame is infinitely late
    d = sched.total - sched.warmup
    in_window = (run.done >= sched.warmup) & (run.done < sched.total)
    # Nearest rank (rounding up): no interpolation into a dropped frame's inf.
    p50, p99 = np.percentile(lat, [50, 99], method="higher") if len(lat) else (np.nan, np.nan)
    return dict(streams=sched.streams, frames=int(m.sum()), p50=float(p50), p99=float(p99),
                max=float(lat.max(initial=0)), late=int(np.sum(lat > sched.period)) - dropped,
                dropped=dropped, steps_per_s=float(in_window.sum() / d), cpu=run.cpu,
                cpu_us_per_frame=float(run.cpu * d / max(1, m.sum()) * 1e6),
                frames_per_call=float(np.count_nonzero(run.hits) / run.steps) if run.steps else 0.0,
                ticks=run.ticks, aborted=run.aborted, client_cpu=run.client_cpu,
                send_lag=run.send_lag)


def held(s, limit=P99_LIMIT):
    return s["p99"] <= limit and s["late"] == 0 and s["dropped"] == 0 and not s["aborted"]


def reference_outputs(model, sched, table):
    """fastcell's StreamState, stream by stream, frame by frame: the output of every frame."""
    outs = np.empty((len(sched.t), H), np.float32)
    mask = len(table) - 1
    state, g_prev = None, -1
    for i in sched.by_sess.tolist():
        g = sched.sess[i]
        if g != g_prev:
            state, g_prev = model.new_state(1), g
        model.step(table[i & mask], state, outs[i])
    return outs


def run_complete(spec, setup, sched):
    """The engine through sched with every output recorded, never stopped for falling behind:
    whatever the machine's speed or load, every frame is served. (The schedules it runs have
    fewer sessions than the engine has room for, so no open fails either.)"""
    return run_engine(spec, setup, sched, record=True, drain=COMPLETE_DRAIN, abort_lag=math.inf)


def verify(specs, setup, log, streams=12, seed=11):
    """Each engine on a short schedule with churn (time compressed: a frame every 4 ms, sessions
    of 0.15 s on average) against the reference, and its accounting complete. Returns {engine:
    check_accounting's summary, with max_abs_diff (and error_vs_float32 for a reduced format)}."""
    models, table = setup.models, setup.table
    refs = {}       # (schedule's maker, weight format) -> outputs: the schedules are seeded

    def reference(sched, maker, fmt):
        if (maker, fmt) not in refs:
            refs[maker, fmt] = reference_outputs(models.fastcell(fmt), sched, table)
        return refs[maker, fmt]

    out = {}
    for spec in specs:
        sched = spec.schedule(setup, streams, 0.0, 0.6, 0.15, seed=seed, period=0.004,
                              jitter=0.0005)
        maker = getattr(spec.engine, "make_schedule", None)
        run = run_complete(spec, setup, sched)
        summary = check_accounting(sched, run, complete=True)
        ref32 = reference(sched, maker, "float32")
        d = float(np.max(np.abs(run.outs - reference(sched, maker, spec.fmt))))
        if spec.exact and d != 0:
            raise AssertionError(f"{spec.name}: not bit-identical to fastcell's StreamState "
                                 f"(max abs diff {d:.3g})")
        if not spec.exact and not d <= PARITY_TOL:
            raise AssertionError(f"{spec.name}: {d:.3g} from fastcell (tolerance {PARITY_TOL:g})")
        if spec.fmt != "float32":
            e = float(np.max(np.abs(run.outs - ref32)))
            if not e <= REDUCED_TOL:
                raise AssertionError(f"{spec.name}: {e:.3g} from float32: a different model")
            summary["error_vs_float32"] = e
        summary["max_abs_diff"] = d
        out[spec.name] = summary
        log(f"parity {spec.name:<13} max abs diff {d:.1e}"
            + (f" (vs float32 {summary['error_vs_float32']:.1e})" if spec.fmt != "float32" else "")
            + f"; {summary['frames']} frames, {summary['sessions']} sessions "
            f"({summary['closed']} closed and replaced), every frame served once, in order")
    return out


def trial(spec, setup, streams, settings, seed):
    sched = spec.schedule(setup, streams, settings["warmup"], settings["duration"],
                          settings["session_mean"], seed=seed)
    run = run_engine(spec, setup, sched, drain=settings["drain"],
                     min_tick=settings["min_tick"])
    check_accounting(sched, run, complete=False)
    s = stats(sched, run)
    del run, sched
    gc.collect()
    return s


def fmt_ms(x):
    if not math.isfinite(x):
        return "∞"
    return f"{x * 1e3:.2f} ms" if x < 1 else f"{x:.2f} s"


def search(spec, setup, settings, max_streams, log, start=None):
    """Largest N held: doubling, then bisection (geometric) to the resolution. Every trial's
    statistics are kept (the chart)."""
    trials = []
    seed = itertools.count(1000)

    def attempt(n):
        for r in range(settings["retries"] + 1):
            s = trial(spec, setup, n, settings, next(seed))
            s["retry"] = r
            trials.append(s)
            ok = held(s, spec.p99_limit)
            log(f"  {spec.name:<13} N={n:<7} p50 {fmt_ms(s['p50']):>9} p99 {fmt_ms(s['p99']):>9} "
                f"max {fmt_ms(s['max']):>9} late {s['late']:<6} dropped {s['dropped']:<7} "
                f"{s['steps_per_s']:>10,.0f} steps/s  CPU {s['cpu']:.2f}  "
                f"{s['frames_per_call']:.1f} frames/call  {'held' if ok else 'FAILED'}"
                + (f" ({s['aborted']})" if s["aborted"] else "") + (" (rerun)" if r else ""))
            # A rerun is for noise (a stall on a shared machine), not for plain overload: an
            # engine that kept up with the offered frames may have been held up by a neighbour.
            if ok or s["aborted"] or s["dropped"] or s["steps_per_s"] < 0.97 * n / PERIOD:
                break
        return s if ok else None

    lo = hi = None
    best = None
    n = min(start or spec.start, max_streams)
    while True:
        s = attempt(n)
        if s is None:
            hi = n
            if lo is not None or n == 1:
                break
            n = max(1, n // 4)
            continue
        lo, best = n, s
        if hi is not None or n >= max_streams:
            break
        n = min(max_streams, n * 2)
    while hi is not None and lo is not None and hi > lo * (1 + settings["resolution"]) \
            and hi - lo > 1:
        mid = int(round(math.sqrt(lo * hi)))
        mid = min(max(mid, lo + 1), hi - 1)
        s = attempt(mid)
        if s is None:
            hi = mid
        else:
            lo, best = mid, s
    return dict(engine=spec.name, label=spec.label, kind=spec.kind, threads=spec.threads,
                fmt=spec.fmt, held=lo or 0, capped=hi is None, best=best, trials=trials,
                p99_limit=spec.p99_limit)


def core_capacity(seconds=0.3):
    """What the host gives of two cores right now: the steps per second of two threads, each
    stepping its own pool (threads=1, the float32 kernel) over those of one thread. 2.0: two
    whole cores; a vCPU that shares its physical core, or a busy neighbour, reads nearer 1."""
    cell = silero_cell()
    rows = 256
    x = np.random.default_rng(0).standard_normal((rows, I)).astype(np.float32)

    def steps_per_s(threads):
        pools = [fastcell.StreamPool(cell, rows) for _ in range(threads)]
        ids = [np.array([p.open() for _ in range(rows)]) for p in pools]
        counts = [0] * threads
        stop = time.perf_counter() + seconds

        def work(k):
            out = np.empty((rows, H), np.float32)
            while True:     # at least one step, however late a busy machine starts the thread
                pools[k].step(ids[k], x, out)
                counts[k] += rows
                if time.perf_counter() >= stop:
                    break
        ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return sum(counts) / (time.perf_counter() - t0)

    one = steps_per_s(1)
    return steps_per_s(2) / one
