"""fastcell.Batcher: frames of many streams stepped together, one pool.step per tick.

Every output must equal, bit for bit, the same frames stepped through the stream's own
model.new_state(1); a pool proxy records what each tick stepped.
"""

import asyncio
import logging
import threading

import numpy as np
import pytest

import fastcell
from conftest import hang_guard, init_weights

I, H = 3, 17
WAIT = 10  # seconds any future may take before the test fails (never reached when all is well)


def make_model(kind, rng):
    k = 1 / np.sqrt(H)
    if kind == "lstm_cell":
        return fastcell.LSTMCell(**init_weights(rng, 4, I, H, np.float32))
    model = fastcell.GRU(I, H) if kind == "gru" else fastcell.LSTM(I, H, num_layers=2)
    model.load_state_dict({n: rng.uniform(-k, k, s).astype(np.float32)
                           for n, s in model.expected_shapes().items()})
    return model


def reference(model, frames):
    """The frames of one stream stepped through a state of its own: (T, H_out)."""
    state = model.new_state(1)
    return np.array([model.step(np.asarray(f, np.float32).reshape(I), state) for f in frames])


class Recording:
    """The pool, with the ids of every step recorded; step waits for `gate` when one is set and
    raises the next exception of `raise_next` instead of stepping."""

    def __init__(self, pool):
        self.pool = pool
        self.input_size, self.output_size, self.dtype = pool.input_size, pool.output_size, pool.dtype
        self.steps, self.gate, self.raise_next, self.entered = [], None, [], threading.Event()

    def step(self, ids, x, out=None):
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(WAIT)
        self.steps.append(list(ids))
        if self.raise_next:
            raise self.raise_next.pop(0)
        return self.pool.step(ids, x, out)

    def close(self, sid):
        return self.pool.close(sid)


def recorded(kind, rng, capacity):
    """A model of `kind`, a StreamPool of `capacity` streams for it, and a Recording proxy of the
    pool."""
    model = make_model(kind, rng)
    pool = fastcell.StreamPool(model, capacity)
    return model, pool, Recording(pool)


def results(futures):
    return np.array([f.result(timeout=WAIT) for f in futures])


@pytest.mark.parametrize("kind", ["lstm_cell", "gru", "lstm_2_layers"])
def test_outputs_equal_each_stream_stepped_alone(kind, rng):
    model = make_model(kind, rng)
    pool = fastcell.StreamPool(model, 16)
    sids = [pool.open() for _ in range(12)]
    xs = rng.standard_normal((12, 25, I)).astype(np.float32)
    # 300 frames at once: past the default max_pending (4 * capacity), so no bound here
    with hang_guard(20), fastcell.Batcher(pool, max_pending=None) as batcher:
        futures = [[batcher.submit(sid, x) for x in xs[k]] for k, sid in enumerate(sids)]
        for k in range(12):
            got = results(futures[k])
            assert got.shape == (25, H) and got.dtype == np.float32
            assert np.array_equal(got, reference(model, xs[k]))


def test_many_threads_submitting_at_once(rng):
    model = make_model("lstm_cell", rng)
    threads, streams, frames = 8, 30, 20
    pool = fastcell.StreamPool(model, threads * streams)
    sids = [[pool.open() for _ in range(streams)] for _ in range(threads)]
    xs = rng.standard_normal((threads, streams, frames, I)).astype(np.float32)
    futures = [[[] for _ in range(streams)] for _ in range(threads)]
    barrier = threading.Barrier(threads)

    def worker(t):
        barrier.wait()
        for f in range(frames):           # each stream's frames in order, streams interleaved
            for s in range(streams):
                futures[t][s].append(batcher.submit(sids[t][s], xs[t, s, f]))

    with hang_guard(30), fastcell.Batcher(pool, max_pending=None) as batcher:
        pool_threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for th in pool_threads:
            th.start()
        for th in pool_threads:
            th.join()
        for t in range(threads):
            for s in range(streams):
                assert np.array_equal(results(futures[t][s]), reference(model, xs[t, s]))


def test_a_stream_is_stepped_in_order_never_twice_in_a_tick(rng):
    model, pool, proxy = recorded("gru", rng, 8)
    fast, *others = [pool.open() for _ in range(4)]
    xs = rng.standard_normal((60, I)).astype(np.float32)
    ys = rng.standard_normal((3, 5, I)).astype(np.float32)
    with hang_guard(20), fastcell.Batcher(proxy, max_delay=0) as batcher:
        futures = [batcher.submit(fast, x) for x in xs]
        other = [[batcher.submit(sid, y) for y in ys[k]] for k, sid in enumerate(others)]
        assert np.array_equal(results(futures), reference(model, xs))
        for k in range(3):
            assert np.array_equal(results(other[k]), reference(model, ys[k]))
    assert all(len(set(ids)) == len(ids) for ids in proxy.steps)
    assert sum(fast in ids for ids in proxy.steps) == 60


def test_max_batch_is_respected(rng):
    model, pool, proxy = recorded("lstm_cell", rng, 16)
    sids = [pool.open() for _ in range(10)]
    xs = rng.standard_normal((10, 6, I)).astype(np.float32)
    with hang_guard(20), fastcell.Batcher(proxy, max_batch=4, max_delay=0.05) as batcher:
        futures = [[batcher.submit(sid, x) for x in xs[k]] for k, sid in enumerate(sids)]
        for k in range(10):
            assert np.array_equal(results(futures[k]), reference(model, xs[k]))
    assert max(len(ids) for ids in proxy.steps) == 4
    assert sum(len(ids) for ids in proxy.steps) == 60


def test_closed_streams_fail_alone(rng):
    """Two streams closed under a waiting tick: one refused step names both (StreamIdError.sids),
    they fail, and the others are stepped without them."""
    model, pool, proxy = recorded("lstm_2_layers", rng, 8)
    a, b, c, d = (pool.open() for _ in range(4))
    xs = rng.standard_normal((4, 4, I)).astype(np.float32)
    with hang_guard(20), fastcell.Batcher(proxy) as batcher:
        proxy.gate = threading.Event()
        first = batcher.submit(a, xs[0, 0])
        assert proxy.entered.wait(WAIT)   # the first tick waits at the gate: the rest queue up
        fa = [batcher.submit(a, x) for x in xs[0, 1:]]
        fb = [batcher.submit(b, x) for x in xs[1]]
        fc = [batcher.submit(c, x) for x in xs[2]]
        fd = [batcher.submit(d, x) for x in xs[3]]
        pool.close(b)
        pool.close(d)
        proxy.gate.set()
        assert np.array_equal(results([first] + fa), reference(model, xs[0]))
        assert np.array_equal(results(fc), reference(model, xs[2]))
        for sid, futs in ((b, fb), (d, fd)):
            for f in futs:
                with pytest.raises(fastcell.StreamIdError) as err:
                    f.result(timeout=WAIT)
                assert err.value.sid == b and err.value.sids == (b, d)
    assert [a, b, c, d] in proxy.steps and [a, c] in proxy.steps   # refused once, then without
    assert sum(b in ids or d in ids for ids in proxy.steps) == 1    # their later frames never tried


def test_bad_frames_and_ids_are_refused_at_submit(rng):
    model, pool, proxy = recorded("gru", rng, 4)
    sid = pool.open()
    with hang_guard(20), fastcell.Batcher(proxy) as batcher:
        for frame, error, fragment in [
            (np.zeros(I + 1), ValueError, f"expected shape ({I},) or (1, {I}), got ({I + 1},)"),
            (np.zeros((2, I)), ValueError, "got (2, 3)"),
            (np.float32(1), ValueError, "got ()"),
            (None, TypeError, "expected an array, got None"),
            (["a", "b", "c"], TypeError, "real numbers"),
            (np.zeros(I, complex), TypeError, "complex"),
            ([[1, 2], [3]], TypeError, "real array"),
        ]:
            with pytest.raises(error, match="^frame: ") as err:
                batcher.submit(sid, frame)
            assert fragment in str(err.value)
        for bad, error in [(1.0, TypeError), ("0", TypeError), (True, TypeError), (2 ** 64, ValueError)]:
            with pytest.raises(error, match="^sid: "):
                batcher.submit(bad, np.zeros(I, np.float32))
        assert batcher.pending == 0 and proxy.steps == []
        # What may be converted is: (1, I), integers, float64, a list, an np.int64 id.
        frames = [np.ones((1, I)), np.arange(I), [0.5] * I, np.full(I, 2, np.float32)]
        got = results([batcher.submit(np.int64(sid), f) for f in frames])
    assert np.array_equal(got, reference(model, frames))


def test_the_frame_is_copied_at_submit(rng):
    model, pool, proxy = recorded("lstm_cell", rng, 4)
    sid = pool.open()
    xs = rng.standard_normal((2, I)).astype(np.float32)
    with hang_guard(20), fastcell.Batcher(proxy) as batcher:
        proxy.gate = threading.Event()
        buf = xs[0].copy()
        f0 = batcher.submit(sid, buf)
        buf[:] = xs[1]          # the caller reuses its buffer before the tick ran
        f1 = batcher.submit(sid, buf)
        buf[:] = 0
        proxy.gate.set()
        got = results([f0, f1])
    assert np.array_equal(got, reference(model, xs))
    assert all(f.result().flags.owndata for f in (f0, f1))   # each row is the caller's own


def test_close_drains_refuses_and_is_idempotent(rng):
    model = make_model("lstm_cell", rng)
    pool = fastcell.StreamPool(model, 8)
    sids = [pool.open() for _ in range(5)]
    xs = rng.standard_normal((5, 10, I)).astype(np.float32)
    # Only close() starts the ticks; 50 frames are past the default max_pending (4 * capacity).
    batcher = fastcell.Batcher(pool, max_delay=3600, max_pending=None)
    futures = [[batcher.submit(sid, x) for x in xs[k]] for k, sid in enumerate(sids)]
    assert batcher.pending == 50
    with hang_guard(20):
        batcher.close()
    assert all(f.done() for fs in futures for f in fs) and batcher.pending == 0
    for k in range(5):
        assert np.array_equal(results(futures[k]), reference(model, xs[k]))
    assert batcher.closed and not batcher._thread.is_alive()
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(sids[0], xs[0, 0])
    with pytest.raises(RuntimeError, match="closed"):
        batcher.close_stream(sids[0])
    with fastcell.Batcher(pool) as b:
        pass
    assert b.closed


def test_errors_of_a_tick_reach_its_futures_and_the_worker_lives_on(rng, caplog):
    model, pool, proxy = recorded("gru", rng, 4)
    a, b = pool.open(), pool.open()
    xs = rng.standard_normal((3, I)).astype(np.float32)

    class Bug(BaseException):   # not an Exception: it escapes the step's handler, as a bug would
        pass

    with hang_guard(20), fastcell.Batcher(proxy) as batcher:
        proxy.raise_next = [RuntimeError("boom")]
        with pytest.raises(RuntimeError, match="boom"):
            batcher.submit(a, xs[0]).result(timeout=WAIT)
        assert np.array_equal(batcher.submit(b, xs[0]).result(timeout=WAIT), reference(model, xs[:1])[0])
        proxy.raise_next = [Bug()]
        with caplog.at_level(logging.ERROR, logger="fastcell.batcher"):
            with pytest.raises(Bug):
                batcher.submit(a, xs[1]).result(timeout=WAIT)
        assert "a tick failed" in caplog.text
        assert batcher._thread.is_alive()
        # the failed steps changed no state: a's stream starts at its first frame still
        assert np.array_equal(batcher.submit(a, xs[2]).result(timeout=WAIT), reference(model, xs[2:])[0])


def test_a_cancelled_frame_is_never_stepped(rng):
    model, pool, proxy = recorded("lstm_cell", rng, 4)
    sid = pool.open()
    xs = rng.standard_normal((3, I)).astype(np.float32)
    with hang_guard(20), fastcell.Batcher(proxy) as batcher:
        proxy.gate = threading.Event()
        f0 = batcher.submit(sid, xs[0])
        assert proxy.entered.wait(WAIT)
        f1, f2 = batcher.submit(sid, xs[1]), batcher.submit(sid, xs[2])
        assert f1.cancel()
        proxy.gate.set()
        assert np.array_equal(results([f0, f2]), reference(model, xs[[0, 2]]))
    assert f1.cancelled() and len(proxy.steps) == 2


def test_close_stream_after_its_frames(rng):
    model = make_model("gru", rng)
    pool = fastcell.StreamPool(model, 4)
    a, b = pool.open(), pool.open()
    xs = rng.standard_normal((6, I)).astype(np.float32)
    with hang_guard(20), fastcell.Batcher(pool) as batcher:
        futures = [batcher.submit(a, x) for x in xs]
        closing = batcher.close_stream(a)
        late = batcher.submit(a, xs[0])
        assert closing.result(timeout=WAIT) is None
        assert np.array_equal(results(futures), reference(model, xs))
        assert not pool.is_open(a) and len(pool) == 1
        with pytest.raises(fastcell.StreamIdError):
            late.result(timeout=WAIT)
        with pytest.raises(fastcell.StreamIdError):
            batcher.close_stream(a).result(timeout=WAIT)
        batcher.close_stream(b)
    assert len(pool) == 0


def test_submit_async(rng):
    model = make_model("lstm_2_layers", rng)
    pool = fastcell.StreamPool(model, 8)
    sids = [pool.open() for _ in range(6)]
    xs = rng.standard_normal((6, 8, I)).astype(np.float32)

    async def client(batcher, k):
        return [await batcher.submit_async(sids[k], x) for x in xs[k]]

    async def main(batcher):
        with pytest.raises(ValueError, match="^frame: "):
            await batcher.submit_async(sids[0], np.zeros(I + 2))
        return await asyncio.wait_for(asyncio.gather(*(client(batcher, k) for k in range(6))), WAIT)

    with hang_guard(20), fastcell.Batcher(pool) as batcher:
        got = asyncio.run(main(batcher))
    for k in range(6):
        assert np.array_equal(np.array(got[k]), reference(model, xs[k]))


def test_constructor_arguments_are_checked(rng):
    pool = fastcell.StreamPool(make_model("gru", rng), 2)
    with pytest.raises(TypeError, match="^pool: expected a fastcell.StreamPool, got object"):
        fastcell.Batcher(object())
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="^max_batch: "):
            fastcell.Batcher(pool, max_batch=bad)
    for bad in (-0.001, float("nan"), float("inf"), "1", None):
        with pytest.raises(ValueError, match="^max_delay: "):
            fastcell.Batcher(pool, max_delay=bad)
    with fastcell.Batcher(pool, max_batch=np.int64(3), max_delay=0) as batcher:
        assert batcher.max_batch == 3 and batcher.max_delay == 0.0 and "pending=0" in repr(batcher)
