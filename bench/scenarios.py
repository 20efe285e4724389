"""What is timed: the scenarios of issue 4 and, for each competitor, a zero-argument callable with
its inputs built once, so the pytest-benchmark suites and bench.report time exactly the same calls.

Every callable does what a user of that library would call per request: fastcell's cell (argument
checks and result arrays included), PyTorch's module, ONNX Runtime's ``session.run``. The floor is
``blas_floor``: the bare recurrent GEMV/GEMM alone, in C.

A competitor is a library in a weight format (bench/models.py): "fastcell", "pytorch",
"onnxruntime", "floor" in float32, "fastcell-int8", "pytorch-int8", ... in a reduced one. A
scenario lists the competitors it times side by side and the cells it runs for: SCENARIOS, every
cell in float32 against the rivals; REDUCED_SCENARIOS, the LSTM's int8 and bf16 against fastcell's
float32 and the rivals' int8; INPUT8_SCENARIOS, fastcell's int8 with 8-bit inputs ("int8x8")
against ONNX Runtime's int8, which quantizes its inputs to 8 bits too.
"""

import contextlib
import os
from dataclasses import dataclass

import numpy as np

from bench.models import KINDS, LABELS, Unavailable, check_format, get_models, optional_import, require
from fastcell_c.blas_floor import blas_floor

COMPETITORS = ("fastcell", "pytorch", "onnxruntime", "floor")
REDUCED_COMPETITORS = ("fastcell", "fastcell-int8", "fastcell-bf16", "pytorch-int8", "onnxruntime-int8")
INPUT8_COMPETITORS = ("fastcell", "fastcell-int8", "fastcell-int8x8", "onnxruntime-int8")

# How the fastcell side of the streaming-step benchmark steps one stream:
#   "call":   state = cell(x, state)                                      (the cells' first API)
#   "stream": state = cell.new_state(batch); y = cell.step(x, state, out)   (issue 4's API)
# Switching to the streaming API is this one line (or FASTCELL_BENCH_STEP_API=stream for one run,
# or `python -m bench.report --step-api stream`).
FASTCELL_STEP_API = os.environ.get("FASTCELL_BENCH_STEP_API", "stream")

# The floor of a step scenario repeats its GEMV this many times in one C call, so that it measures
# the product alone, without the Python call around it.
FLOOR_MIN_STEPS = 100


def competitor(library, fmt="float32"):
    """The competitor's name: the library alone in float32, else "library-format"."""
    return library if fmt == "float32" else f"{library}-{fmt}"


def split_competitor(name):
    """(library, weight format) of a competitor's name."""
    library, _, fmt = name.partition("-")
    return library, fmt or "float32"


@dataclass(frozen=True)
class Scenario:
    mode: str   # "step": one call per step (T = 1); "sequence"/"batch": one call for T steps
    T: int
    B: int
    H: int
    competitors: tuple = COMPETITORS   # timed side by side, each against fastcell
    kinds: tuple = KINDS               # the cells it runs for
    pairs: tuple = ()                  # more (numerator, denominator) ratios, "num/den" in a row

    @property
    def I(self):
        return self.H

    @property
    def formats(self):
        """The reduced weight formats it times ("int8", "bf16"), in order."""
        fmts = (split_competitor(c)[1] for c in self.competitors)
        return tuple(dict.fromkeys(f for f in fmts if f != "float32"))

    @property
    def id(self):
        return f"{self.mode} T={self.T} B={self.B} H={self.H}" + "".join(f" {f}" for f in self.formats)


SCENARIOS = (
    Scenario("step", 1, 1, 64),
    Scenario("step", 1, 1, 256),
    Scenario("sequence", 100, 1, 64),
    Scenario("sequence", 100, 1, 256),
    Scenario("sequence", 100, 1, 512),
    Scenario("batch", 50, 16, 256),
    Scenario("batch", 50, 64, 512),
)

# The reduced weight formats, LSTM only: streaming steps at B = 1, a Silero-VAD-sized batch of
# 1024 streams stepped at once (LSTMCell(128, 128)), and the float32 suite's sequences and batches.
REDUCED_SCENARIOS = tuple(
    Scenario(mode, T, B, H, competitors=REDUCED_COMPETITORS, kinds=("lstm",))
    for mode, T, B, H in (("step", 1, 1, 128), ("step", 1, 1, 256), ("step", 1, 1024, 128),
                          ("sequence", 100, 1, 64), ("sequence", 100, 1, 256),
                          ("sequence", 100, 1, 512), ("batch", 50, 16, 256), ("batch", 50, 64, 512)))

# int8 with 8-bit inputs where the input projection weighs most (the Silero batch, long sequences,
# batches), against ONNX Runtime's int8 (and fastcell's int8 of 16-bit inputs): the trade of
# quantize(..., input_bits=8).
INPUT8_SCENARIOS = tuple(
    Scenario(mode, T, B, H, competitors=INPUT8_COMPETITORS, kinds=("lstm",),
             pairs=(("onnxruntime-int8", "fastcell-int8x8"), ("fastcell-int8", "fastcell-int8x8")))
    for mode, T, B, H in (("step", 1, 1024, 128), ("sequence", 100, 1, 256),
                          ("sequence", 100, 1, 512), ("batch", 50, 16, 256)))

ALL_SCENARIOS = SCENARIOS + REDUCED_SCENARIOS + INPUT8_SCENARIOS


class Runner:
    """A competitor's call for one (cell, scenario).

    fn(): the timed call. steps: recurrent steps fn runs (time / steps is the per-step time).
    results(): runs fn once and returns {"h", "c" (LSTMs), "y" (sequences)} as float64 NumPy
    arrays (B, H) / (T, B, H), for the parity checks. available False: an n/a column (reason).
    """

    def __init__(self, fn=None, steps=1, extract=None, reason="", note=""):
        self.fn, self.steps, self._extract = fn, steps, extract
        self.reason, self.note = reason, note

    available = property(lambda self: self.fn is not None)

    def results(self):
        return {k: np.asarray(v, np.float64) for k, v in self._extract(self.fn()).items()}


def unavailable(reason):
    return Runner(reason=reason)


def _inputs(m, sc, seed=2):
    """x (T, B, I) of unit scale and a non-trivial initial state h0, c0 (B, H)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((sc.T, sc.B, sc.I)).astype(np.float32)
    h0 = rng.uniform(-0.5, 0.5, (sc.B, sc.H)).astype(np.float32)
    c0 = rng.uniform(-0.5, 0.5, (sc.B, sc.H)).astype(np.float32)
    return x, h0, c0


def _fastcell(m, sc, fmt):
    x, h0, c0 = _inputs(m, sc)
    cell, lstm = m.fastcell(fmt), m.has_cell_state
    hx = (h0, c0) if lstm else h0

    def state_dict(s):
        return {"h": s[0], "c": s[1]} if lstm else {"h": s}

    if sc.mode != "step":
        return Runner(lambda: cell.run(x, hx), sc.T,
                      lambda r: dict(state_dict(r[1]), y=r[0]))
    x1 = x[0]
    if FASTCELL_STEP_API == "call":
        return Runner(lambda: cell(x1, hx), 1, state_dict)
    if FASTCELL_STEP_API != "stream":
        raise ValueError(f"FASTCELL_STEP_API: expected 'call' or 'stream', got {FASTCELL_STEP_API!r}")
    # The streaming API: the state owns h, c and the workspace; step writes the output row to out.
    state, out = cell.new_state(batch=sc.B), np.empty((sc.B, sc.H), np.float32)
    state.h[...] = h0
    if lstm:
        state.c[...] = c0
    return Runner(lambda: cell.step(x1, state, out=out), 1, lambda y: {"h": y})


def _pytorch(m, sc, fmt):
    torch = require("torch")
    note = "torch ops (PyTorch has no peephole LSTM)" if m.kind == "peephole" else ""
    x, h0, c0 = (torch.from_numpy(a) for a in _inputs(m, sc))
    lstm = m.has_cell_state
    if sc.mode == "step":
        cell, x1 = m.torch(True, fmt), x[0]
        hx = (h0, c0) if lstm else h0
        extract = (lambda r: {"h": r[0], "c": r[1]}) if lstm else (lambda r: {"h": r})
        return Runner(lambda: cell(x1, hx), 1, extract, note=note)
    module = m.torch(False, fmt)
    hx = (h0[None], c0[None]) if lstm else h0[None]
    if lstm:
        def extract(r):
            return {"y": r[0], "h": r[1][0][0], "c": r[1][1][0]}
    else:
        def extract(r):
            return {"y": r[0], "h": r[1][0]}
    return Runner(lambda: module(x, hx), sc.T, extract, note=note)


def _onnxruntime(m, sc, fmt):
    sess = m.ort_session(fmt)
    x, h0, c0 = _inputs(m, sc)
    lstm = m.has_cell_state
    feeds = {"X": x, "initial_h": h0[None]}
    if lstm:
        feeds["initial_c"] = c0[None]
    # A step needs only the new state; a sequence returns every output row as the others do.
    names = (["Y"] if sc.mode != "step" else []) + ["Y_h"] + (["Y_c"] if lstm else [])

    def extract(r):
        d = dict(zip(names, r))
        out = {"h": d["Y_h"][0]}
        if lstm:
            out["c"] = d["Y_c"][0]
        if "Y" in d:
            out["y"] = d["Y"][:, 0]
        return out

    return Runner(lambda: sess.run(names, feeds), sc.T, extract)


def _floor(m, sc, fmt):
    check_format(fmt, ("float32",))
    w = m.weights["weight_hh"]                    # (G*H, H), row-major: PyTorch's layout
    _, h0, _ = _inputs(m, sc)
    y = np.zeros((sc.B, w.shape[0]), np.float32)
    steps = max(sc.T, FLOOR_MIN_STEPS) if sc.mode == "step" else sc.T
    return Runner(lambda: blas_floor(w, h0, y, steps), steps, lambda r: {})


_MAKERS = {"fastcell": _fastcell, "pytorch": _pytorch, "onnxruntime": _onnxruntime, "floor": _floor}


def make_runner(m, sc, competitor):
    """The Runner of one competitor (library in a weight format) for Models m in scenario sc;
    one that cannot be built here is unavailable, saying why."""
    library, fmt = split_competitor(competitor)
    try:
        return _MAKERS[library](m, sc, fmt)
    except Unavailable as e:
        return unavailable(str(e))


def runners_for(kind, sc):
    """{competitor: Runner} for one (cell, scenario), on the process-wide shared models."""
    m = get_models(kind, sc.I, sc.H)
    return {c: make_runner(m, sc, c) for c in sc.competitors}


def cases(mode=None, scenarios=SCENARIOS):
    """(kind, scenario, competitor) for every benchmark of one mode (None: all) of scenarios,
    competitors innermost so that a (cell, shape) group runs together; case_id names them."""
    return [(kind, sc, comp) for sc in scenarios if mode in (None, sc.mode) for kind in sc.kinds
            for comp in sc.competitors]


def case_id(case):
    kind, sc, comp = case
    return f"{kind}-T{sc.T}-B{sc.B}-H{sc.H}-{comp}"


def group_name(kind, sc):
    """pytest-benchmark group: every competitor of one (cell, shape) side by side."""
    return f"{sc.id} {LABELS[kind]}"


@contextlib.contextmanager
def single_threaded():
    """One thread on every side: OpenBLAS (numpy's and scipy's, which fastcell calls) and OpenMP
    through threadpoolctl, PyTorch's intra-op pool, and no autograd bookkeeping in PyTorch.
    (ONNX Runtime's sessions are built with intra_op_num_threads = 1.)"""
    from threadpoolctl import threadpool_limits

    torch = optional_import("torch")
    with contextlib.ExitStack() as stack:
        if torch is not None:
            old = torch.get_num_threads()
            torch.set_num_threads(1)
            stack.callback(torch.set_num_threads, old)
            stack.enter_context(torch.inference_mode())
        # After the imports above, so every BLAS and OpenMP runtime loaded so far is limited.
        stack.enter_context(threadpool_limits(limits=1))
        yield
