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

This module is the command; the benchmark's parts are in bench/serving/ (the load, the engines,
the loops that drive them, the harness and the report).
"""

import argparse
import contextlib
import os
import time
from pathlib import Path

import bench.pool_step
from bench.models import Models, Unavailable, optional_import
from bench.serving.engines import DEFAULT_BATCHER_DELAY, ENGINES, Setup, missing, select
from bench.serving.harness import core_capacity, search, verify
from bench.serving.load import H, I, make_table
from bench.serving.report import held_str, section, splice, targets, write_chart

HERE = Path(__file__).resolve().parent
SETTINGS = {
    "full": dict(warmup=1.0, duration=3.0, drain=0.5, resolution=0.07, session_mean=7.0,
                 retries=1),
    "quick": dict(warmup=0.3, duration=0.7, drain=0.3, resolution=0.3, session_mean=1.0,
                  retries=0),
}


def main(argv=None):
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
    setup = Setup(Models("lstm", I, H), make_table(), args.batcher_delay)
    runnable = []
    for s in specs:
        try:
            s.build(setup, 8).stop()
            runnable.append(s)
        except Unavailable as e:
            skipped[s.name] = str(e)
            log(f"skip {s.name}: {e}")
    specs = runnable
    t0 = time.perf_counter()
    args.load_at_start = "%.2f %.2f %.2f" % os.getloadavg()
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1), _inference_mode():
        parity = {} if args.no_verify else verify(specs, setup, log)
        args.pool_step = bench.pool_step.measure(rounds=3 if args.quick else 20)
        for what, value, ok in bench.pool_step.targets(args.pool_step):
            log(f"pool step: {what}: {value}")
        results = {}
        for s in specs:
            log(f"{s.name}: {s.label} ({s.kind}, {s.threads} thread{'s' * (s.threads > 1)})")
            capacity = core_capacity()
            log(f"{s.name}: the host gives {capacity:.2f} cores (two threads / one, just before)")
            results[s.name] = search(s, setup, settings, args.max_streams, log, args.start)
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
    torch = optional_import("torch")
    return torch.inference_mode() if torch is not None else contextlib.nullcontext()


if __name__ == "__main__":
    main()
