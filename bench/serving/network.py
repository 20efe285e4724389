"""The network engines of the serving benchmark: examples/stream_server.py serving a schedule's
streams through real sockets on 127.0.0.1, on /mux (the streams spread over a few connections,
each sending one request of all its due frames every period) or one stream per connection. The
server runs here, its event loop on a thread of this process (so its CPU is this process's and
its pool can be checked); the load comes from client processes (bench/serving/netload.py), so no
client's Python shares the server's GIL. Latency is from a frame's scheduled send to its reply,
as the client saw it: the client's own delays count too (their p99 is reported apart).
"""

import importlib.util
import multiprocessing
import time
from pathlib import Path

import numpy as np

import fastcell
from bench.serving import netload
from bench.serving.drivers import ABORT_LAG, Run
from bench.serving.load import H, make_mux_schedule

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "stream_server.py"
KEY0 = 2 ** 63 + 1000         # /mux keys: KEY0 + session, high bit set (the whole uint64 range)
SETTLE = 30.0                 # seconds the server may take to close the streams of a trial


def stream_server():
    """examples/stream_server.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("stream_server", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class NetworkEngine:
    """examples/stream_server.py on a thread of this process, serving this pool's model."""
    kind, exact = "network", True
    path = None

    @property
    def steps(self):
        """pool.step calls so far."""
        return self.server.mux.ticks

    def __init__(self, setup, spec, capacity):
        self.setup = setup
        self.srv = stream_server().ServerThread(
            setup.models.fastcell(spec.fmt), capacity=capacity, threads=spec.threads,
            max_delay=setup.batcher_delay, idle_timeout=None)
        self.server = self.srv.server

    def stop(self):
        self.srv.stop()


class MuxEngine(NetworkEngine):
    """/mux: setup.connections connections, each carrying its share of the streams."""
    path = "/mux"

    @staticmethod
    def make_schedule(setup, streams, warmup, duration, session_mean, **kw):
        return make_mux_schedule(streams, setup.connections, warmup, duration, session_mean, **kw)


class SocketEngine(NetworkEngine):
    """One stream per connection: a session connects at its start and leaves at its end (the
    load of the other engines, load.make_schedule). The server's Batcher is swapped, before any
    connection, for one whose pool counts its steps (frames per step: the batching)."""
    path = "/"

    def __init__(self, setup, spec, capacity):
        from bench.serving.engines import _Counted   # engines.py imports this module
        super().__init__(setup, spec, capacity)
        self.pool, self.calls = self.server.pool, 0
        self.server.batcher.close()
        self.server.batcher = fastcell.Batcher(_Counted(self), max_delay=setup.batcher_delay)

    @property
    def steps(self):
        return self.calls


def client_jobs(engine, sched, setup, record, drain, abort_lag):
    """What each client process plays: [(global frame indices, job)]. /mux: connection c goes to
    process c % P, its frames ordered by (connection, time) so each request is a run of them;
    one stream per connection: session g goes to process g % P."""
    port = engine.server.port
    P = setup.clients
    base = dict(host="127.0.0.1", port=port, table=setup.table, H=H, record=record,
                warmup=sched.warmup, total=sched.total, drain=drain, abort_lag=abort_lag)
    jobs = []
    if engine.path == "/mux":
        conn_of = sched.conn[sched.sess]
        for p in range(min(P, sched.connections)):
            mine = np.flatnonzero(conn_of % P == p)
            mine = mine[np.lexsort((sched.t[mine], conn_of[mine]))]
            t, c = sched.t[mine], conn_of[mine]
            plans, close_keys = [], []
            for cc in range(p, sched.connections, P):
                a, b = np.searchsorted(c, cc, "left"), np.searchsorted(c, cc, "right")
                cut = a + np.flatnonzero(np.diff(t[a:b]) > 0) + 1
                edges = np.concatenate([[a], cut, [b]]) if b > a else np.array([a])
                sends = t[edges[:-1]] if b > a else np.empty(0)
                events = [(float(t[lo]), "request", int(lo), int(hi))
                          for lo, hi in zip(edges[:-1], edges[1:])]
                # The sessions that ended since the connection's last request are closed by one
                # "close" message just before its next request (or at the end, past the last),
                # as a gateway closes its calls with its next tick.
                ending = np.flatnonzero((sched.conn == cc) & np.isfinite(sched.end))
                nxt = np.searchsorted(sends, sched.end[ending])
                due = np.where(nxt < len(sends), sends[np.minimum(nxt, len(sends) - 1)],
                               sched.end[ending])
                order = np.lexsort((sched.end[ending], due))
                ending, due = ending[order], due[order]
                cuts = np.flatnonzero(np.diff(due) > 0) + 1
                for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts,
                                                                                 [len(due)]])):
                    if hi > lo:
                        events.append((float(due[lo]), "close", len(close_keys),
                                       len(close_keys) + int(hi - lo)))
                        close_keys.extend(KEY0 + g for g in ending[lo:hi].tolist())
                plans.append(sorted(events))
            jobs.append((mine, dict(base, kind="mux", frames=mine, t=t, rows=mine,
                                    keys=np.uint64(KEY0) + sched.sess[mine].astype(np.uint64),
                                    first=sched.seq[mine] == 0, connections=plans,
                                    close_keys=np.array(close_keys, np.uint64))))
        return jobs
    for p in range(min(P, sched.sessions)):
        mine = np.flatnonzero(sched.sess % P == p)
        gs = np.arange(p, sched.sessions, P)
        jobs.append((mine, dict(base, kind="streams", frames=mine, t=sched.t[mine], rows=mine,
                                sess=sched.sess[mine] // P, start=sched.start[gs],
                                end=sched.end[gs], nframes=sched.nframes[gs],
                                initial=np.flatnonzero(np.isin(gs, sched.initial)))))
    return jobs


def _receive(pipe, proc, timeout, what):
    """The next message of a client process; raises if it failed, died or went silent."""
    if not pipe.poll(timeout):
        raise RuntimeError(f"a client process ({what}) said nothing for {timeout:g} s "
                           f"(alive: {proc.is_alive()}, exit code {proc.exitcode})")
    msg = pipe.recv()
    if isinstance(msg, dict) and "fatal" in msg:
        raise RuntimeError(f"a client process failed ({what}):\n{msg['fatal']}")
    return msg


def _settle(server, n, timeout=SETTLE):
    """Waits until the server holds n streams (its closes land after the replies); returns the
    number it holds."""
    stop = time.perf_counter() + timeout
    while len(server.pool) != n and time.perf_counter() < stop:
        time.sleep(0.01)
    return len(server.pool)


def run_network(engine, sched, setup, record=False, drain=0.5, abort_lag=ABORT_LAG):
    """Plays sched through the server with setup.clients client processes; the Run as the other
    drivers', plus the clients' CPU and their own send delay. After the trial (connections still
    open) the server must hold exactly the streams opened and not closed, and none once the
    clients have left."""
    F = len(sched.t)
    done = np.full(F, np.nan)
    hits = np.zeros(F, np.int32)
    order = np.full(F, -1, np.int64)
    outs = np.full((F, H), np.nan, np.float32) if record else None
    jobs = client_jobs(engine, sched, setup, record, drain, abort_lag)
    ctx = multiprocessing.get_context("spawn")
    procs = []
    try:
        for frames, job in jobs:
            here, there = ctx.Pipe()
            proc = ctx.Process(target=netload.main, args=(there, job), name="bench-client",
                               daemon=True)
            proc.start()
            procs.append((here, proc, frames))
        for pipe, proc, _ in procs:
            _receive(pipe, proc, 120, "connecting")
        steps0 = engine.steps
        t0 = time.perf_counter() + 0.1
        for pipe, _, _ in procs:
            pipe.send(t0)
        netload.sleep_until(t0 + sched.warmup)
        c0, w0 = time.process_time(), time.perf_counter()
        netload.sleep_until(t0 + sched.total)
        cpu = (time.process_time() - c0) / max(1e-9, time.perf_counter() - w0)
        results = [_receive(pipe, proc, drain + 120, "playing") for pipe, proc, _ in procs]
        ticks = engine.steps - steps0
        errors = [e for r in results for e in r["errors"]]
        if errors:
            raise RuntimeError(f"{engine.path}: {len(errors)} client errors, the first: "
                               f"{errors[0]}")
        for (_, _, frames), r in zip(procs, results):
            done[frames], hits[frames], order[frames] = r["done"], r["hits"], r["order"]
            if record:
                outs[frames] = r["outs"]
        opened = sum(r["opened"] for r in results)
        closed = sum(r["closed"] for r in results)
        aborted = next((r["aborted"] for r in results if r["aborted"]), "")
        held = _settle(engine.server, opened - closed)
        if held != opened - closed and not aborted:
            raise AssertionError(f"{engine.path}: the server holds {held} streams after the "
                                 f"trial; the clients opened {opened} and closed {closed}")
        for pipe, _, _ in procs:
            pipe.send("disconnect")
        for pipe, proc, _ in procs:
            _receive(pipe, proc, 60, "leaving")
        left = _settle(engine.server, 0)
        if left:
            raise AssertionError(f"{engine.path}: {left} streams still open after every client "
                                 "left")
    finally:
        for _, proc, _ in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    # Replies that came after the drain count as dropped, as in the other drivers.
    late = done > sched.total + drain
    done[late], hits[late], order[late] = np.nan, 0, -1
    return Run(done, hits, order, outs, opened, closed, ticks, ticks, cpu, aborted,
               client_cpu=float(sum(r["cpu"] for r in results)),
               send_lag=float(max(r["lag_p99"] for r in results)))

