"""Hostile and awkward input to the streaming API (new_state, step, StreamState) of cells and
unidirectional layers: x of wrong shapes or kinds, states of another model, bad out arrays and
batches raise errors naming the argument, and a refused step leaves the state as it was; states
cannot be resized or pickled; awkward layouts, other dtypes and memory-mapped outputs give exactly
the numbers of clean arrays."""

import pickle
import re

import numpy as np
import pytest

import fastcell
from helpers import (BAD_VALUES, CELLS, DTYPES, LAYERS, H, I, assert_identical, bad_values,
                     cell_of, dtypes, exp, flat, laid_out, layouts_param, make_layer, mapped,
                     other_dtype, other_dtypes)


def make_stepper(name, dtype=np.float64):
    """cell_<variant>: a cell; layer_<kind>: a two-layer stack of a unidirectional layer."""
    if name.startswith("cell_"):
        return cell_of(name[5:], dtype)
    return make_layer(name[6:], dtype, num_layers=2)


STEPPERS = [f"cell_{v}" for v in CELLS] + [f"layer_{k}" for k in LAYERS]
stepper_names = pytest.mark.parametrize("name", STEPPERS)
# The conversions in step() do not depend on the cell: the layout tests take a few.
STEP_SUBSET = ["cell_rnn_relu", "cell_peephole_lstm", "layer_gru_reset_before", "layer_lstm_proj"]
step_subset = pytest.mark.parametrize("name", STEP_SUBSET)


@pytest.fixture(scope="module")
def models():
    return {dt: {name: make_stepper(name, dt) for name in STEPPERS} for dt in DTYPES}


@stepper_names
@pytest.mark.parametrize("batch,shape", [
    (2, ()), (2, (2, 1, I)), (1, (1, 1, I)), (2, (2, 2, 1, I)),       # rank
    (1, (I + 1,)), (2, (2, I - 1)), (2, (2, 0)), (1, (0,)),          # feature size
    (2, (3, I)), (2, (1, I)), (2, (I,)), (1, (2, I)), (3, (I,)),      # batch disagrees with state
    (1, (0, I)), (2, (0, I)),
])
def test_step_x_wrong_shape(models, name, batch, shape):
    model = models[np.float64][name]
    state = model.new_state(batch)
    before = [a.copy() for a in flat((state.h, state.c)) if a is not None]
    with pytest.raises(ValueError, match=exp("x") + r" expected shape .* got " + re.escape(str(shape))):
        model.step(np.zeros(shape), state)
    # A refused step leaves the state as it was.
    assert_identical([a for a in flat((state.h, state.c)) if a is not None], before)


@stepper_names
@bad_values
def test_step_x_bad_values(models, name, bad):
    model = models[np.float64][name]
    with pytest.raises((TypeError, ValueError), match=exp("x")):
        model.step(BAD_VALUES[bad]((2, I)), model.new_state(2))


@stepper_names
def test_step_x_none(models, name):
    model = models[np.float64][name]
    with pytest.raises(TypeError, match=exp("x") + " expected an array, got None"):
        model.step(None, model.new_state())


@stepper_names
def test_step_state_not_this_models(models, name):
    model = models[np.float64][name]
    x = np.zeros((2, I))
    for state in (None, "state", 0, np.zeros((1, 2, H)), (np.zeros((2, H)),) * 2):
        # Cython's own check: "Argument 'state' has incorrect type (expected ..., got ...)"
        with pytest.raises(TypeError, match="'state'.*expected fastcell_c.stream.StreamState"):
            model.step(x, state)
    # Another instance of the same configuration, and a pickled copy.
    for other in (make_stepper(name), pickle.loads(pickle.dumps(model))):
        with pytest.raises(ValueError, match=exp("state") + " expected a state made by this model"):
            model.step(x, other.new_state(2))


def test_step_state_of_another_layer_count():
    one, two = make_layer("gru", num_layers=1), make_layer("gru", num_layers=2)
    with pytest.raises(ValueError, match=exp("state")):
        one.step(np.zeros(I), two.new_state())
    with pytest.raises(ValueError, match=exp("state")):
        two.step(np.zeros(I), one.new_state())


def test_state_of_a_reloaded_layer_steps_with_the_new_weights():
    layer = make_layer("lstm", num_layers=2)
    state = layer.new_state()
    new = {n: v * 0.5 for n, v in layer.state_dict().items()}
    layer.load_state_dict(new)
    twin = make_layer("lstm", num_layers=2)
    twin.load_state_dict(new)
    expected = twin.step(np.ones(I), twin.new_state())
    assert np.array_equal(layer.step(np.ones(I), state), expected)


@stepper_names
@dtypes
def test_step_bad_out(models, name, dtype):
    model = models[dtype][name]
    Hout = model.output_size if hasattr(model, "output_size") else model.hidden_size
    other = np.float64 if dtype == np.float32 else np.float32
    x = np.zeros((3, I), dtype)
    ro = np.empty((3, Hout), dtype)
    ro.flags.writeable = False
    bad = {
        "rows": np.empty((2, Hout), dtype),
        "cols": np.empty((3, Hout + 1), dtype),
        "flat": np.empty(3 * Hout, dtype),
        "rank3": np.empty((1, 3, Hout), dtype),
        "dtype": np.empty((3, Hout), other),
        "int": np.empty((3, Hout), np.int32),
        "fortran": np.empty((3, Hout), dtype, order="F"),
        "strided": np.empty((3, 2 * Hout), dtype)[:, ::2],
        "reversed": np.empty((3, Hout), dtype)[::-1],
        "readonly": ro,
        "byteswapped": np.empty((3, Hout), np.dtype(dtype).newbyteorder()),
        "list": [[0.0] * Hout] * 3,
        "str": "out",
    }
    state = model.new_state(3)
    before = state.h.copy()
    for case, out in bad.items():
        with pytest.raises(ValueError, match=exp("out")):
            model.step(x, state, out)
        np.testing.assert_array_equal(state.h, before)
    # One stream: out must be (H_out,) for x (I,), (1, H_out) for x (1, I).
    s1 = model.new_state(1)
    with pytest.raises(ValueError, match=exp("out")):
        model.step(np.zeros(I, dtype), s1, np.empty((1, Hout), dtype))
    with pytest.raises(ValueError, match=exp("out")):
        model.step(np.zeros((1, I), dtype), s1, np.empty(Hout, dtype))


@stepper_names
@pytest.mark.parametrize("batch", [0, -1, -2**63, 1.5, 2.0, "2", None, True, False, np.float64(2),
                                   [2], 2 + 0j, np.array([2])],
                         ids=repr)
def test_new_state_bad_batch(models, name, batch):
    with pytest.raises((TypeError, ValueError), match=exp("batch") + " expected an integer >= 1, got"):
        models[np.float64][name].new_state(batch)


@stepper_names
@pytest.mark.parametrize("batch", [2**46, 2**50, 2**61, 2**62, 2**63 - 1, 2**63, 2**64, 10**30])
def test_new_state_too_large_is_memory_error(models, name, batch):
    # h alone is more than 2**47 bytes (the x86-64 address space) from 2**46 streams on: no
    # overcommit setting lets that succeed.
    with pytest.raises(MemoryError):
        models[np.float64][name].new_state(batch)


@stepper_names
def test_new_state_accepts_numpy_integers(models, name):
    model = models[np.float64][name]
    for batch in (np.int64(2), np.uint8(2), np.int32(2)):
        assert model.new_state(batch).batch == 2


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_bidirectional_layer_cannot_step(kind):
    layer = make_layer(kind, bidirectional=True)
    with pytest.raises(ValueError, match="bidirectional"):
        layer.new_state()
    with pytest.raises(ValueError, match="bidirectional"):
        layer.step(np.zeros(I), None)


@stepper_names
def test_state_buffers_cannot_be_resized(models, name):
    """step() writes into the state's h and c: NumPy must not be able to reallocate them (this
    once corrupted the heap: state.h.resize(1, refcheck=False) then step)."""
    model = models[np.float64][name]
    state = model.new_state(2)
    for a in (state.h, state.c):
        if a is None:
            continue
        with pytest.raises(ValueError, match="resize"):
            a.resize((1,), refcheck=False)
    with pytest.raises(AttributeError):
        state.h = np.zeros(1)
    y = model.step(np.ones((2, I)), state)
    assert y.shape == (2, state.h.shape[-1]) and np.isfinite(y).all()


@stepper_names
def test_stream_state_and_kernels_refuse_pickling(models, name):
    """Pickling a state used to pickle the kernels behind state.owner with Cython's automatic
    pickling, which stored the weight pointers as NUL-terminated bytes and restored dangling
    pointers (stepping the unpickled state read freed memory). Now a TypeError says what to do;
    copies in the same process, and the model's own pickling, are unaffected."""
    model = models[np.float64][name]
    state = model.new_state(2)
    model.step(np.ones((2, I)), state)
    with pytest.raises(TypeError, match="StreamState cannot be pickled: pickle the model"):
        pickle.dumps(state)
    with pytest.raises(TypeError, match="cannot pickle .*Kernel: pickle the model instead"):
        pickle.dumps(state.owner)
    import copy

    for clone in (copy.copy(state), copy.deepcopy(state), state.copy()):
        assert_identical(model.step(np.ones((2, I)), clone), model.step(np.ones((2, I)), state.copy()))
    # The documented route: pickle the model and the arrays.
    model2, h, c = pickle.loads(pickle.dumps((model, state.h, state.c)))
    s2 = model2.new_state(2)
    s2.h[...] = h
    if c is not None:
        s2.c[...] = c
    assert_identical(model2.step(np.ones((2, I)), s2), model.step(np.ones((2, I)), state))


@pytest.mark.parametrize("kind", ["gru", "lstm_proj"])
def test_step_out_overlapping_the_state(kind):
    """out may be a view of the state's own h (the output row is moved between overlapping
    buffers): the numbers are those of a separate out."""
    layer = make_layer(kind, num_layers=2)
    n = layer.output_size
    for x in np.random.default_rng(0).standard_normal((4, I)):
        want = layer.step(x, layer.new_state())
        state = layer.new_state()
        out = state.h.reshape(-1)[1:n + 1]  # the last n-1 of layer 0's h, the first of layer 1's
        assert np.shares_memory(out, state.h)
        assert layer.step(x, state, out) is out
        np.testing.assert_array_equal(out, want)


def test_step_errors(rng):
    model = fastcell.GRU(3, 4)
    s = model.new_state(2)
    with pytest.raises(ValueError, match=r"x: expected shape \(2, 3\)"):
        model.step(np.zeros((3, 3), np.float32), s)
    with pytest.raises(ValueError, match="x: expected shape"):
        model.step(np.zeros((2, 5), np.float32), s)
    with pytest.raises(ValueError, match="state: expected a state made by this model"):
        model.step(np.zeros((2, 3), np.float32), fastcell.GRU(3, 4).new_state(2))
    with pytest.raises(TypeError):
        model.step(np.zeros((2, 3), np.float32), None)
    with pytest.raises(ValueError, match="out: expected"):
        model.step(np.zeros((2, 3), np.float32), s, out=np.empty((2, 5), np.float32))
    with pytest.raises(ValueError, match="out: expected"):
        model.step(np.zeros((2, 3), np.float32), s, out=np.empty((2, 4), np.float64))
    with pytest.raises(TypeError, match="x: expected real numbers"):
        model.step(np.array(["a", "b", "c"]), model.new_state())
    with pytest.raises(ValueError, match="batch: expected an integer >= 1"):
        model.new_state(0)
    with pytest.raises(ValueError, match="bidirectional"):
        fastcell.LSTM(3, 4, bidirectional=True).new_state()


# =========================== the right numbers ===========================

@step_subset
@dtypes
@pytest.mark.parametrize("batch", [None, 1, 3], ids=["unbatched", "B1", "B3"])
@layouts_param
def test_step_awkward_layouts(models, name, dtype, batch, layout, tmp_path):
    model = models[dtype][name]
    rng = np.random.default_rng(8)
    xs = rng.standard_normal((4,) + ((I,) if batch is None else (batch, I))).astype(dtype)
    ref, odd = model.new_state(batch or 1), model.new_state(batch or 1)
    for x in xs:
        want = model.step(x, ref)
        got = model.step(laid_out(x, layout, tmp_path), odd)
        assert_identical(got, want)
    assert_identical(odd.h, ref.h)


@step_subset
@dtypes
@other_dtypes
def test_step_other_real_dtypes(models, name, dtype, src):
    model = models[dtype][name]
    rng = np.random.default_rng(9)
    xs, xs_conv = other_dtype(src, dtype, (4, 2, I), rng)
    ref, odd = model.new_state(2), model.new_state(2)
    for x, x_conv in zip(xs, xs_conv):
        got = model.step(x, odd)
        assert got.dtype == dtype
        assert_identical(got, model.step(x_conv, ref))


@step_subset
@dtypes
def test_step_into_memmapped_out(models, name, dtype, tmp_path):
    model = models[dtype][name]
    x = np.random.default_rng(10).standard_normal((3, 2, I)).astype(dtype)
    ref, s1, s2 = (model.new_state(2) for _ in range(3))
    for x_t in x:
        want = model.step(x_t, ref)
        out = mapped(tmp_path, np.zeros_like(want), "r+")
        assert model.step(x_t, s1, out) is out
        np.testing.assert_array_equal(out, want)
        mis = mapped(tmp_path, np.zeros_like(want), "r+", offset=2)
        model.step(x_t, s2, mis)
        np.testing.assert_array_equal(mis, want)


def test_step_converts_other_inputs(rng):
    model = fastcell.RNN(3, 4, dtype=np.float64)
    x = rng.standard_normal(3)
    want = model.step(x, model.new_state())
    for variant in (x.tolist(), np.asfortranarray(x[None])[0],
                    x[::-1].copy()[::-1]):
        assert np.array_equal(model.step(variant, model.new_state()), want)
