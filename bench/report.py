"""Runs every benchmark of issue 4 in one process and writes bench/RESULTS.md and bench/results.png.

    python -m bench.report            # the full run (a few minutes)
    python -m bench.report --quick    # fewer rounds (under 2 minutes)
    python -m bench.report --only int8 --out-dir /tmp/r   # the reduced weight formats alone

Timing: the calls of bench/scenarios.py (the ones the pytest-benchmark suites time), one thread on
every side: every cell in float32 (SCENARIOS), then the LSTM's int8 and bf16 weights against
fastcell's float32 and the rivals' int8 (REDUCED_SCENARIOS), then fastcell's int8 with 8-bit
inputs against ONNX Runtime's int8 (INPUT8_SCENARIOS). For one (cell, scenario) the
competitors are warmed up, calibrated to a batch of calls lasting at least --batch-ms, then timed
in rounds, each round running every competitor's batch once in a rotating order. A time is the
median over rounds of a batch's time per call; a ratio is the median over rounds of the two
competitors' per-call ratio in that round, so drift on this shared machine hits both sides of a
ratio alike. Before timing, every float32 competitor's result is checked against fastcell's (max
abs difference <= 1e-4), and every reduced-format one's against PyTorch's float32 model (its max
abs error, the accuracy column, <= 0.1).

Cold start: in fresh subprocesses, `import` + build the model from a weight file + first call,
fastcell against PyTorch, the median of 5 runs each (3 with --quick).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import bench.scenarios
import bench.team
import bench.threads
from bench.machine import machine_info
from bench.timing import measure, paired_ratio
from bench.models import LABELS, optional_import
from bench.parity import PARITY_TOL, REDUCED_TOL, check_parity, verify
from bench.scenarios import (ALL_SCENARIOS, competitor, group_name, runners_for, single_threaded,
                             split_competitor)
from bench.serving.report import section_of, splice

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RIVALS = ("pytorch", "onnxruntime")
NAMES = {"fastcell": "fastcell", "pytorch": "PyTorch", "onnxruntime": "ONNX Runtime",
         "floor": "BLAS floor"}

STEP_CALLS = {"call": "cell(x, state)", "stream": "cell.step(x, state, out=out)"}

# Rounds per (cell, scenario): as many as fit in the budget, within [min, max].
SETTINGS = {
    "full": dict(batch_ms=20.0, budget_s=6.0, min_rounds=11, max_rounds=51, cold_runs=5),
    "quick": dict(batch_ms=4.0, budget_s=0.8, min_rounds=3, max_rounds=11, cold_runs=3),
}


def ratios(sc, samples, steps):
    """{competitor: paired ratio}, > 1 where fastcell is faster: a rival's time over fastcell's
    in the same weight format, fastcell's float32 time over its reduced format's, and fastcell's
    time per step over the floor's."""
    out = {}
    for comp, s in samples.items():
        if comp == "fastcell":
            continue
        library, fmt = split_competitor(comp)
        fc = samples.get(competitor("fastcell", fmt))
        if library == "floor":
            out[comp] = paired_ratio(samples["fastcell"], s, sc.T, steps[comp])
        elif library == "fastcell":
            out[comp] = paired_ratio(samples["fastcell"], s)
        elif fc is not None:
            out[comp] = paired_ratio(s, fc)
    for num, den in sc.pairs:
        if num in samples and den in samples:
            out[f"{num}/{den}"] = paired_ratio(samples[num], samples[den])
    return out


def ratio_label(comp):
    """A ratio's name in the log, "fc" for fastcell: pytorch/fc, fc/fc-int8, fc/floor; a pair's
    ratio "onnxruntime-int8/fastcell-int8x8" as onnxruntime-int8/fc-int8x8."""
    if "/" in comp:
        return comp.replace("fastcell", "fc")
    library, fmt = split_competitor(comp)
    if library == "floor":
        return "fc/floor"
    if library == "fastcell":
        return f"fc/{competitor('fc', fmt)}"
    return f"{comp}/{competitor('fc', fmt)}"


def run_benchmarks(settings, log, only=None):
    """A row per (cell, scenario) of ALL_SCENARIOS; with `only`, those whose group name
    (bench.scenarios.group_name, e.g. "sequence T=100 B=1 H=64 int8 bf16 LSTM") matches that
    regular expression."""
    rows = []
    for sc in ALL_SCENARIOS:
        for kind in sc.kinds:
            if only and not re.search(only, group_name(kind, sc)):
                continue
            runners = runners_for(kind, sc)
            diff, errors = verify(kind, sc, runners)
            fns = {c: r.fn for c, r in runners.items() if r.available}
            s = measure(fns, settings["batch_ms"], settings["budget_s"], settings["min_rounds"],
                        settings["max_rounds"])
            steps = {c: runners[c].steps for c in fns}
            row = {"kind": kind, "mode": sc.mode, "T": sc.T, "B": sc.B, "H": sc.H,
                   "formats": list(sc.formats), "competitors": list(sc.competitors),
                   "rounds": len(s["fastcell"]), "max_abs_diff": diff, "error": errors,
                   "median_s": {c: statistics.median(v) for c, v in s.items()}, "steps": steps,
                   "ratio": ratios(sc, s, steps),
                   "notes": {c: r.note or r.reason for c, r in runners.items() if r.note or r.reason}}
            rows.append(row)
            times = [f"{'fastcell' if c == 'fastcell' else split_competitor(c)[1]} {fmt_time(t):>9}"
                     for c, t in row["median_s"].items() if split_competitor(c)[0] == "fastcell"]
            log(f"{sc.id:<36} {LABELS[kind]:<14} {'  '.join(times)}  "
                + "  ".join(f"{ratio_label(c)} {v:5.2f}" for c, v in row["ratio"].items())
                + "".join(f"  err {c} {e:.1e}" for c, e in errors.items())
                + "".join(f"  [{c} n/a: {r.reason}]" for c, r in runners.items() if not r.available)
                + f"  ({row['rounds']} rounds)")
    return rows


# -- cold start --

COLD_I, COLD_H, COLD_T = 256, 256, 100

# Peak RSS of this process image: VmHWM (ru_maxrss would carry over the forking parent's peak).
PEAK_RSS = """
def peak_rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")
"""

# Each script prints one JSON line: seconds for import, build (weights file -> model), first call.
# fastcell reads its own weight file (fastcell.load) where it has one, else an .npz of the weights.
COLD_FASTCELL = """
import time; t0 = time.perf_counter()
import numpy as np, fastcell
t1 = time.perf_counter()
if {native!r}:
    cell = fastcell.load({weights!r})
else:
    w = np.load({weights!r})
    cell = fastcell.LSTMCell(w["weight_ih"], w["weight_hh"], w["bias_ih"], w["bias_hh"])
t2 = time.perf_counter()
y, _ = cell.run(np.load({inputs!r}))
t3 = time.perf_counter()
import json
print(json.dumps(dict(imp=t1 - t0, build=t2 - t1, call=t3 - t2, rss_mb=peak_rss_mb())))
"""

COLD_TORCH = """
import time; t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
torch.set_num_threads(1)
sd = torch.load({weights!r})
x = sd.pop("x")
lstm = torch.nn.LSTM({I}, {H})
lstm.load_state_dict(sd)
lstm.eval()
t2 = time.perf_counter()
with torch.inference_mode():
    y, _ = lstm(x)
t3 = time.perf_counter()
import json
print(json.dumps(dict(imp=t1 - t0, build=t2 - t1, call=t3 - t2, rss_mb=peak_rss_mb())))
"""


def cold_start(runs, log):
    """{side: {"total": median import+build+call, "imp", "build", "call", "wall", "rss_mb"}}."""
    from bench.models import random_weights

    torch = optional_import("torch")
    w = random_weights("lstm", COLD_I, COLD_H)
    x = np.random.default_rng(3).standard_normal((COLD_T, COLD_I)).astype(np.float32)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    results = {}
    import fastcell

    native = hasattr(fastcell, "load") and hasattr(fastcell, "save")
    with tempfile.TemporaryDirectory() as tmp:
        xs, pt = os.path.join(tmp, "x.npy"), os.path.join(tmp, "lstm.pt")
        np.save(xs, x)
        if native:
            weights = os.path.join(tmp, "lstm.safetensors")
            fastcell.save(fastcell.LSTMCell(**w), weights)
        else:
            weights = os.path.join(tmp, "lstm.npz")
            np.savez(weights, **w)
        scripts = {"fastcell": PEAK_RSS + COLD_FASTCELL.format(native=native, weights=weights,
                                                                inputs=xs)}
        if torch is not None:
            sd = {k + "_l0": torch.from_numpy(v) for k, v in w.items()}
            sd["x"] = torch.from_numpy(x)
            torch.save(sd, pt)
            scripts["pytorch"] = PEAK_RSS + COLD_TORCH.format(weights=pt, I=COLD_I, H=COLD_H)
        samples = {side: [] for side in scripts}
        # One unmeasured run each (page cache), then alternate the two sides.
        for i in range(runs + 1):
            for side, script in scripts.items():
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                                      capture_output=True, text=True)
                if proc.returncode:
                    raise RuntimeError(f"cold start ({side}) failed:\n{proc.stderr[-2000:]}")
                out = proc.stdout
                wall = time.perf_counter() - t0
                if i:
                    d = json.loads(out.strip().splitlines()[-1])
                    d.update(total=d["imp"] + d["build"] + d["call"], wall=wall)
                    samples[side].append(d)
    for side, ds in samples.items():
        results[side] = {k: statistics.median(d[k] for d in ds) for k in ds[0]}
        results[side]["weights"] = {"fastcell": "fastcell.load" if native else ".npz → fastcell.LSTMCell",
                                    "pytorch": "torch.load → nn.LSTM.load_state_dict"}[side]
        r = results[side]
        log(f"cold start {side:<9} import {r['imp']:.3f} s  build {r['build']:.3f} s  "
            f"first call {r['call']:.3f} s  total {r['total']:.3f} s  process wall {r['wall']:.3f} s  "
            f"peak RSS {r['rss_mb']:.0f} MB")
    return results


# -- output --

def fmt_time(s):
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_ratio(x):
    return "n/a" if x is None else f"{x:.2f}×"


# The reduced weight formats' targets (LSTM). A call of T steps: fastcell's int8 at least this many
# times faster than each rival's int8. A streaming step, by batch: fastcell's int8 and bf16 at
# least this many times faster than its float32 (per stream and step, as the call is the same).
REDUCED_RIVAL_TARGETS = {"onnxruntime-int8": 1.5, "pytorch-int8": 2.0}
REDUCED_STEP_TARGETS = {1: {"fastcell-int8": 3.0, "fastcell-bf16": 1.7},
                        1024: {"fastcell-int8": 2.5, "fastcell-bf16": 1.6}}
# int8 with 8-bit inputs (issue 20): at least this many times faster than ONNX Runtime's int8, at
# an error no larger than its own.
INPUT8_RIVAL = "onnxruntime-int8/fastcell-int8x8"
INPUT8_TARGET = 1.3


def is_input8(row):
    """Whether a row is one of INPUT8_SCENARIOS' (fastcell int8 with 8-bit inputs)."""
    return "fastcell-int8x8" in row["competitors"]


def reduced_targets(row):
    """{competitor: the target its ratio should reach} for a reduced-format row."""
    if row["mode"] == "step":
        return REDUCED_STEP_TARGETS.get(row["B"], {})
    return REDUCED_RIVAL_TARGETS


def display(comp, among=()):
    """A competitor's name in the tables: "PyTorch", "fastcell int8", ...; "fastcell float32" in
    a table of competitors `among` that has reduced formats too."""
    library, fmt = split_competitor(comp)
    if fmt == "float32" and not any(split_competitor(c)[1] != "float32" for c in among):
        return NAMES[library]
    return f"{NAMES[library]} {fmt}"


def targets(rows, cold, threads=()):
    """Issue 4's targets (float32) and the reduced weight formats', each with the measured value
    and whether it is met."""
    out = []

    def add(what, value, ok):
        out.append((what, value, "n/a" if ok is None else ("met" if ok else "**not met**")))

    def at_least(name, x, lo, than):
        add(f"{name}: ≥ {lo:g}× {than}", fmt_ratio(x), None if x is None else x >= lo)

    for row in rows:
        name = f"{LABELS[row['kind']]}, {row['mode']} B={row['B']} H={row['H']}"
        r = row["ratio"].get
        if is_input8(row):
            at_least(f"{name}, int8 x8", r(INPUT8_RIVAL), INPUT8_TARGET, "ONNX Runtime int8")
            e, o = row["error"].get("fastcell-int8x8"), row["error"].get("onnxruntime-int8")
            add(f"{name}, int8 x8: error ≤ ONNX Runtime int8's",
                "n/a" if None in (e, o) else f"{e:.1e} vs {o:.1e}", None if None in (e, o) else e <= o)
            continue
        if row["formats"]:
            for comp, lo in reduced_targets(row).items():
                library, fmt = split_competitor(comp)
                than = "fastcell float32" if library == "fastcell" else display(comp)
                at_least(f"{name}, {fmt}", r(comp), lo, than)
            continue
        pt, ox, fl = r("pytorch"), r("onnxruntime"), r("floor")
        if row["mode"] == "step" and row["H"] == 64:
            at_least(name, pt, 20, "PyTorch")
            at_least(name, ox, 5, "ONNX Runtime")
        if row["mode"] == "sequence" and row["H"] == 64:
            at_least(name, pt, 3, "PyTorch")
            at_least(name, ox, 1.5, "ONNX Runtime")
        if row["mode"] == "sequence" and row["H"] >= 256:
            at_least(name, ox, 1.2, "ONNX Runtime")
        if row["mode"] == "batch":
            # The faster rival takes less time, so its rival/fastcell ratio is the smaller one.
            best = min([x for x in (pt, ox) if x is not None], default=None)
            at_least(name, best, 0.95, "the faster rival")
        if row["B"] == 1 and row["H"] >= 256 and row["mode"] == "sequence":
            add(f"{name}: step ≤ 1.2× the GEMV floor", fmt_ratio(fl), None if fl is None else fl <= 1.2)
    for name, _, _, ratio in threads:
        add(f"{name}: 2 threads ≥ 1.7× the throughput of 1", f"{ratio:.2f}×", ratio >= 1.7)
    if "fastcell" in cold and "pytorch" in cold:
        c = cold["fastcell"]["total"] / cold["pytorch"]["total"]
        add("cold start: fastcell ≤ 25% of PyTorch", f"{100 * c:.0f}%", c <= 0.25)
    return out


MODE_TITLES = {
    "step": "Streaming step (one call = one step of one stream, T = 1)",
    "sequence": "Sequence (one call = a whole sequence, T = 100, B = 1)",
    "batch": "Batches (one call = T = 50 steps of B streams)",
}


def ratio_header(comp):
    """A ratio column's title: "PyTorch/fastcell", "fastcell float32/int8", "fastcell/floor", ..."""
    library, fmt = split_competitor(comp)
    if library == "floor":
        return "fastcell/floor"
    if library == "fastcell":
        return f"fastcell float32/{fmt}"
    return f"{display(comp)}/{display(competitor('fastcell', fmt))}"


def ratio_table(rows):
    """One line per row: fastcell's times (each weight format it runs in), then every ratio, in
    the order of the rows' competitors (which they share)."""
    comps = rows[0]["competitors"]
    times = [c for c in comps if split_competitor(c)[0] == "fastcell"]
    ratio_cols = [c for c in comps if c != "fastcell"]
    L = ["| cell | T | B | H | " + " | ".join(display(c, comps) for c in times) + " | "
         + " | ".join(map(ratio_header, ratio_cols)) + " |",
         "|---|--:|--:|--:|" + "--:|" * (len(times) + len(ratio_cols))]
    for r in rows:
        mark = " ¹" if r["kind"] == "peephole" else ""
        L.append(f"| {LABELS[r['kind']]}{mark} | {r['T']} | {r['B']} | {r['H']} | "
                 + " | ".join(fmt_time(r["median_s"][c]) if c in r["median_s"] else "n/a" for c in times)
                 + " | " + " | ".join(fmt_ratio(r["ratio"].get(c)) for c in ratio_cols) + " |")
    return L + [""]


def reduced_section(rows):
    """The LSTM's int8 and bf16 weights: speed (ratio_table) and accuracy."""
    torch = optional_import("torch")
    engine = torch.backends.quantized.engine if torch is not None else "n/a"
    L = ["## Reduced weight formats (LSTM)\n",
         "fastcell int8 and bf16: `fastcell.quantize(cell, \"int8\")` / `\"bf16\"` of the float32 "
         "`LSTMCell`, same weights (int8: one scale per weight row, activations quantized per row "
         "at every product; bf16: weights rounded to bf16; both compute in float32), the same "
         "calls as above. PyTorch int8: `torch.ao.quantization.quantize_dynamic(..., "
         f"dtype=torch.qint8)` of `nn.LSTM` / `nn.LSTMCell` (engine `{engine}`, per-tensor "
         "weight scale). ONNX Runtime int8: `onnxruntime.quantization.quantize_dynamic(..., "
         "weight_type=QuantType.QInt8)` of the LSTM node, which becomes com.microsoft's "
         "`DynamicQuantizeLSTM` (per-tensor weight scale), one thread. All five in one "
         "interleaved group per shape. **fastcell float32/int8** is how many times longer "
         "fastcell's float32 model takes than its int8 one on the same call (bf16 alike); "
         "**ONNX Runtime int8/fastcell int8** and **PyTorch int8/fastcell int8** compare int8 "
         "with int8. B = 1024 at T = 1: a Silero-VAD-sized batch (`LSTMCell(128, 128)`, 1024 "
         "streams stepped in one call); the ratio per call is the ratio per stream and step.\n"]
    L.extend(ratio_table(rows))
    comps = [c for c in rows[0]["competitors"] if split_competitor(c)[1] != "float32"]
    L.append(f"Accuracy: max abs difference from PyTorch's float32 `nn.LSTM` (`nn.LSTMCell` for a "
             "step) on the same weights, x ~ N(0, 1), h0 and c0 ~ U(-0.5, 0.5), over every output "
             "row and the final h and c (a step: h); fastcell's float32 is within "
             f"{PARITY_TOL:g}. Beyond {REDUCED_TOL:g} the run stops: a different model.\n")
    L.append("| cell | T | B | H | " + " | ".join(map(display, comps)) + " |")
    L.append("|---|--:|--:|--:|" + "--:|" * len(comps))
    for r in rows:
        L.append(f"| {LABELS[r['kind']]} | {r['T']} | {r['B']} | {r['H']} | "
                 + " | ".join(f"{r['error'][c]:.1e}" if c in r["error"] else "n/a" for c in comps)
                 + " |")
    L.append("")
    notes = sorted({f"{display(c)}: {n}" for r in rows for c, n in r["notes"].items()})
    if notes:
        L.append("n/a: " + "; ".join(notes) + ".\n")
    return L


def input8_section(rows):
    """fastcell's int8 with 8-bit inputs against ONNX Runtime's int8: speed and accuracy."""
    L = ["## int8 with 8-bit inputs (LSTM)\n",
         "fastcell int8x8: `fastcell.quantize(cell, \"int8\", input_bits=8)`, the same int8 weights "
         "as fastcell int8 with each row of x quantized to 8 bits instead of 16 (h is 8 bits in "
         "both), as ONNX Runtime's `DynamicQuantizeLSTM` quantizes its x and h (to 8 bits, per "
         "tensor). All four in one interleaved group per shape, one thread each. "
         "**ONNX Runtime int8/fastcell int8x8** (target ≥ "
         f"{INPUT8_TARGET:g}×, at an error no larger than ONNX Runtime int8's) and "
         "**fastcell int8/int8x8** (what 8-bit inputs buy) are paired per-round ratios; errors as "
         "in the accuracy table above (max abs difference from PyTorch's float32 model).\n",
         "| cell | T | B | H | fastcell float32 | fastcell int8 | fastcell int8x8 | ONNX Runtime "
         "int8 | ONNX Runtime int8/fastcell int8x8 | fastcell int8/int8x8 | fastcell float32/int8x8 "
         "| error int8 | error int8x8 | error ONNX Runtime int8 |",
         "|---|--:|--:|--:|" + "--:|" * 10]
    comps = ("fastcell", "fastcell-int8", "fastcell-int8x8", "onnxruntime-int8")
    for r in rows:
        t, e = r["median_s"], r["error"]
        L.append(f"| {LABELS[r['kind']]} | {r['T']} | {r['B']} | {r['H']} | "
                 + " | ".join(fmt_time(t[c]) if c in t else "n/a" for c in comps) + " | "
                 + " | ".join(fmt_ratio(r["ratio"].get(k)) for k in (
                     INPUT8_RIVAL, "fastcell-int8/fastcell-int8x8", "fastcell-int8x8")) + " | "
                 + " | ".join(f"{e[c]:.1e}" if c in e else "n/a" for c in comps[1:]) + " |")
    L.append("")
    return L


def command(args):
    return "python -m bench.report" + (" --quick" if args.quick else "") + (
        f" --only '{args.only}'" if args.only else "")


def write_markdown(path, rows, cold, machine, parity, args, elapsed, threads=(), team=""):
    full = [r for r in rows if not r["formats"]]
    reduced = [r for r in rows if r["formats"] and not is_input8(r)]
    input8 = [r for r in rows if is_input8(r)]
    L = []
    L.append("# fastcell benchmark results\n")
    L.append(f"Written by `{command(args)}` on "
             f"{time.strftime('%Y-%m-%d %H:%M %Z')} in {elapsed / 60:.1f} min"
             f"{' (quick run: fewer rounds, noisier)' if args.quick else ''}. "
             "One thread on every side, I = H; float32 weights but in the reduced weight formats' "
             "section.\n")
    L.append("How to read: **PyTorch/fastcell** and **ONNX Runtime/fastcell** are how many times "
             "longer the rival takes than fastcell for the same call (> 1: fastcell is faster). "
             "**fastcell/floor** is fastcell's time per step over a bare BLAS GEMV (B = 1) or GEMM "
             "(B > 1) over the recurrent matrix per step, run from C with nothing else "
             "(`fastcell_c/blas_floor.pyx`): 1.0 would be a kernel whose gates cost nothing. "
             "The floor leaves out the input projection, which a call of T steps also does "
             "(one GEMM over all T·B rows, as many FLOPs as the recurrent products when I = H): "
             "expect about 2 at large B, where both run at GEMM speed. "
             "Each ratio is the median over interleaved rounds of the per-round ratio; the time is "
             "fastcell's median time per call.\n")
    L.append(f"fastcell's step call: `{STEP_CALLS[bench.scenarios.FASTCELL_STEP_API]}`"
             f" (`FASTCELL_STEP_API = {bench.scenarios.FASTCELL_STEP_API!r}` in `bench/scenarios.py`). "
             "PyTorch: `nn.RNN`/`nn.GRU`/`nn.LSTM` for calls of T steps, "
             "`nn.RNNCell`/`nn.GRUCell`/`nn.LSTMCell` for a step, under `torch.inference_mode()`; "
             "the peephole LSTM has no PyTorch module, so its PyTorch column times the torch-ops "
             "module `fastcell/torch.py` (a Python loop over time). "
             "ONNX Runtime: one RNN/GRU/LSTM node (`P` for the peepholes, "
             "`linear_before_reset = 1` for the GRU), `session.run`.\n")
    for mode in ("step", "sequence", "batch"):
        mrows = [r for r in full if r["mode"] == mode]
        if mrows:
            L.append(f"## {MODE_TITLES[mode]}\n")
            L.extend(ratio_table(mrows))
    if any(r["kind"] == "peephole" for r in full):
        L.append("¹ PyTorch column: the torch-ops module (PyTorch has no peephole LSTM).\n")
    if reduced:
        L.extend(reduced_section(reduced))
    if input8:
        L.extend(input8_section(input8))
    L.append("### Absolute medians per call\n")
    for group in (full, reduced, input8):
        if not group:
            continue
        comps = group[0]["competitors"]
        L.append("| scenario | cell | " + " | ".join(
            "floor per step" if c == "floor" else display(c, comps) for c in comps) + " |")
        L.append("|---|---|" + "--:|" * len(comps))
        for r in group:
            m, st = r["median_s"], r["steps"]
            L.append(f"| {r['mode']} T={r['T']} B={r['B']} H={r['H']} | {LABELS[r['kind']]} | "
                     + " | ".join("n/a" if c not in m else fmt_time(m[c] / (st[c] if c == "floor" else 1))
                                  for c in comps) + " |")
        L.append("")
    if cold:
        L.append("## Cold start\n")
        L.append(f"A fresh Python process: import, build an LSTM (I = H = {COLD_H}) from a weight file "
                 f"(fastcell: `{cold['fastcell']['weights']}` (an `LSTMCell`), then `run`; PyTorch: "
                 f"`{cold.get('pytorch', {}).get('weights', 'n/a')}`), first call on T = {COLD_T}, B = 1. "
                 f"Median of {args.cold_runs} runs each; process wall includes interpreter start "
                 "and exit.\n")
        L.append("| | import | build | first call | total | process wall | peak RSS |")
        L.append("|---|--:|--:|--:|--:|--:|--:|")
        for side in ("fastcell", "pytorch"):
            if side in cold:
                c = cold[side]
                L.append(f"| {NAMES[side]} | {fmt_time(c['imp'])} | {fmt_time(c['build'])} | "
                         f"{fmt_time(c['call'])} | {fmt_time(c['total'])} | {fmt_time(c['wall'])} | "
                         f"{c['rss_mb']:.0f} MB |")
        if "pytorch" in cold:
            f, p = cold["fastcell"], cold["pytorch"]
            L.append(f"\nfastcell/PyTorch: **{f['total'] / p['total']:.2f}** (import + build + first "
                     f"call), {f['wall'] / p['wall']:.2f} (process wall), "
                     f"{f['rss_mb'] / p['rss_mb']:.2f} (peak RSS).\n")
    if threads:
        L.append("## Threads\n")
        L.append("Independent streams, one StreamState per thread, one shared model "
                 "(`python -m bench.threads`); the kernels run without the GIL.\n")
        L.append("| scenario | 1 thread | 2 threads | 2 threads / 1 thread |")
        L.append("|---|--:|--:|--:|")
        L.extend(f"| {n} | {a:,.0f} calls/s | {b:,.0f} calls/s | {r:.2f}× |" for n, a, b, r in threads)
        L.append("")
    if team:
        L.append("## Every core for one call\n")
        L.append("One model's call split over its own thread team (`threads=`), against ONNX "
                 "Runtime and OpenVINO given the same threads (`python -m bench.team`).\n")
        L.append(team)
        L.append("")
    tg = targets(rows, cold, threads)
    if tg:
        L.append("## Targets\n")
        L.append("| target | measured | |")
        L.append("|---|--:|---|")
        L.extend(f"| {w} | {v} | {ok} |" for w, v, ok in tg)
        L.append("")
    L.append("## Parity\n")
    worst = {}
    for (kind, case, comp), d in parity.items():
        worst[comp] = max(worst.get(comp, 0.0), d)
    worst_bench = max((r["max_abs_diff"] for r in rows), default=0.0)
    L.append("Every float32 rival computes the same function as fastcell on the same weights and "
             f"inputs (tolerance {PARITY_TOL:g}): "
             + ("`bench.parity.check_parity()` max abs difference "
                + ", ".join(f"{NAMES[c]} {d:.1e}" for c, d in sorted(worst.items())) + "; "
                if worst else "")
             + f"the benchmarked calls themselves, at every shape above: {worst_bench:.1e}"
             + (f". Every int8 and bf16 model is within {REDUCED_TOL:g} of PyTorch's float32 one "
                "(the accuracy table)" if any(r["formats"] for r in rows) else "") + ".\n")
    L.append("## Machine\n")
    L.append(f"- CPU: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable); "
             f"SIMD: {', '.join(machine['simd']) or 'unknown'}")
    L.append(f"- Load average at the end of the run: {machine['load']} (a shared machine: compare "
             "ratios, not absolute times, across runs)")
    L.append("- BLAS: " + ("; ".join(machine["blas"]) or "unknown"))
    L.append("- " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()))
    L.append(f"- {machine['os']}")
    L.append("")
    # bench/serve.py's section (between its markers) comes from its own run: carry it over.
    old = Path(path).read_text() if Path(path).exists() else ""
    Path(path).write_text(splice("\n".join(L), section_of(old)))


CHART_COLORS = {"pytorch": "#ee4c2c", "onnxruntime": "#5a5a5a", "floor": "#1f77b4",
                "fastcell-int8": "#2ca02c", "fastcell-bf16": "#98df8a",
                "pytorch-int8": "#ee4c2c", "onnxruntime-int8": "#5a5a5a"}


def _log_ratio_axis(ax):
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _: f"{v:g}×")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(fmt)
    ax.tick_params(axis="y", which="minor", labelsize=7)


def _chart_reduced(top, bottom, rows):
    """The reduced weight formats' column: every ratio with its target (top), accuracy (bottom)."""
    comps = [c for c in rows[0]["competitors"] if c != "fastcell"]
    reduced = [c for c in comps if split_competitor(c)[1] != "float32"]
    labels = [f"{r['mode']} B={r['B']}\nT={r['T']} H={r['H']}" for r in rows]
    xs, w = np.arange(len(rows)), 0.8 / len(comps)
    for k, comp in enumerate(comps):
        at = xs + (k - (len(comps) - 1) / 2) * w
        top.bar(at, [r["ratio"].get(comp, np.nan) for r in rows], w, color=CHART_COLORS[comp],
                label=ratio_header(comp))
        lo = [reduced_targets(r).get(comp, np.nan) for r in rows]
        top.hlines(lo, at - w / 2, at + w / 2, color="black", lw=1.5,
                   label="target" if k == 0 else None)
        if comp in reduced:
            bottom.bar(at, [r["error"].get(comp, np.nan) for r in rows], w, color=CHART_COLORS[comp],
                       label=display(comp))
    top.axhline(1, color="black", lw=0.8)
    _log_ratio_axis(top)
    top.set_title("LSTM int8 / bf16 weights")
    bottom.set_yscale("log")
    bottom.set_ylabel("max abs error vs PyTorch float32")
    for ax in (top, bottom):
        ax.set_xticks(xs, labels, rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=7, loc="best", framealpha=0.85)


def write_chart(path, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = [r for r in rows if not r["formats"]]
    reduced = [r for r in rows if r["formats"] and not is_input8(r)]   # input8's: the table only
    modes = [m for m in ("step", "sequence", "batch") if any(r["mode"] == m for r in full)]
    widths = [sum(r["mode"] == m for r in full) for m in modes] + ([1.5 * len(reduced)] if reduced else [])
    fig, axes = plt.subplots(2, len(widths), figsize=(4 + 0.55 * sum(widths), 8.5),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    for j, mode in enumerate(modes):
        mrows = [r for r in full if r["mode"] == mode]
        labels = [f"{LABELS[r['kind']]}\nB={r['B']} H={r['H']}" for r in mrows]
        xs = np.arange(len(mrows))
        top, bottom = axes[0][j], axes[1][j]
        for k, comp in enumerate(RIVALS):
            vals = [r["ratio"].get(comp, np.nan) for r in mrows]
            top.bar(xs + (k - 0.5) * 0.4, vals, 0.4, color=CHART_COLORS[comp],
                    label=f"{NAMES[comp]} time / fastcell time")
        top.axhline(1, color="black", lw=0.8)
        _log_ratio_axis(top)
        T = mrows[0]["T"]
        top.set_title(MODE_TITLES[mode].split(" (")[0] + f" ({T} step{'s' if T > 1 else ''} per call)")
        top.set_xticks(xs, labels, rotation=60, ha="right", fontsize=7)
        vals = [r["ratio"].get("floor", np.nan) for r in mrows]
        bottom.bar(xs, vals, 0.6, color=CHART_COLORS["floor"], label="fastcell step / BLAS floor step")
        bottom.axhline(1, color="black", lw=0.8)
        bottom.axhline(1.2, color="black", lw=0.8, ls=":", label="1.2 (issue 4's batch-1 target)")
        bottom.set_xticks(xs, labels, rotation=60, ha="right", fontsize=7)
        if j == 0:
            top.set_ylabel("speed-up of fastcell (log; > 1: fastcell faster)")
            bottom.set_ylabel("fastcell / floor (1 = bare GEMV/GEMM)")
            top.legend(fontsize=7, loc="best", framealpha=0.85)
            bottom.legend(fontsize=7, loc="best", framealpha=0.85)
    if reduced:
        _chart_reduced(axes[0][-1], axes[1][-1], reduced)
    fig.suptitle("fastcell vs PyTorch, ONNX Runtime and the BLAS floor (1 thread; float32 but "
                 "the int8 / bf16 column)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds and cold-start runs (< 2 min)")
    p.add_argument("--out-dir", help="where RESULTS.md and results.png go (default: bench/, "
                   "or nowhere with --only)")
    p.add_argument("--no-cold-start", action="store_true", help="skip the cold-start subprocesses")
    p.add_argument("--step-api", choices=sorted(STEP_CALLS),
                   help="fastcell's streaming-step call (default: FASTCELL_STEP_API in bench/scenarios.py)")
    p.add_argument("--only", metavar="REGEX",
                   help="time only the groups whose name matches, e.g. 'int8' (the reduced weight "
                        "formats), 'H=(64|256) int8', '^sequence.* LSTM$'; skips the parity check, "
                        "threads and cold start, and writes files only with --out-dir")
    args = p.parse_args(argv)
    if args.step_api:
        bench.scenarios.FASTCELL_STEP_API = args.step_api
    settings = SETTINGS["quick" if args.quick else "full"]
    args.cold_runs = settings["cold_runs"]
    if args.only is not None:
        re.compile(args.only)   # a bad pattern fails now, not after the first groups
    out = Path(args.out_dir) if args.out_dir else (None if args.only else HERE)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    t0 = time.perf_counter()
    parity, threads, cold, team = {}, [], {}, ""
    with single_threaded():
        if not args.only:
            parity = check_parity()
            log(f"parity: competitors within {PARITY_TOL:g} of fastcell "
                f"(worst {max(parity.values(), default=0):.1e})")
        rows = run_benchmarks(settings, log, args.only)
        if not rows:
            p.error(f"--only {args.only!r} matches no group")
        if not args.only:
            threads = bench.threads.scaling(rounds=3 if args.quick else 5)
            for name, a, b, r in threads:
                log(f"threads {name}: 2 threads / 1 thread = {r:.2f}")
            team = bench.team.section(bench.team.SETTINGS["quick" if args.quick else "full"], log)
    if not (args.no_cold_start or args.only):
        cold = cold_start(settings["cold_runs"], log)
    elapsed = time.perf_counter() - t0
    for what, value, ok in targets(rows, cold, threads):
        log(f"target {what}: {value} ({ok.strip('*')})")
    if out is None:
        log(f"done in {elapsed:.0f} s (no files written: --out-dir DIR to write them)")
        return
    machine = machine_info()
    write_markdown(out / "RESULTS.md", rows, cold, machine, parity, args, elapsed, threads, team)
    log(f"wrote {out / 'RESULTS.md'}")
    if optional_import("matplotlib") is None:
        log("matplotlib not installed (pip install -r bench/requirements.txt): no chart")
    else:
        write_chart(out / "results.png", rows)
        log(f"wrote {out / 'results.png'}")
    log(f"done in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
