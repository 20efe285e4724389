"""bench/serve.py, the real-time serving benchmark, in a smoke run: its parity check passes, its
accounting holds (every frame served once, in its stream's order, every session opened and
closed), and the results land in the output file.

Nothing here may depend on the machine's speed or load: no timing, and not how many streams a
search held (a busy machine holds fewer); the runs whose every frame is checked are complete
runs (harness.run_complete), which wait for a late engine instead of stopping it."""

import numpy as np
import pytest

import fastcell

if not hasattr(fastcell, "StreamPool"):
    pytest.skip("fastcell.StreamPool not available", allow_module_level=True)

from bench import serve  # noqa: E402
from bench.models import Models, optional_import  # noqa: E402
from bench.serving import drivers, engines, harness, load, report  # noqa: E402

# Two fastcell engines always; the others where their library (or fastcell API) is there.
ENGINES = ["pool-t1", "pool-int8-t2", "pool-int8x8-t1", "state-t2"]
# The network engines (examples/stream_server.py through sockets) where websockets is installed.
for name in ("torch-t1", "ort-t1", "batcher-t1", "mux-t1", "ws-t2"):
    if engines.missing(next(e for e in engines.ENGINES if e.name == name)) is None:
        ENGINES.append(name)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve")
    (out / "RESULTS.md").write_text("# results\n\nother sections\n")
    result = serve.main(["--quick", "--engines", ",".join(ENGINES), "--start", "6",
                         "--max-streams", "6", "--out", str(out)])
    return out, result


def test_parity_ran_and_passed(quick_run):
    _, result = quick_run
    assert set(result["parity"]) == set(ENGINES)
    for name, p in result["parity"].items():
        if name.startswith(("pool", "state", "batcher", "mux", "ws")):
            assert p["max_abs_diff"] == 0, name
        else:
            assert p["max_abs_diff"] <= 1e-4, name
        # The verification schedule has churn: sessions were opened and closed mid-run.
        assert p["closed"] > 0 and p["opened"] == p["sessions"] > p["closed"]
        assert p["served"] == p["frames"]
    assert 0 < result["parity"]["pool-int8-t2"]["error_vs_float32"] <= 0.1
    # int8 with 8-bit inputs: bit for bit its own StreamState's, and not int8's of 16-bit inputs
    x8 = result["parity"]["pool-int8x8-t1"]["error_vs_float32"]
    assert 0 < x8 <= 0.1 and x8 != result["parity"]["pool-int8-t2"]["error_vs_float32"]


def test_every_engine_searched(quick_run):
    # Each trial checked its own accounting (harness.trial: no frame served twice or out of its
    # stream's order); which N it tried and whether it held is the machine's business.
    _, result = quick_run
    for name in ENGINES:
        r = result["results"][name]
        assert r["trials"], name
        for s in r["trials"]:
            assert 1 <= s["streams"] <= 6 and s["frames"] > 0      # --max-streams 6 is the cap
            assert s["late"] >= 0 and s["dropped"] >= 0


def test_network_engines_ran_through_sockets(quick_run):
    """The network engines' trials came back from their client processes, with the clients' own
    CPU and send delay; the report lists them. (Their parity run, above, checked every output bit
    for bit and every session opened and closed on the server.)"""
    out, result = quick_run
    network = [n for n in ENGINES if n.startswith(("mux", "ws"))]
    if not network:
        pytest.skip("websockets not installed")
    block = report.section_of((out / "RESULTS.md").read_text())
    assert "| network engine |" in block
    for name in network:
        r = result["results"][name]
        assert r["kind"] == "network" and r["p99_limit"] == harness.P99_LIMIT_NETWORK
        for s in r["trials"]:
            assert s["client_cpu"] >= 0 and s["send_lag"] == s["send_lag"]   # not NaN
            assert s["frames_per_call"] >= 1      # the server stepped every frame it answered
        assert f"| `{name}` |" in block


def test_mux_schedule():
    """/mux's load: a connection's frames due at one time are
    one request, one per period at most, holding each stream at most once; a session's frames
    are consecutive requests of its connection, from its start to its end."""
    P, C = 0.032, 4
    sched = load.make_mux_schedule(40, C, 0.2, 1.0, 0.3, seed=4, period=P, jitter=0.001)
    assert sched.connections == C and len(sched.conn) == sched.sessions
    conn = sched.conn[sched.sess]
    for c in range(C):
        mine = conn == c
        times = np.unique(sched.t[mine])
        assert len(times) and np.all(np.diff(times) > P - 2 * 0.001 - 1e-9)
        for t in times:
            at = mine & (sched.t == t)
            assert len(np.unique(sched.sess[at])) == at.sum()     # a session once a request
    for g in range(sched.sessions):
        f = sched.by_sess[np.searchsorted(sched.sess[sched.by_sess], g):][:sched.nframes[g]]
        assert np.array_equal(sched.seq[f], np.arange(sched.nframes[g]))
        assert sched.nframes[g] > 0
        ts = sched.t[f]
        assert ts[0] >= sched.start[g] and ts[-1] < min(sched.end[g], sched.total)
        own = np.unique(sched.t[conn == sched.conn[g]])
        lo = np.searchsorted(own, ts[0])
        assert np.array_equal(own[lo:lo + len(ts)], ts)      # every request while it lives
        assert lo == 0 or own[lo - 1] < sched.start[g]
        after = own[lo + len(ts):]
        assert not len(after) or after[0] >= min(sched.end[g], sched.total)


def test_results_in_output_file(quick_run):
    out, result = quick_run
    text = (out / "RESULTS.md").read_text()
    assert text.startswith("# results\n\nother sections\n")       # the rest is left alone
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    block = report.section_of(text)
    assert "python -m bench.serve --quick" in block
    for name in ENGINES:
        spec = next(e for e in engines.ENGINES if e.name == name)
        assert f"| {spec.label} | `{name}` | {spec.kind} | {spec.threads} |" in block
    if optional_import("matplotlib") is not None:   # the chart needs it (bench/requirements.txt)
        assert (out / "serve.png").stat().st_size > 0
    else:
        assert not (out / "serve.png").exists()


def test_splice_replaces_the_section():
    first = report.splice("# r\n\nbody\n", f"{report.BEGIN}\nold\n{report.END}\n")
    again = report.splice(first, f"{report.BEGIN}\nnew\n{report.END}\n")
    assert again.count(report.BEGIN) == 1 and "new" in again and "old" not in again
    assert again.startswith("# r\n\nbody\n")
    # What bench/report.py does when it rewrites RESULTS.md: the section is carried over.
    kept = report.section_of(again)
    assert report.splice("# rewritten\n", kept).endswith(kept)
    assert report.splice("# rewritten\n", report.section_of("# no section\n")) == "# rewritten\n"


@pytest.fixture(scope="module")
def small_run():
    """pool-t1 on a short, time-compressed schedule with churn, outputs recorded."""
    models, table = Models("lstm", load.I, load.H), load.make_table()
    sched = load.make_schedule(10, 0.0, 0.5, 0.1, seed=3, period=0.004, jitter=0.0005)
    spec = next(e for e in engines.ENGINES if e.name == "pool-t1")
    return sched, harness.run_complete(spec, engines.Setup(models, table), sched)


def test_accounting(small_run):
    sched, run = small_run
    # Straight from the records, not through check_accounting.
    assert np.all(run.hits == 1)
    assert not np.isnan(run.done).any() and not np.isnan(run.outs).any()
    for g in range(sched.sessions):
        frames = np.flatnonzero(sched.sess == g)
        frames = frames[np.argsort(sched.seq[frames])]
        assert np.array_equal(sched.seq[frames], np.arange(len(frames)))
        assert np.all(np.diff(run.order[frames]) > 0)       # in order, never two in one tick
    assert run.opened == sched.sessions
    assert run.closed == len(sched.closes) > 0
    harness.check_accounting(sched, run)


def test_accounting_catches_mistakes(small_run):
    sched, run = small_run
    import dataclasses

    twice = dataclasses.replace(run, hits=run.hits.copy())
    twice.hits[5] = 2
    with pytest.raises(AssertionError, match="twice"):
        harness.check_accounting(sched, twice)
    g = np.bincount(sched.sess).argmax()
    a, b = sorted(np.flatnonzero(sched.sess == g), key=lambda i: sched.seq[i])[:2]
    swapped = dataclasses.replace(run, order=run.order.copy())
    swapped.order[[a, b]] = swapped.order[[b, a]]
    with pytest.raises(AssertionError, match="order"):
        harness.check_accounting(sched, swapped)
    lost = dataclasses.replace(run, done=run.done.copy(), hits=run.hits.copy())
    lost.done[b], lost.hits[b] = np.nan, 0
    with pytest.raises(AssertionError, match="skipped|never served"):
        harness.check_accounting(sched, lost)
    unclosed = dataclasses.replace(run, closed=run.closed - 1)
    with pytest.raises(AssertionError, match="closed"):
        harness.check_accounting(sched, unclosed)


def test_latency_accounting_is_open_loop():
    """A frame served late is charged from its scheduled arrival; one never served is dropped."""
    sched = load.make_schedule(4, 0.1, 0.2, 10.0, seed=5)
    F = len(sched.t)
    m = sched.measured()
    done = sched.t + 0.001
    late = np.flatnonzero(m)[0]
    done[late] = sched.t[late] + 0.040          # beyond the 32 ms frame period
    dropped = np.flatnonzero(m)[1]
    done[dropped] = np.nan
    run = drivers.Run(done, np.ones(F, np.int32), np.arange(F), None, 4, 0, F, F, 0.5)
    s = harness.stats(sched, run)
    assert s["late"] == 1 and s["dropped"] == 1 and s["max"] == np.inf
    assert abs(s["p50"] - 0.001) < 1e-9
    assert not harness.held(s)


def test_report_keeps_the_section(tmp_path, quick_run):
    """bench/report.py rewrites RESULTS.md wholesale; the serve section survives it."""
    import bench.report

    out, _ = quick_run
    (tmp_path / "RESULTS.md").write_text((out / "RESULTS.md").read_text())
    bench.report.main(["--quick", "--no-cold-start", "--only", "^step T=1 B=1 H=64 RNN",
                 "--out-dir", str(tmp_path)])
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.startswith("# fastcell benchmark results")
    assert report.section_of(text) == report.section_of((out / "RESULTS.md").read_text()) != ""
