"""One call on every core (issue 19): an LSTM (I = H) computed by fastcell at 1 and 2 threads
against ONNX Runtime (float32, and int8 by its quantize_dynamic) with intra_op_num_threads 1 and
2, and OpenVINO (float32, and bf16 by its precision hint) with INFERENCE_NUM_THREADS 1 and 2,
then the scaling model (bench/scaling.py) fitted to these numbers.

    python -m bench.team              # every shape (~6 minutes); prints the table
    python -m bench.team --quick      # fewer rounds
    python -m bench.report            # the same, as the "Threads" section of bench/RESULTS.md

Shapes: a sequence (T, B) of x (T, B, H) from a non-zero state, outputs and final state; or a
single streaming step at B = 1 (fastcell's model.step into a preallocated output; the rivals'
session run with T = 1, the state passed in and out). For one shape every competitor is timed in
the same interleaved rounds (bench/timing.py); a ratio is the median over rounds of the two
competitors' per-call ratio in that round. Precision classes are compared within themselves:
float32 with float32, fastcell's int8 and bf16 with ONNX Runtime's int8 and OpenVINO's bf16.

Before timing, every competitor's outputs are checked: fastcell at 2 threads gives the bytes of
fastcell at 1; the float32 rivals are within 1e-4 of fastcell float32; the reduced ones within
0.1 of it. The host's cores are probed around each shape (two threads of GIL-free hashing against
one): this VM may give 1 or 2 cores at any moment, and a 2-thread number means nothing when it
gave 1.
"""

import argparse
import hashlib
import statistics
import threading
import time

import numpy as np

import fastcell
from bench.models import Unavailable, build_openvino, build_ort_session, random_weights
from bench.timing import measure

SHAPES = (
    ("sequence", 100, 1, 256), ("sequence", 100, 1, 512), ("sequence", 100, 1, 1024),
    ("sequence", 50, 16, 256), ("sequence", 20, 64, 512),
    ("step", 1, 1, 512), ("step", 1, 1, 1024),
)
THREADS = (1, 2)
# (library, weight format / precision) in the order of the table's columns
FLOAT = (("fastcell", "float32"), ("ort", "float32"), ("openvino", "float32"))
REDUCED = (("fastcell", "int8"), ("fastcell", "bf16"), ("ort", "int8"), ("openvino", "bf16"))
NAMES = {"fastcell": "fastcell", "ort": "ONNX Runtime", "openvino": "OpenVINO"}
SETTINGS = {"full": dict(batch_ms=30.0, budget_s=10.0, min_rounds=9, max_rounds=31, settle_s=0.005),
            "quick": dict(batch_ms=8.0, budget_s=2.0, min_rounds=5, max_rounds=11, settle_s=0.005)}
FLOAT_TOL, REDUCED_TOL = 1e-4, 0.1


def label(lib, fmt, n):
    return f"{lib} {fmt} {n}t"


def shape_id(shape):
    mode, T, B, H = shape
    return f"step B={B} H={H}" if mode == "step" else f"T={T} B={B} H={H}"


# ---- the competitors of one shape ----

class Shape:
    """The inputs of one shape and a call per (library, format, threads), built from one set of
    LSTM weights."""

    def __init__(self, shape, seed=0):
        self.mode, self.T, self.B, self.H = shape
        H, B = self.H, self.B
        self.w = random_weights("lstm", H, H, seed=seed)
        rng = np.random.default_rng(seed + 1)
        self.x = rng.standard_normal((self.T, B, H)).astype(np.float32)
        self.h0 = (0.5 * rng.standard_normal((1, B, H))).astype(np.float32)
        self.c0 = (0.5 * rng.standard_normal((1, B, H))).astype(np.float32)
        self.fc = {"float32": fastcell.LSTM(H, H, weights={f"{k}_l0": v for k, v in self.w.items()})}
        for fmt in ("int8", "bf16"):
            self.fc[fmt] = fastcell.quantize(self.fc["float32"], fmt)

    def call(self, lib, fmt, n):
        """(a no-argument call, a function giving its (outputs, h, c) for the parity check)."""
        return getattr(self, "_" + lib)(fmt, n)

    def _fastcell(self, fmt, n):
        m = self.fc[fmt].with_threads(n)
        if self.mode == "step":
            state = m.new_state(self.B)
            out = np.empty((self.B, self.H), np.float32)
            x = self.x[0]

            def step():
                state.h[...] = self.h0
                state.c[...] = self.c0
                m.step(x, state, out)
                return out[None], state.h, state.c
            return (lambda: m.step(x, state, out)), step
        hx = (self.h0, self.c0)

        def run():
            y, (h, c) = m(self.x, hx)
            return y, h, c
        return run, run

    def _ort(self, fmt, n):
        sess = build_ort_session("lstm", self.w, fmt, threads=n)
        feed = {"X": self.x, "initial_h": self.h0, "initial_c": self.c0}

        def run():
            y, h, c = sess.run(None, feed)
            return y[:, 0], h, c
        return (lambda: sess.run(None, feed)), run

    def _openvino(self, fmt, n):
        req, compiled = build_openvino("lstm", self.w, fmt, n, {
            "X": list(self.x.shape), "initial_h": list(self.h0.shape),
            "initial_c": list(self.c0.shape)})
        feed = {"X": self.x, "initial_h": self.h0, "initial_c": self.c0}
        outs = compiled.outputs

        def run():
            r = req.infer(feed)
            return r[outs[0]][:, 0].copy(), r[outs[1]].copy(), r[outs[2]].copy()
        return (lambda: req.infer(feed)), run


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(u, np.float64).reshape(-1)
                                   - np.asarray(v, np.float64).reshape(-1)))) for u, v in zip(a, b))


def competitors(sh, log):
    """{label: call} of every available competitor of a shape, each checked first."""
    calls, want, one = {}, None, {}
    for lib, fmt in FLOAT + REDUCED:
        for n in THREADS:
            name = label(lib, fmt, n)
            try:
                fn, results = sh.call(lib, fmt, n)
            except Unavailable as e:
                log(f"  {name}: n/a ({e})")
                continue
            got = results()
            got = [np.array(g) for g in got]
            if lib == "fastcell" and fmt == "float32" and n == 1:
                want = got
            if lib == "fastcell":
                if n == 1:
                    one[fmt] = got
                elif any(u.tobytes() != v.tobytes() for u, v in zip(got, one[fmt])):
                    raise AssertionError(f"{name}: not the bytes of 1 thread")
            d = _max_diff(got, want)
            tol = FLOAT_TOL if fmt == "float32" else REDUCED_TOL
            if not d <= tol:
                raise AssertionError(f"{name} is {d:.3g} from fastcell float32 (> {tol})")
            calls[name] = fn
    return calls


# ---- what the host gave ----

def _hash(n):
    data = b"\0" * (1 << 20)
    for _ in range(n):
        hashlib.sha256(data).digest()       # releases the GIL on data this large


def cores_given(n=24):
    """Throughput of two threads hashing over one (hashlib releases the GIL): about 2.0 when the
    host runs both vCPUs, about 1.0 when it gives one."""
    t0 = time.perf_counter()
    _hash(n)
    one = time.perf_counter() - t0
    ts = [threading.Thread(target=_hash, args=(n,)) for _ in range(2)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return 2 * one / (time.perf_counter() - t0)


def barrier_seconds(rounds=7, T=4000):
    """One barrier of a 2-thread split walk, measured: an RNN with H = 32 split by units (the
    split rule lowered for it), whose step is little but the barrier; the median over rounds of
    (2-thread - 1-thread) time per step."""
    from fastcell_c.kernel import split_rule

    m = fastcell.RNN(32, 32)
    two = m.with_threads(2)
    x = np.random.default_rng(0).standard_normal((T, 1, 32)).astype(np.float32)
    previous = split_rule(1, 0)
    try:
        diffs = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            m(x)
            t1 = time.perf_counter()
            two(x)
            t2 = time.perf_counter()
            diffs.append(((t2 - t1) - (t1 - t0)) / T)
    finally:
        split_rule(*previous)
    return max(0.0, statistics.median(diffs))


# ---- the run ----

def run(settings, log=print, shapes=SHAPES):
    """[{shape, per_call: {label: median s}, rounds: {label: [s per round]}, cores: [probes]}]."""
    rows = []
    for shape in shapes:
        sh = Shape(shape)
        log(f"{shape_id(shape)}")
        calls = competitors(sh, log)
        probes = [cores_given()]
        rounds = measure(calls, **settings)
        probes.append(cores_given())
        rows.append({"shape": shape, "rounds": rounds, "cores": probes,
                     "per_call": {k: statistics.median(v) for k, v in rounds.items()}})
        fc = rows[-1]["per_call"]
        log("  " + "  ".join(f"{k} {v * 1e6:,.0f}" for k, v in fc.items()) + " us; host gave "
            + "/".join(f"{p:.2f}" for p in probes) + " cores")
    return rows


def ratio(row, num, den):
    """Median over rounds of num's time / den's (> 1: den is faster), or None."""
    r = row["rounds"]
    if num not in r or den not in r:
        return None
    return statistics.median(a / b for a, b in zip(r[num], r[den]))


# ---- the targets of issue 19 ----

def targets(rows):
    """[(what, value, ok)]: the issue's targets on this 2-core machine."""
    out = []

    def add(what, value, goal):
        out.append((what, "n/a" if value is None else f"{value:.2f}×",
                    "n/a" if value is None else ("yes" if value >= goal else "**no**")))

    for row in rows:
        mode, T, B, H = row["shape"]
        sid = shape_id(row["shape"])
        seq_b1 = mode == "sequence" and B == 1
        for fmt in ("float32", "int8"):
            if seq_b1 or (mode == "step" and fmt == "float32"):
                goal = 1.85 if seq_b1 else 1.6
                add(f"{sid} {fmt}: fastcell 2 threads / 1 thread ≥ {goal}",
                    ratio(row, label("fastcell", fmt, 1), label("fastcell", fmt, 2)), goal)
        if mode == "step":
            add(f"{sid} int8: fastcell 2 threads / 1 thread ≥ 1.6",
                ratio(row, label("fastcell", "int8", 1), label("fastcell", "int8", 2)), 1.6)
        goal = 1.15 if B == 1 else 1.0
        add(f"{sid}: fastcell fp32 vs ONNX Runtime fp32, 2 threads ≥ {goal}",
            ratio(row, label("ort", "float32", 2), label("fastcell", "float32", 2)), goal)
        add(f"{sid}: fastcell int8 vs ONNX Runtime int8, 2 threads ≥ 1.5",
            ratio(row, label("ort", "int8", 2), label("fastcell", "int8", 2)), 1.5)
        goal = 1.3 if B == 1 else 1.1
        add(f"{sid}: fastcell int8 vs OpenVINO bf16, 2 threads ≥ {goal}",
            ratio(row, label("openvino", "bf16", 2), label("fastcell", "int8", 2)), goal)
    return out


def markdown(rows):
    """The Threads section of bench/RESULTS.md: µs per call, the ratios, the targets."""
    L = ["µs per call (medians of interleaved rounds), LSTM with I = H. `1t`/`2t`: threads given "
         "to each library (fastcell `threads=`, ONNX Runtime `intra_op_num_threads`, OpenVINO "
         "`INFERENCE_NUM_THREADS`). *cores* is what the host gave during the shape's rounds "
         "(two threads' throughput over one's, before and after).", ""]
    cols = [(lib, fmt, n) for lib, fmt in FLOAT + REDUCED for n in THREADS]
    L.append("| shape | cores | " + " | ".join(f"{NAMES[l]} {f} {n}t" for l, f, n in cols) + " |")
    L.append("|---|---|" + "--:|" * len(cols))
    for row in rows:
        pc = row["per_call"]
        cells = [f"{pc[label(*c)] * 1e6:,.0f}" if label(*c) in pc else "n/a" for c in cols]
        L.append(f"| {shape_id(row['shape'])} | {'/'.join(f'{p:.1f}' for p in row['cores'])} | "
                 + " | ".join(cells) + " |")
    L += ["", "Ratios, each the median over rounds of the per-round ratio (> 1: fastcell faster; "
          "fastcell 2t/1t: its own speed-up):", "",
          "| shape | fastcell fp32 2t/1t | int8 2t/1t | bf16 2t/1t | vs ORT fp32 (2t) | "
          "vs ORT fp32 (1t) | vs OpenVINO fp32 (2t) | int8 vs ORT int8 (2t) | int8 vs OpenVINO "
          "bf16 (2t) | bf16 vs OpenVINO bf16 (2t) |", "|---|" + "--:|" * 9]

    def f(v):
        return "n/a" if v is None else f"{v:.2f}×"

    for row in rows:
        fc = lambda fmt, n: label("fastcell", fmt, n)       # noqa: E731
        L.append("| " + " | ".join([shape_id(row["shape"])] + [f(v) for v in (
            ratio(row, fc("float32", 1), fc("float32", 2)), ratio(row, fc("int8", 1), fc("int8", 2)),
            ratio(row, fc("bf16", 1), fc("bf16", 2)),
            ratio(row, label("ort", "float32", 2), fc("float32", 2)),
            ratio(row, label("ort", "float32", 1), fc("float32", 1)),
            ratio(row, label("openvino", "float32", 2), fc("float32", 2)),
            ratio(row, label("ort", "int8", 2), fc("int8", 2)),
            ratio(row, label("openvino", "bf16", 2), fc("int8", 2)),
            ratio(row, label("openvino", "bf16", 2), fc("bf16", 2)))]) + " |")
    L += ["", "| target (issue 19) | measured | met |", "|---|--:|:-:|"]
    L += [f"| {w} | {v} | {ok} |" for w, v, ok in targets(rows)]
    return "\n".join(L)


def section(settings, log=print, shapes=SHAPES):
    """Run every shape, then the barrier probe; the markdown of both tables and the scaling model."""
    from bench.scaling import fit_and_predict, scaling_markdown

    rows = run(settings, log, shapes)
    sync = barrier_seconds()
    for what, value, ok in targets(rows):
        log(f"target {what}: {value} ({ok.strip('*')})")
    return markdown(rows) + "\n\n" + scaling_markdown(fit_and_predict(rows, sync))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    p.add_argument("--only", help="shapes whose id (e.g. 'T=100 B=1 H=256') contains this")
    args = p.parse_args()
    shapes = [s for s in SHAPES if not args.only or args.only in shape_id(s)]
    from bench.scenarios import single_threaded

    with single_threaded():     # BLAS and PyTorch at one thread: the threads here are the libraries'
        text = section(SETTINGS["quick" if args.quick else "full"], shapes=shapes)
    print(text)


if __name__ == "__main__":
    main()
