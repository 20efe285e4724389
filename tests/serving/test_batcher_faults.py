"""fastcell.Batcher under faults: finalizers that call it, batchers closed from each other's
worker thread, close() racing submits, done-callbacks that raise, producers that outrun
the pool, a max_delay that cannot be slept or a failure that repeats, and fork.

A deadlock leaves a thread blocked in a C lock, where hang_guard's SIGALRM cannot reach it: a
scenario that could deadlock runs in a subprocess with a timeout. Nothing here depends on speed:
where a rate is bounded (the worker's back-off), a slower machine only lowers it.
"""

import asyncio
import logging
import math
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import traceback

import numpy as np
import pytest

import fastcell
from conftest import ENV, hang_guard
from test_batcher import WAIT, I, Recording, make_model, recorded, reference, results

# Finalizers that call a Batcher, run by collections forced at nearly every allocation
# (gc.set_threshold(1)), on every thread: objects in reference cycles (__del__) or weakref.finalize
# callbacks. They close streams (some already closed: the close fails; frames submitted after it
# make ticks refuse the stream), submit frames, read pending, and close spare batchers (also from
# a done-callback on that batcher's own worker thread), while three threads submit frames of
# streams of their own. Exit 0 and "ok": nothing hung, every future resolved, the producers'
# streams got exactly their own steps; then the batcher steps a new stream exactly.
STORM = r'''
import gc, os, sys, threading, weakref
import numpy as np
import fastcell

KIND, ITERATIONS = sys.argv[1], int(sys.argv[2])
I, H, S, F = 3, 8, 3, 2000
rng = np.random.default_rng(1)
k = 1 / np.sqrt(H)
u = lambda *s: rng.uniform(-k, k, s).astype(np.float32)
model = fastcell.LSTMCell(u(4 * H, I), u(4 * H, H), u(4 * H), u(4 * H))
pool = fastcell.StreamPool(model, 4096)
batcher = fastcell.Batcher(pool, max_delay=0)
spare = [fastcell.Batcher(pool, max_delay=0)]
made = []    # every future a finalizer or the main loop got: each must resolve
ONE = np.ones(I, np.float32)


def act(what, sid, b):
    try:
        if what == "close_stream":
            made.append(b.close_stream(sid))
        elif what == "submit":
            made.append(b.submit(sid, ONE))
        elif what == "pending":
            assert b.pending >= 0
        elif what == "close":
            b.close()
    except RuntimeError as exc:     # a spare batcher closed by an earlier finalizer
        if str(exc) not in ("submit: the Batcher is closed", "close_stream: the Batcher is closed"):
            raise


class Cyclic:
    def __init__(self, *what):
        self.what, self.me = what, self

    def __del__(self):
        act(*self.what)


class Holder:
    def __init__(self):
        self.me = self


def garbage(what, sid, b):
    if KIND == "del":
        Cyclic(what, sid, b)
    else:
        weakref.finalize(Holder(), act, what, sid, b)


def settle(futs):
    for f in futs:
        try:
            f.result(timeout=60)
        except (fastcell.StreamIdError, RuntimeError):
            pass
        except TimeoutError:
            print("a future never resolved", flush=True)
            os._exit(3)


stop = threading.Event()
xs = rng.standard_normal((3, S, F, I)).astype(np.float32)
got = [[[] for _ in range(S)] for _ in range(3)]


def producer(t):
    sids = [pool.open() for _ in range(S)]
    own = pool.open()        # stepped by the spare batchers too: never checked
    for f in range(F):
        if stop.is_set() and f > 0:      # at least one frame of each stream, however slow
            break
        for s in range(S):
            fut = batcher.submit(sids[s], xs[t, s, f])
            # garbage made on the worker thread, where the next collection may run it
            fut.add_done_callback(lambda _, sid=sids[s]: garbage("pending", sid, batcher))
            got[t][s].append(fut)
        garbage("submit" if f % 2 else "pending", own, spare[-1])
        if f % 20 == 0:
            got[t][0][-1].result(timeout=60)


def close_from_the_worker(fut, b, sid):
    garbage("close", sid, b)
    gc.collect()             # the finalizer closes b on b's own worker thread


threads = [threading.Thread(target=producer, args=(t,)) for t in range(3)]
gc.set_threshold(1)
for th in threads:
    th.start()
for i in range(ITERATIONS):
    if i % 100 == 99:        # the pool has room: every victim's close is through
        settle(list(made))
        del made[:]
    sid = pool.open()
    made.append(batcher.submit(sid, ONE))
    garbage("close_stream", sid, batcher)
    garbage("submit", sid, batcher)
    garbage("close_stream", sid, batcher)
    garbage("pending", sid, batcher)
    if i % 250 == 0:
        b = spare[-1]
        spare.append(fastcell.Batcher(pool, max_delay=0))
        if i % 500 == 0:
            made.append(b.submit(sid, ONE))
            garbage("close", sid, b)
        else:
            fut = b.submit(sid, ONE)
            made.append(fut)
            fut.add_done_callback(lambda f, b=b, sid=sid: close_from_the_worker(f, b, sid))
stop.set()
for th in threads:
    th.join()
gc.set_threshold(700, 10, 10)
gc.collect()
settle(list(made))


def ref(frames):
    state = model.new_state(1)
    return np.array([model.step(x, state) for x in frames])


for t in range(3):
    for s in range(S):
        r = np.array([f.result(timeout=60) for f in got[t][s]])
        assert len(r) > 0 and np.array_equal(r, ref(xs[t, s, :len(r)])), (t, s)
assert batcher.pending == 0, batcher.pending
sid = pool.open()
after = [batcher.submit(sid, x) for x in xs[0, 0, :20]]
assert np.array_equal(np.array([f.result(timeout=60) for f in after]), ref(xs[0, 0, :20]))
batcher.close()
for b in spare:
    b.close()
assert all(not b._thread.is_alive() for b in spare)
print("ok")
'''


@pytest.mark.parametrize("kind", ["del", "weakref"])
def test_finalizers_may_call_the_batcher(kind):
    try:
        r = subprocess.run([sys.executable, "-c", STORM, kind, "20000"], env=ENV,
                           capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hang: no end in {exc.timeout} s\n{exc.stdout}\n{exc.stderr}")
    assert r.returncode == 0 and r.stdout == "ok\n", (r.returncode, r.stdout, r.stderr)
    assert r.stderr == ""    # no finalizer raised ("Exception ignored in ..."), nothing logged


# Two batchers, each closed from a done-callback (or a finalizer) on the other's worker thread,
# both at once: were close() to wait for the worker there, each worker would wait for the other.
CROSS = r'''
import threading
import numpy as np
import fastcell

I, H = 3, 8
rng = np.random.default_rng(2)
k = 1 / np.sqrt(H)
u = lambda *s: rng.uniform(-k, k, s).astype(np.float32)
model = fastcell.GRUCell(u(3 * H, I), u(3 * H, H), u(3 * H), u(3 * H))
pools = [fastcell.StreamPool(model, 4) for _ in range(2)]
# A tick waits for two streams: the callbacks are added before the frames are stepped.
batchers = [fastcell.Batcher(p, max_batch=2, max_delay=3600) for p in pools]
both = threading.Barrier(2)
closed = []


def close_the_other(k):
    def callback(fut):
        both.wait(30)                 # both workers are in a callback
        batchers[1 - k].close()
        closed.append(k)
    return callback


futures = []
for k, pool in enumerate(pools):
    a, b = pool.open(), pool.open()
    futures.append(batchers[k].submit(a, np.ones(I, np.float32)))
    futures[-1].add_done_callback(close_the_other(k))
    futures.append(batchers[k].submit(b, np.ones(I, np.float32)))
for b in batchers:
    b.close()
assert sorted(closed) == [0, 1], closed
assert all(f.done() and f.exception() is None for f in futures)
assert all(not b._thread.is_alive() for b in batchers)
print("ok")
'''


def test_batchers_closed_from_each_others_worker():
    try:
        r = subprocess.run([sys.executable, "-c", CROSS], env=ENV, capture_output=True,
                           text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hang: no end in {exc.timeout} s\n{exc.stdout}\n{exc.stderr}")
    assert (r.returncode, r.stdout, r.stderr) == (0, "ok\n", "")


def test_close_while_threads_submit_leaves_no_future_pending(rng):
    """Each round, four threads submit while close() runs: a submit raises "closed", or its
    future resolves (stepped, or RuntimeError when it came after the worker's last look)."""
    model = make_model("gru", rng)
    pool = fastcell.StreamPool(model, 16)
    sids = [pool.open() for _ in range(4)]
    x = rng.standard_normal(I).astype(np.float32)
    errors = []
    with hang_guard(120):
        for _ in range(30):
            batcher = fastcell.Batcher(pool, max_delay=0, max_pending=None)
            futures, go = [[] for _ in range(4)], threading.Barrier(5)

            def producer(t):
                go.wait()
                while True:
                    try:
                        futures[t].append(batcher.submit(sids[t], x))
                    except RuntimeError as exc:
                        if str(exc) != "submit: the Batcher is closed":
                            errors.append(exc)
                        return

            threads = [threading.Thread(target=producer, args=(t,)) for t in range(4)]
            for th in threads:
                th.start()
            go.wait()
            time.sleep(0.002)
            batcher.close()
            for th in threads:
                th.join()
            for fs in futures:
                for f in fs:
                    try:
                        f.result(timeout=WAIT)   # TimeoutError fails the test: never resolved
                    except RuntimeError as exc:
                        assert str(exc) == ("submit: the Batcher was closed before this frame "
                                            "was stepped")
            assert batcher.pending == 0
    assert errors == []
    for sid in sids:     # every stream still open: no close came through by mistake
        assert pool.is_open(sid)


@pytest.mark.parametrize("raised", [SystemExit, KeyboardInterrupt])
def test_a_callback_that_raises_reaches_no_other_future(raised, rng, caplog):
    model, pool, proxy = recorded("lstm_2_layers", rng, 8)
    a, b, c, d, dead = (pool.open() for _ in range(5))
    xs = rng.standard_normal((4, I)).astype(np.float32)
    calls = []

    def bad_callback(fut):
        calls.append(fut)
        raise raised("from a done-callback")

    with caplog.at_level(logging.ERROR, logger="fastcell.batcher"), hang_guard(20), \
            fastcell.Batcher(proxy) as batcher:
        proxy.gate = threading.Event()
        first = batcher.submit(a, xs[0])
        assert proxy.entered.wait(WAIT)     # held: the next frames share the next tick
        fb, fc, fd = (batcher.submit(sid, xs[0]) for sid in (b, c, d))
        fdead = batcher.submit(dead, xs[0])
        pool.close(dead)
        for f in (fb, fdead, fd):
            f.add_done_callback(bad_callback)
        proxy.gate.set()
        assert np.array_equal(first.result(timeout=WAIT), reference(model, xs[:1])[0])
        for f in (fb, fc, fd):
            assert np.array_equal(f.result(timeout=WAIT), reference(model, xs[:1])[0])
        with pytest.raises(fastcell.StreamIdError):
            fdead.result(timeout=WAIT)
        # the worker lives on: a's next frame
        assert np.array_equal(batcher.submit(a, xs[1]).result(timeout=WAIT),
                              reference(model, xs[:2])[1])
        assert batcher._thread.is_alive()
    assert [b, c, d, dead] in proxy.steps and [b, c, d] in proxy.steps   # one tick, then without
    assert sorted(map(id, calls)) == sorted(map(id, (fb, fdead, fd)))
    logged = [r for r in caplog.records if "done-callback" in r.getMessage()]
    assert len(logged) == 3 and all(r.exc_info[0] is raised for r in logged)


def vm_rss():
    """This process's resident memory in bytes (its peak where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class Slowed(Recording):
    """The pool, each step 1 ms slower (and held at `gate` while it is set)."""

    def step(self, ids, x, out=None):
        time.sleep(0.001)
        return super().step(ids, x, out)


def test_producers_that_outrun_the_pool_are_refused(rng):
    """Four threads submit without waiting. While the pool is held, 200,000 attempts (about
    0.5 GB of frames and futures if they were all kept) must be refused past max_pending; then
    the pool runs, slowed, and they go on. pending never passes max_pending by more than the
    number of threads, memory stays bounded, and every accepted frame is stepped in order."""
    threads, streams, attempts = 4, 4, 50_000
    model = make_model("gru", rng)
    pool = fastcell.StreamPool(model, 16)
    proxy = Slowed(pool)
    proxy.gate = threading.Event()
    sids = [[pool.open() for _ in range(streams)] for _ in range(threads)]
    sent = [[[] for _ in range(streams)] for _ in range(threads)]
    futures = [[[] for _ in range(streams)] for _ in range(threads)]
    refused = [0] * threads
    most = [0] * (threads + 1)
    first_phase = threading.Barrier(threads + 1)
    done, errors = threading.Event(), []
    batcher = fastcell.Batcher(proxy, max_pending=64)

    def producer(t):
        try:
            r = np.random.default_rng(t)
            for phase in (attempts, 2_000):
                for a in range(phase):
                    s = a % streams
                    x = r.standard_normal(I).astype(np.float32)
                    try:
                        fut = batcher.submit(sids[t][s], x)
                    except fastcell.BatcherFullError as exc:
                        refused[t] += 1
                        assert exc.max_pending == 64 and exc.pending >= 64
                        continue
                    sent[t][s].append(x)
                    futures[t][s].append(fut)
                    most[t] = max(most[t], batcher.pending)
                if phase == attempts:
                    first_phase.wait()
        except BaseException as exc:
            errors.append(exc)
            first_phase.abort()
            proxy.gate.set()

    def watch():
        while not done.is_set():
            most[threads] = max(most[threads], batcher.pending)
            time.sleep(0.0002)

    with hang_guard(120):
        before = vm_rss()
        workers = [threading.Thread(target=producer, args=(t,)) for t in range(threads)]
        watcher = threading.Thread(target=watch)
        for th in workers + [watcher]:
            th.start()
        first_phase.wait()
        held = batcher.pending
        grown = vm_rss() - before
        proxy.gate.set()
        for th in workers:
            th.join()
        done.set()
        watcher.join()
        batcher.close()
    assert errors == []
    assert 64 <= held <= 64 + threads
    assert max(most) <= 64 + threads
    # while the pool was held, all but the room (and the frames its held tick took) were refused
    assert all(n >= attempts - (64 + 16 + threads) for n in refused)
    assert grown < 100 * 2 ** 20, grown
    for t in range(threads):
        for s in range(streams):
            assert np.array_equal(results(futures[t][s]), reference(model, sent[t][s]))
    assert batcher.pending == 0


def test_the_full_error_names_the_bound_and_closes_still_pass(rng):
    model, pool, proxy = recorded("lstm_cell", rng, 4)
    a, b = pool.open(), pool.open()
    xs = rng.standard_normal((4, I)).astype(np.float32)
    with hang_guard(20), fastcell.Batcher(proxy, max_pending=3) as batcher:
        proxy.gate = threading.Event()
        first = batcher.submit(a, xs[0])
        assert proxy.entered.wait(WAIT)          # the tick is held: the next frames wait
        waiting = [batcher.submit(a, x) for x in xs[1:]]
        assert batcher.pending == 3
        with pytest.raises(fastcell.BatcherFullError) as err:
            batcher.submit(b, xs[0])
        assert str(err.value) == (
            "submit: 3 frames are waiting to be stepped (max_pending=3): the producers outrun "
            "the pool; slow down, or drop frames (a real-time stream can skip one)")
        assert err.value.pending == 3 and err.value.max_pending == 3
        with pytest.raises(fastcell.BatcherFullError):
            asyncio.run(_submit_async(batcher, b, xs[0]))
        closing = batcher.close_stream(b)        # a close is never refused
        assert batcher.pending == 4
        proxy.gate.set()
        assert closing.result(timeout=WAIT) is None and not pool.is_open(b)
        assert np.array_equal(results([first] + waiting), reference(model, xs))
        assert batcher.pending == 0
        assert np.array_equal(batcher.submit(a, xs[0]).result(timeout=WAIT),
                              reference(model, np.concatenate([xs, xs[:1]]))[-1])
    assert fastcell.BatcherFullError is fastcell.serving.batcher.BatcherFullError
    assert issubclass(fastcell.BatcherFullError, RuntimeError)
    assert "BatcherFullError" in fastcell.__all__


async def _submit_async(batcher, sid, x):
    return await batcher.submit_async(sid, x)


def test_max_pending_arguments(rng):
    pool = fastcell.StreamPool(make_model("gru", rng), 8)
    for bad in (0, -1, 2.5, True, np.bool_(True), "10", float("inf")):
        with pytest.raises(ValueError, match=r"^max_pending: expected None or an integer >= 1, "):
            fastcell.Batcher(pool, max_pending=bad)

    class PoolLike:   # no capacity: the default bound is a fixed one
        input_size, output_size, dtype = pool.input_size, pool.output_size, pool.dtype
        step, close = pool.step, pool.close

    with fastcell.Batcher(PoolLike()) as b1, fastcell.Batcher(pool, max_pending=None) as b2, \
            fastcell.Batcher(pool, max_pending=np.int64(5)) as b3, fastcell.Batcher(pool) as b4:
        assert [b.max_pending for b in (b1, b2, b3, b4)] == [65536, None, 5, 32]
        assert "max_pending=32" in repr(b4)


def test_max_delay_beyond_timeout_max_is_refused(rng):
    """A wait the worker cannot sleep is refused when the Batcher is made (it used to fail every
    round of the worker, logging a traceback each time, and never step)."""
    pool = fastcell.StreamPool(make_model("gru", rng), 8)
    top = threading.TIMEOUT_MAX
    for bad in (1e10, top * 2, float("inf"), -1e-9, float("nan")):
        with pytest.raises(ValueError) as err:
            fastcell.Batcher(pool, max_delay=bad)
        assert str(err.value) == (f"max_delay: expected a number of seconds in [0, {top:g}] "
                                  f"(threading.TIMEOUT_MAX), got {bad!r}")


def test_the_longest_max_delay_works_and_close_ends_its_wait(rng, caplog):
    """max_delay = threading.TIMEOUT_MAX: the frame waits for company (no OverflowError, no
    traceback), and close() ends the wait and steps it."""
    model = make_model("lstm_cell", rng)
    pool = fastcell.StreamPool(model, 4)
    sid = pool.open()
    xs = rng.standard_normal((2, I)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="fastcell.batcher"), hang_guard(20):
        batcher = fastcell.Batcher(pool, max_delay=threading.TIMEOUT_MAX)
        futures = [batcher.submit(sid, x) for x in xs]
        assert batcher.pending == 2 and not futures[0].done()
        batcher.close()
    assert np.array_equal(results(futures), reference(model, xs))
    assert caplog.records == []


def test_a_failure_that_repeats_backs_off(rng, caplog):
    """A step that fails with a bug (a BaseException) at every tick while frames keep coming: each
    failure is logged and set on its tick's futures, and the worker pauses longer each time
    (0.01 s, doubling, up to 1 s), so it cannot spin nor flood the log. The count allowed grows
    with the time measured: a slower machine only fails fewer ticks. Once the bug is gone the
    batcher steps again."""
    model, pool, proxy = recorded("gru", rng, 8)
    sids = [pool.open() for _ in range(8)]
    x = rng.standard_normal(I).astype(np.float32)

    class Bug(BaseException):
        pass

    # max_pending: at most one tick's frames left when the loop ends
    with caplog.at_level(logging.ERROR, logger="fastcell.batcher"), hang_guard(60), \
            fastcell.Batcher(proxy, max_delay=0, max_pending=8) as batcher:
        proxy.raise_next = [Bug() for _ in range(10_000)]
        futures = []
        start = time.monotonic()
        while time.monotonic() - start < 0.3:
            for sid in sids:
                try:
                    futures.append(batcher.submit(sid, x))
                except fastcell.BatcherFullError:
                    pass
            time.sleep(0.0005)
        for f in futures:        # every frame fails: no step changed any state
            with pytest.raises(Bug):
                f.result(timeout=WAIT)
        elapsed = time.monotonic() - start
        failed = len(proxy.steps)
        # n failures are n - 1 pauses apart: 0.01 * (2^(n-1) - 1) seconds until the pauses reach
        # 1 s, then 1 s each; and a few pauses a racing submit's ring may cut short
        allowed = 1 + math.log2(elapsed / 0.01 + 1) + elapsed / 1.0 + 3
        assert 1 <= failed <= allowed, (failed, elapsed)
        del proxy.raise_next[:]
        y = batcher.submit(sids[0], x).result(timeout=WAIT)   # after at most a 1 s pause
        assert batcher._thread.is_alive()
    assert sum("a tick failed" in r.getMessage() for r in caplog.records) == failed
    assert np.array_equal(y, reference(model, [x])[0])      # the stream's first step


def _in_child(batcher, sid, model, x):
    """The forked child: the parent's batcher refuses, a new pool and Batcher work. Its status:
    0 when all holds; 1, after a traceback on stderr, when not."""
    status = 1
    try:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(30)        # a stuck child ends itself
        for name, call in [("submit", lambda: batcher.submit(sid, x[0])),
                           ("submit_async", lambda: batcher.submit_async(sid, x[0])),
                           ("close_stream", lambda: batcher.close_stream(sid))]:
            try:
                call()
            except RuntimeError as exc:
                want = (f"{name}: this Batcher belongs to process {os.getppid()}, and this is a "
                        f"process forked from it ({os.getpid()}), where its worker thread does not "
                        "exist; make a new Batcher in this process")
                assert str(exc) == want, (str(exc), want)
            else:
                raise AssertionError("the parent's batcher did not refuse")
        batcher.close()        # returns at once
        assert batcher.closed and batcher.pending == 0
        pool = fastcell.StreamPool(model, 4)
        sids = [pool.open() for _ in range(3)]
        with fastcell.Batcher(pool) as own:
            futures = [[own.submit(s, row) for row in x] for s in sids]
            for fs in futures:
                got = np.array([f.result(timeout=20) for f in fs])
                assert np.array_equal(got, reference(model, x))
        status = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(status)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
@pytest.mark.parametrize("when", ["idle", "mid-step"])
def test_a_forked_child_refuses_the_parents_batcher(when, rng):
    model, pool, proxy = recorded("gru", rng, 8)
    sid = pool.open()
    xs = rng.standard_normal((5, I)).astype(np.float32)
    with hang_guard(60), fastcell.Batcher(proxy) as batcher:
        futures = [batcher.submit(sid, xs[0])]
        futures[0].result(timeout=WAIT)
        if when == "mid-step":
            proxy.gate = threading.Event()
            futures.append(batcher.submit(sid, xs[1]))
            assert proxy.entered.wait(WAIT)       # the worker is in a tick, held
            futures.append(batcher.submit(sid, xs[2]))
        pid = os.fork()
        if pid == 0:
            _in_child(batcher, sid, model, xs)
        deadline = time.monotonic() + 50
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child did not end")
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(status) == 0
        # the parent's batcher is untouched
        if proxy.gate is not None:
            proxy.gate.set()
        futures.append(batcher.submit(sid, xs[len(futures)]))
        assert np.array_equal(results(futures), reference(model, xs[:len(futures)]))
