"""Hot reload: load_state_dict while other threads call the layer. Every call computes with one
weight set, the old or the new, for all its layers and directions: never a mix."""

import threading

import numpy as np
import pytest

import fastcell
from conftest import hang_guard

I, H, T, B = 6, 19, 12, 2


@pytest.mark.parametrize("make", [
    lambda: fastcell.LSTM(I, H, num_layers=3),
    lambda: fastcell.GRU(I, H, num_layers=2, bidirectional=True),
], ids=["lstm-3-layers", "gru-bidirectional"])
def test_calls_during_reloads_see_one_weight_set(make):
    rng = np.random.default_rng(11)
    layer = make()
    sets = [{n: rng.uniform(-0.5, 0.5, v.shape).astype(np.float32)
             for n, v in layer.state_dict().items()} for _ in range(2)]
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    expected = []
    for w in sets:
        ref = make()
        ref.load_state_dict(w)
        expected.append(ref(x)[0])
    assert not np.array_equal(*expected)
    layer.load_state_dict(sets[0])
    stop = threading.Event()
    mixed, calls, errors = [], [0] * 8, []

    def caller(k):
        try:
            while not stop.is_set():
                y = layer(x)[0]
                calls[k] += 1
                if not any(np.array_equal(y, e) for e in expected):
                    mixed.append(y)
        except Exception as exc:   # pragma: no cover - reported below
            errors.append(exc)

    def reloader():
        for i in range(300):
            layer.load_state_dict(sets[i % 2])
        stop.set()

    with hang_guard(120):
        threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
        threads.append(threading.Thread(target=reloader))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and not mixed, f"{len(mixed)} of {sum(calls)} calls mixed the weight sets"
    assert sum(calls) > 0


def test_steps_during_reloads_see_one_weight_set():
    rng = np.random.default_rng(12)
    layer = fastcell.LSTM(I, H, num_layers=3)
    sets = [{n: rng.uniform(-0.5, 0.5, v.shape).astype(np.float32)
             for n, v in layer.state_dict().items()} for _ in range(2)]
    x = rng.standard_normal((B, I)).astype(np.float32)
    expected = []
    for w in sets:
        ref = fastcell.LSTM(I, H, num_layers=3)
        ref.load_state_dict(w)
        expected.append(ref.step(x, ref.new_state(B)))
    layer.load_state_dict(sets[0])
    stop = threading.Event()
    mixed = []

    def caller():
        out = np.empty((B, H), np.float32)
        while not stop.is_set():
            state = layer.new_state(B)       # a fresh state: the step's output is set-specific
            layer.step(x, state, out)
            if not any(np.array_equal(out, e) for e in expected):
                mixed.append(out.copy())

    with hang_guard(120):
        threads = [threading.Thread(target=caller) for _ in range(4)]
        for t in threads:
            t.start()
        for i in range(300):
            layer.load_state_dict(sets[i % 2])
        stop.set()
        for t in threads:
            t.join()
    assert not mixed


def test_a_pool_reloads_between_steps_and_keeps_its_streams():
    rng = np.random.default_rng(13)
    layer = fastcell.LSTM(I, H, num_layers=2)
    new = {n: rng.uniform(-0.5, 0.5, v.shape).astype(np.float32)
           for n, v in layer.state_dict().items()}
    pool = fastcell.StreamPool(layer, 8)
    sid = pool.open()
    state = layer.new_state()
    xs = rng.standard_normal((6, 1, I)).astype(np.float32)
    for t in range(3):
        assert np.array_equal(pool.step(np.array([sid]), xs[t]), layer.step(xs[t], state))
    layer.load_state_dict(new)          # the pool still serves the weights it was made with
    pool.reload(layer)                  # now the new ones, from its streams' current states
    for t in range(3, 6):
        assert np.array_equal(pool.step(np.array([sid]), xs[t]), layer.step(xs[t], state))
    with pytest.raises(ValueError, match="model: expected a model of this pool's architecture"):
        pool.reload(fastcell.LSTM(I, H + 1, num_layers=2))
    with pytest.raises(ValueError, match="architecture"):
        pool.reload(fastcell.quantize(layer, "int8"))
    with pytest.raises(TypeError, match="model: expected a fastcell model"):
        pool.reload("layer")


def test_reload_between_input_bits(rng):
    # An int8 pool may move between 16- and 8-bit inputs (the state is the same; only how x is
    # rounded changes): from the reload on, each stream steps as the new model's StreamState
    # from the state it had.
    I = 6
    base = fastcell.LSTM(I, 17, num_layers=2)
    q16, q8 = fastcell.quantize(base, "int8"), fastcell.quantize(base, "int8", input_bits=8)
    pool = fastcell.StreamPool(q16, 4)
    sid = pool.open()
    xs = rng.standard_normal((6, 1, I)).astype(np.float32)
    state = q16.new_state()
    for t in range(3):
        assert np.array_equal(pool.step(np.array([sid]), xs[t]), q16.step(xs[t], state))
    pool.reload(q8)
    assert pool.model.input_bits == 8
    state8 = q8.new_state()
    state8.h[...], state8.c[...] = state.h, state.c
    for t in range(3, 6):
        y = pool.step(np.array([sid]), xs[t])
        assert np.array_equal(y, q8.step(xs[t], state8))
        assert not np.array_equal(y, q16.step(xs[t], state))
