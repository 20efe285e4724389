"""The loops that play a schedule (bench/serving/load.py) on an engine in real time, one per kind
of engine (bench/serving/engines.py), and record what happened to every frame (Run): its result
time, how often and in which tick it was served, its output (record=True).
"""

import functools
import gc
import itertools
import time
from dataclasses import dataclass

import numpy as np

import fastcell

from bench.serving.load import H, I

ABORT_LAG = 1.0             # a trial this far behind has failed: stop it rather than wait


def clock():
    return time.perf_counter()


@dataclass
class Run:
    """What happened to every frame of a schedule on one engine."""
    done: np.ndarray          # result time (s from the start), nan: never served
    hits: np.ndarray          # times each frame was served
    order: np.ndarray         # serving sequence number (tick or callback), -1: never
    outs: np.ndarray          # outputs (record=True), else None
    opened: int
    closed: int
    ticks: int
    steps: int                # engine calls: batched steps or frames
    cpu: float                # process CPU seconds / wall seconds over the measured window
    aborted: str = ""
    client_cpu: float = float("nan")   # network engines: the client processes' CPU, likewise
    send_lag: float = float("nan")     # network engines: p99 of how late the clients sent


def _capacity(streams):
    # Opens and closes line up in real time; when an engine falls behind a close waits for its
    # stream's last frame while the successor is already open.
    return streams + streams // 2 + 64


class CpuWindow:
    """Process CPU time over wall time between the end of the warm-up and the end of the
    measured window (2.0: both cores busy)."""

    def __init__(self, start, end):
        self.start, self.end = start, end
        self.c0 = self.c1 = self.w0 = self.w1 = None

    def at(self, now):
        if self.c0 is None and now >= self.start:
            self.c0, self.w0 = time.process_time(), now
        if self.c1 is None and now >= self.end:
            self.c1, self.w1 = time.process_time(), now

    def load(self, now):
        if self.c1 is None:
            self.c1, self.w1 = time.process_time(), now
        if self.c0 is None:
            self.c0, self.w0 = self.c1, self.w1
        return (self.c1 - self.c0) / (self.w1 - self.w0) if self.w1 > self.w0 else float("nan")


def _start(engine, sched, record):
    """What a driver keeps per frame (Run's done, hits, order and outs) and per session (handle,
    -1 until opened), the sessions live when the clock starts already opened."""
    F = len(sched.t)
    done = np.full(F, np.nan)
    hits = np.zeros(F, np.int32)
    order = np.full(F, -1, np.int64)
    outs = np.full((F, H), np.nan, np.float32) if record else None
    handle = np.full(sched.sessions, -1, np.int64)
    for g in sched.initial.tolist():
        handle[g] = engine.open()
    return done, hits, order, outs, handle


def run_ticks(engine, sched, table, record=False, drain=0.5, min_tick=0.0, abort_lag=ABORT_LAG):
    """The tick loop (tick and per-frame engines): open-loop, sleeps when nothing is due.
    min_tick > 0: ticks start at least that many seconds apart (bigger batches, less Python per
    frame, up to min_tick more latency); 0 steps whatever is due at once."""
    t, sess = sched.t, sched.sess
    F, S = len(t), sched.sessions
    mask = len(table) - 1
    done, hits, order, outs, handle = _start(engine, sched, record)
    served = np.zeros(S, np.int64)
    cap = _capacity(sched.streams)
    xbuf = np.empty((cap, I), np.float32)
    ybuf = np.empty((cap, H), np.float32)
    out_rows = list(ybuf)
    batch = engine.kind == "tick"
    opened, closed, ticks, steps = len(sched.initial), 0, 0, 0
    opens, closes = sched.opens, sched.closes
    o_ptr = c_ptr = ptr = 0
    waiting_close = []                      # due, but a frame of theirs is not served yet
    backlog = np.empty(0, np.int64)
    rows = (np.arange(F) & mask).astype(np.int32)   # frame i's data: table row i % M
    # Two frames of one stream are >= period - 2 jitter apart: a tick spanning less has no repeat.
    span_ok = sched.period - 2 * sched.jitter
    end_t, stop_t = sched.total, sched.total + drain
    cpu = CpuWindow(sched.warmup, end_t)
    aborted = ""
    next_tick = 0.0
    gc.collect()
    t0 = clock()
    while True:
        now = clock() - t0
        cpu.at(now)
        # Closes first (they free capacity), then opens, then frames.
        if c_ptr < len(closes) and sched.end[closes[c_ptr]] <= now:
            k = c_ptr
            while k < len(closes) and sched.end[closes[k]] <= now:
                k += 1
            waiting_close.extend(closes[c_ptr:k].tolist())
            c_ptr = k
        if waiting_close:
            still = []
            for g in waiting_close:
                # A session opened, and closed, within one long tick opens first.
                if handle[g] >= 0 and served[g] == sched.nframes[g]:
                    engine.close(int(handle[g]))
                    closed += 1
                else:
                    still.append(g)
            waiting_close = still
        while o_ptr < len(opens) and sched.start[opens[o_ptr]] <= now:
            g = opens[o_ptr]
            try:
                handle[g] = engine.open()
            except RuntimeError as e:       # PoolFullError: overloaded far past real time
                aborted = f"open failed: {e}"
                break
            opened += 1
            o_ptr += 1
        if aborted:
            break
        if now > stop_t:
            break
        k = int(np.searchsorted(t, now, "right")) if now >= next_tick else ptr
        if k > ptr or (len(backlog) and now >= next_tick):
            next_tick = now + min_tick
            if not len(backlog) and t[k - 1] - t[ptr] < span_ok:
                take = slice(ptr, k)         # the common case: a run of frames, no repeat
            else:
                cand = np.arange(ptr, k)
                if len(backlog):
                    cand = np.concatenate([backlog, cand])
                if len(cand) > 1 and t[cand[-1]] - t[cand[0]] >= span_ok:
                    # At most one frame per stream per tick: the earliest; the others wait.
                    _, first = np.unique(sess[cand], return_index=True)
                    keep = np.zeros(len(cand), bool)
                    keep[first] = True
                    take, backlog = cand[keep], cand[~keep]
                else:
                    take, backlog = cand, cand[:0]
            ptr = k
            gs = sess[take]
            ids = handle[gs]
            n = len(ids)
            if batch:
                x = xbuf[:n]
                np.take(table, rows[take], axis=0, out=x)
                engine.step(ids, x, ybuf[:n])
                done[take] = clock() - t0
                steps += 1
            else:
                frames = (list(range(take.start, take.stop)) if type(take) is slice
                          else take.tolist())
                engine.serve(ids.tolist(), rows[take].tolist(), frames, out_rows, done, t0, record)
                steps += n
            hits[take] += 1
            order[take] = ticks
            served[gs] += 1
            if record:
                outs[take] = ybuf[:n]
            ticks += 1
            oldest = t[backlog[0]] if len(backlog) else t[take][0]
            if clock() - t0 - oldest > abort_lag:
                aborted = f"more than {abort_lag:g} s behind"
                break
            continue
        # Nothing due: finished, or sleep until the next frame (or open, or the end).
        if ptr >= F and not len(backlog):
            if now >= end_t and not waiting_close and c_ptr >= len(closes):
                break
            if now >= stop_t:
                break
        nxt = min(t[ptr] if ptr < F else end_t,
                  sched.start[opens[o_ptr]] if o_ptr < len(opens) else np.inf,
                  sched.end[closes[c_ptr]] if c_ptr < len(closes) else np.inf,
                  end_t if cpu.c1 is None else stop_t)
        if waiting_close and ptr >= F:
            nxt = min(nxt, now + 0.001)
        nxt = max(nxt, next_tick)
        if nxt > now:
            time.sleep(nxt - now)
        if clock() - t0 > stop_t:
            break
    return Run(done, hits, order, outs, opened, closed, ticks, steps, cpu.load(clock() - t0),
               aborted)


def run_batcher(engine, sched, table, record=False, drain=0.5, abort_lag=ABORT_LAG):
    """A producer (this thread) submits each frame at its scheduled time; a done-callback records
    the result time. Closes wait until every frame of the stream has its result."""
    t, sess = sched.t, sched.sess
    F, S = len(t), sched.sessions
    mask = len(table) - 1
    rows = list(table)
    done, hits, order, outs, handle = _start(engine, sched, record)
    counter = itertools.count()
    errors = []
    offsets = np.concatenate([[0], np.cumsum(np.bincount(sess[sched.by_sess], minlength=S))])
    t0 = None

    def finished(i, fut):
        done[i] = clock() - t0
        hits[i] += 1
        order[i] = next(counter)
        if fut.exception() is not None:
            errors.append(fut.exception())
        elif record:
            outs[i] = fut.result()

    def closed_one(fut):
        if fut.exception() is not None:
            errors.append(fut.exception())
        else:
            closes_done.append(1)

    def all_done(g):
        return not np.isnan(done[sched.by_sess[offsets[g]:offsets[g + 1]]]).any()

    opened = len(sched.initial)
    closes_done = []
    close_stream = getattr(engine, "close_stream", None)
    opens, closes = sched.opens, sched.closes
    o_ptr = c_ptr = ptr = oldest = 0
    waiting_close = []
    submit, ids = engine.submit, handle
    end_t, stop_t = sched.total, sched.total + drain
    cpu = CpuWindow(sched.warmup, end_t)
    aborted = ""
    gc.collect()
    t0 = clock()
    while True:
        now = clock() - t0
        cpu.at(now)
        while o_ptr < len(opens) and sched.start[opens[o_ptr]] <= now:
            try:
                handle[opens[o_ptr]] = engine.open()
            except RuntimeError as e:       # PoolFullError: closes queued far behind
                aborted = f"open failed: {e}"
                break
            opened += 1
            o_ptr += 1
        if aborted:
            break
        # Opens, then frames, then closes: a close goes behind its stream's last frame.
        k = int(np.searchsorted(t, now, "right"))
        if k > ptr:
            try:
                for i, g in zip(range(ptr, k), sess[ptr:k].tolist()):
                    fut = submit(int(ids[g]), rows[i & mask])
                    fut.add_done_callback(functools.partial(finished, i))
                    ptr = i + 1
            except fastcell.BatcherFullError as e:   # a service would refuse this frame
                aborted = f"the Batcher refused a frame ({e})"
        if aborted:
            break
        while c_ptr < len(closes) and sched.end[closes[c_ptr]] <= now:
            g = int(closes[c_ptr])
            if close_stream is not None:
                close_stream(int(handle[g])).add_done_callback(closed_one)
            else:
                waiting_close.append(g)
            c_ptr += 1
        if waiting_close:
            still = []
            for g in waiting_close:
                if all_done(g):
                    engine.close(int(handle[g]))
                    closes_done.append(g)
                else:
                    still.append(g)
            waiting_close = still
        # The oldest frame without a result: the Batcher (or this producer) is that far behind.
        while oldest < ptr and done[oldest] == done[oldest]:
            oldest += 1
        if oldest < ptr and now - t[oldest] > abort_lag:
            aborted = f"more than {abort_lag:g} s behind"
            break
        if ptr >= F and ((now >= end_t and not waiting_close and oldest >= F) or now >= stop_t):
            break
        nxt = min(t[ptr] if ptr < F else stop_t,
                  sched.start[opens[o_ptr]] if o_ptr < len(opens) else np.inf,
                  sched.end[closes[c_ptr]] if c_ptr < len(closes) else np.inf,
                  end_t if cpu.c1 is None else stop_t)
        if waiting_close or oldest < ptr:
            nxt = min(nxt, now + 0.001)    # poll for results: closes and the drain wait on them
        if nxt > now:
            time.sleep(nxt - now)
    load = cpu.load(clock() - t0)
    engine.stop()     # drains what is left: results after the drain count as dropped
    after = done > stop_t
    done[after], hits[after], order[after] = np.nan, 0, -1
    if errors:
        raise RuntimeError(f"Batcher: {len(errors)} frames failed, the first: {errors[0]!r}")
    return Run(done, hits, order, outs, opened, len(closes_done), engine.calls, engine.calls, load,
               aborted)


def run_engine(spec, setup, sched, record=False, drain=0.5, min_tick=0.0, abort_lag=ABORT_LAG):
    """The engine of spec, built from setup, through sched by the driver of its kind."""
    engine = spec.build(setup, _capacity(sched.streams))
    try:
        if spec.kind == "per frame, Batcher":
            return run_batcher(engine, sched, setup.table, record, drain, abort_lag)
        if spec.kind == "network":
            from bench.serving.network import run_network   # network.py builds on this module
            return run_network(engine, sched, setup, record, drain, abort_lag)
        return run_ticks(engine, sched, setup.table, record, drain, min_tick, abort_lag)
    finally:
        if spec.kind != "per frame, Batcher":
            engine.stop()
