"""Helpers shared by the test modules of several folders of tests/, written once here (conftest.py
holds the fixtures and the most basic helpers; tests/ is on sys.path, so `from helpers import ...`
works from every folder).

- Models and awkward arrays for the bad-input and API tests (bad_input/, api/): small layers and
  cells with fixed weights, states, the same values laid out every awkward way, values of other
  dtypes, values that are not real arrays.
"""

import re
from itertools import count

import numpy as np
import pytest

import fastcell
from conftest import VARIANTS, init_weights, make_cell

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


# ---- models ----

def make_layer(kind, dtype=np.float64, **kw):
    cls, extra = LAYERS[kind]
    layer = cls(I, H, dtype=dtype, **extra, **kw)
    # Deterministic weights with PyTorch's initialisation scale.
    rng = np.random.default_rng(sorted(LAYERS).index(kind))
    k = 1 / np.sqrt(H)
    layer.load_state_dict({n: rng.uniform(-k, k, s) for n, s in layer.expected_shapes().items()})
    return layer


def cell_weights(variant, dtype=np.float64, bias=True, seed=0, hidden=H, inputs=I):
    """PyTorch-initialised weights of a VARIANTS cell, from a fixed seed."""
    rng = np.random.default_rng(seed)
    return init_weights(rng, VARIANTS[variant][0], inputs, hidden, dtype,
                        peephole=variant == "peephole_lstm", bias=bias)


def cell_of(variant, dtype=np.float64, **kw):
    """A cell of VARIANTS with the weights of cell_weights (seed 0: the same weights every time)."""
    return make_cell(variant, cell_weights(variant, dtype, **kw))


def state_of(variant, batch, dtype=np.float64, seed=1):
    """A random cell state of batch shape `batch` ((): unbatched), from a fixed seed."""
    rng = np.random.default_rng(seed)

    def s():
        return rng.standard_normal(batch + (H,)).astype(dtype)

    return (s(), s()) if variant in LSTM_CELLS else s()


def inputs(shape, dtype=np.float64, seed=2):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


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


# ---- comparing results ----

def flat(result):
    """(output, state) / state / (h, c) as a flat list of arrays."""
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
