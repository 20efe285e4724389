"""Helpers shared by the test modules of several folders of tests/, written once here (conftest.py
holds the fixtures and the most basic helpers; tests/ is on sys.path, so `from helpers import ...`
works from every folder).

- Models and awkward arrays for the bad-input and API tests (bad_input/, api/): small layers and
  cells with fixed weights, states, the same values laid out every awkward way, values of other
  dtypes, values that are not real arrays.
- Weight files (files/, cli/, converters/): small models of every cell and layer type, float and
  reduced; files built by hand, byte by byte; comparing two models bit for bit.
- Converters (converters/, parity/): the model classes by kind, and differences over arrays and
  torch tensors alike.
"""

import json
import re
import struct
from itertools import count
from pathlib import Path

import numpy as np
import pytest

import fastcell
from fastcell.formats.reduced import Reduced
from fastcell.models.layers import _Layer
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


# ==== weight files (files/, cli/, converters/) ====

FORMATS = ["int8", "bf16"]
# The reduced models the tests build, by name: fastcell.quantize's format and arguments. "int8x8":
# int8 weights with each layer's input x quantized to 8 bits (input_bits=8) instead of 16.
QUANTIZED = {"int8": ("int8", {}), "int8x8": ("int8", {"input_bits": 8}), "bf16": ("bf16", {})}
QFORMATS = list(QUANTIZED)


def quantized(model, name, **kwargs):
    """fastcell.quantize(model, ...) as QUANTIZED names it."""
    fmt, args = QUANTIZED[name]
    return fastcell.quantize(model, fmt, **args, **kwargs)
# The reduced files' models: 3 -> 17, projection 5 (not multiples of any vector width); the float
# files' models: 3 -> 4.
ODD_I, ODD_H, ODD_P = 3, 17, 5


def layer_of(variant, dtype=np.float32, num_layers=1, bidirectional=False, proj_size=0,
             bias=True, batch_first=False, input_size=3, hidden_size=4):
    """A layer of VARIANTS with its constructor's initialisation (3 -> 4 by default)."""
    common = dict(num_layers=num_layers, bias=bias, batch_first=batch_first,
                  bidirectional=bidirectional, dtype=dtype)
    if variant.startswith("rnn"):
        return fastcell.RNN(input_size, hidden_size, **VARIANTS[variant][1], **common)
    if variant.startswith("gru"):
        return fastcell.GRU(input_size, hidden_size, **VARIANTS[variant][1], **common)
    if variant == "lstm":
        return fastcell.LSTM(input_size, hidden_size, proj_size=proj_size, **common)
    return fastcell.PeepholeLSTM(input_size, hidden_size, **common)


def small_cell(variant, dtype=np.float32, bias=True, seed=0, input_size=3, hidden_size=4):
    """A cell of VARIANTS with PyTorch's initialisation from a fixed seed (3 -> 4 by default)."""
    return cell_of(variant, dtype, bias=bias, seed=seed, hidden=hidden_size, inputs=input_size)


def odd_layer(variant, **kwargs):
    return layer_of(variant, input_size=ODD_I, hidden_size=ODD_H, **kwargs)


def odd_cell(variant, bias=True, seed=0, dtype=np.float32):
    return small_cell(variant, dtype, bias=bias, seed=seed, input_size=ODD_I, hidden_size=ODD_H)


def reduced_layer(fmt, variant="lstm", **kwargs):
    """odd_layer in a reduced format as QUANTIZED names it (int8, int8x8, bf16)."""
    return quantized(odd_layer(variant, **kwargs), fmt)


def assert_same_model(a, b):
    assert type(a) is type(b)
    assert a.config() == b.config()
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and sa[name].shape == sb[name].shape, name
        assert sa[name].tobytes() == sb[name].tobytes(), f"{name} differs"


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_same_stored(a, b):
    """The weights as kept, bit for bit: float arrays, int8 data and scales, bf16 bits."""
    assert type(a) is type(b) and a.config() == b.config()
    assert a.weight_format == b.weight_format and a.weight_bytes == b.weight_bytes
    sa, sb = a._stored_state_dict(), b._stored_state_dict()
    assert list(sa) == list(sb)
    for name, u in sa.items():
        v = sb[name]
        assert type(u) is type(v), name
        if isinstance(u, Reduced):
            assert u.format == v.format and same_bits(u.data, v.data), name
            assert (u.scale is None) == (v.scale is None), name
            assert u.scale is None or same_bits(u.scale, v.scale), name
        else:
            assert same_bits(u, v), name


def assert_same_outputs(a, b, x):
    """Bitwise the same outputs and final states (np.array_equal, and the same bytes)."""
    if isinstance(a, _Layer):
        ya, sa = a(x)
        yb, sb = b(x)
    else:
        ya, sa = a.run(x)
        yb, sb = b.run(x)
    sa, sb = (sa if isinstance(sa, tuple) else (sa,)), (sb if isinstance(sb, tuple) else (sb,))
    for u, v in zip((ya, *sa), (yb, *sb)):
        assert np.array_equal(u, v) and same_bits(u, v)


def saved_with_a_run(model, tmp_path, x):
    """model saved as tmp_path/m.safetensors, with x.npy and the model's output on it, y.npy, beside
    it: for another process to load and check."""
    fastcell.save(model, tmp_path / "m.safetensors")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model(x)[0])


# ---- the bytes of a file ----

def build(tensors, metadata, *, header_extra=None, raw_header=None, length=None, tail=b""):
    """A safetensors file: tensors {name: array or (dtype, shape, bytes)}, laid out in order."""
    header, data = {}, b""
    for name, t in tensors.items():
        if isinstance(t, np.ndarray):
            t = ({"float32": "F32", "float64": "F64"}[t.dtype.name], list(t.shape),
                 np.ascontiguousarray(t).astype(t.dtype.newbyteorder("<")).tobytes())
        dtype, shape, raw = t
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata is not None:
        header["__metadata__"] = metadata
    header.update(header_extra or {})
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data + tail


def tensor_entry(dtype, a):
    """A tensor entry for build(): safetensors dtype and an array's little-endian bytes."""
    a = np.asarray(a)
    return (dtype, a.shape, a.astype(a.dtype.newbyteorder("<")).tobytes())


def stored_parts(model, version=None):
    """({name: (dtype, shape, bytes)}, metadata) of a valid file for this model, whatever its
    weight format: I8 / BF16 matrices, F32 int8 scales "<matrix>.scale", F32 / F64 float tensors;
    version "2" for reduced weights, "1" for float ones."""
    tensors = {}
    for name, v in model._stored_state_dict().items():
        if isinstance(v, Reduced):
            tensors[name] = tensor_entry("I8" if v.format == "int8" else "BF16", v.data)
            if v.scale is not None:
                tensors[name + ".scale"] = tensor_entry("F32", v.scale)
        else:
            tensors[name] = tensor_entry({"float32": "F32", "float64": "F64"}[v.dtype.name], v)
    reduced = model.weight_format in FORMATS
    meta = {"format": "fastcell", "version": version if version is not None else ("2" if reduced else "1"),
            "config": json.dumps(model.config())}
    return tensors, meta


def header_of_bytes(blob):
    """(header, header length, data) of a file's bytes."""
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), n, blob[8 + n:]


def header_of(path):
    return header_of_bytes(Path(path).read_bytes())


def split(blob):
    """(header, data) of a file's bytes."""
    header, _, data = header_of_bytes(blob)
    return header, data


def join(header, data):
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def expected_dtypes(model):
    """{name: safetensors dtype} by the convention of stored_parts."""
    fmt = model.weight_format
    out = {}
    for name, v in model._stored_state_dict().items():
        if isinstance(v, Reduced):
            out[name] = {"int8": "I8", "bf16": "BF16"}[fmt]
            if fmt == "int8":
                out[name + ".scale"] = "F32"
        else:
            out[name] = {"float32": "F32", "float64": "F64"}[v.dtype.name]
    return out


# ==== converters (converters/, parity/) ====

LAYER_TYPES = {"rnn": fastcell.RNN, "gru": fastcell.GRU, "lstm": fastcell.LSTM,
               "peephole_lstm": fastcell.PeepholeLSTM}
CELL_TYPES = {"rnn": fastcell.RNNCell, "gru": fastcell.GRUCell, "lstm": fastcell.LSTMCell,
              "peephole_lstm": fastcell.PeepholeLSTMCell}


def tensor_max_diff(a, b):
    """Largest |a - b| over arrays or torch tensors, or tuples and lists of them, in float64."""
    if isinstance(a, (tuple, list)):
        return max(tensor_max_diff(u, v) for u, v in zip(a, b))
    a, b = (v.detach().numpy() if hasattr(v, "detach") else v for v in (a, b))
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0))


# ---- the command line ----

def cli_without(package, command, cwd):
    """`fastcell COMMAND...` (main()) in a child process where importing `package` fails."""
    import subprocess
    import sys

    from conftest import ENV

    code = (f"import sys; sys.modules[{package!r}] = None\n"
            "from fastcell.cli import main\n"
            f"sys.exit(main({list(command)!r}))\n")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env=ENV, timeout=120)
