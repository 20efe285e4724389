"""Recurrent layers from ONNX files: ``onnx_nodes`` lists the RNN, GRU and LSTM nodes of a model
(also inside If, Loop and Scan bodies), ``from_onnx`` turns one into a fastcell layer.

What an ONNX node stores, and what fastcell takes (docs/SPEC.md, "Other frameworks' conventions"):

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

from dataclasses import dataclass

import numpy as np

from fastcell import spec
from fastcell.convert.choosing import choose
from fastcell.convert.onnx_fold import ConstantFolder, NotConstant
from fastcell.convert.onnx_reader import (A_FLOAT, A_FLOATS, A_INT, A_STRING, A_STRINGS, Bad,
                                          FormatError, OnnxModel, attributes, get, text)
from fastcell.models import LAYERS, with_threads
from fastcell.models.recurrence import packed_bytes
from fastcell_c.team import check_threads

__all__ = ["onnx_nodes", "from_onnx", "onnx_outputs", "OnnxNode"]

_RECURRENT = ("RNN", "GRU", "LSTM")
_GATES = {"RNN": spec.GATES["rnn"], "GRU": spec.GATES["gru"], "LSTM": spec.GATES["lstm"]}
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
    model = _Converter(source)
    with model.errors():
        return [model.describe(i) for i in range(len(model.nodes))]


def from_onnx(source, node=None, *, threads=1):
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
    threads: the layer's (``layer.threads``).
    """
    threads = check_threads(threads)
    model = _Converter(source)
    i = model.select(node)      # a `node` that matches none: ValueError, not the file's fault
    with model.errors():
        layer = model.layer(i)
    return with_threads(layer, threads)


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



# ---- the conversion ----

class _Converter:
    """The recurrent nodes of one ONNX model (OnnxModel) and their conversion to layers."""

    def __init__(self, source):
        self.model = OnnxModel(source, _RECURRENT)
        self.folder = ConstantFolder(self.model)
        self.nodes = self.model.nodes
        self.fail = self.model.fail
        self.errors = self.model.errors

    # -- choosing a node --

    def describe(self, i):
        scope, node, _ = self.nodes[i]
        op = node.op_type
        attrs = attributes(node, self._where(i))
        direction = get(attrs, "direction", A_STRING, "forward", self._where(i))
        layout = get(attrs, "layout", A_INT, 0, self._where(i))
        H = get(attrs, "hidden_size", A_INT, None, self._where(i))
        I = None
        W, R = (node.input[1] if len(node.input) > 1 else ""), (node.input[2] if len(node.input) > 2 else "")
        w_shape, r_shape = self._shape(W, scope), self._shape(R, scope)
        if w_shape is not None and len(w_shape) == 3:
            I = w_shape[2]
        if H is None and r_shape is not None and len(r_shape) == 3:
            H = r_shape[2]
        return OnnxNode(i, op, text(node.name), scope.path, direction, I, H, layout)

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
            return self.folder.value(name, scope, "W").shape
        except (FormatError, Bad):
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

        return choose(node, n, argument="node", item="recurrent node",
                      named="RNN, GRU or LSTM node", listing=listing,
                      matches=lambda name: [[i for i in range(n) if text(self.nodes[i][1].name) == name]],
                      index_hint="give its index", ambiguous_hint="give the index of one",
                      expected="a node name, an index or None", empty=self._no_node)

    def _no_node(self):
        """The error for a model without a recurrent node, saying what the recurrence became."""
        hint = ""
        if self.model.op_types & {"Loop", "Scan"}:
            op = "Loop" if "Loop" in self.model.op_types else "Scan"
            hint = (f" (the recurrence was exported as a {op} of plain ops: tf2onnx writes "
                    "Keras' SimpleRNN, GRU(reset_after=False), GRU(use_bias=False) and masked "
                    "layers so, and PyTorch cells in a loop come out so too; convert a Keras model "
                    "with fastcell.from_keras and a PyTorch cell with fastcell.from_torch instead)")
        elif self.model.op_types & {"Gemm", "MatMul"}:
            hint = (" (torch.onnx.export writes nn.LSTMCell, GRUCell and RNNCell as Gemm and "
                    "activation nodes, and tf2onnx Keras layers with unroll=True as MatMul and "
                    "activation nodes, not as one recurrent node: convert a PyTorch cell with "
                    "fastcell.from_torch and a Keras model with fastcell.from_keras instead)")
        return self.fail(f"no RNN, GRU or LSTM node in the model{hint}")

    # -- the layer --

    def layer(self, i):
        scope, node, _ = self.nodes[i]
        op, where = node.op_type, self._where(i)

        def fail(msg):
            return Bad(f"{where}: {msg}")

        attrs = attributes(node, where)
        unknown = sorted(set(attrs) - _OP_ATTRIBUTES[op])
        if unknown:
            raise fail(f"attribute {unknown[0]!r} is not one of the ONNX {op} attributes that "
                       f"fastcell knows ({', '.join(sorted(_OP_ATTRIBUTES[op]))})")
        direction = get(attrs, "direction", A_STRING, "forward", where)
        if direction not in _DIRECTIONS:
            raise fail(f"attribute direction is {direction!r}, expected one of {list(_DIRECTIONS)}")
        D = 2 if direction == "bidirectional" else 1
        layout = get(attrs, "layout", A_INT, 0, where)
        if layout not in (0, 1):
            raise fail(f"attribute layout is {layout}, expected 0 or 1")
        for name in ("activation_alpha", "activation_beta"):
            if name in attrs and get(attrs, name, A_FLOATS, [], where):
                raise fail(f"attribute {name}: fastcell computes only activations without "
                           "parameters (Tanh, Relu, Sigmoid)")
        if "clip" in attrs:
            raise fail(f"attribute clip ({get(attrs, 'clip', A_FLOAT, 0.0, where)!r}): fastcell "
                       "does not clip the cell input")
        if op == "LSTM" and get(attrs, "input_forget", A_INT, 0, where) != 0:
            raise fail("attribute input_forget = 1 (coupled input and forget gates): fastcell's "
                       "LSTM computes them separately")
        reset_after = None
        if op == "GRU":
            lbr = get(attrs, "linear_before_reset", A_INT, 0, where)
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
        W = self.folder.value(inputs[1], scope, f"{where}: W")
        R = self.folder.value(inputs[2], scope, f"{where}: R")
        B = self.folder.value(inputs[3], scope, f"{where}: B") if inputs[3] else None
        P = self.folder.value(inputs[7], scope, f"{where}: P") if op == "LSTM" and inputs[7] else None

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
        attr_H = get(attrs, "hidden_size", A_INT, None, where)
        if attr_H is not None and attr_H != H:
            raise fail(f"attribute hidden_size is {attr_H}, but W has shape {W.shape} "
                       f"({G}*{H} rows)")
        for role, v, want in (("R", R, (D, G * H, H)), ("B", B, (D, 2 * G * H)), ("P", P, (D, 3 * H))):
            if v is not None and v.shape != want:
                raise fail(f"{role} has shape {v.shape}, expected {list(want)}")

        order = spec.ONNX_GATE_ORDER[op]
        weights = {}
        for d in range(D):
            s = spec.suffix(0, d)
            weights["weight_ih" + s] = spec.reorder(W[d], order, H)
            weights["weight_hh" + s] = spec.reorder(R[d], order, H)
            if B is not None:
                weights["bias_ih" + s] = spec.reorder(B[d, :G * H], order, H)
                weights["bias_hh" + s] = spec.reorder(B[d, G * H:], order, H)
            if P is not None:
                weights["weight_ph" + s] = np.ascontiguousarray(
                    P[d].reshape(3, H)[list(spec.ONNX_PEEPHOLE_ORDER)])
        # The built model keeps its packed weights; one far larger than the file's own tensors
        # (which folding can make) is refused before anything is allocated for it.
        split = 2 if op == "GRU" and not reset_after else 0
        model_bytes = D * packed_bytes(G, H, I, H, W.dtype.itemsize, split)
        model_bytes += sum(v.nbytes for v in (B, P) if v is not None)
        budget = self.folder.budget()
        if model_bytes > budget:
            raise fail(f"its weights would take {model_bytes} bytes in memory, more than "
                       f"{budget} bytes, far more than the file's tensors hold "
                       f"({self.model.read_bytes} bytes)")
        initial = self._initial_state(node, inputs, scope, op, D, H, layout, W.dtype, fail)
        config = {"input_size": I, "hidden_size": H, "num_layers": 1, "bias": B is not None,
                  "batch_first": layout == 1, "bidirectional": D == 2,
                  "reverse": direction == "reverse", "dtype": W.dtype,
                  "initial_state": initial}
        if op == "RNN":
            kind, config["nonlinearity"] = "rnn", nonlinearity
        elif op == "GRU":
            kind, config["reset_after"] = "gru", reset_after
        else:
            kind = "peephole_lstm" if P is not None else "lstm"
        initial = config.pop("initial_state")
        return LAYERS[kind](**config, weights=weights, initial_state=initial)

    def _constant_input(self, name, scope, role):
        """A run-time input's value when the file makes it a constant, else None (a graph
        input, or computed at run time: the layer takes it at call time)."""
        if not name:
            return None
        try:
            return self.folder.value(name, scope, role)
        except NotConstant:
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
        acts = [text(a) for a in get(attrs, "activations", A_STRINGS, [], where)]
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

