"""The streaming API (new_state / step on cells and unidirectional layers) gives the numbers of the
sequence call: steps against a whole sequence, out against the cell call, rows alone against the
batch and with BLAS threads; states reset, copy and stay independent; models with states pickle.
Its argument errors: bad_input/test_bad_stream_input.py."""

import copy
import pickle

import numpy as np
import pytest

import fastcell
from conftest import TOL

LAYERS = {"rnn": fastcell.RNN, "gru": fastcell.GRU, "lstm": fastcell.LSTM, "peephole_lstm": fastcell.PeepholeLSTM}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_steps_equal_the_sequence_call(kind, num_layers, batch, dtype, rng):
    kw = {"proj_size": 3} if kind == "lstm" else {}
    model = LAYERS[kind](5, 7, num_layers=num_layers, dtype=dtype, **kw)
    x = rng.standard_normal((40, batch, 5)).astype(dtype)
    want, final = model(x)
    state = model.new_state(batch)
    got = np.stack([model.step(x_t, state) for x_t in x])
    assert np.max(np.abs(got - want)) <= TOL[dtype]
    h_n = final[0] if isinstance(final, tuple) else final
    assert np.max(np.abs(state.h - h_n)) <= TOL[dtype]
    if kind.endswith("lstm"):
        assert np.max(np.abs(state.c - final[1])) <= TOL[dtype]


def test_step_writes_into_out_and_matches_cell_call(rng):
    w = {"weight_ih": rng.standard_normal((9, 4)), "weight_hh": rng.standard_normal((9, 3)) * 0.3}
    cell = fastcell.GRUCell(**w)
    state, out = cell.new_state(2), np.empty((2, 3))
    h = np.zeros((2, 3))
    for _ in range(5):
        x = rng.standard_normal((2, 4))
        returned = cell.step(x, state, out)
        h = cell(x, h)
        assert returned is out
        assert np.array_equal(out, h)  # B > 1: the same GEMM path, the same bits
    # unbatched: one stream, (I,) in and (H,) out
    s1 = cell.new_state()
    y = cell.step(rng.standard_normal(4), s1)
    assert y.shape == (3,)


def test_state_reset_copy_and_independence(rng):
    model = fastcell.LSTM(3, 4, num_layers=2)
    s = model.new_state()
    x = rng.standard_normal(3).astype(np.float32)
    model.step(x, s)
    snap = s.copy()
    assert copy.copy(s) is not s and np.array_equal(copy.deepcopy(s).h, s.h)
    model.step(x, s)
    assert not np.array_equal(snap.h, s.h)
    a = model.step(x, snap)
    b = model.step(x, model.new_state())  # a fresh stream is independent of the others
    assert not np.array_equal(a, b)
    s.reset()
    assert not s.h.any() and not s.c.any()
    assert s.h.shape == (2, 1, 4) and s.c.shape == (2, 1, 4)


def test_models_with_states_survive_pickling(rng):
    model = fastcell.LSTM(3, 4, num_layers=2)
    clone = pickle.loads(pickle.dumps(model))
    x = rng.standard_normal(3).astype(np.float32)
    assert np.array_equal(model.step(x, model.new_state()), clone.step(x, clone.new_state()))


def test_large_projections_match_row_by_row_and_with_blas_threads(rng):
    """A projection of 1200 rows runs on fastcell's own GEMM by default: every stream's rows give
    the bits they give alone. With 2 BLAS threads it goes to BLAS: the same numbers to rounding
    (I = 600 is past OpenBLAS's k-block, where its sums start to round differently)."""
    model = fastcell.LSTM(600, 17)
    x = rng.standard_normal((400, 3, 600)).astype(np.float32)
    y, (h, c) = model(x)
    for b in range(3):
        yb, (hb, cb) = model(x[:, b:b + 1])
        assert np.array_equal(yb[:, 0], y[:, b]) and np.array_equal(hb[:, 0], h[:, b])
    old = fastcell.set_blas_threads(2)
    try:
        y2, _ = model(x)
    finally:
        fastcell.set_blas_threads(old)
    assert np.max(np.abs(y2 - y)) <= 1e-5


def test_blas_threads_are_fastcells_own_setting():
    from fastcell_c import kernel

    assert kernel.blas_thread_control_installed()  # scipy's OpenBLAS wheels export the hook
    assert fastcell.set_blas_threads(2) == 1
    assert fastcell.set_blas_threads(1) == 2
    with pytest.raises(ValueError, match="n: expected an integer >= 1"):
        fastcell.set_blas_threads(0)
