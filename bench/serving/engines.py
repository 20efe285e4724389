"""The engines the serving benchmark compares, and ENGINES, the list `--engines` picks from.

An engine serves the streams of a schedule; its class says how (kind), and the driver of that
kind (bench/serving/drivers.py) plays the schedule on it:
- "tick": step(ids, x, out) steps one batch, a frame of each stream due, in one call.
- "per frame": serve(ids, rows, frames, out_rows, done, t0, record) serves a tick's frames one
  call each (Python lists), writing each frame's result time into done.
- "per frame, Batcher": submit(sid, frame) -> a FrameResult (a light future) per frame; close_stream(sid), where the
  engine has it, closes a stream behind its frames.
- "network": examples/stream_server.py, served through sockets to client processes
  (bench/serving/network.py); its class gives its path and make_schedule (the load of /mux is
  requests of many streams' frames).
Its class also says whether its outputs are fastcell's own bits (exact: it runs fastcell's
kernels, and the parity check wants them bit for bit; else within PARITY_TOL). Every engine has
open() -> an int handle, close(handle) and stop(), and is built as cls(setup, spec, capacity):
the models, frames and options of a Setup, its EngineSpec's weight format and threads, room for
capacity streams. A new engine is such a class here and an EngineSpec in ENGINES; a new kind
also needs its driver.
"""

import re
import threading
import time
from dataclasses import dataclass

import numpy as np

import fastcell
from bench.models import Models, optional_import
from bench.serving.harness import P99_LIMIT, P99_LIMIT_NETWORK
from bench.serving.load import H, I, make_schedule
from bench.serving.network import MuxEngine, SocketEngine

# The Batcher's max_delay: 0 steps whatever is waiting at once, the tick loop's policy (its
# default, 2 ms, spends that much of the 5 ms budget waiting for company). --batcher-delay.
DEFAULT_BATCHER_DELAY = 0.0


@dataclass
class Setup:
    """What every engine is built from: one set of weights in every library, the frames' data
    (bench.serving.load.make_table) and the engines' options."""
    models: Models
    table: np.ndarray
    batcher_delay: float = DEFAULT_BATCHER_DELAY
    clients: int = 2          # network engines: client processes
    connections: int = 8      # /mux: connections carrying the streams


class PoolEngine:
    """fastcell's StreamPool: the due streams stepped by id in one call."""
    kind, exact = "tick", True

    def __init__(self, setup, spec, capacity):
        self.pool = fastcell.StreamPool(setup.models.fastcell(spec.fmt), capacity,
                                        threads=spec.threads)
        self.open, self.close = self.pool.open, self.pool.close

    def step(self, ids, x, out):
        self.pool.step(ids, x, out=out)

    def stop(self):
        pass


class TorchEngine:
    """nn.LSTMCell batched by hand: gather the due streams' rows, one cell call, scatter back."""
    kind, exact = "tick", False

    def __init__(self, setup, spec, capacity):
        torch = self.torch = optional_import("torch")
        self.cell = setup.models.torch(step=True, fmt=spec.fmt)
        self.old_threads = torch.get_num_threads()
        torch.set_num_threads(spec.threads)
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
    kind, exact = "per frame", True

    def __init__(self, setup, spec, capacity):
        model = setup.models.fastcell(spec.fmt)
        self.slots = Slots(lambda: model.new_state(1))
        self.open, self.close = self.slots.open, self.slots.close
        self.step1 = model.step
        self.rows = list(setup.table)    # row views made once, not per frame
        self.split = Split(spec.threads)

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
    kind, exact = "per frame", False

    def __init__(self, setup, spec, capacity):
        zero = np.zeros((1, 1, H), np.float32)
        self.slots = Slots(lambda: [zero, zero])
        self.open, self.close = self.slots.open, self.slots.close
        self.run = setup.models.ort_session(spec.fmt).run
        self.rows = list(setup.table.reshape(len(setup.table), 1, 1, I))
        self.split = Split(spec.threads)

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
        self.capacity = self._pool.capacity     # so the Batcher's bound is a pool's default

    def step(self, ids, x, out=None):
        self._engine.calls += 1
        return self._pool.step(ids, x, out)


class BatcherEngine:
    """fastcell's Batcher over a StreamPool: one submit() (and one FrameResult) per frame."""
    kind, exact = "per frame, Batcher", True

    def __init__(self, setup, spec, capacity):
        self.pool = fastcell.StreamPool(setup.models.fastcell(spec.fmt), capacity,
                                        threads=spec.threads)
        self.calls = 0
        self.batcher = fastcell.Batcher(_Counted(self), max_delay=setup.batcher_delay)
        self.open, self.close, self.submit = self.pool.open, self.pool.close, self.batcher.submit
        # Closes the stream after the frames already submitted for it (a FrameResult).
        self.close_stream = getattr(self.batcher, "close_stream", None)

    def stop(self):
        self.batcher.close()


@dataclass
class EngineSpec:
    name: str
    label: str
    engine: type             # the engine's class, built as engine(setup, spec, capacity)
    threads: int
    fmt: str
    start: int               # the search's first N
    needs: tuple = ()
    p99_limit: float = P99_LIMIT    # N is held when p99 is at most this (and nothing is late)

    @property
    def kind(self):
        return self.engine.kind

    def schedule(self, setup, streams, warmup, duration, session_mean, **kw):
        """The load of N streams for this engine (load.make_schedule, or its class's own)."""
        make = getattr(self.engine, "make_schedule", None)
        if make is None:
            return make_schedule(streams, warmup, duration, session_mean, **kw)
        return make(setup, streams, warmup, duration, session_mean, **kw)

    @property
    def exact(self):
        return self.engine.exact

    def build(self, setup, capacity):
        return self.engine(setup, self, capacity)


ENGINES = [
    EngineSpec("pool-t1", "fastcell StreamPool", PoolEngine, 1, "float32", 2000, ("StreamPool",)),
    EngineSpec("pool-t2", "fastcell StreamPool", PoolEngine, 2, "float32", 2000, ("StreamPool",)),
    EngineSpec("pool-int8-t1", "fastcell StreamPool int8", PoolEngine, 1, "int8", 2000,
               ("StreamPool",)),
    EngineSpec("pool-int8-t2", "fastcell StreamPool int8", PoolEngine, 2, "int8", 2000,
               ("StreamPool",)),
    # int8 with each frame's x quantized to 8 bits (quantize(..., input_bits=8)): bench.models
    EngineSpec("pool-int8x8-t1", "fastcell StreamPool int8, 8-bit inputs", PoolEngine, 1,
               "int8x8", 2000, ("StreamPool",)),
    EngineSpec("pool-int8x8-t2", "fastcell StreamPool int8, 8-bit inputs", PoolEngine, 2,
               "int8x8", 2000, ("StreamPool",)),
    EngineSpec("torch-t1", "PyTorch LSTMCell, batched by hand", TorchEngine, 1, "float32", 1000,
               ("torch",)),
    EngineSpec("torch-t2", "PyTorch LSTMCell, batched by hand", TorchEngine, 2, "float32", 1000,
               ("torch",)),
    EngineSpec("state-t1", "fastcell StreamState per stream", StreamStateEngine, 1, "float32",
               500),
    EngineSpec("state-t2", "fastcell StreamState per stream", StreamStateEngine, 2, "float32",
               500),
    EngineSpec("ort-t1", "ONNX Runtime, session.run per frame", OrtEngine, 1, "float32", 250,
               ("onnxruntime", "onnx")),
    EngineSpec("ort-t2", "ONNX Runtime, session.run per frame", OrtEngine, 2, "float32", 250,
               ("onnxruntime", "onnx")),
    EngineSpec("batcher-t1", "fastcell Batcher (submit per frame)", BatcherEngine, 1, "float32",
               250, ("StreamPool", "Batcher")),
    EngineSpec("batcher-t2", "fastcell Batcher (submit per frame)", BatcherEngine, 2, "float32",
               250, ("StreamPool", "Batcher")),
    # The WebSocket service, over sockets: its p99 limit counts both ways through the network.
    EngineSpec("mux-t1", "stream_server.py /mux, 8 connections", MuxEngine, 1, "float32", 4000,
               ("StreamPool", "Batcher", "websockets"), P99_LIMIT_NETWORK),
    EngineSpec("mux-t2", "stream_server.py /mux, 8 connections", MuxEngine, 2, "float32", 4000,
               ("StreamPool", "Batcher", "websockets"), P99_LIMIT_NETWORK),
    EngineSpec("ws-t1", "stream_server.py, a connection per stream", SocketEngine, 1, "float32",
               125, ("StreamPool", "Batcher", "websockets"), P99_LIMIT_NETWORK),
    EngineSpec("ws-t2", "stream_server.py, a connection per stream", SocketEngine, 2, "float32",
               125, ("StreamPool", "Batcher", "websockets"), P99_LIMIT_NETWORK),
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
