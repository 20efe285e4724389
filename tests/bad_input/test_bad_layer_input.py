"""Hostile and awkward input on every public entry point (issue 5, "Bad input").

- Errors: cells (__call__, run), layers (__call__ with hx and lengths), step and new_state get
  wrong ranks, wrong sizes, states that disagree with x, bad lengths and values that are not real
  arrays; each raises ValueError or TypeError whose message starts with the argument's name.
- Numbers: non-contiguous, Fortran-ordered, negative-stride, read-only, memory-mapped, misaligned,
  byte-swapped inputs, other real dtypes and nested lists give exactly the numbers of a clean
  C-contiguous array of the model's dtype (converted first where the dtype differs).
- NaN and Inf propagate as in PyTorch; T = 0 and B = 0 behave as PyTorch; sizes that cannot be
  allocated raise MemoryError; weights are validated when a model is built.

tests/test_cell_api.py already covers the cells' shape, state and value errors, their strided,
Fortran, negative-stride and read-only inputs, and the cells' weight checks; this file extends
those to layers, streaming, lengths and the cases listed above.
"""

import os
import pickle
import re
import subprocess
import sys
import textwrap
from itertools import count
from pathlib import Path

import numpy as np
import pytest

import fastcell
from conftest import TOL, VARIANTS, init_weights
from conftest import make_cell as conftest_make_cell

I, H, P = 3, 5, 2          # input size, hidden size, LSTM projection size
T, B = 5, 3
DTYPES = [np.float32, np.float64]
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)

LAYERS = {
    "rnn": (fastcell.RNN, {}),
    "rnn_relu": (fastcell.RNN, {"nonlinearity": "relu"}),
    "gru": (fastcell.GRU, {}),
    "gru_reset_before": (fastcell.GRU, {"reset_after": False}),
    "lstm": (fastcell.LSTM, {}),
    "lstm_proj": (fastcell.LSTM, {"proj_size": P}),
    "peephole_lstm": (fastcell.PeepholeLSTM, {}),
}
LSTM_LAYERS = ["lstm", "lstm_proj", "peephole_lstm"]
CELLS = list(VARIANTS)
LSTM_CELLS = ["lstm", "peephole_lstm"]
layer_kinds = pytest.mark.parametrize("kind", list(LAYERS))
cell_variants = pytest.mark.parametrize("variant", CELLS)


# ---- helpers ----

def make_layer(kind, dtype=np.float64, **kw):
    cls, extra = LAYERS[kind]
    layer = cls(I, H, dtype=dtype, **extra, **kw)
    # Deterministic weights with PyTorch's initialisation scale.
    rng = np.random.default_rng(sorted(LAYERS).index(kind))
    k = 1 / np.sqrt(H)
    layer.load_state_dict({n: rng.uniform(-k, k, s) for n, s in layer.expected_shapes().items()})
    return layer


def make_cell(variant, dtype=np.float64, seed=0, w=None):
    """A cell of VARIANTS with PyTorch's initialisation (or the weights w)."""
    if w is None:
        w = init_weights(np.random.default_rng(seed), VARIANTS[variant][0], I, H, dtype,
                         peephole=variant == "peephole_lstm")
    return conftest_make_cell(variant, w)


def layer_hx(layer, batch, rng, dtype=None):
    """A random initial state for layer: h_0 (D*L, B, H_out), and c_0 for the LSTMs; batch None:
    unbatched."""
    n = layer.num_layers * layer.num_directions
    lead = (n,) if batch is None else (n, batch)
    dtype = dtype or layer.dtype
    h = rng.standard_normal(lead + (layer.output_size,)).astype(dtype)
    if not layer.has_cell_state:
        return h
    return h, rng.standard_normal(lead + (layer.hidden_size,)).astype(dtype)


def cell_state(variant, batch, rng, dtype=np.float64):
    shape = (H,) if batch is None else (batch, H)

    def s():
        return rng.standard_normal(shape).astype(dtype)

    return (s(), s()) if variant in LSTM_CELLS else s()


def flat(result):
    if isinstance(result, (tuple, list)):
        return [a for r in result for a in flat(r)]
    return [result]


def assert_identical(got, want):
    fg, fw = flat(got), flat(want)
    assert len(fg) == len(fw)
    for g, w in zip(fg, fw):
        assert isinstance(g, np.ndarray) and g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


def exp(name):
    """Matches an error message that starts with the argument's name."""
    return "^" + re.escape(name) + ":"


def mapped(tmp_path, a, mode="r", offset=0):
    """a as an np.memmap on a file of tmp_path (offset bytes of padding first: misaligned data)."""
    path = tmp_path / f"a{next(_files)}.bin"
    with open(path, "wb") as f:
        f.write(b"\0" * offset + np.ascontiguousarray(a).tobytes())
    m = np.memmap(path, dtype=a.dtype, mode=mode, shape=a.shape, offset=offset)
    np.testing.assert_array_equal(m, a)
    return m


_files = count()


def _strided_last(a, tmp):
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    big[..., ::2] = a
    return big[..., ::2]


def _strided_first(a, tmp):
    big = np.zeros((2 * a.shape[0],) + a.shape[1:], a.dtype)
    big[::2] = a
    return big[::2]


def _readonly(a, tmp):
    ro = a.copy()
    ro.flags.writeable = False
    return ro


# The values of a (C-contiguous) laid out every awkward way; each equals a.
LAYOUT_MAKERS = {
    "strided_last": _strided_last,
    "strided_first": _strided_first,
    "fortran": lambda a, tmp: np.asfortranarray(a),
    "negative_stride": lambda a, tmp: np.flip(np.flip(a, -1).copy(), -1),
    "negative_all": lambda a, tmp: np.flip(np.flip(a).copy()),
    "readonly": _readonly,
    "memmap_readonly": lambda a, tmp: mapped(tmp, a, "r"),
    "memmap_readwrite": lambda a, tmp: mapped(tmp, a, "r+"),
    "memmap_copy_on_write": lambda a, tmp: mapped(tmp, a, "c"),
    "memmap_misaligned": lambda a, tmp: mapped(tmp, a, "r", offset=1),
    "byteswapped": lambda a, tmp: a.astype(a.dtype.newbyteorder()),
    "masked_array": lambda a, tmp: np.ma.masked_array(a.copy()),
    "nested_list": lambda a, tmp: a.tolist(),
}
LAYOUTS = list(LAYOUT_MAKERS)
layouts_param = pytest.mark.parametrize("layout", LAYOUTS)


def laid_out(value, layout, tmp_path):
    """layout applied to an array, or to each array of an (h, c) pair."""
    if isinstance(value, tuple):
        return tuple(laid_out(v, layout, tmp_path) for v in value)
    v = LAYOUT_MAKERS[layout](value, tmp_path)
    np.testing.assert_array_equal(v, value)
    if layout == "memmap_misaligned":
        assert not v.flags.aligned
    if layout == "byteswapped":
        assert not v.dtype.isnative
    return v


def other_dtype(kind, model_dtype, shape, rng):
    """(value of another real dtype, the same converted to the model's dtype first)."""
    if kind == "other_float":
        v = rng.standard_normal(shape).astype(np.float64 if model_dtype == np.float32 else np.float32)
    elif kind == "float16":
        v = rng.standard_normal(shape).astype(np.float16)
    elif kind == "longdouble":
        v = rng.standard_normal(shape).astype(np.longdouble) / 3
    elif kind == "bool":
        v = rng.standard_normal(shape) > 0
    elif kind == "uint8":
        v = rng.integers(0, 4, shape).astype(np.uint8)
    else:
        v = rng.integers(-3, 4, shape).astype(kind)
    return v, v.astype(model_dtype)


OTHER_DTYPES = ["int64", "int32", "int8", "uint8", "float16", "bool", "other_float", "longdouble"]
other_dtypes = pytest.mark.parametrize("src", OTHER_DTYPES)


# Values that are not real arrays, for any array argument. Each must raise TypeError or ValueError
# naming the argument.
BAD_VALUES = {
    "complex": lambda s: np.zeros(s, np.complex64),
    "complex_scalar": lambda s: 1j,
    "str_array": lambda s: np.full(s, "1.0"),
    "str": lambda s: "abc",
    "bytes": lambda s: b"\0" * 16,
    "object": lambda s: np.empty(s, object),
    "object_of_floats": lambda s: np.full(s, 1.0, dtype=object),
    "ragged": lambda s: [[0.0] * 2, [0.0]],
    "ragged_deep": lambda s: [[[0.0]], [0.0, 1.0]],
    "huge_ints": lambda s: np.full(s, 2**70).tolist(),
    "datetime": lambda s: np.zeros(s, "datetime64[s]"),
    "timedelta": lambda s: np.zeros(s, "timedelta64[s]"),
    "structured": lambda s: np.zeros(s, [("a", "f4")]),
    "void": lambda s: np.zeros(s, "V4"),
    "dict": lambda s: {"x": 1.0},
    "set": lambda s: {1.0, 2.0},
    "function": lambda s: print,
}
bad_values = pytest.mark.parametrize("bad", list(BAD_VALUES))


# =============================== errors ===============================

# ---- layers: x ----

@layer_kinds
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("shape", [(), (I,), (T, B, 1, I), (T, B, I + 1), (T, I - 1), (T, B, 0),
                                   (0,)])
def test_layer_x_wrong_rank_or_size(kind, batch_first, shape):
    layer = make_layer(kind, batch_first=batch_first)
    lead = "(B, T, " if batch_first else "(T, B, "
    msg = exp("x") + re.escape(f" expected shape {lead}{I}) or (T, {I}), got {shape}")
    with pytest.raises(ValueError, match=msg):
        layer(np.zeros(shape))


@layer_kinds
@bad_values
def test_layer_x_bad_values(kind, bad):
    layer = make_layer(kind)
    with pytest.raises((TypeError, ValueError), match=exp("x")):
        layer(BAD_VALUES[bad]((T, B, I)))


@layer_kinds
def test_layer_x_none(kind):
    with pytest.raises(TypeError, match=exp("x") + " expected an array, got None"):
        make_layer(kind)(None)


# ---- layers: hx ----

HX_MISMATCHES = {
    # (change of the layer count, of the batch, of the size), or a whole other shape
    "fewer_layers": (-1, 0, 0),
    "more_layers": (1, 0, 0),
    "batch": (0, 1, 0),
    "size": (0, 0, 1),
    "batch_zero": (0, -B, 0),
}


@layer_kinds
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("case", list(HX_MISMATCHES) + ["unbatched_state", "batched_state_unbatched_x",
                                                        "rank4"])
def test_layer_state_disagrees_with_x(kind, bidirectional, case):
    layer = make_layer(kind, num_layers=2, bidirectional=bidirectional)
    n = 2 * layer.num_directions
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, I))
    sizes = [("h_0", layer.output_size)] + ([("c_0", H)] if kind in LSTM_LAYERS else [])
    for which, (name, size) in enumerate(sizes):
        good = [np.zeros((n, B, s)) for _, s in sizes]
        want = (n, B, size)
        xx = x
        if case in HX_MISMATCHES:
            dn, db, ds = HX_MISMATCHES[case]
            bad = np.zeros((n + dn, B + db, size + ds))
        elif case == "unbatched_state":
            bad = np.zeros((n, size))
        elif case == "batched_state_unbatched_x":
            xx = x[:, 0]
            good = [g[:, 0] for g in good]
            bad, want = np.zeros((n, 1, size)), (n, size)
        else:
            bad = np.zeros((n, B, size, 1))
        good[which] = bad
        hx = tuple(good) if len(good) == 2 else good[0]
        msg = exp(name) + re.escape(f" expected shape {want}, got {bad.shape}")
        with pytest.raises(ValueError, match=msg):
            layer(xx, hx)


@pytest.mark.parametrize("kind", LSTM_LAYERS)
@pytest.mark.parametrize("hx", [
    pytest.param(lambda h, c: h, id="array"),
    pytest.param(lambda h, c: np.stack([h, h]), id="stacked_array"),
    pytest.param(lambda h, c: (h,), id="1-tuple"),
    pytest.param(lambda h, c: (h, c, c), id="3-tuple"),
    pytest.param(lambda h, c: "hc", id="str"),
    pytest.param(lambda h, c: {"h": h, "c": c}, id="dict"),
    pytest.param(lambda h, c: 0, id="int"),
    pytest.param(lambda h, c: iter((h, c)), id="iterator"),
])
def test_layer_lstm_state_must_be_a_pair(kind, hx):
    layer = make_layer(kind)
    h, c = layer_hx(layer, B, np.random.default_rng(0))
    with pytest.raises(TypeError, match=exp("hx") + r" expected an \(h_0, c_0\) pair, got "):
        layer(np.zeros((T, B, I)), hx(h, c))


@pytest.mark.parametrize("kind", LSTM_LAYERS)
def test_layer_lstm_state_pair_with_none(kind):
    layer = make_layer(kind)
    h, c = layer_hx(layer, B, np.random.default_rng(0))
    with pytest.raises(TypeError, match=exp("h_0") + " expected an array, got None"):
        layer(np.zeros((T, B, I)), (None, c))
    with pytest.raises(TypeError, match=exp("c_0") + " expected an array, got None"):
        layer(np.zeros((T, B, I)), (h, None))
    # A list pair is a pair.
    assert_identical(layer(np.ones((T, B, I)), [h, c]), layer(np.ones((T, B, I)), (h, c)))


@pytest.mark.parametrize("kind", ["rnn", "gru"])
def test_layer_non_lstm_given_a_pair(kind):
    layer = make_layer(kind)
    h = layer_hx(layer, B, np.random.default_rng(0))
    with pytest.raises(ValueError, match=exp("h_0") + " expected shape"):
        layer(np.zeros((T, B, I)), (h, h))


@layer_kinds
@bad_values
def test_layer_state_bad_values(kind, bad):
    layer = make_layer(kind)
    good = layer_hx(layer, B, np.random.default_rng(0))
    x = np.zeros((T, B, I))
    if kind in LSTM_LAYERS:
        h, c = good
        with pytest.raises((TypeError, ValueError), match=exp("h_0")):
            layer(x, (BAD_VALUES[bad](h.shape), c))
        with pytest.raises((TypeError, ValueError), match=exp("c_0")):
            layer(x, (h, BAD_VALUES[bad](c.shape)))
    else:
        with pytest.raises((TypeError, ValueError), match=exp("h_0")):
            layer(x, BAD_VALUES[bad](good.shape))


# ---- layers: lengths ----

BAD_LENGTHS = {
    # for x (T=5, B=3)
    "zero": ([0, 5, 3], ValueError),
    "all_zero": ([0, 0, 0], ValueError),
    "negative": ([-1, 5, 3], ValueError),
    "too_long": ([6, 5, 3], ValueError),
    "int64_min": ([-2**63, 5, 3], ValueError),
    "huge": ([2**62, 1, 1], ValueError),
    "huge_uint64": (np.array([2**64 - 1, 1, 1], np.uint64), ValueError),
    "too_few": ([5, 3], ValueError),
    "too_many": ([5, 3, 2, 1], ValueError),
    "empty": ([], TypeError),  # np.asarray([]) is float64
    "scalar": (5, ValueError),
    "row": ([[5, 3, 2]], ValueError),
    "column": ([[5], [3], [2]], ValueError),
    "float": ([5.0, 3.0, 2.0], TypeError),
    "float32": (np.array([5, 3, 2], np.float32), TypeError),
    "nan": ([np.nan, 3, 2], TypeError),
    "bool": ([True, True, True], TypeError),
    "complex": ([5 + 0j, 3, 2], TypeError),
    "str": ("532", TypeError),
    "str_list": (["5", "3", "2"], TypeError),
    "object": (np.array([5, 3, 2], object), TypeError),
    "none_inside": ([5, None, 2], TypeError),
    "ragged": ([[5], [3, 2]], TypeError),
    "big_int": ([2**70, 1, 1], TypeError),
    "datetime": (np.array([5, 3, 2], "datetime64[s]"), TypeError),
    "timedelta": (np.array([5, 3, 2], "timedelta64[s]"), TypeError),
    "dict": ({"a": 1}, TypeError),
}


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm_proj"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("case", list(BAD_LENGTHS))
def test_layer_bad_lengths(kind, bidirectional, batch_first, case):
    layer = make_layer(kind, bidirectional=bidirectional, batch_first=batch_first)
    lengths, error = BAD_LENGTHS[case]
    x = np.zeros((B, T, I) if batch_first else (T, B, I))
    with pytest.raises(error, match=exp("lengths")):
        layer(x, None, lengths)


@layer_kinds
def test_lengths_with_unbatched_x(kind):
    with pytest.raises(ValueError, match=exp("lengths") + " only for a batched x"):
        make_layer(kind)(np.zeros((T, I)), None, [T])


# ---- step and new_state ----

def make_stepper(name, dtype=np.float64):
    """cell_<variant>: a cell; layer_<kind>: a two-layer stack of a unidirectional layer."""
    if name.startswith("cell_"):
        return make_cell(name[5:], dtype)
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


# =========================== the right numbers ===========================

@layer_kinds
@dtypes
@layouts_param
def test_layer_awkward_layouts(kind, dtype, layout, tmp_path):
    layer = make_layer(kind, dtype, num_layers=2, bidirectional=True)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    hx = layer_hx(layer, B, rng)
    lengths = np.array([T, 2, 4])
    want = layer(x, hx)
    want_len = layer(x, hx, lengths)
    x_l, hx_l = laid_out(x, layout, tmp_path), laid_out(hx, layout, tmp_path)
    assert_identical(layer(x_l, hx), want)
    assert_identical(layer(x, hx_l), want)
    assert_identical(layer(x_l, hx_l, lengths), want_len)
    # unbatched, and batch_first (a view of the same layer's weights)
    assert_identical(layer(laid_out(np.ascontiguousarray(x[:, 1]), layout, tmp_path)),
                     layer(x[:, 1]))
    bf = make_layer(kind, dtype, num_layers=2, bidirectional=True, batch_first=True)
    xb = np.ascontiguousarray(x.transpose(1, 0, 2))
    assert_identical(bf(laid_out(xb, layout, tmp_path), hx, lengths), bf(xb, hx, lengths))


@layer_kinds
@dtypes
@other_dtypes
def test_layer_other_real_dtypes(kind, dtype, src):
    layer = make_layer(kind, dtype, num_layers=2)
    rng = np.random.default_rng(2)
    x, x_conv = other_dtype(src, dtype, (T, B, I), rng)
    h, h_conv = other_dtype(src, dtype, (2, B, layer.output_size), rng)
    hx, hx_conv = h, h_conv
    if layer.has_cell_state:
        c, c_conv = other_dtype(src, dtype, (2, B, H), rng)
        hx, hx_conv = (h, c), (h_conv, c_conv)
    got = layer(x, hx)
    assert all(a.dtype == dtype for a in flat(got))
    assert_identical(got, layer(x_conv, hx_conv))
    assert_identical(layer(x, hx, [4, T, 1]), layer(x_conv, hx_conv, [4, T, 1]))


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_layer_broadcast_input(kind):
    """A zero-strided (np.broadcast_to) input gives the numbers of its materialised copy."""
    layer = make_layer(kind)
    row = np.random.default_rng(3).standard_normal(I)
    x = np.broadcast_to(row, (T, B, I))
    assert x.strides[:2] == (0, 0)
    assert_identical(layer(x), layer(x.copy()))
    assert_identical(layer(x, None, [1, T, 3]), layer(x.copy(), None, [1, T, 3]))


LENGTH_FORMS = {
    "list": lambda a, tmp: a.tolist(),
    "tuple": lambda a, tmp: tuple(a.tolist()),
    "numpy_ints": lambda a, tmp: [np.int16(v) for v in a],
    "int32": lambda a, tmp: a.astype(np.int32),
    "int8": lambda a, tmp: a.astype(np.int8),
    "uint8": lambda a, tmp: a.astype(np.uint8),
    "uint64": lambda a, tmp: a.astype(np.uint64),
    "byteswapped": lambda a, tmp: a.astype(np.dtype(np.int64).newbyteorder()),
    "negative_stride": lambda a, tmp: a[::-1].copy()[::-1],
    "strided": lambda a, tmp: np.repeat(a, 2)[::2],
    "readonly": lambda a, tmp: np.frombuffer(a.tobytes(), a.dtype),
    "memmap": lambda a, tmp: mapped(tmp, a),
    "memmap_misaligned": lambda a, tmp: mapped(tmp, a, offset=3),
}


@pytest.mark.parametrize("form", list(LENGTH_FORMS))
@pytest.mark.parametrize("kind", ["rnn", "lstm_proj"])
def test_lengths_layouts_and_dtypes(form, kind, tmp_path):
    layer = make_layer(kind, bidirectional=True)
    x = np.random.default_rng(4).standard_normal((T, B, I))
    lengths = np.array([4, T, 1], np.int64)
    value = LENGTH_FORMS[form](lengths, tmp_path)
    np.testing.assert_array_equal(value, lengths)
    assert_identical(layer(x, None, value), layer(x, None, lengths))


def test_lengths_as_torch_tensor():
    torch = pytest.importorskip("torch")
    layer = make_layer("gru")
    x = np.random.default_rng(5).standard_normal((T, B, I))
    assert_identical(layer(x, None, torch.tensor([4, T, 1])), layer(x, None, [4, T, 1]))
    with pytest.raises(TypeError, match=exp("lengths")):
        layer(x, None, torch.tensor([4.0, 5.0, 1.0]))


@cell_variants
@dtypes
@pytest.mark.parametrize("layout", ["memmap_readonly", "memmap_readwrite", "memmap_copy_on_write",
                                    "memmap_misaligned", "byteswapped", "masked_array",
                                    "strided_first"])
def test_cell_memmapped_and_byteswapped_inputs(variant, dtype, layout, tmp_path):
    # (strided, Fortran, negative-stride, read-only and nested lists: tests/test_cell_api.py)
    cell = make_cell(variant, dtype)
    rng = np.random.default_rng(6)
    xs = rng.standard_normal((T, B, I)).astype(dtype)
    s = cell_state(variant, B, rng, dtype)
    want_run, want_call = cell.run(xs, s), cell(xs[0], s)
    assert_identical(cell.run(laid_out(xs, layout, tmp_path), laid_out(s, layout, tmp_path)), want_run)
    assert_identical(cell(laid_out(np.ascontiguousarray(xs[0]), layout, tmp_path),
                          laid_out(s, layout, tmp_path)), want_call)


@cell_variants
@dtypes
@pytest.mark.parametrize("src", ["float16", "other_float", "int8", "uint8", "longdouble"])
def test_cell_other_real_dtypes(variant, dtype, src):
    # (int64 and bool, and float64 into a float32 model: tests/test_cell_api.py)
    cell = make_cell(variant, dtype)
    rng = np.random.default_rng(7)
    xs, xs_conv = other_dtype(src, dtype, (T, B, I), rng)
    if variant in LSTM_CELLS:
        (h, hc), (c, cc) = (other_dtype(src, dtype, (B, H), rng) for _ in range(2))
        s, s_conv = (h, c), (hc, cc)
    else:
        s, s_conv = other_dtype(src, dtype, (B, H), rng)
    got = cell.run(xs, s)
    assert all(a.dtype == dtype for a in flat(got))
    assert_identical(got, cell.run(xs_conv, s_conv))
    assert_identical(cell(xs[0], s), cell(xs_conv[0], s_conv))


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


# =========================== NaN and Inf ===========================

def torch_module():
    return pytest.importorskip("torch")


def hostile_values(x, dtype):
    """NaN, +-Inf and a huge finite value scattered over x (T, B, I)."""
    x = x.copy()
    x[2, 0, 1] = np.nan
    x[3, 1, 0] = np.inf
    x[4, 2, :] = -np.inf
    x[0, 3, 2], x[0, 3, 0] = np.inf, -np.inf  # +Inf and -Inf in one row: NaN gates
    x[5, 4, 0] = 1e30 if dtype == np.float32 else 1e300
    return x


def assert_same_nonfinite(got, want, dtype):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    fin = np.isfinite(want)
    tol = TOL[dtype] * np.maximum(1.0, np.abs(want[fin]))
    assert np.all(np.abs(got[fin] - want[fin]) <= tol)


TORCH_LAYERS = {"rnn": ("RNN", {}), "rnn_relu": ("RNN", {"nonlinearity": "relu"}), "gru": ("GRU", {}),
                "lstm": ("LSTM", {}), "lstm_proj": ("LSTM", {"proj_size": P})}


def torch_pair(kind, dtype, **kw):
    torch = torch_module()
    name, extra = TORCH_LAYERS[kind]
    torch.manual_seed(0)
    tdt = torch.float32 if dtype == np.float32 else torch.float64
    tm = getattr(torch.nn, name)(I, H, dtype=tdt, **extra, **kw)
    fm = LAYERS[kind][0](I, H, dtype=dtype, **extra, **kw)
    fm.load_state_dict(tm.state_dict())
    return tm, fm


@pytest.mark.parametrize("kind", list(TORCH_LAYERS))
@dtypes
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_nan_inf_propagate_like_torch_layers(kind, dtype, bidirectional, with_state):
    torch = torch_module()
    tm, fm = torch_pair(kind, dtype, num_layers=2, bidirectional=bidirectional)
    rng = np.random.default_rng(11)
    x = hostile_values(rng.standard_normal((7, 5, I)).astype(dtype), dtype)
    hx = None
    if with_state:
        hx = layer_hx(fm, 5, rng)
        h = hx[0] if isinstance(hx, tuple) else hx
        h[0, 0, 0], h[-1, 1, 1], h[0, 2, 0] = np.inf, np.nan, -np.inf
        if isinstance(hx, tuple):
            hx[1][0, 3, 1], hx[1][-1, 4, 2] = np.nan, np.inf
    thx = None if hx is None else (tuple(map(torch.from_numpy, hx)) if isinstance(hx, tuple)
                                   else torch.from_numpy(hx))
    with torch.no_grad():
        ty, th = tm(torch.from_numpy(x), thx)
    fy, fh = fm(x, hx)
    assert np.isnan(ty.numpy()).any()
    assert_same_nonfinite(fy, ty.numpy(), dtype)
    for a, b in zip(flat(fh), flat(th)):
        assert_same_nonfinite(a, b.numpy(), dtype)
    if not bidirectional:
        # The streaming path: step by step gives the same NaN/Inf pattern.
        state = fm.new_state(5)
        if hx is not None:
            state.h[...] = flat(hx)[0]
            if state.c is not None:
                state.c[...] = hx[1]
        steps = np.stack([fm.step(x_t, state) for x_t in x])
        assert_same_nonfinite(steps, ty.numpy(), dtype)


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
@dtypes
def test_nan_inf_with_lengths_like_torch(kind, dtype):
    torch = torch_module()
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    tm, fm = torch_pair(kind, dtype, bidirectional=True)
    x = hostile_values(np.random.default_rng(12).standard_normal((7, 5, I)).astype(dtype), dtype)
    lengths = np.array([7, 3, 5, 1, 6])
    with torch.no_grad():
        packed = pack_padded_sequence(torch.from_numpy(x), torch.from_numpy(lengths), enforce_sorted=False)
        ty, th = tm(packed)
        ty, _ = pad_packed_sequence(ty)
    fy, fh = fm(x, None, lengths)
    assert_same_nonfinite(fy, ty.numpy(), dtype)
    for a, b in zip(flat(fh), flat(th)):
        assert_same_nonfinite(a, b.numpy(), dtype)


def torch_cell_step(variant, w, dtype):
    """One step of the PyTorch cell (nn.*Cell, or tests/torch_reference.py for the two cells nn
    lacks) on the cell's weights."""
    torch = torch_module()
    from torch_reference import gru_reset_before_cell, peephole_lstm_cell

    tw = {k: torch.from_numpy(np.array(v)) for k, v in w.items()}
    if variant == "peephole_lstm":
        return lambda x, s: peephole_lstm_cell(x, *s, **tw)
    if variant == "gru_reset_before":
        return lambda x, s: gru_reset_before_cell(x, s, **tw)
    cls = {"rnn_tanh": torch.nn.RNNCell, "rnn_relu": torch.nn.RNNCell, "gru": torch.nn.GRUCell,
           "lstm": torch.nn.LSTMCell}[variant]
    kw = {"nonlinearity": "relu"} if variant == "rnn_relu" else {}
    m = cls(I, H, dtype=torch.float32 if dtype == np.float32 else torch.float64, **kw)
    m.load_state_dict(tw)
    return lambda x, s: m(x, s)


@cell_variants
@dtypes
def test_nan_inf_propagate_like_torch_cells(variant, dtype):
    torch = torch_module()
    cell = make_cell(variant, dtype)
    rng = np.random.default_rng(13)
    xs = hostile_values(rng.standard_normal((7, 5, I)).astype(dtype), dtype)
    s = cell_state(variant, 5, rng, dtype)
    h0 = s[0] if isinstance(s, tuple) else s
    h0[1, 0], h0[2, 1] = np.inf, np.nan
    step = torch_cell_step(variant, cell.state_dict(), dtype)
    ts = tuple(map(torch.from_numpy, s)) if isinstance(s, tuple) else torch.from_numpy(s)
    want = []
    with torch.no_grad():
        for x in xs:
            ts = step(torch.from_numpy(x), ts)
            want.append((ts[0] if isinstance(ts, tuple) else ts).numpy())
    want = np.stack(want)
    assert np.isnan(want).any()
    y, final = cell.run(xs, s)
    assert_same_nonfinite(y, want, dtype)
    for a, b in zip(flat(final), flat(ts)):
        assert_same_nonfinite(a, b.numpy(), dtype)
    # cell(x, hx) step by step, and the streaming state
    state, stream = s, cell.new_state(5)
    stream.h[0] = h0
    if stream.c is not None:
        stream.c[0] = s[1]
    for x, w in zip(xs, want):
        state = cell(x, state)
        assert_same_nonfinite(flat(state)[0], w, dtype)
        assert_same_nonfinite(cell.step(x, stream), w, dtype)


# =========================== T = 0 and B = 0 ===========================

@pytest.mark.parametrize("kind", list(TORCH_LAYERS))
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_empty_sequence_like_torch_layers(kind, bidirectional, batch_first):
    """T = 0: torch.nn raises ("Expected sequence length to be larger than 0"), so do we, with a
    ValueError naming x."""
    torch = torch_module()
    tm, fm = torch_pair(kind, np.float64, bidirectional=bidirectional, batch_first=batch_first)
    for shape in ((0, B, I), (0, I)):
        if batch_first and len(shape) == 3:
            shape = (B, 0, I)
        with pytest.raises(RuntimeError, match="larger than 0"):
            tm(torch.zeros(shape, dtype=torch.float64))
        with pytest.raises(ValueError, match=exp("x") + " expected a sequence length larger than 0"):
            fm(np.zeros(shape))
    with pytest.raises(ValueError, match=exp("x")):
        fm(np.zeros((B, 0, I) if batch_first else (0, B, I)), None, np.ones(B, int))


@pytest.mark.parametrize("kind", list(TORCH_LAYERS))
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_empty_batch_like_torch_layers(kind, bidirectional, batch_first, with_state):
    torch = torch_module()
    tm, fm = torch_pair(kind, np.float64, num_layers=2, bidirectional=bidirectional,
                        batch_first=batch_first)
    x = np.zeros((0, T, I) if batch_first else (T, 0, I))
    hx = layer_hx(fm, 0, np.random.default_rng(0)) if with_state else None
    thx = None if hx is None else (tuple(map(torch.from_numpy, hx)) if isinstance(hx, tuple)
                                   else torch.from_numpy(hx))
    with torch.no_grad():
        ty, th = tm(torch.from_numpy(x), thx)
    fy, fh = fm(x, hx)
    assert fy.shape == tuple(ty.shape) and fy.dtype == np.float64
    assert [a.shape for a in flat(fh)] == [tuple(b.shape) for b in flat(th)]
    # With lengths (torch: "Cannot pack empty tensors"): a result of the same shapes, or an
    # error naming lengths; never a crash.
    try:
        gy, gh = fm(x, hx, np.zeros(0, np.int64))
    except ValueError as e:
        assert str(e).startswith("lengths:")
    else:
        assert gy.shape == fy.shape and [a.shape for a in flat(gh)] == [a.shape for a in flat(fh)]


@cell_variants
def test_empty_batch_like_torch_cells(variant):
    torch = torch_module()
    cell = make_cell(variant)
    step = torch_cell_step(variant, cell.state_dict(), np.float64)
    s = cell_state(variant, 0, np.random.default_rng(0))
    ts = tuple(map(torch.from_numpy, s)) if isinstance(s, tuple) else torch.from_numpy(s)
    with torch.no_grad():
        want = step(torch.zeros((0, I), dtype=torch.float64), ts)
    got = cell(np.zeros((0, I)), s)
    assert [a.shape for a in flat(got)] == [tuple(b.shape) for b in flat(want)]
    y, final = cell.run(np.zeros((T, 0, I)), s)
    assert y.shape == (T, 0, H) and [a.shape for a in flat(final)] == [(0, H)] * len(flat(s))
    # A stream state holds at least one stream.
    with pytest.raises(ValueError, match=exp("batch")):
        cell.new_state(0)


# =========================== MemoryError ===========================

# Each more than 2**47 bytes (the x86-64 user address space), so no machine and no overcommit
# setting lets the allocation succeed.
HUGE = [(1, 2**46, I), (2**46, 1, I), (2**23, 2**23, I)]


@pytest.mark.parametrize("shape", HUGE, ids=str)
@pytest.mark.parametrize("kind", ["gru", "lstm_proj"])
def test_huge_layer_input_is_memory_error(shape, kind):
    """A zero-strided input of a few bytes whose copy, output or workspace cannot be allocated."""
    layer = make_layer(kind, np.float32)
    x = np.broadcast_to(np.float32(1), shape)
    with pytest.raises(MemoryError):
        layer(x)
    if shape[1] <= 2**21:
        with pytest.raises(MemoryError):
            layer(x, None, np.broadcast_to(np.int64(1), (shape[1],)))


@pytest.mark.parametrize("shape", HUGE, ids=str)
@pytest.mark.parametrize("variant", ["gru", "lstm"])
def test_huge_cell_input_is_memory_error(shape, variant):
    cell = make_cell(variant, np.float32)
    x = np.broadcast_to(np.float32(1), shape)
    with pytest.raises(MemoryError):
        cell.run(x)
    if shape[1] * shape[2] * 4 > 2**47:  # a step of that batch cannot be allocated either
        with pytest.raises(MemoryError):
            cell(x[0])


WORKSPACE_SCRIPT = textwrap.dedent("""
    import resource, sys
    import numpy as np
    import fastcell

    # An LSTM with a wide cell and a one-number projection: input and output are tiny, but the
    # kernel's workspace (T*B rows of 4*H gate values) is 16 GiB.
    H = 2**14
    layer = fastcell.LSTM(1, H, proj_size=1)
    x = np.ones((2**16, 1, 1), np.float32)
    small = layer(x[:8])
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
    limit = vm + 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:
        layer(x)
    except MemoryError as e:
        print("MemoryError:", e)
    else:
        sys.exit("no MemoryError")
    try:
        layer.new_state(2**26)
    except MemoryError as e:
        print("MemoryError:", e)
    else:
        sys.exit("no MemoryError")
    # The process is still healthy: the same call on a short sequence gives the same numbers.
    again = layer(x[:8])
    assert np.array_equal(again[0], small[0])
    print("ok")
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc: Linux")
def test_workspace_that_cannot_be_allocated_is_memory_error():
    """The kernel's own workspace allocation fails (under an address-space limit, so the test
    does not depend on the machine's memory or overcommit setting): MemoryError, no crash."""
    root = Path(fastcell.__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
               OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", WORKSPACE_SCRIPT], cwd=root, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.split("\n")
    assert lines[0].startswith("MemoryError: workspace of ")
    assert lines[1].startswith("MemoryError")
    assert lines[2] == "ok"


# =========================== weights ===========================

def wrong_shapes(shape):
    """Shapes a weight of `shape` must not have."""
    out = [tuple(d + 1 if i == k else d for i, d in enumerate(shape)) for k in range(len(shape))]
    out += [tuple(d - 1 if i == k else d for i, d in enumerate(shape)) for k in range(len(shape))]
    out += [shape[::-1], shape + (1,), (1,) + shape, (int(np.prod(shape)),) if len(shape) > 1 else (),
            (0,) + shape[1:]]
    return [s for s in dict.fromkeys(out) if s != shape]


@layer_kinds
@pytest.mark.parametrize("bias", [True, False])
def test_load_state_dict_mis_shaped_entry(kind, bias):
    layer = make_layer(kind, num_layers=2, bidirectional=True, bias=bias)
    x = np.random.default_rng(14).standard_normal((T, B, I))
    before = layer(x)
    good = layer.state_dict()
    tried = 0
    for name, shape in layer.expected_shapes().items():
        for bad in wrong_shapes(shape):
            sd = dict(good, **{name: np.zeros(bad)})
            msg = "mis-shaped: " + re.escape(f"{name} expected {shape}, got {bad}")
            with pytest.raises(fastcell.StateDictError, match=msg):
                layer.load_state_dict(sd)
            tried += 1
    assert tried > 20
    # Every refused load left the layer as it was.
    assert_identical(layer(x), before)
    assert issubclass(fastcell.StateDictError, ValueError)


@layer_kinds
def test_load_state_dict_missing_and_unexpected(kind):
    layer = make_layer(kind, num_layers=2)
    good = layer.state_dict()
    for name, shape in layer.expected_shapes().items():
        sd = {k: v for k, v in good.items() if k != name}
        with pytest.raises(fastcell.StateDictError, match="missing: " + re.escape(f"{name} {shape}")):
            layer.load_state_dict(sd)
    G = LAYERS[kind][0].gates * H
    extras = {"weight_ih_l2": np.zeros((G, H)), "weight_ih_l0_reverse": np.zeros((G, I)),
              "weight_hr_l0": np.zeros((P, H)), "weight_ph_l0": np.zeros((3, H)),
              "bias": np.zeros(G), "": np.zeros(1), "weight_ih": np.zeros((G, I))}
    for name, value in extras.items():
        if name in good:
            continue
        with pytest.raises(fastcell.StateDictError, match="unexpected: " + re.escape(name)):
            layer.load_state_dict(dict(good, **{name: value}))
    no_bias = make_layer(kind, bias=False)
    with pytest.raises(fastcell.StateDictError, match="unexpected: bias_ih_l0"):
        no_bias.load_state_dict(make_layer(kind).state_dict())


@layer_kinds
@bad_values
def test_load_state_dict_bad_values(kind, bad):
    layer = make_layer(kind)
    good = layer.state_dict()
    for name, v in good.items():
        with pytest.raises((TypeError, ValueError), match=exp(name) + "|mis-shaped: " + re.escape(name)):
            layer.load_state_dict(dict(good, **{name: BAD_VALUES[bad](v.shape)}))
    with pytest.raises(TypeError, match=exp("weight_ih_l0") + " expected an array, got None"):
        layer.load_state_dict(dict(good, weight_ih_l0=None))


@pytest.mark.parametrize("value", [None, "abc", 5, [np.zeros(3)], [("a", 1, 2)], np.zeros(3)],
                         ids=["None", "str", "int", "list", "triples", "array"])
def test_load_state_dict_not_a_mapping(value):
    with pytest.raises(TypeError, match=exp("state_dict") + " expected a mapping"):
        make_layer("gru").load_state_dict(value)


@pytest.mark.parametrize("src,dst", [
    (("gru", {}), ("lstm", {})),
    (("lstm", {}), ("rnn", {})),
    (("lstm", {}), ("peephole_lstm", {})),
    (("peephole_lstm", {}), ("lstm", {})),
    (("lstm_proj", {}), ("lstm", {})),
    (("lstm", {}), ("lstm_proj", {})),
    (("gru", {"num_layers": 1}), ("gru", {"num_layers": 2})),
    (("gru", {"num_layers": 2}), ("gru", {"num_layers": 1})),
    (("gru", {"bidirectional": True}), ("gru", {})),
    (("gru", {}), ("gru", {"bidirectional": True})),
    (("rnn", {"bias": False}), ("rnn", {})),
    (("lstm", {"num_layers": 2, "bidirectional": True}), ("lstm", {"num_layers": 2})),
])
def test_load_state_dict_of_another_config(src, dst):
    """A state dict that disagrees with the layer's config is refused as a whole."""
    source = make_layer(src[0], **src[1])
    target = make_layer(dst[0], **dst[1])
    x = np.random.default_rng(15).standard_normal((T, B, I))
    before = target(x)
    with pytest.raises(fastcell.StateDictError, match=type(target).__name__ + r".load_state_dict: "):
        target.load_state_dict(source.state_dict())
    assert_identical(target(x), before)


def test_load_state_dict_of_another_hidden_size():
    target = make_layer("lstm", num_layers=2, bidirectional=True)
    source = fastcell.LSTM(I, H + 1, num_layers=2, bidirectional=True)
    with pytest.raises(fastcell.StateDictError) as e:
        target.load_state_dict(source.state_dict())
    # every entry is listed, layer 1's input width (2 * H) included
    msg = str(e.value)
    for name in target.expected_shapes():
        assert f"mis-shaped: {name} " in msg
    assert f"weight_ih_l1 expected ({4 * H}, {2 * H}), got ({4 * H + 4}, {2 * H + 2})" in msg


@layer_kinds
@other_dtypes
def test_load_state_dict_converts_other_real_dtypes(kind, src):
    """Documented: entries are converted to the layer's dtype, as np.asarray(v, dtype) does."""
    layer = make_layer(kind, np.float32, num_layers=2)
    rng = np.random.default_rng(16)
    given = {n: other_dtype(src, np.float32, s, rng)[0] for n, s in layer.expected_shapes().items()}
    layer.load_state_dict(given)
    for n, v in layer.state_dict().items():
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, np.asarray(given[n], np.float32))


@pytest.mark.parametrize("kwargs,name,error", [
    ({"input_size": 0}, "input_size", ValueError),
    ({"input_size": -3}, "input_size", ValueError),
    ({"input_size": 3.0}, "input_size", TypeError),
    ({"input_size": "3"}, "input_size", TypeError),
    ({"input_size": None}, "input_size", TypeError),
    ({"input_size": True}, "input_size", TypeError),
    ({"hidden_size": 0}, "hidden_size", ValueError),
    ({"hidden_size": np.float64(4)}, "hidden_size", TypeError),
    ({"num_layers": 0}, "num_layers", ValueError),
    ({"num_layers": -1}, "num_layers", ValueError),
    ({"proj_size": -1}, "proj_size", ValueError),
    ({"proj_size": H}, "proj_size", ValueError),
    ({"proj_size": H + 3}, "proj_size", ValueError),
    ({"proj_size": 1.5}, "proj_size", TypeError),
    ({"bias": "yes"}, "bias", TypeError),
    ({"bias": None}, "bias", TypeError),
    ({"bias": 2}, "bias", TypeError),
    ({"batch_first": "no"}, "batch_first", TypeError),
    ({"bidirectional": [True]}, "bidirectional", TypeError),
    ({"dtype": np.int32}, "dtype", TypeError),
    ({"dtype": np.float16}, "dtype", TypeError),
    ({"dtype": np.complex64}, "dtype", TypeError),
    ({"dtype": "nonsense"}, "dtype", TypeError),
    ({"dtype": object}, "dtype", TypeError),
])
def test_layer_constructor_arguments(kwargs, name, error):
    args = dict(input_size=I, hidden_size=H)
    args.update(kwargs)
    with pytest.raises(error, match=exp(name) + " expected "):
        fastcell.LSTM(**args)


@pytest.mark.parametrize("cls,kwargs,name,error", [
    (fastcell.RNN, {"nonlinearity": "sigmoid"}, "nonlinearity", ValueError),
    (fastcell.RNN, {"nonlinearity": None}, "nonlinearity", ValueError),
    (fastcell.GRU, {"reset_after": "no"}, "reset_after", TypeError),
    (fastcell.GRU, {"reset_after": None}, "reset_after", TypeError),
])
def test_layer_options(cls, kwargs, name, error):
    with pytest.raises(error, match=exp(name) + " expected "):
        cls(I, H, **kwargs)


CROSS = [("lstm", "gru"), ("lstm", "rnn_tanh"), ("gru", "lstm"), ("gru", "rnn_tanh"),
         ("rnn_tanh", "gru"), ("rnn_tanh", "lstm"), ("peephole_lstm", "gru"), ("gru", "peephole_lstm")]


@pytest.mark.parametrize("hidden", [4, 6, 12])
@pytest.mark.parametrize("src,dst", CROSS)
def test_cell_given_another_cells_weights(src, dst, hidden):
    """The gate count is inferred from weight_ih's rows: another cell type's weights disagree with
    each other (weight_hh, weight_ph) and are refused, naming the weight."""
    w = init_weights(np.random.default_rng(0), VARIANTS[src][0], I, hidden, np.float64,
                     peephole=src == "peephole_lstm")
    w.pop("weight_ph", None)
    if dst == "peephole_lstm":
        w["weight_ph"] = np.zeros((3, hidden))
    cls = {"rnn_tanh": fastcell.RNNCell, "gru": fastcell.GRUCell, "lstm": fastcell.LSTMCell,
           "peephole_lstm": fastcell.PeepholeLSTMCell}[dst]
    with pytest.raises(ValueError, match=r"^(weight_ih|weight_hh|weight_ph|bias_ih|bias_hh): expected "):
        cls(**w)


def test_cell_given_a_projected_lstms_weights():
    w = init_weights(np.random.default_rng(0), 4, I, H, np.float64, proj_size=P)
    w.pop("weight_hr")
    msg = exp("weight_hh") + re.escape(f" expected shape ({4 * H}, {H}), got ({4 * H}, {P})")
    with pytest.raises(ValueError, match=msg):
        fastcell.LSTMCell(**w)


@cell_variants
def test_cell_weights_with_nan_build_and_propagate(variant):
    """Weights are not checked for finiteness (PyTorch does not either): NaN weights give NaN."""
    w = init_weights(np.random.default_rng(0), VARIANTS[variant][0], I, H, np.float64,
                     peephole=variant == "peephole_lstm")
    w["weight_ih"][0, 0] = np.nan
    y, _ = make_cell(variant, w=w).run(np.ones((T, B, I)))
    assert np.isnan(y).any()
