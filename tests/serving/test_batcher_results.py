"""The compiled Batcher's results (issue 20): light futures instead of concurrent.futures.Future,
a whole batch in one submit_many, asyncio futures resolved by one loop callback per tick, and a
backlog of many frames per stream served in submit order, one frame a stream a tick.

Every output equals, bit for bit, the stream's own model.new_state(1) stepped with the same
frames (test_batcher.py's reference).
"""

import asyncio
import gc
import threading
from concurrent.futures import CancelledError

import numpy as np
import pytest

import fastcell
from conftest import hang_guard
from test_batcher import I, WAIT, make_model, recorded, reference


def test_a_frame_result_is_a_light_future(rng):
    model, pool, proxy = recorded("gru", rng, 4)
    a, b = pool.open(), pool.open()
    xs = rng.standard_normal((3, I)).astype(np.float32)
    with hang_guard(20), fastcell.Batcher(proxy) as batcher:
        proxy.gate = threading.Event()
        first = batcher.submit(a, xs[0])
        assert proxy.entered.wait(WAIT)           # the first tick is held in pool.step
        held = batcher.submit(a, xs[1])
        dropped = batcher.submit(b, xs[2])
        assert isinstance(held, fastcell.FrameResult) and not held.done()
        with pytest.raises(TimeoutError, match="not done within"):
            held.result(timeout=0.01)
        seen = []
        held.add_done_callback(seen.append)
        assert dropped.cancel() and dropped.cancelled() and dropped.done()
        with pytest.raises(CancelledError):
            dropped.result()
        assert not first.cancel()                 # taken by the tick: too late
        proxy.gate.set()
        y0, y1 = first.result(timeout=WAIT), held.result(timeout=WAIT)
        assert held.exception() is None and seen == [held]
        late = []
        held.add_done_callback(late.append)       # already done: called at once
        assert late == [held]
    assert np.array_equal(np.stack([y0, y1]), reference(model, xs[:2]))
    assert all(b not in ids for ids in proxy.steps)   # the cancelled frame was never stepped
    y0[:] = 0                                         # each result is the caller's own array
    assert not np.array_equal(y1, 0) and y0.flags.owndata


def test_result_inside_a_done_callback_refuses_to_wait_for_itself(rng):
    model = make_model("lstm_cell", rng)
    pool = fastcell.StreamPool(model, 4)
    a = pool.open()
    errors = []
    with hang_guard(20), fastcell.Batcher(pool, max_delay=0.05) as batcher:
        later = [None]

        def wait_on_later(res):
            try:
                later[0].result()
            except RuntimeError as exc:
                errors.append(str(exc))

        res = batcher.submit(a, np.zeros(I, np.float32))
        later[0] = batcher.submit(a, np.ones(I, np.float32))   # the next tick's
        res.add_done_callback(wait_on_later)
        later[0].result(timeout=WAIT)
    assert errors and "worker thread" in errors[0]


@pytest.mark.parametrize("kind", ["lstm_cell", "lstm_2_layers"])
def test_submit_many_gives_each_stream_its_own_bits(kind, rng):
    model = make_model(kind, rng)
    pool = fastcell.StreamPool(model, 32)
    sids = np.array([pool.open() for _ in range(20)])
    xs = rng.standard_normal((4, 20, I)).astype(np.float32)
    with hang_guard(20), fastcell.Batcher(pool, max_batch=7) as batcher:   # several ticks a batch
        outs = [batcher.submit_many(sids, x) for x in xs]
        got = np.stack([r.result(timeout=WAIT) for r in outs])
        assert isinstance(outs[0], fastcell.BatchResult)
        empty = batcher.submit_many(np.empty(0, np.int64), np.empty((0, I), np.float32))
        assert empty.done() and empty.result().shape == (0, pool.output_size)
    for j in range(20):
        assert np.array_equal(got[:, j], reference(model, xs[:, j])), j


def test_submit_many_refuses_bad_batches_before_queueing_anything(rng):
    model = make_model("gru", rng)
    pool = fastcell.StreamPool(model, 8)
    a, b = pool.open(), pool.open()
    with fastcell.Batcher(pool) as batcher:
        with pytest.raises(ValueError, match="sids: a stream appears twice"):
            batcher.submit_many([a, a], np.zeros((2, I), np.float32))
        with pytest.raises(ValueError, match=r"frames: expected shape \(2, 3\) for 2 sids"):
            batcher.submit_many([a, b], np.zeros((2, I + 1), np.float32))
        with pytest.raises(TypeError, match="sids: expected a 1-d array of int stream ids"):
            batcher.submit_many([[a, b]], np.zeros((2, I), np.float32))
        with pytest.raises(TypeError, match="sids"):
            batcher.submit_many([0.5, 1.5], np.zeros((2, I), np.float32))
        assert batcher.pending == 0


def test_a_closed_stream_fails_its_batch_and_no_other_stream(rng):
    model = make_model("lstm_cell", rng)
    pool = fastcell.StreamPool(model, 8)
    a, b, c = pool.open(), pool.open(), pool.open()
    pool.close(b)
    xs = rng.standard_normal((3, I)).astype(np.float32)
    with hang_guard(20), fastcell.Batcher(pool) as batcher:
        res = batcher.submit_many([a, b, c], xs)
        with pytest.raises(fastcell.StreamIdError) as err:
            res.result(timeout=WAIT)
        assert err.value.sid == b
        alone = batcher.submit(c, xs[0]).result(timeout=WAIT)
    want_a, want_c = reference(model, xs[:1]), reference(model, [xs[2], xs[0]])
    assert np.array_equal(res.outputs[0], want_a[0]) and np.isnan(res.outputs[1]).all()
    assert np.array_equal(res.outputs[2], want_c[0]) and np.array_equal(alone, want_c[1])


def test_async_results_come_once_per_tick_per_loop(rng):
    """Every asyncio future of a tick is set by ONE call_soon_threadsafe on its loop."""
    model = make_model("gru", rng)
    pool = fastcell.StreamPool(model, 64)
    sids = [pool.open() for _ in range(50)]
    xs = rng.standard_normal((3, 50, I)).astype(np.float32)
    calls = []

    class Counting(asyncio.SelectorEventLoop):
        def call_soon_threadsafe(self, callback, *args, **kw):
            calls.append(callback)
            return super().call_soon_threadsafe(callback, *args, **kw)

    loop = Counting()
    with hang_guard(30), fastcell.Batcher(pool, max_batch=50, max_delay=3600) as batcher:
        async def main():
            got = []
            for x in xs:
                got.append(await asyncio.gather(*[batcher.submit_async(s, f)
                                                  for s, f in zip(sids, x)]))
            return got
        try:
            got = np.array(loop.run_until_complete(main()))
        finally:
            loop.close()
    assert len([c for c in calls if getattr(c, "__name__", "") == "_resolve_async"]) == 3
    for j in range(50):
        assert np.array_equal(got[:, j], reference(model, xs[:, j])), j


def test_a_cancelled_await_drops_its_frame(rng):
    model, pool, proxy = recorded("gru", rng, 4)
    a, b = pool.open(), pool.open()
    xs = rng.standard_normal((2, I)).astype(np.float32)

    async def main(batcher):
        proxy.gate = threading.Event()
        first = batcher.submit_async(a, xs[0])
        await asyncio.get_running_loop().run_in_executor(None, proxy.entered.wait, WAIT)
        doomed = batcher.submit_async(b, xs[1])
        doomed.cancel()
        await asyncio.sleep(0)                  # its done-callback marks the frame dropped
        proxy.gate.set()
        return await first

    with hang_guard(20), fastcell.Batcher(proxy) as batcher:
        y = asyncio.run(main(batcher))
        batcher.submit(a, xs[1]).result(timeout=WAIT)      # one more tick after the drop
    assert np.array_equal(y, reference(model, xs[:1])[0])
    assert all(b not in ids for ids in proxy.steps)


def test_a_backlog_is_served_in_submit_order_one_frame_a_stream_a_tick(rng):
    """Streams with hundreds of frames waiting each (a producer faster than the pool): every
    tick takes one frame of each waiting stream, a stream that keeps frames goes behind the
    others, and each stream's outputs are its own state's."""
    model, pool, proxy = recorded("lstm_cell", rng, 8)
    sids = [pool.open() for _ in range(5)]
    xs = rng.standard_normal((5, 300, I)).astype(np.float32)
    with hang_guard(60), fastcell.Batcher(proxy, max_batch=3, max_delay=0) as batcher:
        proxy.gate = threading.Event()
        first = batcher.submit(sids[0], xs[0, 0])
        assert proxy.entered.wait(WAIT)
        res = [[batcher.submit(s, xs[j, t]) for t in range(1 if j == 0 else 0, 300)]
               for j, s in enumerate(sids)]
        proxy.gate.set()
        got = [[first.result(timeout=WAIT)] + [r.result(timeout=WAIT) for r in res[0]]]
        got += [[r.result(timeout=WAIT) for r in res[j]] for j in range(1, 5)]
    for j in range(5):
        assert np.array_equal(np.array(got[j]), reference(model, xs[j])), j
    assert all(len(ids) == len(set(ids)) <= 3 for ids in proxy.steps)
    # fair: no stream waits more than two ticks behind while others are served
    for j, s in enumerate(sids):
        ticks = [i for i, ids in enumerate(proxy.steps) if s in ids]
        assert max(np.diff(ticks)) <= 2, j


def test_a_finalizer_that_submits_mid_submit_is_served(rng):
    """A garbage collection run by a submit's allocation may run a finalizer that submits: both
    are queued whole, and each stream gets its own state's bits, frame after frame."""
    model = make_model("gru", rng)
    pool = fastcell.StreamPool(model, 40)
    sids = [pool.open() for _ in range(40)]
    x = rng.standard_normal(I).astype(np.float32)
    out = []
    with hang_guard(60), fastcell.Batcher(pool, max_delay=0, max_pending=None) as batcher:
        class Cyclic:
            def __init__(self, sid):
                self.sid, self.me = sid, self

            def __del__(self):
                out.append((self.sid, batcher.submit(self.sid, x)))

        gc.collect()
        old = gc.get_threshold()
        gc.set_threshold(10)
        try:
            for i in range(600):
                Cyclic(sids[i % 20])                    # garbage, collected during submits
                s = sids[20 + i % 20]
                out.append((s, batcher.submit(s, x)))
        finally:
            gc.set_threshold(*old)
        gc.collect()
        got = {}
        for s, r in out:
            got.setdefault(s, []).append(r.result(timeout=WAIT))
    assert sum(len(v) for v in got.values()) == len(out) and len(got) == 40
    for s, ys in got.items():
        assert np.array_equal(np.array(ys), reference(model, [x] * len(ys))), s
