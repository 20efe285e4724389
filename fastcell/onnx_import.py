"""Recurrent layers from ONNX files: ``onnx_nodes`` lists the RNN, GRU and LSTM nodes of a model
(also inside If, Loop and Scan bodies), ``from_onnx`` turns one into a fastcell layer.

What an ONNX node stores, and what fastcell takes (SPEC.md, "Other conventions"):

    ONNX input    shape              gate blocks          fastcell (PyTorch names, per direction)
    W             [D, G*H, I]        LSTM i, o, f, c      weight_ih (G*H, I), blocks i, f, g, o
    R             [D, G*H, H]        GRU  z, r, h         weight_hh (G*H, H), blocks r, z, n
    B             [D, 2*G*H]         [Wb, Rb]             bias_ih = Wb, bias_hh = Rb (absent: bias=False)
    P             [D, 3*H]           i, o, f              weight_ph (3, H), rows p_i, p_f, p_o

Direction 0 is the forward one (``_l0``), direction 1 of a bidirectional node the backward one
(``_l0_reverse``); a ``direction="reverse"`` node becomes a layer with ``reverse=True``.
``layout=1`` is ``batch_first=True``; GRU ``linear_before_reset=1`` is ``reset_after=True``
(PyTorch's form), 0 the reset-before form.

The file is untrusted. It is parsed by protobuf (the onnx package's message classes) and read in
Python: neither onnx's checker nor its shape inference (C++) ever sees it. Every tensor's byte
size is checked against its dims before an array is made; external data must be a regular file
inside the model's folder (no absolute path, no ``..``, no symlink out); the constants folded into
a weight (Constant, Identity, Cast, Reshape, Squeeze, Unsqueeze, Concat, Slice, Split, Transpose,
computed here in NumPy from the ONNX operator spec) may not grow past a bound set by the bytes
actually read. Whatever is wrong with a file raises ``FormatError`` saying what.
"""

import contextlib
import math
import os
import re
from dataclasses import dataclass

import numpy as np

from fastcell.recurrence import packed_bytes
from fastcell.weights_file import FormatError, _open_regular

__all__ = ["onnx_nodes", "from_onnx", "onnx_outputs", "OnnxNode"]

_RECURRENT = ("RNN", "GRU", "LSTM")
_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
# For each fastcell gate block, the ONNX block it comes from (SPEC.md).
_GATE_ORDER = {"RNN": (0,), "GRU": (1, 0, 2), "LSTM": (0, 2, 3, 1)}
_PEEPHOLE_ORDER = (0, 2, 1)   # ONNX P rows i, o, f -> p_i, p_f, p_o
_DIRECTIONS = ("forward", "reverse", "bidirectional")
# The attributes of each op in the ONNX spec (output_sequence: opset 1, where it only said whether
# Y is produced; fastcell always computes it).
_ATTRIBUTES = {"activation_alpha", "activation_beta", "activations", "clip", "direction",
               "hidden_size", "layout", "output_sequence"}
_OP_ATTRIBUTES = {"RNN": _ATTRIBUTES, "GRU": _ATTRIBUTES | {"linear_before_reset"},
                  "LSTM": _ATTRIBUTES | {"input_forget"}}
# The activations fastcell computes, per direction, as ONNX spells them (case-sensitive, as ONNX
# Runtime reads them).
_DEFAULT_ACTIVATIONS = {"GRU": ("Sigmoid", "Tanh"), "LSTM": ("Sigmoid", "Tanh", "Tanh")}
_RNN_ACTIVATIONS = {"Tanh": "tanh", "Relu": "relu"}

_FOLDABLE = ("Constant", "Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Concat", "Slice",
             "Split", "Transpose")

# TensorProto data types read here: numpy dtype (little-endian in raw_data) and the typed field
# that holds them otherwise. FLOAT16 sits in int32_data as its bit patterns.
_DTYPES = {1: ("<f4", "float_data"), 2: ("u1", "int32_data"), 3: ("i1", "int32_data"),
           4: ("<u2", "int32_data"), 5: ("<i2", "int32_data"), 6: ("<i4", "int32_data"),
           7: ("<i8", "int64_data"), 9: ("?", "int32_data"), 10: ("<f2", "int32_data"),
           11: ("<f8", "double_data"), 12: ("<u4", "uint64_data"), 13: ("<u8", "uint64_data")}
_TYPE_NAMES = {0: "UNDEFINED", 1: "FLOAT", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16",
               6: "INT32", 7: "INT64", 8: "STRING", 9: "BOOL", 10: "FLOAT16", 11: "DOUBLE",
               12: "UINT32", 13: "UINT64", 14: "COMPLEX64", 15: "COMPLEX128", 16: "BFLOAT16"}
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data",
                 "uint64_data")
# AttributeProto.AttributeType values.
_A_FLOAT, _A_INT, _A_STRING, _A_TENSOR, _A_GRAPH = 1, 2, 3, 4, 5
_A_FLOATS, _A_INTS, _A_STRINGS, _A_GRAPHS = 6, 7, 8, 10
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

MAX_FILE_BYTES = 2**31 - 1   # protobuf's limit: bigger models keep their weights as external data
MAX_NDIM = 32
MAX_DIM = 2**62
MAX_GRAPH_DEPTH = 16         # If/Loop/Scan bodies inside one another (protobuf stops near 30)
MAX_FOLD_DEPTH = 64          # nodes in one chain of constants
FOLD_BASE_BYTES = 16 << 20   # folded values may total this plus FOLD_FACTOR x the bytes read
FOLD_FACTOR = 16


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError("reading .onnx files needs the onnx package: pip install 'fastcell[onnx]' "
                          "(or pip install onnx); serving a converted model does not") from None
    return onnx


@dataclass(frozen=True)
class OnnxNode:
    """One recurrent node of an ONNX model, as ``onnx_nodes`` lists it.

    index: its position in the list (``from_onnx(path, node=index)``); op_type: "RNN", "GRU" or
    "LSTM"; name: the node's name ("" if it has none); graph: where it sits, "main_graph" or, in a
    subgraph, the path of the nodes and attributes leading to it ("main_graph/loop.body");
    direction: "forward", "reverse" or "bidirectional"; input_size and hidden_size (None where a
    weight is not a constant); layout: 0 (time first) or 1 (batch first).
    """

    index: int
    op_type: str
    name: str
    graph: str
    direction: str
    input_size: int | None
    hidden_size: int | None
    layout: int

    def describe(self):
        name = repr(self.name) if self.name else "(unnamed)"
        return (f"#{self.index} {self.op_type} {name} in {self.graph}: {self.direction}, "
                f"input_size {self.input_size}, hidden_size {self.hidden_size}, layout {self.layout}")


def onnx_nodes(source):
    """The RNN, GRU and LSTM nodes of an ONNX model (a path, or the file's bytes), including those
    in the subgraphs of If, Loop, Scan and any other op: a list of ``OnnxNode``, in graph order
    (a subgraph's nodes right after the node that holds it)."""
    model = _Model(source)
    with model.errors():
        return [model.describe(i) for i in range(len(model.nodes))]


def from_onnx(source, node=None):
    """The fastcell layer of one recurrent node of an ONNX model (a path, or the file's bytes).

    node: None (the model must have exactly one RNN, GRU or LSTM node), a node name, or an index
    into ``onnx_nodes``. Returns ``fastcell.RNN``, ``GRU``, ``LSTM`` or, with peepholes (input P),
    ``PeepholeLSTM``: one layer, ``batch_first`` for ``layout=1``, ``bidirectional`` or
    ``reverse`` as the node's direction, ``bias=False`` without B, in the weights' dtype (float32
    or float64). The node's run-time inputs map to the layer call: X is x, sequence_lens is
    ``lengths``, initial_h/initial_c are ``hx`` (see ``onnx_outputs`` for the shapes).

    Raises FormatError naming the problem: a malformed file, an attribute fastcell cannot compute
    (an activation other than the defaults, or Tanh/Relu for RNN; activation_alpha/beta; clip;
    input_forget=1), a weight that is not a constant. ValueError for a ``node`` that matches none.
    """
    model = _Model(source)
    i = model.select(node)      # a `node` that matches none: ValueError, not the file's fault
    with model.errors():
        return model.layer(i)


def onnx_outputs(layer, X, sequence_lens=None, initial_h=None, initial_c=None):
    """Run a one-layer fastcell model (from ``from_onnx``) on an ONNX node's inputs and return its
    outputs as the node gives them: (Y, Y_h) or, for LSTMs, (Y, Y_h, Y_c).

    Shapes for layout 0 (``batch_first=False``): X [T, B, I], initial_h/c and Y_h/Y_c [D, B, H],
    Y [T, D, B, H]; for layout 1: X [B, T, I], initial_h/c and Y_h/Y_c [B, D, H], Y [B, T, D, H].
    sequence_lens [B] are the layer's ``lengths`` (each in [1, T]); Y is zero past each sequence's
    end and keeps all T steps. A missing initial_h or initial_c is the layer's initial state: the
    constant the file held for it, else zeros.
    """
    if getattr(layer, "num_layers", None) != 1:
        raise ValueError(f"layer: expected a one-layer fastcell RNN, GRU or LSTM (as from_onnx "
                         f"gives), got {layer!r}")
    X = np.asarray(X)
    if X.ndim != 3:
        raise ValueError(f"X: expected a 3-d array ([T, B, I] or, with layout 1, [B, T, I]), "
                         f"got shape {X.shape}")
    layout = 1 if layer.batch_first else 0
    B, T = (X.shape[0], X.shape[1]) if layout else (X.shape[1], X.shape[0])
    D, H = layer.num_directions, layer.output_size
    names = ("initial_h", "initial_c") if layer.has_cell_state else ("initial_h",)
    given = (initial_h, initial_c)[: len(names)]
    if initial_c is not None and not layer.has_cell_state:
        raise ValueError("initial_c: only for LSTMs")
    hx = None
    if any(v is not None for v in given):
        init = layer.initial_state
        init = (init,) if init is not None and not layer.has_cell_state else init
        states = []
        for i, (name, v) in enumerate(zip(names, given)):
            if v is None:
                default = np.zeros((D, H), layer.dtype) if init is None else init[i]
                states.append(np.repeat(np.asarray(default)[:, None, :], B, axis=1))
                continue
            v = np.asarray(v)
            want = (B, D, H) if layout else (D, B, H)
            if v.shape != want:
                raise ValueError(f"{name}: expected shape {want}, got {v.shape}")
            states.append(v.transpose(1, 0, 2) if layout else v)
        hx = tuple(states) if layer.has_cell_state else states[0]
    out, state = layer(X, hx, lengths=sequence_lens)
    steps = out.shape[1 if layout else 0]
    if steps < T:  # every sequence shorter than T: the layer returns max(lengths) steps
        pad = [(0, 0)] * 3
        pad[1 if layout else 0] = (0, T - steps)
        out = np.pad(out, pad)
    if layout:
        Y = out.reshape(B, T, D, H)
    else:
        Y = out.reshape(T, B, D, H).transpose(0, 2, 1, 3)
    states = state if isinstance(state, tuple) else (state,)
    if layout:
        states = tuple(s.transpose(1, 0, 2) for s in states)
    return (Y, *states)


# ---- reading the file ----

class _Bad(Exception):
    """What is wrong with the file; the entry points raise it as FormatError naming the file."""


class _NotConstant(FormatError):
    """A value computed from a graph input or by an op fastcell does not fold: a run-time value."""


class _Model:
    """A parsed ONNX model: its recurrent nodes, each with its scope, and the constant folder."""

    def __init__(self, source):
        onnx = _onnx()
        if isinstance(source, (bytes, bytearray, memoryview)):
            data, self.label, self.folder_path = bytes(source), "<ONNX bytes>", None
        else:
            path = os.fspath(source)
            if isinstance(path, bytes):
                path = os.fsdecode(path)
            self.label = path
            self.folder_path = os.path.realpath(os.path.dirname(os.path.abspath(path)))
            with _open_regular(path) as f:
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
                            f"{_short(exc)})") from None
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
            self._walk(_Scope(proto.graph, None, _text(proto.graph.name) or "main_graph"), 0)
        self._memo, self._busy, self._spent = {}, set(), 0

    def fail(self, message):
        return FormatError(f"{self.label}: {message}")

    @contextlib.contextmanager
    def errors(self):
        """Whatever goes wrong inside while reading the file becomes FormatError naming it: _Bad,
        and any other error a malformed file provokes (a string that is not UTF-8, say); but
        MemoryError stays itself."""
        try:
            yield
        except (FormatError, MemoryError):
            raise
        except _Bad as exc:
            raise self.fail(str(exc)) from None
        except Exception as exc:
            raise self.fail(f"a malformed model ({type(exc).__name__}: {_short(exc)})") from None

    def _walk(self, scope, depth):
        if depth > MAX_GRAPH_DEPTH:
            raise self.fail(f"subgraphs nested more than {MAX_GRAPH_DEPTH} deep in {scope.path}")
        for i, node in enumerate(scope.graph.node):
            label = _text(node.name) or f"{_text(node.op_type)}#{i}"
            self.op_types.add(node.op_type)
            if node.domain in ("", "ai.onnx") and node.op_type in _RECURRENT:
                self.nodes.append((scope, node, label))
            for a in node.attribute:
                if a.type == _A_GRAPH:
                    self._walk(_Scope(a.g, scope, f"{scope.path}/{label}.{_text(a.name)}"),
                               depth + 1)
                elif a.type == _A_GRAPHS:
                    for k, g in enumerate(a.graphs):
                        self._walk(_Scope(g, scope, f"{scope.path}/{label}.{_text(a.name)}[{k}]"),
                                   depth + 1)

    # -- choosing a node --

    def describe(self, i):
        scope, node, _ = self.nodes[i]
        op = node.op_type
        attrs = _attributes(node, self._where(i))
        direction = _get(attrs, "direction", _A_STRING, "forward", self._where(i))
        layout = _get(attrs, "layout", _A_INT, 0, self._where(i))
        H = _get(attrs, "hidden_size", _A_INT, None, self._where(i))
        I = None
        W, R = (node.input[1] if len(node.input) > 1 else ""), (node.input[2] if len(node.input) > 2 else "")
        w_shape, r_shape = self._shape(W, scope), self._shape(R, scope)
        if w_shape is not None and len(w_shape) == 3:
            I = w_shape[2]
        if H is None and r_shape is not None and len(r_shape) == 3:
            H = r_shape[2]
        return OnnxNode(i, op, _text(node.name), scope.path, direction, I, H, layout)

    def _shape(self, name, scope):
        """A weight's shape without reading its bytes where the file declares it; None when it
        is not a constant."""
        if not name:
            return None
        owner, entry = scope.find(name)
        if entry is None or entry[0] == "input":
            return None
        if entry[0] == "initializer":
            return tuple(entry[1].dims)
        try:
            return self.value(name, scope, "W").shape
        except (FormatError, _Bad):
            return None

    def _where(self, i):
        scope, node, label = self.nodes[i]
        return f"{node.op_type} node {label!r} in {scope.path}"

    def select(self, node):
        n = len(self.nodes)

        def listing():
            with self.errors():
                text = "; ".join(self.describe(i).describe() for i in range(min(n, 12)))
            return text + (f"; and {n - 12} more" if n > 12 else "")

        if node is None:
            if n == 1:
                return 0
            if n == 0:
                hint = ""
                if self.op_types & {"Gemm", "MatMul"}:
                    hint = (" (torch.onnx.export writes nn.LSTMCell, GRUCell and RNNCell as Gemm "
                            "and activation nodes, not as one recurrent node: export the cell's "
                            "weights with fastcell.from_torch instead)")
                raise self.fail(f"no RNN, GRU or LSTM node in the model{hint}")
            raise ValueError(f"node: the model has {n} recurrent nodes, name one (or give its "
                             f"index): {listing()}")
        if isinstance(node, (int, np.integer)) and not isinstance(node, bool):
            if not 0 <= node < n:
                raise ValueError(f"node: index {node} is out of range: the model has {n} recurrent "
                                 f"node{'s' if n != 1 else ''}" + (f": {listing()}" if n else ""))
            return int(node)
        if not isinstance(node, str):
            raise TypeError(f"node: expected a node name, an index or None, got {type(node).__name__}")
        found = [i for i in range(n) if _text(self.nodes[i][1].name) == node]
        if len(found) == 1:
            return found[0]
        if found:
            raise ValueError(f"node: {len(found)} recurrent nodes are named {node!r}; give the "
                             f"index of one: {listing()}")
        raise ValueError(f"node: no RNN, GRU or LSTM node named {node!r}; the model has "
                         + (listing() if n else "none"))

    # -- the layer --

    def layer(self, i):
        import fastcell

        scope, node, _ = self.nodes[i]
        op, where = node.op_type, self._where(i)

        def fail(msg):
            return _Bad(f"{where}: {msg}")

        attrs = _attributes(node, where)
        unknown = sorted(set(attrs) - _OP_ATTRIBUTES[op])
        if unknown:
            raise fail(f"attribute {unknown[0]!r} is not one of the ONNX {op} attributes that "
                       f"fastcell knows ({', '.join(sorted(_OP_ATTRIBUTES[op]))})")
        direction = _get(attrs, "direction", _A_STRING, "forward", where)
        if direction not in _DIRECTIONS:
            raise fail(f"attribute direction is {direction!r}, expected one of {list(_DIRECTIONS)}")
        D = 2 if direction == "bidirectional" else 1
        layout = _get(attrs, "layout", _A_INT, 0, where)
        if layout not in (0, 1):
            raise fail(f"attribute layout is {layout}, expected 0 or 1")
        for name in ("activation_alpha", "activation_beta"):
            if name in attrs and _get(attrs, name, _A_FLOATS, [], where):
                raise fail(f"attribute {name}: fastcell computes only activations without "
                           "parameters (Tanh, Relu, Sigmoid)")
        if "clip" in attrs:
            raise fail(f"attribute clip ({_get(attrs, 'clip', _A_FLOAT, 0.0, where)!r}): fastcell "
                       "does not clip the cell input")
        if op == "LSTM" and _get(attrs, "input_forget", _A_INT, 0, where) != 0:
            raise fail("attribute input_forget = 1 (coupled input and forget gates): fastcell's "
                       "LSTM computes them separately")
        reset_after = None
        if op == "GRU":
            lbr = _get(attrs, "linear_before_reset", _A_INT, 0, where)
            if lbr not in (0, 1):
                raise fail(f"attribute linear_before_reset is {lbr}, expected 0 or 1")
            reset_after = lbr == 1
        nonlinearity = self._activations(op, attrs, D, where, fail)

        inputs = list(node.input)
        limit = 8 if op == "LSTM" else 6
        if len(inputs) > limit:
            raise fail(f"{len(inputs)} inputs, an {op} node has at most {limit}")
        inputs += [""] * (limit - len(inputs))
        if not inputs[0]:
            raise fail("input X is missing")
        for role, k in (("W", 1), ("R", 2)):
            if not inputs[k]:
                raise fail(f"input {role} is missing")
        W = self.value(inputs[1], scope, f"{where}: W")
        R = self.value(inputs[2], scope, f"{where}: R")
        B = self.value(inputs[3], scope, f"{where}: B") if inputs[3] else None
        P = self.value(inputs[7], scope, f"{where}: P") if op == "LSTM" and inputs[7] else None

        if W.dtype not in (np.float32, np.float64):
            extra = " (fastcell computes in float32 or float64; cast the weights in the model)" \
                if W.dtype == np.float16 else ""
            raise fail(f"W has dtype {W.dtype}, expected float32 or float64{extra}")
        for role, v in (("R", R), ("B", B), ("P", P)):
            if v is not None and v.dtype != W.dtype:
                raise fail(f"{role} has dtype {v.dtype}, expected {W.dtype} like W")
        G = _GATES[op]
        if W.ndim != 3 or W.shape[0] != D or W.shape[1] == 0 or W.shape[1] % G or W.shape[2] == 0:
            raise fail(f"W has shape {W.shape}, expected [{D}, {G}*hidden_size, input_size] "
                       f"(num_directions {D} for direction {direction!r})")
        H, I = W.shape[1] // G, W.shape[2]
        attr_H = _get(attrs, "hidden_size", _A_INT, None, where)
        if attr_H is not None and attr_H != H:
            raise fail(f"attribute hidden_size is {attr_H}, but W has shape {W.shape} "
                       f"({G}*{H} rows)")
        for role, v, want in (("R", R, (D, G * H, H)), ("B", B, (D, 2 * G * H)), ("P", P, (D, 3 * H))):
            if v is not None and v.shape != want:
                raise fail(f"{role} has shape {v.shape}, expected {list(want)}")

        order = _GATE_ORDER[op]
        weights = {}
        for d in range(D):
            s = "_l0" + ("_reverse" if d else "")
            weights["weight_ih" + s] = _reorder(W[d], order, H)
            weights["weight_hh" + s] = _reorder(R[d], order, H)
            if B is not None:
                weights["bias_ih" + s] = _reorder(B[d, :G * H], order, H)
                weights["bias_hh" + s] = _reorder(B[d, G * H:], order, H)
            if P is not None:
                weights["weight_ph" + s] = np.ascontiguousarray(
                    P[d].reshape(3, H)[list(_PEEPHOLE_ORDER)])
        # The built model keeps its packed weights; one far larger than the file's own tensors
        # (which folding can make) is refused before anything is allocated for it.
        split = 2 if op == "GRU" and not reset_after else 0
        model_bytes = D * packed_bytes(G, H, I, H, W.dtype.itemsize, split)
        model_bytes += sum(v.nbytes for v in (B, P) if v is not None)
        budget = FOLD_BASE_BYTES + FOLD_FACTOR * self.read_bytes
        if model_bytes > budget:
            raise fail(f"its weights would take {model_bytes} bytes in memory, more than "
                       f"{budget} bytes, far more than the file's tensors hold "
                       f"({self.read_bytes} bytes)")
        initial = self._initial_state(node, inputs, scope, op, D, H, layout, W.dtype, fail)
        config = {"input_size": I, "hidden_size": H, "num_layers": 1, "bias": B is not None,
                  "batch_first": layout == 1, "bidirectional": D == 2,
                  "reverse": direction == "reverse", "dtype": W.dtype,
                  "initial_state": initial}
        if op == "RNN":
            cls, config["nonlinearity"] = fastcell.RNN, nonlinearity
        elif op == "GRU":
            cls, config["reset_after"] = fastcell.GRU, reset_after
        else:
            cls = fastcell.PeepholeLSTM if P is not None else fastcell.LSTM
        return cls._from_weights(weights, **config)

    def _constant_input(self, name, scope, role):
        """A run-time input's value when the file makes it a constant, else None (a graph
        input, or computed at run time: the layer takes it at call time)."""
        if not name:
            return None
        try:
            return self.value(name, scope, role)
        except _NotConstant:
            return None

    def _initial_state(self, node, inputs, scope, op, D, H, layout, dtype, fail):
        """The node's constant initial_h (and initial_c) as the layer's initial state, or None.
        Nothing in the file is dropped: a constant sequence_lens, or a constant state that
        differs between the batch's sequences, is refused."""
        lens = self._constant_input(inputs[4], scope, "sequence_lens")
        if lens is not None:
            raise fail(f"input sequence_lens is a constant in the file ({lens.size} values): "
                       "fastcell takes the lengths at call time (layer(x, lengths=...)); make "
                       "sequence_lens a graph input, or drop it if every sequence is full")
        names = ("initial_h", "initial_c") if op == "LSTM" else ("initial_h",)
        given = [self._constant_input(inputs[5 + i], scope, n) for i, n in enumerate(names)]
        if all(v is None for v in given):
            return None
        states = []
        for name, v in zip(names, given):
            if v is None:
                states.append(np.zeros((D, H), dtype))
                continue
            if v.dtype != dtype:
                raise fail(f"input {name} is a constant of dtype {v.dtype}, expected {dtype} like W")
            want = "[batch, num_directions, hidden_size]" if layout else \
                "[num_directions, batch, hidden_size]"
            d_axis, b_axis = (1, 0) if layout else (0, 1)
            if v.ndim != 3 or v.shape[d_axis] != D or v.shape[2] != H or v.shape[b_axis] == 0:
                raise fail(f"input {name} is a constant of shape {list(v.shape)}, expected {want} "
                           f"with num_directions {D} and hidden_size {H}")
            per_batch = v.transpose(1, 0, 2) if layout else v     # [D, batch, H]
            if not np.array_equal(per_batch, np.broadcast_to(per_batch[:, :1], per_batch.shape)):
                raise fail(f"input {name} is a constant that differs between the {per_batch.shape[1]} "
                           "sequences of a batch: fastcell keeps one initial state per direction, "
                           "the same for every sequence; pass per-sequence states as hx at call time")
            states.append(np.ascontiguousarray(per_batch[:, 0]))
        return tuple(states) if op == "LSTM" else states[0]

    def _activations(self, op, attrs, D, where, fail):
        """The RNN's nonlinearity ("tanh" or "relu"); for GRU and LSTM, checks the defaults."""
        if "activations" not in attrs:
            return "tanh" if op == "RNN" else None
        acts = [_text(a) for a in _get(attrs, "activations", _A_STRINGS, [], where)]
        per = 1 if op == "RNN" else len(_DEFAULT_ACTIVATIONS[op])
        if len(acts) != per * D:
            raise fail(f"attribute activations has {len(acts)} entries ({acts}), expected {per * D} "
                       f"({per} per direction, {D} direction{'s' if D > 1 else ''})")
        dirs = [tuple(acts[d * per:(d + 1) * per]) for d in range(D)]
        if D == 2 and dirs[0] != dirs[1]:
            raise fail(f"attribute activations: the two directions use different activations "
                       f"({list(dirs[0])} and {list(dirs[1])}); a fastcell layer uses the same in both")
        if op == "RNN":
            if dirs[0][0] not in _RNN_ACTIVATIONS:
                raise fail(f"attribute activations is {acts}: fastcell's RNN computes Tanh or Relu")
            return _RNN_ACTIVATIONS[dirs[0][0]]
        if dirs[0] != _DEFAULT_ACTIVATIONS[op]:
            raise fail(f"attribute activations is {acts}: fastcell's {op} computes the defaults "
                       f"{list(_DEFAULT_ACTIVATIONS[op])}")
        return None

    # -- constants --

    def value(self, name, scope, role, depth=0):
        """The constant array behind a value name: an initializer, or a node output folded from
        constants. A graph input or any other op is refused."""
        owner, entry = scope.find(name)
        if entry is None:
            raise self.fail(f"{role}: {name!r} is produced by no node, initializer or input of "
                            f"{scope.path} or the graphs around it")
        key = (id(owner), name)
        if key in self._memo:
            return self._memo[key]
        kind = entry[0]
        if kind == "input":
            raise _NotConstant(f"{self.label}: {role} depends on the graph input {name!r} of "
                               f"{owner.path}: fastcell needs the weights as constants "
                               "(initializers or constant nodes)")
        if kind == "sparse":
            raise self.fail(f"{role}: {name!r} is a sparse initializer; fastcell reads dense ones")
        if kind == "initializer":
            arr = self.tensor(entry[1], f"initializer {name!r}")
            self._memo[key] = arr
            return arr
        node, k = entry[1], entry[2]
        if depth >= MAX_FOLD_DEPTH:
            raise self.fail(f"{role}: {name!r} comes from a chain of more than {MAX_FOLD_DEPTH} "
                            "nodes; fastcell folds shorter chains of constants only")
        if key in self._busy:
            raise self.fail(f"{role}: {name!r} depends on itself (a cycle in the graph)")
        label = f"{_text(node.op_type)} node {_text(node.name) or '(unnamed)'!r}"
        if node.domain not in ("", "ai.onnx") or node.op_type not in _FOLDABLE:
            raise _NotConstant(f"{self.label}: {role}: {name!r} comes from a {label} (domain "
                               f"{_text(node.domain) or 'ai.onnx'!r}); fastcell folds only "
                               f"constants and {', '.join(_FOLDABLE[1:])} of constants")
        self._busy.add(key)
        try:
            args = [self.value(i, owner, role, depth + 1) if i else None for i in node.input]
            outs = self._fold(node, args, owner, label, role)
        finally:
            self._busy.discard(key)
        if len(outs) != len(node.output):
            raise self.fail(f"{role}: {label} has {len(node.output)} outputs, its op gives "
                            f"{len(outs)}")
        for o, v in zip(node.output, outs):
            if o:
                self._memo[(id(owner), o)] = v
        return outs[k]

    def _fold(self, node, args, scope, label, role):
        where = f"{role}: {label}"
        attrs = _attributes(node, where)
        # Every op here makes at most as many elements as it reads (Concat: their sum; Cast: at
        # most 8 bytes each), so this bounds what the evaluation allocates.
        bound = sum(a.nbytes * (8 if node.op_type == "Cast" else 1) for a in args if a is not None)
        if self._spent + bound > FOLD_BASE_BYTES + FOLD_FACTOR * self.read_bytes:
            raise self.fail(f"{where}: folding the model's constants would take more than "
                            f"{FOLD_BASE_BYTES + FOLD_FACTOR * self.read_bytes} bytes, far more "
                            "than the tensors it holds")
        try:
            outs = _evaluate(node.op_type, args, attrs, self.opset, len(node.output), self, where)
        except (FormatError, _Bad):
            raise
        except (ValueError, TypeError, IndexError, OverflowError) as exc:
            raise self.fail(f"{where}: cannot evaluate it ({_short(exc)})") from None
        self._spent += sum(o.nbytes for o in outs)
        return outs

    def tensor(self, t, where):
        """A TensorProto as a NumPy array, its byte size checked against its dims first."""
        dims = list(t.dims)
        if len(dims) > MAX_NDIM or any(d < 0 or d > MAX_DIM for d in dims):
            raise self.fail(f"{where}: dims {dims[:8]} are not at most {MAX_NDIM} sizes in "
                            f"[0, 2**62]")
        count = math.prod(dims)
        if t.data_type not in _DTYPES:
            raise self.fail(f"{where}: data type {_TYPE_NAMES.get(t.data_type, t.data_type)} is "
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
                raise self.fail(f"{where}: dims {dims} of {_TYPE_NAMES[t.data_type]} need {nbytes} "
                                f"bytes, raw_data holds {len(raw)}")
        else:
            if typed and typed != [field]:
                raise self.fail(f"{where}: {_TYPE_NAMES[t.data_type]} data in {typed[0]}, "
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
                raise self.fail(f"{where}: a value does not fit {_TYPE_NAMES[t.data_type]} "
                                f"({_short(exc)})") from None
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
            key = _text(e.key)
            if key in info:
                raise self.fail(f"{where}: external_data has two {key!r} entries")
            info[key] = _text(e.value)
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
            opened = _open_regular(full)   # non-blocking: a FIFO cannot stall the reader
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


class _Scope:
    """One graph and the values it defines; names not found here are looked up in the graphs
    around it (ONNX's outer-scope rule for If, Loop and Scan bodies)."""

    def __init__(self, graph, parent, path):
        self.graph, self.parent, self.path = graph, parent, path
        values = {}
        for vi in graph.input:
            values[vi.name] = ("input",)
        for t in graph.initializer:   # an initializer that is also an input: its default value
            if values.get(t.name, ("input",))[0] != "input":
                raise _Bad(f"{path}: two initializers are named {t.name!r}")
            values[t.name] = ("initializer", t)
        for t in graph.sparse_initializer:
            values[t.values.name] = ("sparse",)
        for node in graph.node:
            for k, o in enumerate(node.output):
                if not o:
                    continue
                if o in values and values[o][0] != "input":
                    raise _Bad(f"{path}: value {o!r} is produced twice")
                values[o] = ("node", node, k)
        self.values = values

    def find(self, name):
        scope = self
        while scope is not None:
            if name in scope.values:
                return scope, scope.values[name]
            scope = scope.parent
        return None, None


def _reorder(a, order, H):
    """Gate blocks of an ONNX matrix or vector (rows) in fastcell's order, a contiguous copy."""
    return np.ascontiguousarray(np.concatenate([a[k * H:(k + 1) * H] for k in order], axis=0))


def _text(s):
    if isinstance(s, bytes):
        return s.decode("utf-8", "replace")
    return s


def _short(exc, limit=200):
    s = " ".join(str(exc).split()) or type(exc).__name__
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _count(value, key, where, model):
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > 20:
        raise model.fail(f"{where}: external data {key} {value!r} is not a non-negative integer")
    return int(value)


# ---- attributes ----

_ATTR_FIELD = {_A_FLOAT: "f", _A_INT: "i", _A_STRING: "s", _A_TENSOR: "t", _A_FLOATS: "floats",
               _A_INTS: "ints", _A_STRINGS: "strings"}
_ATTR_TYPE_NAMES = {0: "UNDEFINED", 1: "FLOAT", 2: "INT", 3: "STRING", 4: "TENSOR", 5: "GRAPH",
                    6: "FLOATS", 7: "INTS", 8: "STRINGS", 9: "TENSORS", 10: "GRAPHS",
                    11: "SPARSE_TENSOR", 12: "SPARSE_TENSORS", 13: "TYPE_PROTO", 14: "TYPE_PROTOS"}


def _attributes(node, where):
    out = {}
    for a in node.attribute:
        name = _text(a.name)    # bytes where the file's name is not UTF-8
        if name in out:
            raise _Bad(f"{where}: two attributes named {name!r}")
        out[name] = a
    return out


def _get(attrs, name, kind, default, where):
    """An attribute's value, which must be of the given type; `default` when absent."""
    a = attrs.get(name)
    if a is None:
        return default
    if a.type != kind:
        raise _Bad(f"{where}: attribute {name} has type "
                          f"{_ATTR_TYPE_NAMES.get(a.type, a.type)}, expected {_ATTR_TYPE_NAMES[kind]}")
    v = getattr(a, _ATTR_FIELD[kind])
    if kind == _A_STRING:
        return _text(v)
    if kind in (_A_FLOATS, _A_INTS, _A_STRINGS):
        return list(v)
    return v


# ---- the ops folded into constants (NumPy, from the ONNX operator spec) ----

_CAST_TO = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32,
            7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


def _ints(a, what):
    """A tensor of integers (axes, shape, starts, ...) as a list of Python ints."""
    if a is None:
        return None
    if a.dtype.kind not in "iu" or a.ndim > 1 or a.size > 64:
        raise _Bad(f"{what}: expected at most 64 integers, got {a.dtype} of shape {a.shape}")
    return [int(v) for v in a.reshape(-1)]


def _axis(axis, rank, what):
    if not -rank <= axis < rank:
        raise _Bad(f"{what}: axis {axis} is out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def _evaluate(op, args, attrs, opset, n_out, model, where):
    """[outputs] of one constant node. `args` are its inputs (None for absent optional ones)."""
    def fail(msg):
        return _Bad(f"{where}: {msg}")

    def arg(k, name):
        if k >= len(args) or args[k] is None:
            raise fail(f"input {name} is missing")
        return args[k]

    def opt(k):
        return args[k] if k < len(args) else None

    if op == "Constant":
        return [_constant(attrs, model, where)]
    x = arg(0, "input")
    if op == "Identity":
        return [x]
    if op == "Cast":
        to = _get(attrs, "to", _A_INT, None, where)
        if to not in _CAST_TO:
            raise fail(f"Cast to {_TYPE_NAMES.get(to, to)} is not a type fastcell folds")
        return [x.astype(_CAST_TO[to])]
    if op == "Transpose":
        perm = _get(attrs, "perm", _A_INTS, None, where)
        perm = list(range(x.ndim))[::-1] if perm is None else perm
        if sorted(perm) != list(range(x.ndim)):
            raise fail(f"perm {perm} is not a permutation of the {x.ndim} axes")
        return [np.transpose(x, perm)]
    if op in ("Squeeze", "Unsqueeze"):
        axes = (_get(attrs, "axes", _A_INTS, None, where) if opset < 13
                else _ints(opt(1), f"{where}: axes"))
        if op == "Unsqueeze":
            if not axes:
                raise fail("Unsqueeze needs axes")
            rank = x.ndim + len(axes)
            axes = [_axis(a, rank, where) for a in axes]
            if len(set(axes)) != len(axes):
                raise fail(f"axes {axes} repeat an axis")
            shape, it = [], iter(x.shape)
            for k in range(rank):
                shape.append(1 if k in axes else next(it))
            return [x.reshape(shape)]
        if not axes:
            return [x.reshape([d for d in x.shape if d != 1])]
        axes = sorted({_axis(a, x.ndim, where) for a in axes})
        if any(x.shape[a] != 1 for a in axes):
            raise fail(f"Squeeze axes {axes} of shape {x.shape}: not all of size 1")
        return [x.reshape([d for k, d in enumerate(x.shape) if k not in axes])]
    if op == "Reshape":
        shape = (_get(attrs, "shape", _A_INTS, None, where) if opset < 5
                 else _ints(arg(1, "shape"), f"{where}: shape"))
        if shape is None:
            raise fail("Reshape needs a shape")
        allowzero = _get(attrs, "allowzero", _A_INT, 0, where)
        if not allowzero:
            if any(s == 0 and k >= x.ndim for k, s in enumerate(shape)):
                raise fail(f"shape {shape}: a 0 copies an input axis, but the input has rank {x.ndim}")
            shape = [x.shape[k] if s == 0 else s for k, s in enumerate(shape)]
        if shape.count(-1) > 1 or any(s < -1 for s in shape):
            raise fail(f"shape {shape} is not a valid Reshape target")
        return [x.reshape(shape)]
    if op == "Concat":
        axis = _get(attrs, "axis", _A_INT, None, where)
        if axis is None:
            raise fail("Concat needs an axis")
        parts = [a for a in args if a is not None]
        if any(p.ndim != x.ndim or p.dtype != x.dtype for p in parts):
            raise fail("Concat inputs of different ranks or types")
        return [np.concatenate(parts, axis=_axis(axis, max(x.ndim, 1), where))]
    if op == "Slice":
        if opset < 10:
            starts = _get(attrs, "starts", _A_INTS, None, where)
            ends = _get(attrs, "ends", _A_INTS, None, where)
            axes = _get(attrs, "axes", _A_INTS, None, where)
            steps = None
        else:
            starts = _ints(arg(1, "starts"), f"{where}: starts")
            ends = _ints(arg(2, "ends"), f"{where}: ends")
            axes, steps = _ints(opt(3), f"{where}: axes"), _ints(opt(4), f"{where}: steps")
        if starts is None or ends is None or len(starts) != len(ends):
            raise fail("Slice needs starts and ends of one length")
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        if len(axes) != len(starts) or len(steps) != len(starts):
            raise fail("Slice's starts, ends, axes and steps differ in length")
        index = [slice(None)] * x.ndim
        seen = set()
        for s, e, a, st in zip(starts, ends, axes, steps):
            a = _axis(a, x.ndim, where)
            if a in seen or st == 0:
                raise fail("Slice repeats an axis or has a step of 0")
            seen.add(a)
            index[a] = _slice(s, e, st, x.shape[a])
        return [x[tuple(index)]]
    if op == "Split":
        axis = _axis(_get(attrs, "axis", _A_INT, 0, where), x.ndim, where)
        dim = x.shape[axis]
        split = (_get(attrs, "split", _A_INTS, None, where) if opset < 13
                 else _ints(opt(1), f"{where}: split"))
        if split is None:
            n = _get(attrs, "num_outputs", _A_INT, None, where) if opset >= 18 else None
            n = n_out if n is None else n
            if n != n_out or n < 1:
                raise fail(f"num_outputs {n} but {n_out} outputs")
            if dim % n == 0:
                split = [dim // n] * n
            elif opset >= 18:   # the last chunk takes what is left
                chunk = -(-dim // n)
                split = [chunk] * (n - 1) + [dim - chunk * (n - 1)]
            else:
                raise fail(f"axis of size {dim} does not split into {n} equal parts")
        if len(split) != n_out or any(s < 0 for s in split) or sum(split) != dim:
            raise fail(f"split {split} does not cut an axis of size {dim} into {n_out} outputs")
        outs, begin = [], 0
        for size in split:
            index = [slice(None)] * x.ndim
            index[axis] = slice(begin, begin + size)
            outs.append(x[tuple(index)])
            begin += size
        return outs
    raise fail(f"op {op} is not folded")  # unreachable: callers check _FOLDABLE


def _slice(start, end, step, dim):
    """ONNX Slice's clamping (opset 10+) as a Python slice."""
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        return slice(start, end, step)
    if dim == 0:
        return slice(0, 0, 1)
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return slice(start, None if end == -1 else end, step)


def _constant(attrs, model, where):
    if len(attrs) != 1:
        raise model.fail(f"{where}: a Constant needs exactly one value attribute, it has "
                         f"{sorted(attrs) or 'none'}")
    (name, a), = attrs.items()
    if name == "value":
        return model.tensor(_get(attrs, name, _A_TENSOR, None, where), where)
    if name in ("value_float", "value_floats", "value_int", "value_ints"):
        kind = {"value_float": _A_FLOAT, "value_floats": _A_FLOATS, "value_int": _A_INT,
                "value_ints": _A_INTS}[name]
        arr = np.array(_get(attrs, name, kind, None, where),
                       dtype=np.float32 if "float" in name else np.int64)
        model.read_bytes += arr.nbytes
        return arr
    raise model.fail(f"{where}: a Constant with {name} is not one fastcell folds (value, "
                     "value_float(s), value_int(s))")
