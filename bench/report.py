"""Runs every benchmark of issue 4 in one process and writes bench/RESULTS.md and bench/results.png.

    python -m bench.report            # the full run (a few minutes)
    python -m bench.report --quick    # fewer rounds (under 2 minutes)

Timing: the calls of bench/scenarios.py (the ones the pytest-benchmark suites time), float32, one
thread on every side. For one (cell, scenario) the competitors are warmed up, calibrated to a batch
of calls lasting at least --batch-ms, then timed in rounds, each round running every competitor's
batch once in a rotating order. A time is the median over rounds of a batch's time per call; a
ratio is the median over rounds of the two competitors' per-call ratio in that round, so drift on
this shared machine hits both sides of a ratio alike. Before timing, every competitor's result is
checked against fastcell's (max abs difference <= 1e-4).

Cold start: in fresh subprocesses, `import` + build the model from a weight file + first call,
fastcell against PyTorch, the median of 5 runs each (3 with --quick).
"""

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import bench.machine
import bench.scenarios
import bench.threads
from bench.models import KINDS, LABELS, PARITY_TOL, check_parity, optional_import
from bench.scenarios import SCENARIOS, runners_for, single_threaded

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


# -- timing --

def _per_call(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def measure(fns, batch_ms, budget_s, min_rounds, max_rounds):
    """Interleaved timing of {name: fn}. Returns {name: [seconds per call, one per round]}."""
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
                samples[name].append(_per_call(fns[name], calls[name]))
    finally:
        gc.enable()
    return samples


def paired_ratio(num, den, num_steps=1, den_steps=1):
    """Median over rounds of (num per step) / (den per step)."""
    return statistics.median((a / num_steps) / (b / den_steps) for a, b in zip(num, den))


def verify(kind, sc, runners):
    """The benchmarked calls themselves agree with fastcell (checked once, before timing)."""
    want = runners["fastcell"].results()
    worst = 0.0
    for comp in RIVALS:
        r = runners[comp]
        if not r.available:
            continue
        got = r.results()
        d = max(float(np.max(np.abs(got[k] - want[k]))) for k in want if k in got)
        if not d <= PARITY_TOL:
            raise AssertionError(f"{comp} disagrees with fastcell on {LABELS[kind]} {sc.id}: {d:.3g}")
        worst = max(worst, d)
    return worst


def run_benchmarks(settings, log):
    rows = []
    for sc in SCENARIOS:
        for kind in KINDS:
            runners = runners_for(kind, sc)
            diff = verify(kind, sc, runners)
            fns = {c: r.fn for c, r in runners.items() if r.available}
            s = measure(fns, settings["batch_ms"], settings["budget_s"], settings["min_rounds"],
                        settings["max_rounds"])
            fc = s["fastcell"]
            row = {"kind": kind, "mode": sc.mode, "T": sc.T, "B": sc.B, "H": sc.H,
                   "rounds": len(fc), "max_abs_diff": diff,
                   "median_s": {c: statistics.median(v) for c, v in s.items()},
                   "steps": {c: runners[c].steps for c in fns},
                   "notes": {c: r.note or r.reason for c, r in runners.items() if r.note or r.reason}}
            # Ratios > 1 in the rival columns mean fastcell is faster.
            row["ratio"] = {c: paired_ratio(s[c], fc) for c in RIVALS if c in s}
            if "floor" in s:
                row["ratio"]["floor"] = paired_ratio(fc, s["floor"], sc.T, runners["floor"].steps)
            rows.append(row)
            log(f"{sc.id:<26} {LABELS[kind]:<14} fastcell {fmt_time(row['median_s']['fastcell']):>9}  "
                + "  ".join(f"{c}/fc {row['ratio'][c]:6.2f}" for c in RIVALS if c in row["ratio"])
                + (f"  fc/floor {row['ratio']['floor']:5.2f}" if "floor" in row["ratio"] else "")
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


# -- machine --

def machine_info():
    import scipy
    from threadpoolctl import threadpool_info

    import fastcell
    from fastcell_c.kernel import simd_level

    cpu = bench.machine.read_cpuinfo()
    simd = bench.machine.simd_flags(cpu) + [f"fastcell kernels: {simd_level()}"]
    versions = {"python": platform.python_version(), "fastcell": fastcell.__version__,
                "numpy": np.__version__, "scipy": scipy.__version__}
    for name in ("torch", "onnxruntime", "onnx", "threadpoolctl"):
        mod = optional_import(name)
        versions[name] = getattr(mod, "__version__", "not installed") if mod else "not installed"
    blas = []
    for lib in threadpool_info():
        if lib.get("user_api") != "blas":
            continue
        path = lib.get("filepath", "")
        owner = next((p for p in ("scipy", "numpy", "torch") if f"/{p}" in path), "?")
        blas.append(f"{lib.get('internal_api')} {lib.get('version')} "
                    f"({lib.get('architecture', '?')} kernels, from {owner}: {os.path.basename(path)})")
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    try:
        load = "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = "?"
    return {"cpu": bench.machine.describe(cpu), "simd": simd, "cores": os.cpu_count(), "usable_cores": affinity,
            "versions": versions, "blas": blas, "os": platform.platform(), "load": load}


# -- output --

def fmt_time(s):
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_ratio(x):
    return "n/a" if x is None else f"{x:.2f}×"


def targets(rows, cold, threads=()):
    """Issue 4's targets, each with the measured value and whether it is met."""
    out = []

    def r(row, key):
        return row["ratio"].get(key)

    def add(what, value, ok):
        out.append((what, value, "n/a" if ok is None else ("met" if ok else "**not met**")))

    for row in rows:
        name = f"{LABELS[row['kind']]}, {row['mode']} B={row['B']} H={row['H']}"
        pt, ox, fl = r(row, "pytorch"), r(row, "onnxruntime"), r(row, "floor")
        if row["mode"] == "step" and row["H"] == 64:
            add(f"{name}: ≥ 20× PyTorch", fmt_ratio(pt), None if pt is None else pt >= 20)
            add(f"{name}: ≥ 5× ONNX Runtime", fmt_ratio(ox), None if ox is None else ox >= 5)
        if row["mode"] == "sequence" and row["H"] == 64:
            add(f"{name}: ≥ 3× PyTorch", fmt_ratio(pt), None if pt is None else pt >= 3)
            add(f"{name}: ≥ 1.5× ONNX Runtime", fmt_ratio(ox), None if ox is None else ox >= 1.5)
        if row["mode"] == "sequence" and row["H"] >= 256:
            add(f"{name}: ≥ 1.2× ONNX Runtime", fmt_ratio(ox), None if ox is None else ox >= 1.2)
        if row["mode"] == "batch":
            # The faster rival takes less time, so its rival/fastcell ratio is the smaller one.
            best = min([x for x in (pt, ox) if x is not None], default=None)
            add(f"{name}: ≥ 0.95× the faster rival", fmt_ratio(best), None if best is None else best >= 0.95)
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


def write_markdown(path, rows, cold, machine, parity, args, elapsed, threads=()):
    L = []
    L.append("# fastcell benchmark results\n")
    L.append(f"Written by `python -m bench.report{' --quick' if args.quick else ''}` on "
             f"{time.strftime('%Y-%m-%d %H:%M %Z')} in {elapsed / 60:.1f} min"
             f"{' (quick run: fewer rounds, noisier)' if args.quick else ''}. "
             "Float32, one thread on every side, I = H.\n")
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
             "module `bench/torch_peephole.py` (a Python loop over time). "
             "ONNX Runtime: one RNN/GRU/LSTM node (`P` for the peepholes, "
             "`linear_before_reset = 1` for the GRU), `session.run`.\n")
    for mode in ("step", "sequence", "batch"):
        mrows = [r for r in rows if r["mode"] == mode]
        if not mrows:
            continue
        L.append(f"## {MODE_TITLES[mode]}\n")
        L.append("| cell | T | B | H | fastcell | PyTorch/fastcell | ONNX Runtime/fastcell "
                 "| fastcell/floor |")
        L.append("|---|--:|--:|--:|--:|--:|--:|--:|")
        for r in mrows:
            rt = r["ratio"]
            mark = " ¹" if r["kind"] == "peephole" else ""
            L.append(f"| {LABELS[r['kind']]}{mark} | {r['T']} | {r['B']} | {r['H']} | "
                     f"{fmt_time(r['median_s']['fastcell'])} | "
                     f"{fmt_ratio(rt.get('pytorch'))} | {fmt_ratio(rt.get('onnxruntime'))} | "
                     f"{fmt_ratio(rt.get('floor'))} |")
        L.append("")
    L.append("¹ PyTorch column: the torch-ops module (PyTorch has no peephole LSTM).\n")
    L.append("### Absolute medians per call\n")
    L.append("| scenario | cell | fastcell | PyTorch | ONNX Runtime | floor per step |")
    L.append("|---|---|--:|--:|--:|--:|")
    for r in rows:
        m, st = r["median_s"], r["steps"]
        L.append(f"| {r['mode']} T={r['T']} B={r['B']} H={r['H']} | {LABELS[r['kind']]} | "
                 f"{fmt_time(m['fastcell'])} | "
                 + " | ".join(fmt_time(m[c]) if c in m else "n/a" for c in RIVALS)
                 + f" | {fmt_time(m['floor'] / st['floor']) if 'floor' in m else 'n/a'} |")
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
    tg = targets(rows, cold, threads)
    if tg:
        L.append("## Issue 4 targets\n")
        L.append("| target | measured | |")
        L.append("|---|--:|---|")
        L.extend(f"| {w} | {v} | {ok} |" for w, v, ok in tg)
        L.append("")
    L.append("## Parity\n")
    worst = {}
    for (kind, case, comp), d in parity.items():
        worst[comp] = max(worst.get(comp, 0.0), d)
    worst_bench = max((r["max_abs_diff"] for r in rows), default=0.0)
    L.append("Every rival computes the same function as fastcell on the same weights and inputs "
             f"(tolerance {PARITY_TOL:g}): `bench.models.check_parity()` max abs difference "
             + ", ".join(f"{NAMES[c]} {d:.1e}" for c, d in sorted(worst.items()))
             + f"; the benchmarked calls themselves, at every shape above: {worst_bench:.1e}.\n")
    L.append("## Machine\n")
    L.append(f"- CPU: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable); "
             f"SIMD: {', '.join(machine['simd']) or 'unknown'}")
    L.append(f"- Load average at the end of the run: {machine['load']} (a shared machine: compare "
             "ratios, not absolute times, across runs)")
    L.append("- BLAS: " + ("; ".join(machine["blas"]) or "unknown"))
    L.append("- " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()))
    L.append(f"- {machine['os']}")
    L.append("")
    Path(path).write_text("\n".join(L))


def write_chart(path, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    modes = [m for m in ("step", "sequence", "batch") if any(r["mode"] == m for r in rows)]
    widths = [sum(r["mode"] == m for r in rows) for m in modes]
    fig, axes = plt.subplots(2, len(modes), figsize=(4 + 0.55 * sum(widths), 8.5),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    colors = {"pytorch": "#ee4c2c", "onnxruntime": "#5a5a5a", "floor": "#1f77b4"}
    for j, mode in enumerate(modes):
        mrows = [r for r in rows if r["mode"] == mode]
        labels = [f"{LABELS[r['kind']]}\nB={r['B']} H={r['H']}" for r in mrows]
        xs = np.arange(len(mrows))
        top, bottom = axes[0][j], axes[1][j]
        for k, comp in enumerate(RIVALS):
            vals = [r["ratio"].get(comp, np.nan) for r in mrows]
            top.bar(xs + (k - 0.5) * 0.4, vals, 0.4, color=colors[comp],
                    label=f"{NAMES[comp]} time / fastcell time")
        top.axhline(1, color="black", lw=0.8)
        top.set_yscale("log")
        times = FuncFormatter(lambda v, _: f"{v:g}×")
        top.yaxis.set_major_formatter(times)
        top.yaxis.set_minor_formatter(times)
        top.tick_params(axis="y", which="minor", labelsize=7)
        T = mrows[0]["T"]
        top.set_title(MODE_TITLES[mode].split(" (")[0] + f" ({T} step{'s' if T > 1 else ''} per call)")
        top.set_xticks(xs, labels, rotation=60, ha="right", fontsize=7)
        vals = [r["ratio"].get("floor", np.nan) for r in mrows]
        bottom.bar(xs, vals, 0.6, color=colors["floor"], label="fastcell step / BLAS floor step")
        bottom.axhline(1, color="black", lw=0.8)
        bottom.axhline(1.2, color="black", lw=0.8, ls=":", label="1.2 (issue 4's batch-1 target)")
        bottom.set_xticks(xs, labels, rotation=60, ha="right", fontsize=7)
        if j == 0:
            top.set_ylabel("speed-up of fastcell (log; > 1: fastcell faster)")
            bottom.set_ylabel("fastcell / floor (1 = bare GEMV/GEMM)")
            top.legend(fontsize=7, loc="best", framealpha=0.85)
            bottom.legend(fontsize=7, loc="best", framealpha=0.85)
    fig.suptitle("fastcell vs PyTorch, ONNX Runtime and the BLAS floor (float32, 1 thread)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds and cold-start runs (< 2 min)")
    p.add_argument("--out-dir", default=str(HERE), help="where RESULTS.md and results.png go")
    p.add_argument("--no-cold-start", action="store_true", help="skip the cold-start subprocesses")
    p.add_argument("--step-api", choices=sorted(STEP_CALLS),
                   help="fastcell's streaming-step call (default: FASTCELL_STEP_API in bench/scenarios.py)")
    args = p.parse_args(argv)
    if args.step_api:
        bench.scenarios.FASTCELL_STEP_API = args.step_api
    settings = SETTINGS["quick" if args.quick else "full"]
    args.cold_runs = settings["cold_runs"]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    t0 = time.perf_counter()
    with single_threaded():
        parity = check_parity()
        log(f"parity: competitors within {PARITY_TOL:g} of fastcell "
            f"(worst {max(parity.values(), default=0):.1e})")
        rows = run_benchmarks(settings, log)
        threads = bench.threads.scaling(rounds=3 if args.quick else 5)
        for name, a, b, r in threads:
            log(f"threads {name}: 2 threads / 1 thread = {r:.2f}")
    cold = {} if args.no_cold_start else cold_start(settings["cold_runs"], log)
    machine = machine_info()
    elapsed = time.perf_counter() - t0
    write_markdown(out / "RESULTS.md", rows, cold, machine, parity, args, elapsed, threads)
    log(f"wrote {out / 'RESULTS.md'}")
    if optional_import("matplotlib") is None:
        log("matplotlib not installed (pip install -r bench/requirements.txt): no chart")
    else:
        write_chart(out / "results.png", rows)
        log(f"wrote {out / 'results.png'}")
    log(f"done in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
