"""Real-time serving load (issue 11, item 3): how many live streams of a Silero-VAD-sized
LSTMCell(128, 128) each engine keeps in real time.

    python -m bench.serve            # every engine (~10-15 min): bench/RESULTS.md, bench/serve.png
    python -m bench.serve --quick    # a smoke run: short trials, coarse search
    python -m bench.serve --engines 'pool|ort' --out /tmp/serve

Load: N streams, each sending a frame every 32 ms (random phase, +-1 ms jitter, a stream's frames
in order). Each stream's session lasts an exponential time (mean --session-mean); then it closes
and a new stream (new id, zero state) takes its place. The load is open-loop: every frame's arrival
time is drawn in advance and its latency is result time - scheduled arrival, so an engine that
falls behind is charged for the whole wait (no coordinated omission). A trial is --warmup seconds,
then --duration measured seconds, then at most --drain seconds to finish; the statistics cover the
frames scheduled in the measured window. N is held when p99 <= 5 ms and no frame is late
(latency > 32 ms, the frame period) or dropped (not served by the end of the drain). The search
doubles N from --start while held, then bisects to --resolution; a failed trial that kept up
with the offered frames runs once more (a shared machine has hiccups) and fails only if the rerun
fails too.

Two kinds of engines, since at 20,000 streams (625,000 frames/s) one Python object per frame costs
more than the arithmetic:
- tick: one loop takes every frame due (at most one per stream per tick), applies the due opens and
  closes, and steps them all in one batched call; a frame's data is a row of a preallocated table.
- per frame: the same loop, but each frame is one Python call (fastcell's StreamState, ONNX
  Runtime's session.run), split over 1 or 2 threads; and fastcell's Batcher, fed one submit() and
  one Future per frame at its scheduled time.

Before any timing every engine runs a short deterministic schedule (with churn) and its outputs are
checked against fastcell's StreamState stepped stream by stream: bit-exact for fastcell's engines
(int8: against the int8 model's StreamState, and within 0.1 of float32), within 1e-4 for PyTorch
and ONNX Runtime.
"""

import argparse
import functools
import gc
import itertools
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import fastcell
from bench.machine import machine_info
from bench.models import Models, Unavailable, optional_import
from bench.parity import PARITY_TOL, REDUCED_TOL

HERE = Path(__file__).resolve().parent
I = H = 128                 # Silero VAD's LSTMCell
PERIOD = 0.032              # a frame every 32 ms per stream
JITTER = 0.001
P99_LIMIT = 0.005
TABLE_ROWS = 4096           # 2 MB of frames, more than L2: the data is not all cache-hot
# The Batcher's max_delay: 0 steps whatever is waiting at once, the tick loop's policy (its
# default, 2 ms, spends that much of the 5 ms budget waiting for company). --batcher-delay.
DEFAULT_BATCHER_DELAY = 0.0
BATCHER_DELAY = DEFAULT_BATCHER_DELAY
ABORT_LAG = 1.0             # a trial this far behind has failed: stop it rather than wait

SETTINGS = {
    "full": dict(warmup=1.0, duration=3.0, drain=0.5, resolution=0.07, session_mean=7.0,
                 retries=1),
    "quick": dict(warmup=0.3, duration=0.7, drain=0.3, resolution=0.3, session_mean=1.0,
                  retries=0),
}

# Marks the section in RESULTS.md, which bench/report.py keeps when it rewrites the file.
BEGIN = "<!-- bench.serve: begin -->"
END = "<!-- bench.serve: end -->"


def clock():
    return time.perf_counter()


# -- the load --

@dataclass
class Schedule:
    """Every frame of a trial, sorted by scheduled arrival time (seconds from the start).

    Frame i: arrival t[i], session sess[i], its seq[i]-th frame; its data is table row i % M.
    Session g: open at start[g] (before the clock for the first session of each stream), close
    at end[g] (inf: still open at the end), nframes[g] frames.
    """
    t: np.ndarray
    sess: np.ndarray
    seq: np.ndarray
    start: np.ndarray
    end: np.ndarray
    nframes: np.ndarray
    initial: np.ndarray          # sessions open before the clock starts
    opens: np.ndarray            # the other sessions, by start time
    closes: np.ndarray           # sessions that close before the end, by end time
    streams: int
    warmup: float
    total: float
    period: float
    jitter: float
    by_sess: np.ndarray = field(default=None)   # frame indices sorted by (session, seq)

    @property
    def sessions(self):
        return len(self.start)

    def measured(self):
        return (self.t >= self.warmup) & (self.t < self.total)


def make_schedule(streams, warmup, duration, session_mean, seed=0, period=PERIOD, jitter=JITTER):
    rng = np.random.default_rng(seed)
    total = warmup + duration
    # Session boundaries per stream: cumulative exponential lengths, enough to pass the end.
    k = int(math.ceil(total / session_mean)) * 3 + 4
    lengths = rng.exponential(session_mean, (streams, k))
    bounds = np.concatenate([np.zeros((streams, 1)), np.cumsum(lengths, axis=1)], axis=1)
    while bounds[:, -1].min() < total:
        more = np.cumsum(rng.exponential(session_mean, (streams, k)), axis=1) + bounds[:, -1:]
        bounds = np.concatenate([bounds, more], axis=1)
    live = bounds[:, :-1] < total
    start = bounds[:, :-1][live]
    end = bounds[:, 1:][live]
    initial_mask = np.zeros_like(live)
    initial_mask[:, 0] = True
    initial_mask = initial_mask[live]
    S = len(start)
    # Frames of a session: start + phase + j * period for as long as it lasts (and the run).
    phase = rng.uniform(0, period, S)
    last = np.minimum(end, total)
    nframes = np.maximum(0, np.ceil((last - start - phase) / period)).astype(np.int64)
    F = int(nframes.sum())
    sess = np.repeat(np.arange(S), nframes)
    first = np.cumsum(nframes) - nframes
    seq = np.arange(F) - np.repeat(first, nframes)
    nominal = start[sess] + phase[sess] + seq * period
    # Jitter < period / 2 keeps a stream's frames in order; clipping keeps them inside the session.
    t = np.clip(nominal + rng.uniform(-jitter, jitter, F), start[sess], last[sess] - 1e-7)
    order = np.argsort(t, kind="stable")
    t, sess, seq = t[order], sess[order], seq[order]
    end = np.where(end < total, end, np.inf)
    opens = np.flatnonzero(~initial_mask)
    opens = opens[np.argsort(start[opens], kind="stable")]
    closes = np.flatnonzero(np.isfinite(end))
    closes = closes[np.argsort(end[closes], kind="stable")]
    by_sess = np.lexsort((seq, sess))
    return Schedule(t, sess, seq, start, end, nframes, np.flatnonzero(initial_mask), opens, closes,
                    streams, warmup, total, period, jitter, by_sess)


def make_table(rows=TABLE_ROWS, seed=7):
    return np.random.default_rng(seed).standard_normal((rows, I)).astype(np.float32)


# -- engines --
# A tick engine steps one batch: step(ids, x, out). A per-frame engine serves frames one call
# each: serve(ids, rows, frames, out_rows, done, t0) with Python lists. Both open() -> an int
# handle, close(handle).

class PoolEngine:
    kind = "tick"

    def __init__(self, model, capacity, threads):
        self.pool = fastcell.StreamPool(model, capacity, threads=threads)
        self.open, self.close = self.pool.open, self.pool.close

    def step(self, ids, x, out):
        self.pool.step(ids, x, out=out)

    def stop(self):
        pass


class TorchEngine:
    """nn.LSTMCell batched by hand: gather the due streams' rows, one cell call, scatter back."""
    kind = "tick"

    def __init__(self, cell, capacity, threads):
        torch = self.torch = optional_import("torch")
        self.cell = cell
        self.old_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        self.h = torch.zeros(capacity, H)
        self.c = torch.zeros(capacity, H)
        self.free = list(range(capacity - 1, -1, -1))

    def open(self):
        if not self.free:
            raise RuntimeError(f"all {len(self.h)} slots are open")   # as PoolFullError
        slot = self.free.pop()
        self.h[slot].zero_()
        self.c[slot].zero_()
        return slot

    def close(self, slot):
        self.free.append(slot)

    def step(self, ids, x, out):
        torch = self.torch
        idx = torch.from_numpy(ids)
        h1, c1 = self.cell(torch.from_numpy(x), (self.h.index_select(0, idx),
                                                 self.c.index_select(0, idx)))
        self.h.index_copy_(0, idx, h1)
        self.c.index_copy_(0, idx, c1)
        np.copyto(out, h1.numpy())

    def stop(self):
        self.torch.set_num_threads(self.old_threads)


class Split:
    """Runs fn(a, b) over [0, n) cut into one share per thread: this thread takes the first, the
    helpers the others, and run() returns when all are done."""
    MIN_SHARE = 4    # a hand-off costs tens of µs: below this, one thread does it all

    def __init__(self, threads):
        self.job, self.errors = None, []
        self.helpers = []
        for i in range(1, threads):
            go, fin = threading.Semaphore(0), threading.Semaphore(0)
            th = threading.Thread(target=self._helper, args=(i, go, fin), daemon=True)
            th.start()
            self.helpers.append((go, fin, th))

    def _helper(self, i, go, fin):
        while True:
            go.acquire()
            if self.job is None:
                return
            fn, cuts = self.job
            try:
                fn(cuts[i], cuts[i + 1])
            except BaseException as e:   # noqa: B036 - re-raised by run()
                self.errors.append(e)
            fin.release()

    def run(self, fn, n):
        k = len(self.helpers) + 1
        if k == 1 or n < k * self.MIN_SHARE:
            fn(0, n)
            return
        cuts = [n * i // k for i in range(k + 1)]
        self.job = (fn, cuts)
        for go, _, _ in self.helpers:
            go.release()
        fn(cuts[0], cuts[1])
        for _, fin, _ in self.helpers:
            fin.acquire()
        if self.errors:
            raise self.errors.pop()

    def stop(self):
        self.job = None
        for go, _, th in self.helpers:
            go.release()
            th.join()


class Slots:
    """Per-stream state objects in a list, handles = list indices, reused after close."""

    def __init__(self, make):
        self.items, self.free, self.make = [], [], make

    def open(self):
        if self.free:
            i = self.free.pop()
            self.items[i] = self.make()
        else:
            i = len(self.items)
            self.items.append(self.make())
        return i

    def close(self, i):
        self.items[i] = None
        self.free.append(i)


class StreamStateEngine:
    """fastcell, one StreamState per stream, model.step one frame at a time."""
    kind = "per frame"

    def __init__(self, model, table, threads):
        self.slots = Slots(lambda: model.new_state(1))
        self.open, self.close = self.slots.open, self.slots.close
        self.step1 = model.step
        self.rows = list(table)          # row views made once, not per frame
        self.split = Split(threads)

    def serve(self, ids, rows, frames, out_rows, done, t0, record):
        st, xs, step1, pc = self.slots.items, self.rows, self.step1, time.perf_counter

        def part(a, b):
            for j in range(a, b):
                step1(xs[rows[j]], st[ids[j]], out_rows[j])
                done[frames[j]] = pc() - t0

        self.split.run(part, len(ids))

    def stop(self):
        self.split.stop()


class OrtEngine:
    """ONNX Runtime, one session.run of a one-step LSTM node per frame; each stream's h and c
    passed in and taken back as NumPy arrays."""
    kind = "per frame"

    def __init__(self, session, table, threads):
        zero = np.zeros((1, 1, H), np.float32)
        self.slots = Slots(lambda: [zero, zero])
        self.open, self.close = self.slots.open, self.slots.close
        self.run = session.run
        self.rows = list(table.reshape(len(table), 1, 1, I))
        self.split = Split(threads)

    def serve(self, ids, rows, frames, out_rows, done, t0, record):
        st, xs, run, pc = self.slots.items, self.rows, self.run, time.perf_counter
        names = ["Y_h", "Y_c"]

        def part(a, b):
            for j in range(a, b):
                s = st[ids[j]]
                s[0], s[1] = run(names, {"X": xs[rows[j]], "initial_h": s[0], "initial_c": s[1]})
                done[frames[j]] = pc() - t0
                if record:
                    out_rows[j][:] = s[0].reshape(H)

        self.split.run(part, len(ids))

    def stop(self):
        self.split.stop()


class _Counted:
    """The pool as the Batcher sees it, counting its steps (frames per step: the batching)."""

    def __init__(self, engine):
        self._engine, self._pool = engine, engine.pool
        self.input_size, self.output_size = self._pool.input_size, self._pool.output_size
        self.dtype, self.close = self._pool.dtype, self._pool.close

    def step(self, ids, x, out=None):
        self._engine.calls += 1
        return self._pool.step(ids, x, out)


class BatcherEngine:
    """fastcell's Batcher over a StreamPool: one submit() (and one Future) per frame."""
    kind = "per frame, Batcher"

    def __init__(self, model, capacity, threads):
        self.pool = fastcell.StreamPool(model, capacity, threads=threads)
        self.calls = 0
        self.batcher = fastcell.Batcher(_Counted(self), max_delay=BATCHER_DELAY)
        self.open, self.close, self.submit = self.pool.open, self.pool.close, self.batcher.submit
        # Closes the stream after the frames already submitted for it (a Future), if it can.
        self.close_stream = getattr(self.batcher, "close_stream", None)

    def stop(self):
        self.batcher.close()


@dataclass
class EngineSpec:
    name: str
    label: str
    kind: str
    threads: int
    fmt: str
    build: object            # build(models, capacity, table) -> engine
    start: int               # the search's first N
    needs: tuple = ()


def _pool(fmt, threads):
    return lambda m, cap, table: PoolEngine(m.fastcell(fmt), cap, threads)


def _torch(threads):
    return lambda m, cap, table: TorchEngine(m.torch(step=True), cap, threads)


def _state(threads):
    return lambda m, cap, table: StreamStateEngine(m.fastcell(), table, threads)


def _ort(threads):
    return lambda m, cap, table: OrtEngine(m.ort_session(), table, threads)


def _batcher(threads):
    return lambda m, cap, table: BatcherEngine(m.fastcell(), cap, threads)


ENGINES = [
    EngineSpec("pool-t1", "fastcell StreamPool", "tick", 1, "float32", _pool("float32", 1), 2000,
               ("StreamPool",)),
    EngineSpec("pool-t2", "fastcell StreamPool", "tick", 2, "float32", _pool("float32", 2), 2000,
               ("StreamPool",)),
    EngineSpec("pool-int8-t1", "fastcell StreamPool int8", "tick", 1, "int8", _pool("int8", 1),
               2000, ("StreamPool",)),
    EngineSpec("pool-int8-t2", "fastcell StreamPool int8", "tick", 2, "int8", _pool("int8", 2),
               2000, ("StreamPool",)),
    EngineSpec("torch-t1", "PyTorch LSTMCell, batched by hand", "tick", 1, "float32", _torch(1),
               1000, ("torch",)),
    EngineSpec("torch-t2", "PyTorch LSTMCell, batched by hand", "tick", 2, "float32", _torch(2),
               1000, ("torch",)),
    EngineSpec("state-t1", "fastcell StreamState per stream", "per frame", 1, "float32",
               _state(1), 500),
    EngineSpec("state-t2", "fastcell StreamState per stream", "per frame", 2, "float32",
               _state(2), 500),
    EngineSpec("ort-t1", "ONNX Runtime, session.run per frame", "per frame", 1, "float32",
               _ort(1), 250, ("onnxruntime", "onnx")),
    EngineSpec("ort-t2", "ONNX Runtime, session.run per frame", "per frame", 2, "float32",
               _ort(2), 250, ("onnxruntime", "onnx")),
    EngineSpec("batcher-t1", "fastcell Batcher (submit per frame)", "per frame, Batcher", 1,
               "float32", _batcher(1), 250, ("StreamPool", "Batcher")),
    EngineSpec("batcher-t2", "fastcell Batcher (submit per frame)", "per frame, Batcher", 2,
               "float32", _batcher(2), 250, ("StreamPool", "Batcher")),
]


def missing(spec):
    """Why an engine cannot run here (a missing package or fastcell API), or None."""
    for need in spec.needs:
        if need in ("StreamPool", "Batcher"):
            if not hasattr(fastcell, need):
                return f"fastcell.{need} not available"
        elif optional_import(need) is None:
            return f"{need} not installed"
    return None


def select(pattern):
    """Engines whose name matches the regex, or a comma-separated list of names."""
    if pattern is None:
        return list(ENGINES)
    names = [p.strip() for p in pattern.split(",")]
    if all(n in {e.name for e in ENGINES} for n in names):
        return [e for e in ENGINES if e.name in names]
    rx = re.compile(pattern)
    return [e for e in ENGINES if rx.search(e.name)]


# -- one trial --

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


def run_ticks(engine, sched, table, record=False, drain=0.5, min_tick=0.0):
    """The tick loop (tick and per-frame engines): open-loop, sleeps when nothing is due.
    min_tick > 0: ticks start at least that many seconds apart (bigger batches, less Python per
    frame, up to min_tick more latency); 0 steps whatever is due at once."""
    t, sess = sched.t, sched.sess
    F, S = len(t), sched.sessions
    mask = len(table) - 1
    done = np.full(F, np.nan)
    hits = np.zeros(F, np.int32)
    order = np.full(F, -1, np.int64)
    outs = np.full((F, H), np.nan, np.float32) if record else None
    handle = np.full(S, -1, np.int64)
    served = np.zeros(S, np.int64)
    cap = _capacity(sched.streams)
    xbuf = np.empty((cap, I), np.float32)
    ybuf = np.empty((cap, H), np.float32)
    out_rows = list(ybuf)
    batch = engine.kind == "tick"
    opened = closed = ticks = steps = 0
    for g in sched.initial.tolist():       # streams already live when the clock starts
        handle[g] = engine.open()
        opened += 1
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
            if clock() - t0 - oldest > ABORT_LAG:
                aborted = f"more than {ABORT_LAG:g} s behind"
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


def run_batcher(engine, sched, table, record=False, drain=0.5):
    """A producer (this thread) submits each frame at its scheduled time; a done-callback records
    the result time. Closes wait until every frame of the stream has its result."""
    t, sess = sched.t, sched.sess
    F, S = len(t), sched.sessions
    mask = len(table) - 1
    rows = list(table)
    done = np.full(F, np.nan)
    hits = np.zeros(F, np.int32)
    order = np.full(F, -1, np.int64)
    outs = np.full((F, H), np.nan, np.float32) if record else None
    handle = np.full(S, -1, np.int64)
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

    opened = 0
    closes_done = []
    close_stream = getattr(engine, "close_stream", None)
    for g in sched.initial.tolist():
        handle[g] = engine.open()
        opened += 1
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
            for i, g in zip(range(ptr, k), sess[ptr:k].tolist()):
                fut = submit(int(ids[g]), rows[i & mask])
                fut.add_done_callback(functools.partial(finished, i))
            ptr = k
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
        if oldest < ptr and now - t[oldest] > ABORT_LAG:
            aborted = f"more than {ABORT_LAG:g} s behind"
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


def run_engine(spec, models, sched, table, record=False, drain=0.5, min_tick=0.0):
    engine = spec.build(models, _capacity(sched.streams), table)
    try:
        if spec.kind == "per frame, Batcher":
            return run_batcher(engine, sched, table, record, drain)
        return run_ticks(engine, sched, table, record, drain, min_tick)
    finally:
        if spec.kind != "per frame, Batcher":
            engine.stop()


# -- accounting and statistics --

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
                ticks=run.ticks, aborted=run.aborted)


def held(s):
    return s["p99"] <= P99_LIMIT and s["late"] == 0 and s["dropped"] == 0 and not s["aborted"]


# -- parity --

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


def verify(specs, models, table, log, streams=12, seed=11):
    """Each engine on a short schedule with churn (time compressed: a frame every 4 ms, sessions
    of 0.15 s on average) against the reference. Returns {engine: (max abs diff, summary)}."""
    sched = make_schedule(streams, 0.0, 0.6, 0.15, seed=seed, period=0.004, jitter=0.0005)
    refs = {fmt: reference_outputs(models.fastcell(fmt), sched, table)
            for fmt in {s.fmt for s in specs}}
    ref32 = refs.get("float32")
    if ref32 is None:
        ref32 = reference_outputs(models.fastcell(), sched, table)
    out = {}
    for spec in specs:
        run = run_engine(spec, models, sched, table, record=True, drain=2.0)
        summary = check_accounting(sched, run, complete=True)
        d = float(np.max(np.abs(run.outs - refs[spec.fmt])))
        exact = spec.name.startswith(("pool", "state", "batcher"))
        if exact and d != 0:
            raise AssertionError(f"{spec.name}: not bit-identical to fastcell's StreamState "
                                 f"(max abs diff {d:.3g})")
        if not exact and not d <= PARITY_TOL:
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


# -- the search --

def trial(spec, models, table, streams, settings, seed):
    sched = make_schedule(streams, settings["warmup"], settings["duration"],
                          settings["session_mean"], seed=seed)
    run = run_engine(spec, models, sched, table, drain=settings["drain"],
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


def search(spec, models, table, settings, max_streams, log, start=None):
    """Largest N held: doubling, then bisection (geometric) to the resolution. Every trial's
    statistics are kept (the chart)."""
    trials = []
    seed = itertools.count(1000)

    def attempt(n):
        for r in range(settings["retries"] + 1):
            s = trial(spec, models, table, n, settings, next(seed))
            s["retry"] = r
            trials.append(s)
            ok = held(s)
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
                fmt=spec.fmt, held=lo or 0, capped=hi is None, best=best, trials=trials)


def core_capacity(seconds=0.3):
    """What the host gives of two cores right now: the steps per second of two threads, each
    stepping its own pool (threads=1, the float32 kernel) over those of one thread. 2.0: two
    whole cores; a vCPU that shares its physical core, or a busy neighbour, reads nearer 1."""
    import threading

    from bench.pool_step import silero_cell

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
            while time.perf_counter() < stop:
                pools[k].step(ids[k], x, out)
                counts[k] += rows
        ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return sum(counts) / (time.perf_counter() - t0)

    one = steps_per_s(1)
    return steps_per_s(2) / one


# -- output --

def machine_line():
    m = machine_info()
    v = m["versions"]
    return (f"{m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable); SIMD: "
            f"{', '.join(m['simd'])}; load average at the end {m['load']}; "
            + ", ".join(f"{k} {v[k]}" for k in ("python", "fastcell", "numpy", "torch",
                                                 "onnxruntime")) + f"; {m['os']}")


def command(args):
    parts = ["python -m bench.serve"]
    if args.quick:
        parts.append("--quick")
    if args.engines:
        parts.append(f"--engines '{args.engines}'")
    for opt, key in (("--duration", "duration"), ("--warmup", "warmup"),
                     ("--max-streams", "max_streams"), ("--min-tick", "min_tick"),
                     ("--batcher-delay", "batcher_delay")):
        if getattr(args, key) != args.defaults[key]:
            parts.append(f"{opt} {getattr(args, key):g}")
    return " ".join(parts)


def ratio(results, a, b):
    ra, rb = results.get(a), results.get(b)
    if not ra or not rb or not ra["held"] or not rb["held"]:
        return None
    return ra["held"] / rb["held"]


TARGETS = [
    ("fp32 StreamPool, 2 threads: ≥ 20,000 streams", "pool-t2", None, 20000),
    ("fp32 StreamPool, 1 thread: ≥ 5× the streams ONNX Runtime per frame holds (1 thread)",
     "pool-t1", "ort-t1", 5.0),
    ("fp32 StreamPool: 2 threads ≥ 1.8× 1 thread", "pool-t2", "pool-t1", 1.8),
    ("int8 StreamPool, 2 threads: 50,000 streams (aim)", "pool-int8-t2", None, 50000),
]

RATIOS = [
    ("StreamPool 1 thread / ONNX Runtime per frame 1 thread", "pool-t1", "ort-t1"),
    ("StreamPool 2 threads / ONNX Runtime per frame 2 threads", "pool-t2", "ort-t2"),
    ("StreamPool 2 threads / 1 thread", "pool-t2", "pool-t1"),
    ("StreamPool int8 2 threads / 1 thread", "pool-int8-t2", "pool-int8-t1"),
    ("StreamPool int8 / fp32, 1 thread", "pool-int8-t1", "pool-t1"),
    ("StreamPool int8 / fp32, 2 threads", "pool-int8-t2", "pool-t2"),
    ("StreamPool / PyTorch batched, 1 thread", "pool-t1", "torch-t1"),
    ("StreamPool / PyTorch batched, 2 threads", "pool-t2", "torch-t2"),
    ("StreamPool / StreamState per frame, 1 thread", "pool-t1", "state-t1"),
    ("StreamPool / Batcher, 1 thread", "pool-t1", "batcher-t1"),
]


def targets(results):
    out = []
    for what, a, b, goal in TARGETS:
        r = results.get(a)
        if r is None or (b is not None and b not in results):
            continue
        if b is None:
            value = r["held"]
            out.append((what, f"{value:,}" + (" (the cap)" if r["capped"] else ""),
                        value >= goal))
        else:
            x = ratio(results, a, b)
            out.append((what, "n/a" if x is None else f"{x:.2f}×",
                        None if x is None else x >= goal))
    return out


def held_str(r):
    if not r["held"]:
        tried = min((s["streams"] for s in r["trials"]), default=None)
        return "none" if tried is None else f"< {tried:,}"
    return ("≥ " if r["capped"] else "") + f"{r['held']:,}"


def _yes(ok):
    return "n/a" if ok is None else ("met" if ok else "**not met**")


def section(results, skipped, parity, args, settings, elapsed):
    quick = " (quick run: short trials, coarse search)" if args.quick else ""
    tick = ("at once (the loop sleeps only when nothing is due)" if not settings["min_tick"]
            else f"with ticks at least {settings['min_tick'] * 1e3:g} ms apart")
    rerun = ("; a failed trial is rerun once, unless plainly overloaded (it served under 97% of "
             "the offered frames per second, dropped frames or was stopped), and fails only if "
             "the rerun fails too") if settings["retries"] else ""
    L = [BEGIN, "## Real-time serving (`python -m bench.serve`)\n"]
    L.append(f"Written by `{command(args)}` on {time.strftime('%Y-%m-%d %H:%M %Z')} in "
             f"{elapsed / 60:.1f} min{quick}. Model: Silero-VAD-sized `LSTMCell({I}, {H})`, "
             "PyTorch's default initialisation, the same weights in every engine (int8: "
             "`fastcell.quantize(cell, \"int8\")`).\n")
    L.append(f"Load: N streams, each sending a frame every {PERIOD * 1e3:g} ms with a random "
             f"phase and ±{JITTER * 1e3:g} ms jitter; each stream's session lasts an exponential "
             f"time (mean {settings['session_mean']:g} s), then it closes and a new stream (new "
             "id, zero state) takes its place. Open loop: every arrival time is drawn in advance "
             "and latency = result time − scheduled arrival. A trial: "
             f"{settings['warmup']:g} s warm-up, {settings['duration']:g} s measured, at most "
             f"{settings['drain']:g} s to drain. **Held**: p99 ≤ {P99_LIMIT * 1e3:g} ms and no "
             f"frame late (> {PERIOD * 1e3:g} ms) or dropped (not served by the end of the "
             f"drain). The search doubles N, then bisects to {settings['resolution'] * 100:g}%"
             f"{rerun} (cap: {args.max_streams:,} streams).\n")
    L.append(f"Kinds. **tick**: one loop takes every frame due (one per stream per tick), applies "
             f"the due opens and closes and steps them all in one batched call, {tick}: "
             "`pool.step(ids, x, out=...)`, or for PyTorch `index_select` → `nn.LSTMCell` → "
             "`index_copy_` under `torch.inference_mode()`. **per frame**: the same loop, but "
             "one Python call per frame, a tick's frames split over the threads: "
             "`model.step(x, state, out=...)` on a StreamState per stream, or ONNX Runtime's "
             "`session.run` of a one-step LSTM node (h and c in and out as NumPy arrays, "
             "`intra_op_num_threads = 1`). **Batcher**: "
             f"`fastcell.Batcher(pool, max_delay={BATCHER_DELAY:g})`; a producer thread calls "
             "`batcher.submit(sid, frame)` for each frame at its scheduled time and "
             "`batcher.close_stream(sid)` at a session's end; a done-callback takes the result "
             "time. Threads: the pool's `threads`, `torch.set_num_threads`, or the per-frame "
             "threads. CPU: process CPU time / wall time over the measured window (2.0: both "
             "cores busy); CPU µs/frame: that CPU time per frame; frames/call: frames per "
             "batched call (`pool.step` or the PyTorch cell). Host cores: what the host gave of "
             "two cores just before the engine's search (`core_capacity`: two threads stepping "
             "pools of their own, over one thread; 2.0 is two whole cores, and on this shared "
             "machine it swings between about 1.05 and 1.95).\n")
    L.append("| engine | `--engines` | kind | threads | largest N held | p50 | p99 | max | "
             "stream-steps/s | late | dropped | CPU | CPU µs/frame | frames/call | host cores |")
    L.append("|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in results.values():
        b = r["best"]
        head = f"| {r['label']} | `{r['engine']}` | {r['kind']} | {r['threads']} | {held_str(r)} | "
        cores = f"{r['capacity']:.2f}" if "capacity" in r else "n/a"
        if b is None:
            L.append(head + " | ".join(["n/a"] * 9) + f" | {cores} |")
            continue
        L.append(head + f"{fmt_ms(b['p50'])} | {fmt_ms(b['p99'])} | {fmt_ms(b['max'])} | "
                 f"{b['steps_per_s']:,.0f} | {b['late']} | {b['dropped']} | {b['cpu']:.2f} | "
                 f"{b['cpu_us_per_frame']:.1f} | {b['frames_per_call']:.1f} | {cores} |")
    L.append("")
    for name, why in skipped.items():
        L.append(f"- not run: `{name}`: {why}")
    if skipped:
        L.append("")
    rs = [(what, ratio(results, a, b)) for what, a, b in RATIOS if a in results and b in results]
    if rs:
        L.append("| ratio of the largest N held | |")
        L.append("|---|--:|")
        L.extend(f"| {w} | {'n/a' if x is None else f'{x:.2f}×'} |" for w, x in rs)
        L.append("")
    if getattr(args, "pool_step", None):
        import bench.pool_step as ps

        L.append(f"What one pool step costs (`python -m bench.pool_step`): {ps.N:,} Silero-size "
                 f"streams out of {ps.OPEN:,} open, stepped by id, against a fixed "
                 f"`new_state(batch={ps.N})` and against one StreamState per stream stepped one "
                 "by one; medians of interleaved rounds, per stream-step.\n")
        L.extend(ps.table(args.pool_step))
        L.append("")
    tg = targets(results) + (ps.targets(args.pool_step) if getattr(args, "pool_step", None)
                             else [])
    if tg:
        L.append("| target | measured | |")
        L.append("|---|--:|---|")
        L.extend(f"| {w} | {v} | {_yes(ok)} |" for w, v, ok in tg)
        L.append("")
    if parity:
        L.append("Parity, before timing (12 streams with churn, a frame every 4 ms): max abs "
                 "difference from fastcell's StreamState stepped stream by stream "
                 + ", ".join(f"`{k}` {v['max_abs_diff']:.1e}" for k, v in parity.items())
                 + " (fastcell's engines bit-identical, int8 against the int8 model; the others "
                 f"within {PARITY_TOL:g}); every frame served once, in its stream's order; every "
                 "session opened and closed.\n")
    L.append(f"Chart: `serve.png` (p99 against N, every trial). Machine: {machine_line()}; load "
             f"average at the start {args.load_at_start} (a shared machine: another process's "
             "burst shows in p99 and max).")
    L.append(END)
    return "\n".join(L) + "\n"


def section_of(text):
    """The serve section of a RESULTS.md text, markers included, or ""."""
    if BEGIN in text and END in text.split(BEGIN, 1)[1]:
        return BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END + "\n"
    return ""


def splice(text, block):
    """RESULTS.md with its serve section replaced by block (appended if it has none)."""
    if not block:
        return text
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + block.rstrip("\n") + rest.split(END, 1)[1]
    return text.rstrip("\n") + "\n\n" + block if text.strip() else block


FAMILY_COLORS = {"pool-int8": "#2ca02c", "pool": "#1f77b4", "torch": "#ee4c2c",
                 "state": "#9467bd", "ort": "#5a5a5a", "batcher": "#ff7f0e"}
KIND_MARKERS = {"tick": "o", "per frame": "s", "per frame, Batcher": "^"}


def write_chart(path, results):
    """p99 against N for every trial (log-log), a line per engine: colour the engine, solid 2
    threads, dashed 1; x a failed trial; a trial that dropped frames is drawn at the top."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(10, 6))
    top = 2000.0     # ms
    for r in results.values():
        pts = sorted((s["streams"], min(s["p99"] * 1e3, top), held(s)) for s in r["trials"])
        if not pts:
            continue
        color = next(c for f, c in FAMILY_COLORS.items() if r["engine"].startswith(f + "-"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-" if r["threads"] > 1 else "--",
                color=color, marker=KIND_MARKERS.get(r["kind"], "o"), ms=4,
                label=f"{r['engine']} ({r['kind']}): {held_str(r)}")
        bad = [p for p in pts if not p[2]]
        ax.plot([p[0] for p in bad], [p[1] for p in bad], "x", color="black", ms=7, mew=1.2)
    ax.axhline(P99_LIMIT * 1e3, color="black", lw=1.2, label=f"p99 limit {P99_LIMIT * 1e3:g} ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(top=top * 1.5)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("live streams N (a frame every 32 ms each)")
    ax.set_ylabel("p99 latency, ms (x: failed; at the top: frames dropped)")
    ax.set_title(f"LSTMCell({I}, {H}), real-time serving: p99 latency against live streams "
                 "(legend: largest N held)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    global BATCHER_DELAY
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n")[0])
    p.add_argument("--engines", help="a regex over the engine names, or a comma-separated list: "
                   + ", ".join(e.name for e in ENGINES))
    p.add_argument("--quick", action="store_true", help="short trials, coarse search (a smoke run)")
    p.add_argument("--duration", type=float, help="measured seconds per trial")
    p.add_argument("--warmup", type=float, help="warm-up seconds per trial")
    p.add_argument("--max-streams", type=int, default=100_000, help="the search's cap")
    p.add_argument("--start", type=int, help="the search's first N (default: per engine)")
    p.add_argument("--session-mean", type=float, help="mean session length, s")
    p.add_argument("--out", help="directory for RESULTS.md (its serve section) and serve.png "
                   "(default: bench/)")
    p.add_argument("--min-tick", type=float, default=0.0, metavar="S",
                   help="the tick loop's least time between ticks (default 0: step whatever is "
                   "due at once)")
    p.add_argument("--batcher-delay", type=float, default=DEFAULT_BATCHER_DELAY, metavar="S",
                   help="the Batcher's max_delay (default: %(default)g)")
    p.add_argument("--no-verify", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    settings = dict(SETTINGS["quick" if args.quick else "full"])
    args.defaults = {"duration": settings["duration"], "warmup": settings["warmup"],
                     "max_streams": 100_000, "min_tick": 0.0,
                     "batcher_delay": DEFAULT_BATCHER_DELAY}
    for key in ("duration", "warmup", "session_mean"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    args.duration, args.warmup = settings["duration"], settings["warmup"]
    settings["min_tick"] = args.min_tick
    BATCHER_DELAY = args.batcher_delay
    specs = select(args.engines)
    if not specs:
        p.error(f"--engines {args.engines!r} matches no engine")
    out = Path(args.out) if args.out else HERE
    out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    skipped = {s.name: missing(s) for s in specs if missing(s)}
    for name, why in skipped.items():
        log(f"skip {name}: {why}")
    specs = [s for s in specs if s.name not in skipped]
    models = Models("lstm", I, H)
    table = make_table()
    runnable = []
    for s in specs:
        try:
            s.build(models, 8, table).stop()
            runnable.append(s)
        except Unavailable as e:
            skipped[s.name] = str(e)
            log(f"skip {s.name}: {e}")
    specs = runnable
    t0 = time.perf_counter()
    args.load_at_start = "%.2f %.2f %.2f" % os.getloadavg()
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1), _inference_mode():
        parity = {} if args.no_verify else verify(specs, models, table, log)
        import bench.pool_step

        args.pool_step = bench.pool_step.measure(rounds=3 if args.quick else 20)
        for what, value, ok in bench.pool_step.targets(args.pool_step):
            log(f"pool step: {what}: {value}")
        results = {}
        for s in specs:
            log(f"{s.name}: {s.label} ({s.kind}, {s.threads} thread{'s' * (s.threads > 1)})")
            capacity = core_capacity()
            log(f"{s.name}: the host gives {capacity:.2f} cores (two threads / one, just before)")
            results[s.name] = search(s, models, table, settings, args.max_streams, log, args.start)
            r = results[s.name]
            r["capacity"] = capacity
            log(f"{s.name}: largest N held {held_str(r)}")
    elapsed = time.perf_counter() - t0
    block = section(results, skipped, parity, args, settings, elapsed)
    md = out / "RESULTS.md"
    md.write_text(splice(md.read_text() if md.exists() else "", block))
    log(f"wrote {md}")
    if optional_import("matplotlib") is not None:
        write_chart(out / "serve.png", results)
        log(f"wrote {out / 'serve.png'}")
    for what, value, ok in targets(results):
        log(f"target {what}: {value} ({'n/a' if ok is None else ('met' if ok else 'not met')})")
    log(f"done in {elapsed / 60:.1f} min")
    return dict(results=results, parity=parity, skipped=skipped, path=str(md))


def _inference_mode():
    import contextlib

    torch = optional_import("torch")
    return torch.inference_mode() if torch is not None else contextlib.nullcontext()


if __name__ == "__main__":
    main()
