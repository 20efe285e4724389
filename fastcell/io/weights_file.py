"""The weight file: safetensors with fastcell's config in the metadata (docs/DESIGN.md "The weight file").

    8 bytes    N, the header length (unsigned little-endian)
    N bytes    JSON: {"__metadata__": {"format": "fastcell", "version": "1", "config": "<json>"},
                      "<name>": {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...}
    the rest   the tensors' bytes (little-endian, C order), offsets relative to the data section

Tensors carry PyTorch's state_dict names. The config names the module, cell type, sizes and
``dtype`` (float32 or float64: what the model computes in), and, for a reduced model,
``weight_format`` (fastcell.formats.reduced; "float32" or "float64" are also accepted there when
they equal ``dtype``). A layer that runs backwards in time (ONNX's direction="reverse") has
``"reverse": true``; the key is absent otherwise, so older readers refuse such a file rather than
run it forwards. Likewise an int8 model that quantizes its inputs x to 8 bits has
``"input_bits": 8`` (16 or 8, int8 only); absent, x takes 16 bits, as in every file before the
key. What each tensor holds:

    format     W_ih, W_hh, W_hr (names as PyTorch)   "<matrix>.scale"           biases, peepholes
    float32    F32                                   -                          F32
    float64    F64                                   -                          F64
    int8       I8, q in [-128, 127]                  F32 (rows,), finite > 0    F32
    bf16       BF16 (the bit patterns)               -                          F32

An int8 matrix ``weight_ih_l0`` (rows, cols) has its per-output-row scales in the tensor
``weight_ih_l0.scale`` (rows,): the weight is ``q[r, c] * scale[r]`` (``weight_ih.scale`` for a
cell). Version "1" files hold float weights only (every fastcell reads them, and float files are
still written as version 1); version "2" files may hold a reduced format, which their config's
``weight_format`` names. The tensors' own safetensors dtypes (I8, BF16, F32) let any safetensors
reader open the file: safetensors.torch gives int8 and bfloat16 tensors, safetensors.numpy int8
arrays (and bfloat16 ones where ml_dtypes is installed).

``save`` writes the format itself: tensors grouped by item size, largest first, after a header
padded with spaces to a multiple of 8 bytes, so every tensor is aligned to its item size (as the
safetensors package lays files out). ``load`` trusts nothing in the file: it parses the header
itself (bounded length, strict JSON types, offsets inside the file, no overlap, no gap, sizes that
match shapes), checks the config, then checks every name, shape and dtype against what the config
implies, and only then reads bytes, each read sized by a checked entry; the int8 scales are then
checked to be finite and > 0. A bad file raises FormatError saying what is wrong. Neither saving
nor loading imports torch, pickle, or even the safetensors package.
"""

import errno
import json
import math
import os
import stat
import struct
import threading

import numpy as np

from fastcell import spec
from fastcell.formats.reduced import FLOAT_FORMATS, FORMATS, INPUT_BITS, REDUCED_FORMATS, Reduced
from fastcell.models import CELLS, LAYERS, is_model, with_threads
from fastcell.spec import is_matrix
from fastcell_c.team import check_threads

__all__ = ["save", "load", "FormatError", "read_config", "expected_shapes", "expected_tensors"]

FORMAT = "fastcell"
VERSION = "1"          # float files: every fastcell reads them
REDUCED_VERSION = "2"  # files whose config has a weight_format (int8, bf16)
SUPPORTED_VERSIONS = ("1", "2")
SCALE_SUFFIX = ".scale"  # int8 "weight_ih_l0" keeps its per-row scales in "weight_ih_l0.scale"
INITIAL_NAMES = ("initial_h", "initial_c")  # a layer's initial state, with "initial_state": true

# A fastcell header takes under a kilobyte per layer and direction (at most 8 tensors: an int8
# LSTM with projection and its scales), so 1 MiB holds MAX_LAYERS bidirectional layers.
# The bound keeps json.loads of a hostile header small in time and memory (a 100 MB header of
# "{}," would build tens of millions of Python objects).
MAX_HEADER_BYTES = 1 << 20
MAX_LAYERS = 512
MAX_SIZE = 2**31 - 1  # BLAS dimensions are 32-bit ints
MAX_NDIM = 8
MAX_PROBLEMS_SHOWN = 12

# The byte-sized dtypes safetensors names, with their item sizes, so a tensor of any of them gets
# its size checked and then a precise "has dtype X, expected F32" (packed sub-byte types such as
# F4 are not listed: "unknown dtype").
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
                "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
                "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_ST_DTYPE = {"float32": "F32", "float64": "F64"}
_ST_MATRIX = {"int8": "I8", "bf16": "BF16"}  # a reduced matrix's dtype; bf16 read as its bits
_NP_DTYPE = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "I8": np.dtype("i1"), "BF16": np.dtype("<u2")}


# The config keys of each (module, cell): name -> kind ("size", "size0", "layers", "bool",
# "dtype", or a tuple of allowed strings).
_COMMON = {"cell": spec.KINDS, "module": ("layer", "cell"), "input_size": "size",
           "hidden_size": "size", "bias": "bool", "dtype": tuple(_ST_DTYPE)}
_LAYER_KEYS = {"num_layers": "layers", "batch_first": "bool", "bidirectional": "bool"}
_CELL_EXTRA = {"rnn": {"nonlinearity": ("tanh", "relu")}, "gru": {"reset_after": "bool"},
               "lstm": {}, "peephole_lstm": {}}
_LAYER_EXTRA = {**_CELL_EXTRA, "lstm": {"proj_size": "size0"}}


class FormatError(ValueError):
    """A file fastcell cannot read: not a valid fastcell weight file, or an ONNX or Keras model it
    cannot import (fastcell.convert.onnx_import, keras_import); the message says what is wrong."""


# ---- writing ----

def save(model, path):
    """Write a fastcell model (a layer or a cell) to ``path`` as a fastcell safetensors file.

    Float models are written as version 1 files, reduced ones (fastcell.quantize: int8, bf16) as
    version 2 files holding the int8 data and its scales, or the bf16 bits, exactly as kept.
    The file is written next to ``path`` and renamed over it, so a reader never sees half a file.
    """
    if not is_model(model):
        raise TypeError(
            "save: expected a fastcell model (RNN, GRU, LSTM, PeepholeLSTM or one of their cells), "
            f"got {type(model).__module__}.{type(model).__qualname__}"
            + ("; convert a PyTorch module with fastcell.from_torch first"
               if type(model).__module__.startswith("torch") else ""))
    config = model.config()
    _check_config(config)  # never write a file that load would refuse
    tensors = _file_tensors({**model._stored_state_dict(), **_initial_tensors(model)})
    expected = expected_tensors(config)
    got = {name: (a.shape, dtype) for name, dtype, a in tensors}
    if got != expected:  # a model whose weights disagree with its own config: a fastcell bug
        raise ValueError(f"save: {type(model).__name__}'s weights disagree with its config")
    reduced = _weight_format(config) in REDUCED_FORMATS
    metadata = {"format": FORMAT, "version": REDUCED_VERSION if reduced else VERSION,
                "config": json.dumps(config, sort_keys=True)}
    head, tensors = _layout(tensors, metadata)
    # Written by open() (so a bad path is a plain OSError) to a temporary file that is renamed
    # over path: a reader sees the old file or the new one, never half of one.
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}-{threading.get_ident()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for a in tensors:
                f.write(memoryview(a).cast("B"))
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.errno is not None:
            raise type(exc)(exc.errno, exc.strerror, path) from None  # name path, not tmp
        raise


def _initial_tensors(model):
    """A layer's initial state as tensors ("initial_h", and "initial_c" for the LSTMs)."""
    init = getattr(model, "_initial", None)
    if init is None:
        return {}
    return dict(zip(INITIAL_NAMES, init))


def _file_tensors(stored):
    """[(name, safetensors dtype, little-endian C-contiguous array)] of a model's weights as kept:
    float arrays as they are, an int8 matrix as its data and its scales, a bf16 one as its bits."""
    out = []
    for name, v in stored.items():
        if isinstance(v, Reduced):
            out.append((name, _ST_MATRIX[v.format], v.data))
            if v.scale is not None:
                out.append((name + SCALE_SUFFIX, "F32", v.scale))
        else:
            v = np.asarray(v)
            out.append((name, _ST_DTYPE[v.dtype.name], v))
    # Own contiguous little-endian copies where needed: the bytes written are the array's memory.
    return [(name, dtype, np.ascontiguousarray(a, dtype=_NP_DTYPE[dtype])) for name, dtype, a in out]


def _layout(tensors, metadata):
    """(header bytes with their length field, arrays in file order). Tensors are grouped by item
    size, largest first (stable), and the header is padded with spaces to a multiple of 8 bytes,
    so every tensor starts at a multiple of its item size, as the safetensors package writes."""
    tensors = sorted(tensors, key=lambda t: -t[2].dtype.itemsize)
    header, pos = {"__metadata__": metadata}, 0
    for name, dtype, a in tensors:
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [pos, pos + a.nbytes]}
        pos += a.nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    if len(h) > MAX_HEADER_BYTES:
        raise ValueError(f"save: the header would take {len(h)} bytes, more than the "
                         f"{MAX_HEADER_BYTES}-byte limit load accepts")
    return struct.pack("<Q", len(h)) + h, [a for _, _, a in tensors]


# ---- reading ----

def load(path, *, threads=1):
    """Read a fastcell weight file and rebuild its model (a layer or a cell), computing on
    `threads` threads (``model.threads``; a file keeps no thread count: that is the service's).

    Raises FormatError (a ValueError) naming the problem for any file that is not a valid fastcell
    file, OSError when the file cannot be opened. Imports neither torch nor pickle.
    """
    threads = check_threads(threads)
    path = os.fspath(path)
    with open_regular(path) as f:
        config, entries, data_start = _read_header(f, path)
        weights = _read_tensors(f, path, entries, data_start)
    _check_scales(weights, path)
    return with_threads(_build(config, weights, path), threads)


def read_config(path):
    """The config of a fastcell file, after the same checks as ``load`` but without reading the
    tensors' bytes."""
    path = os.fspath(path)
    with open_regular(path) as f:
        return _read_header(f, path)[0]


def expected_shapes(config):
    """{name: shape} of every tensor a model with this config has, under PyTorch's names.

    Pure arithmetic on the config (nothing is allocated), so it can be checked before any model
    is built. Equals ``model.expected_shapes()`` for layers.
    """
    if config["module"] == "cell":
        return spec.cell_shapes(config["cell"], config["input_size"], config["hidden_size"],
                                config["bias"])
    return spec.layer_shapes(config["cell"], config["input_size"], config["hidden_size"],
                             config["num_layers"], config["bias"], config["bidirectional"],
                             config.get("proj_size", 0))


def expected_tensors(config):
    """{name: (shape, safetensors dtype)} of every tensor in a file with this (checked) config:
    the parameters of ``expected_shapes`` in the config's weight format, plus an int8 matrix's
    scales "<matrix>.scale" (rows,) F32 right after it."""
    fmt = _weight_format(config)
    float_dtype = _ST_DTYPE[config["dtype"]]
    out = {}
    for name, shape in expected_shapes(config).items():
        if fmt in REDUCED_FORMATS and is_matrix(name):
            out[name] = (shape, _ST_MATRIX[fmt])
            if fmt == "int8":
                out[name + SCALE_SUFFIX] = ((shape[0],), "F32")
        else:
            out[name] = (shape, float_dtype)
    if config.get("initial_state"):
        n = config["num_layers"] * (2 if config["bidirectional"] else 1)
        out["initial_h"] = ((n, config.get("proj_size", 0) or config["hidden_size"]), float_dtype)
        if config["cell"] in ("lstm", "peephole_lstm"):
            out["initial_c"] = ((n, config["hidden_size"]), float_dtype)
    return out



def _weight_format(config):
    """How a (checked) config's weight matrices are stored: its weight_format, else its dtype."""
    return config.get("weight_format", config["dtype"])


class open_regular:
    """open(path, "rb") for a regular file. A missing file or a directory stays an OSError; a FIFO
    or a device is refused (opened non-blocking, so a FIFO cannot stall the loader)."""

    def __init__(self, path):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
            if not stat.S_ISREG(mode):
                raise FormatError(f"{path}: not a regular file")
            self.f = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def __enter__(self):
        return self.f

    def __exit__(self, *exc):
        self.f.close()


def _fail(path, message):
    return FormatError(f"{path}: {message}")


def _name(s, limit=60):
    """A file-supplied string, quoted and cut short, for an error message."""
    r = repr(s)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _read_header(f, path):
    """(config, {name: (dtype, shape, begin, end)}, data_start), every field checked."""
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        raise _fail(path, "empty file (0 bytes), not a fastcell weight file")
    head = f.read(8)
    if len(head) < 8:
        raise _fail(path, f"truncated: {len(head)} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(head, "little")
    if n == 0:
        raise _fail(path, "the header length is 0: not a safetensors file")
    if n > MAX_HEADER_BYTES or n > size - 8:
        if head[:4] == b"PK\x03\x04" or head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
            raise _fail(path, "this looks like a PyTorch checkpoint (zip or pickle), not a fastcell "
                              "weight file; convert it with `fastcell export SRC DEST`")
        if head[:6] == b"\x93NUMPY":
            raise _fail(path, "this is a NumPy .npy file, not a fastcell weight file")
        if n > MAX_HEADER_BYTES:
            raise _fail(path, f"the header claims {n} bytes, more than the {MAX_HEADER_BYTES}-byte "
                              "limit (a corrupt or non-safetensors file)")
        raise _fail(path, f"truncated: the header claims {n} bytes but only {size - 8} follow "
                          "the length field")
    raw = f.read(n)
    if len(raw) != n:
        raise _fail(path, f"truncated: read {len(raw)} of the header's {n} bytes")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as exc:
        raise _fail(path, f"the header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        raise _fail(path, f"the header is not valid JSON ({_short(exc)})") from None
    if not isinstance(header, dict):
        raise _fail(path, f"the header is a JSON {type(header).__name__}, expected an object")

    config = _read_metadata(header.pop("__metadata__", None), path)
    data_size = size - 8 - n
    entries = {name: _read_entry(name, e, data_size, path) for name, e in header.items()}
    _check_layout(entries, data_size, path)
    _check_against_config(entries, config, path)
    return config, entries, 8 + n


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {_name(k)}")
        d[k] = v
    return d


def _short(exc, limit=200):
    s = str(exc) or type(exc).__name__
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _read_metadata(meta, path):
    if meta is None:
        raise _fail(path, "no __metadata__ in the header: not a fastcell file (a plain safetensors "
                          "file? fastcell files carry their config in the metadata)")
    if not isinstance(meta, dict):
        raise _fail(path, f"__metadata__ is a JSON {type(meta).__name__}, expected an object")
    for k, v in meta.items():
        if not isinstance(v, str):
            raise _fail(path, f"__metadata__[{_name(k)}] is a JSON {type(v).__name__}, "
                              "expected a string (safetensors metadata is text only)")
    fmt = meta.get("format")
    if fmt != FORMAT:
        raise _fail(path, "not a fastcell file: __metadata__ has " +
                    ("no 'format'" if fmt is None else f"format {_name(fmt)}") +
                    f", expected {FORMAT!r}")
    version = meta.get("version")
    if version is None:
        raise _fail(path, "__metadata__ has no 'version'")
    if version not in SUPPORTED_VERSIONS:
        raise _fail(path, f"unknown format version {_name(version)}; this fastcell reads version "
                          f"{', '.join(SUPPORTED_VERSIONS)} (a newer fastcell wrote it?)")
    if "config" not in meta:
        raise _fail(path, "__metadata__ has no 'config'")
    try:
        config = json.loads(meta["config"], object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise _fail(path, f"the config is not valid JSON ({_short(exc)})") from None
    try:
        _check_config(config)
    except ValueError as exc:
        raise _fail(path, str(exc)) from None
    fmt = _weight_format(config)
    if fmt in REDUCED_FORMATS and version == "1":
        raise _fail(path, f"the config's weight_format is {fmt!r}, but version 1 files hold float "
                          f"weights only ({fmt} needs version {REDUCED_VERSION!r})")
    return config


def _check_config(config):
    """ValueError naming every problem if config is not one fastcell can build."""
    if not isinstance(config, dict):
        raise ValueError(f"the config is a JSON {type(config).__name__}, expected an object")
    problems = []
    for key in ("cell", "module"):
        if key not in config:
            problems.append(f"config has no {key!r}")
        elif config[key] not in _COMMON[key]:
            problems.append(f"config {key!r} is {_name(config[key])}, expected one of {list(_COMMON[key])}")
    if problems:
        raise ValueError("; ".join(problems))
    layer = config["module"] == "layer"
    spec = {**_COMMON, **(_LAYER_KEYS if layer else {}),
            **(_LAYER_EXTRA if layer else _CELL_EXTRA)[config["cell"]]}
    for key, kind in spec.items():
        if key not in config:
            problems.append(f"config has no {key!r} (needed for a {config['cell']} {config['module']})")
            continue
        v = config[key]
        isint = isinstance(v, int) and not isinstance(v, bool)
        if kind == "bool" and not isinstance(v, bool):
            problems.append(f"config {key!r} is {_name(v)}, expected true or false")
        elif kind in ("size", "size0", "layers"):
            low, high = (0 if kind == "size0" else 1), (MAX_LAYERS if kind == "layers" else MAX_SIZE)
            if not (isint and low <= v <= high):
                problems.append(f"config {key!r} is {_name(v)}, expected an integer in [{low}, {high}]")
        elif isinstance(kind, tuple) and v not in kind:
            problems.append(f"config {key!r} is {_name(v)}, expected one of {list(kind)}")
    optional = ("weight_format", "input_bits") + (("reverse", "initial_state") if layer else ())
    problems += [f"config has an unexpected key {_name(k)} for a {config['cell']} {config['module']}"
                 for k in config if k not in spec and k not in optional]
    if layer and "initial_state" in config and not isinstance(config["initial_state"], bool):
        problems.append(f"config 'initial_state' is {_name(config['initial_state'])}, expected "
                        "true or false")
    if layer and "reverse" in config:  # optional: absent, the layer runs forward in time
        if not isinstance(config["reverse"], bool):
            problems.append(f"config 'reverse' is {_name(config['reverse'])}, expected true or false")
        elif config["reverse"] and config.get("bidirectional") is True:
            problems.append("config 'reverse' is true, but a bidirectional layer runs both ways")
    if "weight_format" in config:  # optional: absent, the matrices are in the dtype
        fmt, dtype = config["weight_format"], config.get("dtype")
        if not isinstance(fmt, str) or fmt not in FORMATS:
            problems.append(f"config 'weight_format' is {_name(fmt)}, expected one of {list(FORMATS)}")
        elif fmt in REDUCED_FORMATS and dtype != "float32":
            problems.append(f"config 'weight_format' is {fmt!r}, which computes in float32, but "
                            f"'dtype' is {_name(dtype)}")
        elif fmt in FLOAT_FORMATS and dtype != fmt:
            problems.append(f"config 'weight_format' is {fmt!r} but 'dtype' is {_name(dtype)}")
    if "input_bits" in config:  # optional, int8 only: absent, x is quantized to 16 bits
        bits, fmt = config["input_bits"], config.get("weight_format", config.get("dtype"))
        if fmt != "int8":
            problems.append(f"config 'input_bits' is for int8 weights, but the weight format is "
                            f"{_name(fmt)}")
        elif not (isinstance(bits, int) and not isinstance(bits, bool) and bits in INPUT_BITS):
            problems.append(f"config 'input_bits' is {_name(bits)}, expected one of "
                            f"{list(INPUT_BITS)}")
    if not problems and config.get("proj_size", 0) >= config["hidden_size"]:
        problems.append(f"config 'proj_size' is {config['proj_size']}, expected 0 or less than "
                        f"hidden_size={config['hidden_size']}")
    if problems:
        raise ValueError("; ".join(problems))


def _read_entry(name, e, data_size, path):
    """(dtype, shape, begin, end) of one tensor entry, each field checked against the file."""
    where = f"tensor {_name(name)}"
    if not isinstance(e, dict):
        raise _fail(path, f"{where}: entry is a JSON {type(e).__name__}, expected an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in e]
    if missing:
        raise _fail(path, f"{where}: entry has no {', '.join(missing)}")
    extra = [k for k in e if k not in ("dtype", "shape", "data_offsets")]
    if extra:
        raise _fail(path, f"{where}: unexpected entry field {_name(extra[0])}")
    dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ST_ITEMSIZE:
        raise _fail(path, f"{where}: unknown dtype {_name(dtype)}")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise _fail(path, f"{where}: shape {_name(shape)} is not a list of at most {MAX_NDIM} "
                          "non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise _fail(path, f"{where}: data_offsets {_name(offsets)} is not a [begin, end] pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise _fail(path, f"{where}: data_offsets [{begin}, {end}] are not 0 <= begin <= end")
    if end > data_size:
        raise _fail(path, f"{where}: data_offsets [{begin}, {end}] run past the end of the data "
                          f"({data_size} bytes; truncated file?)")
    nbytes = math.prod(shape) * _ST_ITEMSIZE[dtype]
    if end - begin != nbytes:
        raise _fail(path, f"{where}: shape {tuple(shape)} of {dtype} needs {nbytes} bytes, "
                          f"data_offsets [{begin}, {end}] hold {end - begin}")
    return dtype, tuple(shape), begin, end


def _check_layout(entries, data_size, path):
    """The tensors tile the data section: no overlap, no gap, nothing after the last one."""
    pos, prev = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin < pos:
            raise _fail(path, f"tensor {_name(name)} (bytes [{begin}, {end}]) overlaps tensor "
                              f"{_name(prev)} (ending at {pos})")
        if begin > pos:
            raise _fail(path, f"a gap in the data: bytes [{pos}, {begin}] belong to no tensor")
        pos, prev = end, name
    if pos != data_size:
        raise _fail(path, f"{data_size - pos} bytes after the last tensor belong to no tensor")


def _check_against_config(entries, config, path):
    """Every name, shape and dtype the config implies, and nothing else; all problems listed."""
    expected = expected_tensors(config)
    fmt = _weight_format(config)
    problems = [f"missing {n} {expected[n][0]}" for n in expected if n not in entries]
    problems += [f"unexpected {_name(n)}" for n in entries if n not in expected]
    for n, (shape, want_dtype) in expected.items():
        if n in entries:
            dtype, got, _, _ = entries[n]
            if got != shape:
                problems.append(f"{n} has shape {got}, expected {shape}")
            if dtype != want_dtype:
                if n.endswith(SCALE_SUFFIX):
                    why = "int8 scales are float32"
                elif fmt in REDUCED_FORMATS and is_matrix(n):
                    why = f"config weight_format {fmt}"
                elif fmt in REDUCED_FORMATS:
                    why = f"biases and peepholes stay float32 in {fmt} models"
                else:
                    why = f"config dtype {config['dtype']}"
                problems.append(f"{n} has dtype {dtype}, expected {want_dtype} ({why})")
    if problems:
        shown = problems[:MAX_PROBLEMS_SHOWN]
        more = len(problems) - len(shown)
        desc = f"{config['cell']} {config['module']}" + (f", {fmt}" if fmt in REDUCED_FORMATS else "")
        raise _fail(path, f"the tensors disagree with the config ({desc}): " + "; ".join(shown)
                    + (f"; and {more} more" if more else ""))


def _check_scales(weights, path):
    """Every int8 scale finite and > 0 (a zero, negative, infinite or NaN scale is no weight)."""
    for name, a in weights.items():
        if name.endswith(SCALE_SUFFIX):
            bad = ~(np.isfinite(a) & (a > 0))
            if bad.any():
                i = int(np.argmax(bad))
                raise _fail(path, f"tensor {name}: {int(bad.sum())} of its {a.size} int8 scales "
                                  f"are not finite and > 0 (row {i} is {float(a[i])!r})")


def _read_tensors(f, path, entries, data_start):
    """Read each checked entry into an array of exactly its checked size (so at most the file's
    size is ever allocated)."""
    weights = {}
    for name, (dtype, shape, begin, end) in entries.items():
        arr = np.empty(shape, _NP_DTYPE[dtype])
        f.seek(data_start + begin)
        got = f.readinto(memoryview(arr).cast("B")) if arr.nbytes else 0
        if got != end - begin:
            raise _fail(path, f"truncated while reading {name} (the file changed while loading?)")
        weights[name] = arr.astype(arr.dtype.newbyteorder("="), copy=False)
    return weights


def _build(config, weights, path):
    """The model the config describes, with these (already checked) weights."""
    kind, dtype = config["cell"], np.dtype(config["dtype"])
    fmt = _weight_format(config)
    try:
        if fmt in REDUCED_FORMATS:
            weights = {n: Reduced(fmt, w, weights.get(n + SCALE_SUFFIX)) if is_matrix(n) else w
                       for n, w in weights.items() if not n.endswith(SCALE_SUFFIX)}
        if config["module"] == "layer":
            kwargs = {k: config[k] for k in ("input_size", "hidden_size", "num_layers", "bias",
                                             "batch_first", "bidirectional")}
            kwargs.update({k: config[k] for k in _LAYER_EXTRA[kind]})
            kwargs["reverse"] = config.get("reverse", False)
            init = tuple(weights.pop(n) for n in INITIAL_NAMES if n in weights) or None
            if init is not None and len(init) == 1:
                init = init[0]
            return LAYERS[kind](**kwargs, dtype=dtype, weights=weights, initial_state=init,
                                input_bits=config.get("input_bits"))
        extra = {k: config[k] for k in _CELL_EXTRA[kind]}
        return CELLS[kind](**weights, **extra, input_bits=config.get("input_bits"))
    except (ValueError, TypeError) as exc:  # the checks above should make this unreachable
        raise _fail(path, f"cannot build the {kind} {config['module']}: {exc}") from None
