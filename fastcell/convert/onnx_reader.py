"""Reading an untrusted ONNX file: the protobuf model (parsed by the onnx package's message classes,
read in Python: neither onnx's checker nor its shape inference ever sees it), its graphs and
subgraphs with their scopes, its attributes and its tensors.

Every tensor's byte size is checked against its dims before an array is made; external data
must be a regular file inside the model's folder (no absolute path, no ``..``, no symlink out).
Whatever is wrong raises ``FormatError`` naming the file and what; ``errors()`` turns anything
else a malformed file provokes into one too.
"""

import contextlib
import math
import os
import re

import numpy as np

from fastcell.io.weights_file import FormatError, open_regular

__all__ = ["OnnxModel", "Scope", "FormatError"]

# TensorProto data types read here: numpy dtype (little-endian in raw_data) and the typed field
# that holds them otherwise. FLOAT16 sits in int32_data as its bit patterns.
_DTYPES = {1: ("<f4", "float_data"), 2: ("u1", "int32_data"), 3: ("i1", "int32_data"),
           4: ("<u2", "int32_data"), 5: ("<i2", "int32_data"), 6: ("<i4", "int32_data"),
           7: ("<i8", "int64_data"), 9: ("?", "int32_data"), 10: ("<f2", "int32_data"),
           11: ("<f8", "double_data"), 12: ("<u4", "uint64_data"), 13: ("<u8", "uint64_data")}
TYPE_NAMES = {0: "UNDEFINED", 1: "FLOAT", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16",
               6: "INT32", 7: "INT64", 8: "STRING", 9: "BOOL", 10: "FLOAT16", 11: "DOUBLE",
               12: "UINT32", 13: "UINT64", 14: "COMPLEX64", 15: "COMPLEX128", 16: "BFLOAT16"}
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data",
                 "uint64_data")
# AttributeProto.AttributeType values.
A_FLOAT, A_INT, A_STRING, A_TENSOR, A_GRAPH = 1, 2, 3, 4, 5
A_FLOATS, A_INTS, A_STRINGS, A_GRAPHS = 6, 7, 8, 10
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

MAX_FILE_BYTES = 2**31 - 1   # protobuf's limit: bigger models keep their weights as external data
MAX_NDIM = 32
MAX_DIM = 2**62
MAX_GRAPH_DEPTH = 16         # If/Loop/Scan bodies inside one another (protobuf stops near 30)

MAX_FILE_BYTES = 2**31 - 1   # protobuf's limit: bigger models keep their weights as external data
MAX_NDIM = 32
MAX_DIM = 2**62
MAX_GRAPH_DEPTH = 16         # If/Loop/Scan bodies inside one another (protobuf stops near 30)


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError("reading .onnx files needs the onnx package: pip install 'fastcell[onnx]' "
                          "(or pip install onnx); serving a converted model does not") from None
    return onnx


class Bad(Exception):
    """What is wrong with the file; the entry points raise it as FormatError naming the file."""


class OnnxModel:
    """A parsed ONNX model: the nodes of the wanted op types (also in subgraphs), each with its
    scope (the graph it sits in and the graphs around it), and its tensors read on demand."""

    def __init__(self, source, ops):
        onnx = _onnx()
        self.ops = ops
        if isinstance(source, (bytes, bytearray, memoryview)):
            data, self.label, self.folder_path = bytes(source), "<ONNX bytes>", None
        else:
            path = os.fspath(source)
            if isinstance(path, bytes):
                path = os.fsdecode(path)
            self.label = path
            self.folder_path = os.path.realpath(os.path.dirname(os.path.abspath(path)))
            with open_regular(path) as f:
                size = os.fstat(f.fileno()).st_size
                if size > MAX_FILE_BYTES:
                    raise self.fail(f"{size} bytes, more than protobuf's 2 GB limit for one "
                                    "message (large ONNX models keep their weights as external "
                                    "data)")
                data = f.read()
        if not data:
            raise self.fail("empty file (0 bytes), not an ONNX model")
        from google.protobuf.message import DecodeError

        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(data)
        except (DecodeError, RecursionError, ValueError) as exc:
            raise self.fail(f"not an ONNX model, or a truncated or corrupt one (protobuf: "
                            f"{short(exc)})") from None
        if not proto.HasField("graph") or not (proto.graph.node or proto.graph.initializer):
            raise self.fail("not an ONNX model (no graph with nodes): truncated, or another "
                            "kind of file?")
        opsets = {}
        for o in proto.opset_import:
            opsets[o.domain] = o.version
        self.opset = opsets.get("", opsets.get("ai.onnx"))
        if self.opset is None or not 1 <= self.opset <= 10**4:
            raise self.fail("the model imports no ONNX operator set (opset_import has no '' domain "
                            "with a valid version)")
        self.read_bytes = 0
        self.nodes = []   # [(scope, node, label)]
        self.op_types = set()
        with self.errors():
            self._walk(Scope(proto.graph, None, text(proto.graph.name) or "main_graph"), 0)

    def fail(self, message):
        return FormatError(f"{self.label}: {message}")

    @contextlib.contextmanager
    def errors(self):
        """Whatever goes wrong inside while reading the file becomes FormatError naming it: Bad,
        and any other error a malformed file provokes (a string that is not UTF-8, say); but
        MemoryError stays itself."""
        try:
            yield
        except (FormatError, MemoryError):
            raise
        except Bad as exc:
            raise self.fail(str(exc)) from None
        except Exception as exc:
            raise self.fail(f"a malformed model ({type(exc).__name__}: {short(exc)})") from None

    def _walk(self, scope, depth):
        if depth > MAX_GRAPH_DEPTH:
            raise self.fail(f"subgraphs nested more than {MAX_GRAPH_DEPTH} deep in {scope.path}")
        for i, node in enumerate(scope.graph.node):
            label = text(node.name) or f"{text(node.op_type)}#{i}"
            self.op_types.add(node.op_type)
            if node.domain in ("", "ai.onnx") and node.op_type in self.ops:
                self.nodes.append((scope, node, label))
            for a in node.attribute:
                if a.type == A_GRAPH:
                    self._walk(Scope(a.g, scope, f"{scope.path}/{label}.{text(a.name)}"),
                               depth + 1)
                elif a.type == A_GRAPHS:
                    for k, g in enumerate(a.graphs):
                        self._walk(Scope(g, scope, f"{scope.path}/{label}.{text(a.name)}[{k}]"),
                                   depth + 1)

    # -- tensors --

    def tensor(self, t, where):
        """A TensorProto as a NumPy array, its byte size checked against its dims first."""
        dims = list(t.dims)
        if len(dims) > MAX_NDIM or any(d < 0 or d > MAX_DIM for d in dims):
            raise self.fail(f"{where}: dims {dims[:8]} are not at most {MAX_NDIM} sizes in "
                            f"[0, 2**62]")
        count = math.prod(dims)
        if t.data_type not in _DTYPES:
            raise self.fail(f"{where}: data type {TYPE_NAMES.get(t.data_type, t.data_type)} is "
                            "not one fastcell reads (float, double, float16, integers, bool)")
        dtype, field = _DTYPES[t.data_type]
        dtype = np.dtype(dtype)
        nbytes = count * dtype.itemsize
        if t.HasField("segment"):
            raise self.fail(f"{where}: segmented tensors are not supported")
        typed = [f for f in _TYPED_FIELDS if len(getattr(t, f))]
        if t.data_location == _EXTERNAL:
            if t.HasField("raw_data") or typed:
                raise self.fail(f"{where}: external data, but also data in the file")
            raw = self._external(t, nbytes, where)
        elif t.data_location != 0:
            raise self.fail(f"{where}: unknown data_location {t.data_location}")
        elif t.HasField("raw_data"):
            if typed:
                raise self.fail(f"{where}: data in both raw_data and {typed[0]}")
            raw = t.raw_data
            if len(raw) != nbytes:
                raise self.fail(f"{where}: dims {dims} of {TYPE_NAMES[t.data_type]} need {nbytes} "
                                f"bytes, raw_data holds {len(raw)}")
        else:
            if typed and typed != [field]:
                raise self.fail(f"{where}: {TYPE_NAMES[t.data_type]} data in {typed[0]}, "
                                f"expected {field}")
            values = getattr(t, field)
            if len(values) != count:
                raise self.fail(f"{where}: dims {dims} hold {count} values, {field} has "
                                f"{len(values)}")
            self.read_bytes += nbytes
            try:
                if t.data_type == 10:  # FLOAT16 as its bit patterns
                    return np.array(values, dtype=np.uint16).view(np.float16).reshape(dims)
                return np.array(values, dtype=dtype.newbyteorder("=")).reshape(dims)
            except (OverflowError, ValueError) as exc:
                raise self.fail(f"{where}: a value does not fit {TYPE_NAMES[t.data_type]} "
                                f"({short(exc)})") from None
        self.read_bytes += nbytes
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(dims).astype(
            dtype.newbyteorder("="), copy=False)

    def _external(self, t, nbytes, where):
        """The bytes of an external tensor: a regular file inside the model's folder."""
        if self.folder_path is None:
            raise self.fail(f"{where}: its data is in an external file; load the model from its "
                            "path, not from bytes")
        info = {}
        for e in t.external_data:
            key = text(e.key)
            if key in info:
                raise self.fail(f"{where}: external_data has two {key!r} entries")
            info[key] = text(e.value)
        location = info.get("location", "")
        if not location or "\0" in location:
            raise self.fail(f"{where}: external data without a valid location")
        parts = location.replace("\\", "/").split("/")
        if (os.path.isabs(location) or location.startswith(("/", "\\")) or ".." in parts
                or re.match(r"[A-Za-z]:", location)):   # C:... is absolute on Windows
            raise self.fail(f"{where}: external data location {location!r} points outside the "
                            "model's folder (an absolute path or '..'); refused")
        full = os.path.realpath(os.path.join(self.folder_path, *[p for p in parts if p]))
        if os.path.commonpath([full, self.folder_path]) != self.folder_path:
            raise self.fail(f"{where}: external data location {location!r} resolves to {full}, "
                            "outside the model's folder (a symlink out?); refused")
        offset, length = (_count(info.get(k), k, where, self) for k in ("offset", "length"))
        offset = offset or 0
        if length is not None and length != nbytes:
            raise self.fail(f"{where}: external data length {length}, but its dims need {nbytes} "
                            "bytes")
        try:
            opened = open_regular(full)   # non-blocking: a FIFO cannot stall the reader
        except FormatError:
            raise self.fail(f"{where}: external data {location!r} is not a regular file") from None
        except OSError as exc:
            raise self.fail(f"{where}: cannot read external data {location!r} "
                            f"({exc.strerror or exc})") from None
        with opened as f:
            size = os.fstat(f.fileno()).st_size
            if offset + nbytes > size:
                raise self.fail(f"{where}: external data [{offset}, {offset + nbytes}) runs past "
                                f"the end of {location!r} ({size} bytes)")
            f.seek(offset)
            raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise self.fail(f"{where}: read {len(raw)} of {nbytes} bytes of {location!r} "
                            "(changed while loading?)")
        return raw


class Scope:
    """One graph and the values it defines; names not found here are looked up in the graphs
    around it (ONNX's outer-scope rule for If, Loop and Scan bodies)."""

    def __init__(self, graph, parent, path):
        self.graph, self.parent, self.path = graph, parent, path
        values = {}
        for vi in graph.input:
            values[vi.name] = ("input",)
        for t in graph.initializer:   # an initializer that is also an input: its default value
            if values.get(t.name, ("input",))[0] != "input":
                raise Bad(f"{path}: two initializers are named {t.name!r}")
            values[t.name] = ("initializer", t)
        for t in graph.sparse_initializer:
            values[t.values.name] = ("sparse",)
        for node in graph.node:
            for k, o in enumerate(node.output):
                if not o:
                    continue
                if o in values and values[o][0] != "input":
                    raise Bad(f"{path}: value {o!r} is produced twice")
                values[o] = ("node", node, k)
        self.values = values

    def find(self, name):
        scope = self
        while scope is not None:
            if name in scope.values:
                return scope, scope.values[name]
            scope = scope.parent
        return None, None


def text(s):
    if isinstance(s, bytes):
        return s.decode("utf-8", "replace")
    return s


def short(exc, limit=200):
    s = " ".join(str(exc).split()) or type(exc).__name__
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _count(value, key, where, model):
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > 20:
        raise model.fail(f"{where}: external data {key} {value!r} is not a non-negative integer")
    return int(value)


# ---- attributes ----

_ATTR_FIELD = {A_FLOAT: "f", A_INT: "i", A_STRING: "s", A_TENSOR: "t", A_FLOATS: "floats",
               A_INTS: "ints", A_STRINGS: "strings"}
_ATTR_TYPE_NAMES = {0: "UNDEFINED", 1: "FLOAT", 2: "INT", 3: "STRING", 4: "TENSOR", 5: "GRAPH",
                    6: "FLOATS", 7: "INTS", 8: "STRINGS", 9: "TENSORS", 10: "GRAPHS",
                    11: "SPARSE_TENSOR", 12: "SPARSE_TENSORS", 13: "TYPE_PROTO", 14: "TYPE_PROTOS"}


def attributes(node, where):
    out = {}
    for a in node.attribute:
        name = text(a.name)    # bytes where the file's name is not UTF-8
        if name in out:
            raise Bad(f"{where}: two attributes named {name!r}")
        out[name] = a
    return out


def get(attrs, name, kind, default, where):
    """An attribute's value, which must be of the given type; `default` when absent."""
    a = attrs.get(name)
    if a is None:
        return default
    if a.type != kind:
        raise Bad(f"{where}: attribute {name} has type "
                          f"{_ATTR_TYPE_NAMES.get(a.type, a.type)}, expected {_ATTR_TYPE_NAMES[kind]}")
    v = getattr(a, _ATTR_FIELD[kind])
    if kind == A_STRING:
        return text(v)
    if kind in (A_FLOATS, A_INTS, A_STRINGS):
        return list(v)
    return v
