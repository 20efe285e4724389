"""StreamPool: many streams' states in one block, stepped by id in one GIL-free call.

The contract: each stream gets exactly the bits of its own StreamState (model.new_state(1)), for
every cell and layer type, dtype and weight format, whatever rows share its step, whatever the
number of threads; an id is valid from open() to close() only; a refused call changes nothing."""

import copy
import multiprocessing
import pickle
import threading

import numpy as np
import pytest

import fastcell
from conftest import VARIANTS, hang_guard, init_weights, make_cell


def cell_of(variant, I, H, dtype, rng):
    return make_cell(variant, init_weights(rng, VARIANTS[variant][0], I, H, dtype,
                                           peephole=variant == "peephole_lstm"))


def models(rng):
    """(name, model) over every cell type, layer stacks, projection, float64 and the reduced
    formats, at sizes that are not multiples of the vector width."""
    out = [(v, cell_of(v, 3, 17, np.float32, rng)) for v in VARIANTS]
    out += [
        ("lstm_1x1", cell_of("lstm", 1, 1, np.float32, rng)),
        ("gru_f64", cell_of("gru", 5, 3, np.float64, rng)),
        ("lstm_2layer_proj", fastcell.LSTM(4, 17, num_layers=2, proj_size=5)),
        ("gru_3layer", fastcell.GRU(3, 17, num_layers=3)),
        ("peephole_2layer", fastcell.PeepholeLSTM(3, 6, num_layers=2)),
        ("rnn_relu_2layer_f64", fastcell.RNN(2, 9, num_layers=2, nonlinearity="relu",
                                             dtype=np.float64)),
        ("lstm_int8", fastcell.quantize(cell_of("lstm", 17, 33, np.float32, rng), "int8")),
        ("gru_2layer_int8", fastcell.quantize(fastcell.GRU(3, 17, num_layers=2), "int8")),
        ("lstm_bf16", fastcell.quantize(cell_of("lstm", 3, 17, np.float32, rng), "bf16")),
        ("lstm_int8x8", fastcell.quantize(cell_of("lstm", 17, 33, np.float32, rng), "int8",
                                          input_bits=8)),
        ("gru_2layer_int8x8", fastcell.quantize(fastcell.GRU(3, 17, num_layers=2), "int8",
                                                input_bits=8)),
    ]
    return out


MODELS = models(np.random.default_rng(1234))


def states_equal(pool, sid, state):
    h, c = pool.get_state(sid)
    ok = np.array_equal(h, state.h[:, 0])
    if c is not None:
        ok = ok and np.array_equal(c, state.c[:, 0])
    return ok


def drive(model, pool, rng, ticks=12, streams=150, churn=True):
    """Random subsets in random order, with opens and closes between ticks and some non-zero
    starting states; every output and state checked against the stream's own StreamState."""
    I = pool.input_size
    live = {}                              # sid -> its StreamState
    for _ in range(streams):
        sid = pool.open()
        live[sid] = model.new_state(1)
    for sid in list(live)[:10]:            # non-zero initial states, through set_state
        h = rng.standard_normal(live[sid].h[:, 0].shape) * 0.5
        c = None if live[sid].c is None else rng.standard_normal(live[sid].c[:, 0].shape)
        pool.set_state(sid, h, c)
        live[sid].h[:, 0] = h
        if c is not None:
            live[sid].c[:, 0] = c
    for t in range(ticks):
        ids = np.array(list(live), np.int64)
        pick = rng.permutation(len(ids))[: rng.integers(1, len(ids) + 1)]
        x = rng.standard_normal((len(pick), I)).astype(pool.dtype)
        y = pool.step(ids[pick], x)
        for r, p in enumerate(pick):
            want = model.step(x[r], live[ids[p]])
            assert np.array_equal(y[r], want), f"tick {t}, row {r}"
        if churn:
            for sid in rng.choice(ids, 5, replace=False):
                pool.close(int(sid))
                del live[int(sid)]
            for _ in range(5):
                live[pool.open()] = model.new_state(1)
    for sid, state in live.items():
        assert states_equal(pool, sid, state)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("name, model", MODELS, ids=[m[0] for m in MODELS])
def test_pool_steps_equal_each_streams_own_state(name, model, threads, rng):
    pool = fastcell.StreamPool(model, 200, threads=threads)
    drive(model, pool, rng)


def test_large_hidden_size_and_many_rows(rng):
    """H = 257 (no multiple of any vector width) and steps of more rows than a chunk, over
    both threads."""
    model = cell_of("lstm", 17, 257, np.float32, rng)
    pool = fastcell.StreamPool(model, 400, threads=2)
    drive(model, pool, rng, ticks=3, streams=300, churn=False)


def test_long_run_stays_exact(rng):
    """Hundreds of steps of the same streams, in varying company: still the same bits."""
    model = fastcell.LSTM(3, 17, num_layers=2)
    pool = fastcell.StreamPool(model, 40, threads=2)
    ids = np.array([pool.open() for _ in range(40)])
    states = [model.new_state(1) for _ in ids]
    for _ in range(300):
        pick = rng.permutation(40)[: rng.integers(1, 41)]
        x = rng.standard_normal((len(pick), 3)).astype(np.float32)
        y = pool.step(ids[pick], x)
        for r, p in enumerate(pick):
            assert np.array_equal(y[r], model.step(x[r], states[p]))


def test_open_close_reset_and_len(rng):
    model = cell_of("gru", 3, 5, np.float32, rng)
    pool = fastcell.StreamPool(model, 3)
    assert len(pool) == 0 and pool.capacity == 3 and pool.threads == 1
    a, b, c = pool.open(), pool.open(), pool.open()
    assert len({a, b, c}) == 3 and len(pool) == 3
    assert sorted(pool.open_ids().tolist()) == sorted([a, b, c])
    with pytest.raises(fastcell.PoolFullError, match="all 3 streams are open"):
        pool.open()
    assert isinstance(fastcell.PoolFullError(), RuntimeError)
    pool.step([a, b], np.ones((2, 3), np.float32))
    assert np.any(pool.get_state(a)[0])
    pool.reset(a)
    assert not np.any(pool.get_state(a)[0]) and np.any(pool.get_state(b)[0])
    pool.close(b)
    assert len(pool) == 2 and not pool.is_open(b) and pool.is_open(a)
    d = pool.open()                       # b's slot, a new generation
    assert d != b and (d & 0xFFFFFFFF) == (b & 0xFFFFFFFF)
    assert not np.any(pool.get_state(d)[0]), "a reopened slot starts at zero"
    y = pool.step([d], np.ones((1, 3), np.float32))
    assert np.array_equal(y[0], model.step(np.ones(3, np.float32), model.new_state(1)))


def test_ids_are_refused_outside_open_to_close(rng):
    model = cell_of("lstm", 3, 5, np.float32, rng)
    pool = fastcell.StreamPool(model, 4)
    other = fastcell.StreamPool(model, 4)
    a, b = pool.open(), pool.open()
    foreign = other.open()
    pool.close(b)
    stale = b
    b2 = pool.open()                      # reuses the slot: the old id must not reach it
    x = np.ones((2, 3), np.float32)
    bad_ids = {
        "closed": stale,
        "never opened": (a & ~0xFFFFFFFF) | 3,
        "other pool": foreign,
        "negative": -1,
        "out of range": 2 ** 40 + 100,
    }
    for why, sid in bad_ids.items():
        with pytest.raises(fastcell.StreamIdError, match="not open in this pool") as e:
            pool.step([a, sid], x)
        assert e.value.sid == sid, why
        with pytest.raises(fastcell.StreamIdError, match="sid: stream"):
            pool.close(sid)
        for call in (pool.reset, pool.get_state):
            with pytest.raises(fastcell.StreamIdError):
                call(sid)
        with pytest.raises(fastcell.StreamIdError):
            pool.set_state(sid, np.zeros(5), np.zeros(5))
        assert not pool.is_open(sid)
    assert isinstance(fastcell.StreamIdError("m", 1), ValueError)
    with pytest.raises(fastcell.StreamIdError, match=r"ids\[1\]: .* 2 ids in all") as e:
        pool.step([a, stale, b2, foreign], np.ones((4, 3), np.float32))
    assert e.value.sid == stale and e.value.sids == (stale, foreign)
    with pytest.raises(fastcell.StreamIdError) as e:     # not open beats a duplicate
        pool.step([a, a, stale], np.ones((3, 3), np.float32))
    assert e.value.sids == (stale,)
    with pytest.raises(ValueError, match=r"appears twice \(ids\[0\] and ids\[2\]\)"):
        pool.step([a, b2, a], np.ones((3, 3), np.float32))
    with pytest.raises(TypeError, match="sid: expected a stream id"):
        pool.close(1.5)
    with pytest.raises(TypeError, match="sid: expected a stream id"):
        pool.close(True)
    assert pool.is_open(a) and pool.is_open(b2) and len(pool) == 2


def test_a_refused_step_changes_nothing(rng):
    model = fastcell.LSTM(3, 6, num_layers=2)
    pool = fastcell.StreamPool(model, 100, threads=2)
    ids = np.array([pool.open() for _ in range(100)])
    pool.step(ids, rng.standard_normal((100, 3)).astype(np.float32))
    before = [pool.get_state(s) for s in ids]
    x = rng.standard_normal((100, 3)).astype(np.float32)
    closed = ids[50]
    pool.close(int(closed))
    refused = [
        (ids, x, fastcell.StreamIdError),                               # one closed id, late
        (np.r_[ids[:50], ids[:1]], x[:51], ValueError),                 # a duplicate, last
        (ids[:10], x[:9], ValueError),                                  # x of the wrong length
        (ids[:10], x[:10, :2], ValueError),                             # x of the wrong width
    ]
    for bad_ids, bad_x, error in refused:
        with pytest.raises(error):
            pool.step(bad_ids, bad_x)
    with pytest.raises(ValueError, match="out"):
        pool.step(ids[:10], x[:10], out=np.empty((10, 5), np.float32))
    for k, s in enumerate(ids):
        if s != closed:
            h, c = pool.get_state(s)
            assert np.array_equal(h, before[k][0]) and np.array_equal(c, before[k][1])


def test_step_arguments(rng):
    model = cell_of("gru", 4, 4, np.float32, rng)
    pool = fastcell.StreamPool(model, 10)
    ids = [pool.open() for _ in range(3)]
    x = rng.standard_normal((3, 4)).astype(np.float32)
    ref = [model.new_state(1) for _ in ids]
    want = np.stack([model.step(x[i], ref[i]) for i in range(3)])
    # a list of ids, float64 x (converted) and out=
    out = np.empty((3, 4), np.float32)
    assert pool.step(ids, x.astype(np.float64), out=out) is out
    assert np.array_equal(out, want)
    # out may be x itself (each chunk reads its rows before writing them)
    x2 = rng.standard_normal((3, 4)).astype(np.float32)
    want2 = np.stack([model.step(x2[i], ref[i]) for i in range(3)])
    assert pool.step(ids, x2, out=x2) is x2 and np.array_equal(x2, want2)
    gru = fastcell.StreamPool(fastcell.GRU(3, 8), 200)    # out rows wider than x rows
    g_ids = [gru.open() for _ in range(150)]
    buf = np.zeros(150 * 8, np.float32)
    with pytest.raises(ValueError, match="out: overlaps x"):
        gru.step(g_ids, buf[:450].reshape(150, 3), out=buf.reshape(150, 8))
    big = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="out: overlaps x"):
        pool.step(ids, big[:3], out=big[1:])
    # no rows: nothing to do
    assert pool.step(np.empty(0, np.int64), np.empty((0, 4), np.float32)).shape == (0, 4)
    assert pool.step([], np.empty((0, 4))).shape == (0, 4)
    with pytest.raises(TypeError, match="ids: expected integer stream ids, got an array of dtype float64"):
        pool.step(np.array(ids, float), x)
    with pytest.raises(ValueError, match=r"ids: expected shape \(n,\)"):
        pool.step(np.array([ids]), x)
    with pytest.raises(TypeError, match="ids: expected an int64 array"):
        pool.step(None, x)
    with pytest.raises(ValueError, match=r"x: expected shape \(3, 4\) for 3 ids, got \(4,\)"):
        pool.step(ids, x[0])
    with pytest.raises(TypeError, match="x: expected real numbers"):
        pool.step(ids, np.array([["a"] * 4] * 3))
    with pytest.raises(TypeError, match="x: expected an array, got None"):
        pool.step(ids, None)
    with pytest.raises(ValueError, match="out: expected"):
        pool.step(ids, x, out=np.empty((3, 4), np.float64))
    with pytest.raises(ValueError, match="out: expected"):
        pool.step(ids, x, out=np.empty((3, 4), np.float32)[::-1])


def test_construction_errors(rng):
    cell = cell_of("lstm", 3, 5, np.float32, rng)
    for capacity in (0, -1):
        with pytest.raises(ValueError, match="capacity: expected an integer >= 1"):
            fastcell.StreamPool(cell, capacity)
    for capacity in (True, 2.0, None):
        with pytest.raises(TypeError, match="capacity: expected an integer"):
            fastcell.StreamPool(cell, capacity)
    with pytest.raises(ValueError, match="capacity: expected at most"):
        fastcell.StreamPool(cell, 2 ** 31)
    with pytest.raises(MemoryError, match="capacity"):
        fastcell.StreamPool(fastcell.LSTM(3, 500, num_layers=2), 2 ** 31 - 1)
    with pytest.raises(ValueError, match="threads: expected an integer >= 1"):
        fastcell.StreamPool(cell, 4, threads=0)
    with pytest.raises(TypeError, match="model: expected a fastcell model"):
        fastcell.StreamPool(object(), 4)
    with pytest.raises(ValueError, match="bidirectional layer needs the whole sequence"):
        fastcell.StreamPool(fastcell.GRU(3, 4, bidirectional=True), 4)
    with pytest.raises(ValueError, match="reverse"):
        fastcell.StreamPool(fastcell.GRU(3, 4, reverse=True), 4)


def test_state_access(rng):
    model = fastcell.LSTM(3, 7, num_layers=2, proj_size=4)
    pool = fastcell.StreamPool(model, 2)
    assert (pool.num_layers, pool.input_size, pool.hidden_size, pool.output_size) == (2, 3, 7, 4)
    sid = pool.open()
    h, c = pool.get_state(sid)
    assert h.shape == (2, 4) and c.shape == (2, 7) and not h.any() and not c.any()
    h[...] = 1                                  # a copy: the pool is untouched
    assert not pool.get_state(sid)[0].any()
    with pytest.raises(TypeError, match="c: expected the cell state"):
        pool.set_state(sid, np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"h: expected shape \(2, 4\), got \(4,\)"):
        pool.set_state(sid, np.zeros(4), np.zeros((2, 7)))
    with pytest.raises(TypeError, match="h: expected real numbers"):
        pool.set_state(sid, np.full((2, 4), "x"), np.zeros((2, 7)))
    gru = fastcell.StreamPool(fastcell.GRUCell(np.ones((6, 2)), np.ones((6, 2))), 1)
    g = gru.open()
    gru.set_state(g, [0.5, -0.5])               # (H,) for one layer
    assert np.array_equal(gru.get_state(g)[0], [[0.5, -0.5]]) and gru.get_state(g)[1] is None
    with pytest.raises(TypeError, match="c: this model has no cell state"):
        gru.set_state(g, [0.5, -0.5], [0.0, 0.0])


def test_pickling_and_copying_are_refused(rng):
    pool = fastcell.StreamPool(cell_of("gru", 3, 5, np.float32, rng), 2)
    for op in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match="StreamPool cannot be pickled"):
            op(pool)
    assert "capacity=2" in repr(pool)


def test_many_threads_open_step_and_close_at_once(rng):
    """Eight threads, each with its own streams that come and go, on one pool with two workers:
    every output is still its stream's own."""
    model = fastcell.GRU(5, 17, num_layers=2)
    pool = fastcell.StreamPool(model, 8 * 12, threads=2)
    errors = []

    def client(seed):
        try:
            r = np.random.default_rng(seed)
            mine = {pool.open(): model.new_state(1) for _ in range(12)}
            for t in range(40):
                ids = np.array(list(mine), np.int64)
                x = r.standard_normal((len(ids), 5)).astype(np.float32)
                y = pool.step(ids, x)
                for k, sid in enumerate(ids):
                    assert np.array_equal(y[k], model.step(x[k], mine[int(sid)]))
                if t % 5 == 0:
                    old = int(ids[r.integers(len(ids))])
                    pool.close(old)
                    del mine[old]
                    mine[pool.open()] = model.new_state(1)
        except Exception as exc:  # reported below, with the thread's seed
            errors.append((seed, exc))

    with hang_guard(120):
        threads = [threading.Thread(target=client, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert len(pool) == 8 * 12


def test_a_forked_child_steps_without_the_workers(rng):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    model = cell_of("lstm", 3, 17, np.float32, rng)
    pool = fastcell.StreamPool(model, 64, threads=2)
    ids = np.array([pool.open() for _ in range(64)])
    x = rng.standard_normal((64, 3)).astype(np.float32)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()

    def child():
        out.put(pool.step(ids, x))

    with hang_guard(60):
        p = ctx.Process(target=child)
        p.start()
        got = out.get(timeout=50)
        p.join(10)
    assert p.exitcode == 0
    assert np.array_equal(got, pool.step(ids, x))
