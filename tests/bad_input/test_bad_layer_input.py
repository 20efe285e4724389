"""Hostile and awkward input to the layers (fastcell.RNN, GRU, LSTM, PeepholeLSTM): calls with x, hx
and lengths of wrong ranks, sizes and kinds raise ValueError or TypeError whose message starts with
the argument's name; non-contiguous, Fortran-ordered, negative-stride, read-only, memory-mapped,
misaligned, byte-swapped, broadcast inputs, other real dtypes and nested lists give exactly the
numbers of a clean C-contiguous array of the layer's dtype; the constructors check their
arguments.

The layers' state dicts: bad_input/test_bad_state_dict.py; NaN, Inf and empty input:
bad_input/test_nonfinite_and_empty.py; sizes that cannot be allocated:
bad_input/test_memory_errors.py.
"""

import re

import numpy as np
import pytest

import fastcell
from helpers import (BAD_VALUES, LSTM_LAYERS, B, H, I, T, assert_identical, bad_values, dtypes, exp,
                     flat, laid_out, layer_hx, layer_kinds, layouts_param, make_layer, mapped,
                     other_dtype, other_dtypes)


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


# ---- layers: constructors, and a call of each error ----

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


def test_constructor_errors():
    with pytest.raises(ValueError, match="hidden_size"):
        fastcell.LSTM(3, 0)
    with pytest.raises(ValueError, match="proj_size"):
        fastcell.LSTM(3, 4, proj_size=4)
    with pytest.raises(ValueError, match="nonlinearity"):
        fastcell.RNN(3, 4, nonlinearity="sigmoid")
    with pytest.raises(TypeError, match="dtype"):
        fastcell.GRU(3, 4, dtype=np.int32)


def test_call_errors(rng):
    fm = fastcell.LSTM(3, 4, num_layers=2)
    with pytest.raises(ValueError, match="x: expected shape"):
        fm(np.zeros((5, 2, 4)))
    with pytest.raises(ValueError, match="sequence length larger than 0"):
        fm(np.zeros((0, 2, 3)))
    with pytest.raises(TypeError, match="hx: expected an"):
        fm(np.zeros((5, 2, 3)), np.zeros((2, 2, 4)))
    with pytest.raises(ValueError, match="h_0: expected shape"):
        fm(np.zeros((5, 2, 3)), (np.zeros((1, 2, 4)), np.zeros((2, 2, 4))))
    for bad in ([0, 3], [1, 6], [1, 2, 3]):
        with pytest.raises(ValueError, match="lengths"):
            fm(np.zeros((5, 2, 3)), lengths=np.array(bad))
    with pytest.raises(TypeError, match="lengths: expected integers"):
        fm(np.zeros((5, 2, 3)), lengths=np.array([1.0, 2.0]))


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
