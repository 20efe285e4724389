"""The serving benchmark's output: its section of bench/RESULTS.md (between BEGIN and END, which
bench/report.py carries over when it rewrites the file) and the chart bench/serve.png.
"""

import time

import bench.pool_step as ps
from bench.machine import machine_info
from bench.parity import PARITY_TOL
from bench.serving.harness import P99_LIMIT, P99_LIMIT_NETWORK, fmt_ms, held
from bench.serving.load import JITTER, PERIOD, H, I

# Marks the section in RESULTS.md, which bench/report.py keeps when it rewrites the file.
BEGIN = "<!-- bench.serve: begin -->"
END = "<!-- bench.serve: end -->"


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
    ("int8 StreamPool with 8-bit inputs, 2 threads: 50,000 streams (aim)", "pool-int8x8-t2", None,
     50000),
    ("stream_server.py /mux, 8 connections, pool 1 thread: ≥ 12,000 streams", "mux-t1", None,
     12000),
    ("stream_server.py /mux, 8 connections, pool 2 threads: ≥ 12,000 streams", "mux-t2", None,
     12000),
]

RATIOS = [
    ("StreamPool 1 thread / ONNX Runtime per frame 1 thread", "pool-t1", "ort-t1"),
    ("StreamPool 2 threads / ONNX Runtime per frame 2 threads", "pool-t2", "ort-t2"),
    ("StreamPool 2 threads / 1 thread", "pool-t2", "pool-t1"),
    ("StreamPool int8 2 threads / 1 thread", "pool-int8-t2", "pool-int8-t1"),
    ("StreamPool int8 / fp32, 1 thread", "pool-int8-t1", "pool-t1"),
    ("StreamPool int8 / fp32, 2 threads", "pool-int8-t2", "pool-t2"),
    ("StreamPool int8 8-bit inputs / int8, 1 thread", "pool-int8x8-t1", "pool-int8-t1"),
    ("StreamPool int8 8-bit inputs / int8, 2 threads", "pool-int8x8-t2", "pool-int8-t2"),
    ("StreamPool / PyTorch batched, 1 thread", "pool-t1", "torch-t1"),
    ("StreamPool / PyTorch batched, 2 threads", "pool-t2", "torch-t2"),
    ("StreamPool / StreamState per frame, 1 thread", "pool-t1", "state-t1"),
    ("StreamPool / Batcher, 1 thread", "pool-t1", "batcher-t1"),
    ("/mux / a connection per stream, 1 thread", "mux-t1", "ws-t1"),
    ("/mux / a connection per stream, 2 threads", "mux-t2", "ws-t2"),
    ("StreamPool / /mux, 1 thread", "pool-t1", "mux-t1"),
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
             "`fastcell.quantize(cell, \"int8\")`; int8x8, its inputs x quantized to 8 bits: "
             "`fastcell.quantize(cell, \"int8\", input_bits=8)`).\n")
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
             f"`fastcell.Batcher(pool, max_delay={args.batcher_delay:g})`; a producer thread calls "
             "`batcher.submit(sid, frame)` for each frame at its scheduled time and "
             "`batcher.close_stream(sid)` at a session's end; a done-callback takes the result "
             "time. Threads: the pool's `threads`, `torch.set_num_threads`, or the per-frame "
             "threads. CPU: process CPU time / wall time over the measured window (2.0: both "
             "cores busy); CPU µs/frame: that CPU time per frame; frames/call: frames per "
             "batched call (`pool.step` or the PyTorch cell). Host cores: what the host gave of "
             "two cores just before the engine's search (`core_capacity`: two threads stepping "
             "pools of their own, over one thread; 2.0 is two whole cores, and on this shared "
             "machine it swings between about 1.05 and 1.95).\n")
    if any(r["kind"] == "network" for r in results.values()):
        L.append("**network**: `examples/stream_server.py` on an event loop of a thread of the "
                 "benchmark's process (its CPU is the CPU column), the load from client processes "
                 "(`bench/serving/netload.py`: RFC 6455 over blocking sockets, so no client shares "
                 "the server's GIL) on 127.0.0.1, on the same cores. `/mux`: the streams spread "
                 "over 8 connections, each sending one request (every frame due of its streams) "
                 f"every {PERIOD * 1e3:g} ms, its own phase ±{JITTER * 1e3:g} ms; a session's "
                 "first frame opens its key, `close <key>` ends it. A connection per stream: a "
                 "session connects at its start, sends each frame as a binary message and leaves "
                 "at its end. Latency runs from the frame's scheduled send to its reply as the "
                 "client read it (both ways through the sockets, and the client's own delay); "
                 f"held: p99 ≤ {P99_LIMIT_NETWORK * 1e3:g} ms, nothing late or dropped. The "
                 "outputs of the parity run are checked bit for bit against StreamState.\n")
        L.append("| network engine | largest N held | clients' CPU | clients' send delay p99 |")
        L.append("|---|--:|--:|--:|")
        for r in results.values():
            b = r["best"]
            if r["kind"] == "network" and b is not None:
                L.append(f"| `{r['engine']}` | {held_str(r)} | {b['client_cpu']:.2f} | "
                         f"{fmt_ms(b['send_lag'])} |")
        L.append("")
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


FAMILY_COLORS = {"pool-int8x8": "#8c564b", "pool-int8": "#2ca02c", "pool": "#1f77b4",
                 "torch": "#ee4c2c", "state": "#9467bd", "ort": "#5a5a5a", "batcher": "#ff7f0e",
                 "mux": "#17becf", "ws": "#bcbd22"}
KIND_MARKERS = {"tick": "o", "per frame": "s", "per frame, Batcher": "^", "network": "D"}


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
        limit = r.get("p99_limit", P99_LIMIT)
        pts = sorted((s["streams"], min(s["p99"] * 1e3, top), held(s, limit))
                     for s in r["trials"])
        if not pts:
            continue
        color = next((c for f, c in FAMILY_COLORS.items() if r["engine"].startswith(f + "-")),
                     "#7f7f7f")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-" if r["threads"] > 1 else "--",
                color=color, marker=KIND_MARKERS.get(r["kind"], "o"), ms=4,
                label=f"{r['engine']} ({r['kind']}): {held_str(r)}")
        bad = [p for p in pts if not p[2]]
        ax.plot([p[0] for p in bad], [p[1] for p in bad], "x", color="black", ms=7, mew=1.2)
    ax.axhline(P99_LIMIT * 1e3, color="black", lw=1.2, label=f"p99 limit {P99_LIMIT * 1e3:g} ms")
    if any(r.get("p99_limit", P99_LIMIT) != P99_LIMIT for r in results.values()):
        ax.axhline(P99_LIMIT_NETWORK * 1e3, color="black", lw=1.2, ls=":",
                   label=f"p99 limit through the network {P99_LIMIT_NETWORK * 1e3:g} ms")
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
