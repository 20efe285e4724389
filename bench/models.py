"""The benchmark's models: for one cell type at (I, H), random weights with PyTorch's default
initialisation and, from those same weights, fastcell's cell, PyTorch's modules and an ONNX
Runtime session holding a single RNN/GRU/LSTM node, each in a weight format:

- "float32": the weights as drawn.
- "int8": fastcell.quantize(cell, "int8") (one scale per row); PyTorch's dynamic quantization
  (torch.ao.quantization.quantize_dynamic, qint8); ONNX Runtime's quantize_dynamic (QInt8), which
  turns the LSTM node into com.microsoft's DynamicQuantizeLSTM.
- "int8x8": fastcell's int8 with each layer's input x quantized to 8 bits per row
  (fastcell.quantize(cell, "int8", input_bits=8)), as ONNX Runtime's and PyTorch's int8 quantize
  theirs (per tensor); fastcell only.
- "bf16": fastcell.quantize(cell, "bf16"); OpenVINO's INFERENCE_PRECISION_HINT=bf16 (bench.team).

OpenVINO (bench.team's rival beside ONNX Runtime) compiles the same one-node ONNX model for its
CPU plugin, in float32 or, with its precision hint, bf16 (the CPU's bf16 dot products or AMX).

A benchmark against a competitor that computes something else is worthless: bench/parity.py holds
every model built here to fastcell's (float32) or to PyTorch's float32 one (a reduced format).

PyTorch, ONNX Runtime and OpenVINO (and their quantization) are optional: a missing one makes its column
"n/a", never an error (the builders raise Unavailable, saying why).
"""

import functools
import importlib
import logging
import os
import tempfile
import warnings

import numpy as np

import fastcell

KINDS = ("rnn", "gru", "lstm", "peephole")
GATES = {"rnn": 1, "gru": 3, "lstm": 4, "peephole": 4}
LABELS = {"rnn": "RNN tanh", "gru": "GRU", "lstm": "LSTM", "peephole": "peephole LSTM"}
WEIGHT_FORMATS = ("float32", "int8", "int8x8", "bf16")
# fastcell.quantize's arguments for each reduced weight format of the benchmark
QUANTIZE_ARGS = {"int8": ("int8", {}), "int8x8": ("int8", {"input_bits": 8}), "bf16": ("bf16", {})}

# ONNX's gate blocks as indices into PyTorch's (SPEC.md "Other conventions"): GRU r,z,n -> z,r,h;
# LSTM i,f,g,o -> i,o,f,c; peepholes p_i,p_f,p_o -> p_i,p_o,p_f.
ONNX_GATE_ORDER = {"rnn": [0], "gru": [1, 0, 2], "lstm": [0, 3, 1, 2], "peephole": [0, 3, 1, 2]}
ONNX_PEEPHOLE_ORDER = [0, 2, 1]
ONNX_OP = {"rnn": "RNN", "gru": "GRU", "lstm": "LSTM", "peephole": "LSTM"}
ONNX_OPSET = 14
ONNX_IR_VERSION = 8


def optional_import(name):
    """The module, or None when it is not installed (its benchmark column becomes n/a)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


class Unavailable(Exception):
    """A competitor that cannot be built here (its column becomes n/a); the message says why."""


def require(name):
    mod = optional_import(name)
    if mod is None:
        raise Unavailable(f"{name} not installed")
    return mod


def check_format(fmt, supported):
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"weight format: expected one of {WEIGHT_FORMATS}, got {fmt!r}")
    if fmt not in supported:
        raise Unavailable(f"no {fmt} model")


def has_cell_state(kind):
    return kind in ("lstm", "peephole")


def random_weights(kind, input_size, hidden_size, dtype=np.float32, seed=0):
    """PyTorch's default initialisation, U(-1/sqrt(H), 1/sqrt(H)), under fastcell's cell names."""
    rng = np.random.default_rng(seed)
    H, G = hidden_size, GATES[kind]
    k = 1 / np.sqrt(H)

    def u(*shape):
        return rng.uniform(-k, k, shape).astype(dtype)

    w = {"weight_ih": u(G * H, input_size), "weight_hh": u(G * H, H),
         "bias_ih": u(G * H), "bias_hh": u(G * H)}
    if kind == "peephole":
        w["weight_ph"] = u(3, H)
    return w


def build_fastcell(kind, w):
    if kind == "rnn":
        return fastcell.RNNCell(**w, nonlinearity="tanh")
    if kind == "gru":
        return fastcell.GRUCell(**w, reset_after=True)
    if kind == "lstm":
        return fastcell.LSTMCell(**w)
    return fastcell.PeepholeLSTMCell(**w)


def _load_torch(module, weights, suffix=""):
    torch = importlib.import_module("torch")
    module.load_state_dict({name + suffix: torch.from_numpy(np.array(v)) for name, v in weights.items()})
    # Inference only: no autograd bookkeeping on the PyTorch side either.
    return module.requires_grad_(False).eval()


def build_torch(kind, w, step, fmt="float32"):
    """PyTorch's module for one step (nn.RNNCell/GRUCell/LSTMCell) or a sequence (nn.RNN/GRU/LSTM,
    one layer), or the torch-ops peephole ones; int8: that module dynamically quantized."""
    check_format(fmt, ("float32", "int8"))
    torch = require("torch")
    H, I = w["weight_hh"].shape[1], w["weight_ih"].shape[1]
    if kind == "peephole":
        if fmt != "float32":
            raise Unavailable("PyTorch has no peephole LSTM to quantize")
        return _peephole_torch(torch, I, H, w, step)
    names = {"rnn": "RNN", "gru": "GRU", "lstm": "LSTM"}
    cls = getattr(torch.nn, names[kind] + ("Cell" if step else ""))
    kwargs = {"nonlinearity": "tanh"} if kind == "rnn" else {}
    module = _load_torch(cls(I, H, **kwargs), w, suffix="" if step else "_l0")
    return module if fmt == "float32" else _quantize_torch(torch, module)


def _peephole_torch(torch, I, H, w, step):
    """The peephole LSTM as a PyTorch user writes it, PyTorch having none: modules called like
    nn.LSTMCell (step) or a one-layer nn.LSTM, whose forward is fastcell.torch's equations
    (peephole_lstm_cell), the input projection of a whole sequence one matmul (as nn.LSTM does)
    and the time loop Python.

    Not fastcell.torch's modules as they are: a training reference, they check their arguments
    and handle packed sequences, layers and directions on every call, work this column must not
    time. Their parameters and names are kept (the subclasses only replace forward).
    """
    from fastcell.torch import PeepholeLSTMCell, peephole_lstm_cell

    linear = torch.nn.functional.linear

    class Cell(PeepholeLSTMCell):
        def forward(self, x, hx):
            h, c = hx
            return peephole_lstm_cell(linear(x, self.weight_ih, self.bias_ih), h, c,
                                      self.weight_hh, self.weight_ph, self.bias_hh)

    class Layer(PeepholeLSTMCell):
        def forward(self, x, hx):
            h, c = hx[0][0], hx[1][0]
            w_hh, w_ph, b_hh = self.weight_hh, self.weight_ph, self.bias_hh
            ys = []
            for gates_x in linear(x, self.weight_ih, self.bias_ih).unbind(0):
                h, c = peephole_lstm_cell(gates_x, h, c, w_hh, w_ph, b_hh)
                ys.append(h)
            return torch.stack(ys), (h[None], c[None])

    return _load_torch((Cell if step else Layer)(I, H), w)


def _quantize_torch(torch, module):
    """torch.ao.quantization.quantize_dynamic(qint8) of one RNN module, on the default engine."""
    engine = torch.backends.quantized.engine
    if engine in (None, "none") or engine not in torch.backends.quantized.supported_engines:
        raise Unavailable(f"no PyTorch quantized engine (engine {engine!r})")
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as e:
        raise Unavailable(f"no torch.ao.quantization ({e})") from None
    # quantize_dynamic swaps a model's submodules, never the model itself: hand it a container.
    holder = torch.nn.Sequential(module)
    try:
        # torch 2.10+ warns that torch.ao.quantization and qint8 tensors are deprecated.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"(?s).*deprecated")
            q = quantize_dynamic(holder, {type(module)}, dtype=torch.qint8)[0]
    except (RuntimeError, NotImplementedError, AssertionError) as e:
        raise Unavailable(f"PyTorch dynamic quantization failed: {e}") from None
    if type(q) is type(module):
        raise Unavailable(f"PyTorch has no dynamic int8 {type(module).__name__}")
    return q.eval()


def build_onnx_model(kind, w):
    """A single ONNX RNN/GRU/LSTM node with the weights as initialisers.

    Inputs X (T, B, I), initial_h (1, B, H) [, initial_c]; outputs Y (T, 1, B, H), Y_h [, Y_c].
    T and B are symbolic, so one session serves the step and the sequence benchmarks.
    """
    onnx = importlib.import_module("onnx")
    from onnx import TensorProto, helper, numpy_helper

    H, I = w["weight_hh"].shape[1], w["weight_ih"].shape[1]
    order = ONNX_GATE_ORDER[kind]

    def blocks(a):
        return np.concatenate([a[g * H:(g + 1) * H] for g in order])

    inits = {"W": blocks(w["weight_ih"])[None], "R": blocks(w["weight_hh"])[None],
             "B": np.concatenate([blocks(w["bias_ih"]), blocks(w["bias_hh"])])[None]}
    node_inputs = ["X", "W", "R", "B", "", "initial_h"]
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "B", I]),
                    helper.make_tensor_value_info("initial_h", TensorProto.FLOAT, [1, "B", H])]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["T", 1, "B", H]),
               helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, [1, "B", H])]
    attrs = {"hidden_size": H}
    if kind == "gru":
        attrs["linear_before_reset"] = 1     # PyTorch's reset-after GRU
    if has_cell_state(kind):
        node_inputs.append("initial_c")
        graph_inputs.append(helper.make_tensor_value_info("initial_c", TensorProto.FLOAT, [1, "B", H]))
        outputs.append(helper.make_tensor_value_info("Y_c", TensorProto.FLOAT, [1, "B", H]))
    if kind == "peephole":
        node_inputs.append("P")
        inits["P"] = w["weight_ph"][ONNX_PEEPHOLE_ORDER].reshape(1, 3 * H)
    node = helper.make_node(ONNX_OP[kind], node_inputs, [o.name for o in outputs], **attrs)
    graph = helper.make_graph(
        [node], f"fastcell_bench_{kind}", graph_inputs, outputs,
        initializer=[numpy_helper.from_array(np.ascontiguousarray(v, np.float32), name)
                     for name, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(model)
    return model


def build_ort_session(kind, w, fmt="float32", threads=1):
    """An ONNX Runtime CPU session on `threads` intra-op threads (its own pool), sequential;
    int8: of the quantize_dynamic'd model."""
    check_format(fmt, ("float32", "int8"))
    ort = require("onnxruntime")
    require("onnx")
    model = build_onnx_model(kind, w).SerializeToString()
    if fmt == "int8":
        model = _quantize_onnx(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])


def _quantize_onnx(model):
    """onnxruntime.quantization.quantize_dynamic(QInt8 weights) of a serialized one-node model."""
    onnx = require("onnx")
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
        raise Unavailable(f"no onnxruntime.quantization ({e})") from None
    with tempfile.TemporaryDirectory(prefix="fastcell-bench-") as tmp:
        src, dst = os.path.join(tmp, "float32.onnx"), os.path.join(tmp, "int8.onnx")
        with open(src, "wb") as f:
            f.write(model)
        # It logs a warning to run its pre-processing first, which matters to graphs of many nodes.
        logging.disable(logging.WARNING)
        try:
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
        quantized = onnx.load(dst)
    ops = [n.op_type for n in quantized.graph.node]
    if ops == [n.op_type for n in onnx.load_from_string(model).graph.node]:
        raise Unavailable(f"ONNX Runtime's quantize_dynamic leaves {'/'.join(ops)} in float32")
    return quantized.SerializeToString()


def build_openvino(kind, w, fmt="float32", threads=1, shapes=None):
    """An OpenVINO CPU infer request of the one-node ONNX model, on `threads` threads
    (INFERENCE_NUM_THREADS, one stream, latency hint), computing in float32 or bf16
    (INFERENCE_PRECISION_HINT). shapes: {input name: static shape} (OpenVINO compiles a static
    shape faster), else dynamic. Returns (infer request, compiled model)."""
    check_format(fmt, ("float32", "bf16"))
    ov = require("openvino")
    core = ov.Core()
    model = core.read_model(build_onnx_model(kind, w).SerializeToString(), b"")
    if shapes:
        model.reshape(shapes)
    config = {"INFERENCE_NUM_THREADS": str(threads), "NUM_STREAMS": "1",
              "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": "bf16" if fmt == "bf16" else "f32"}
    compiled = core.compile_model(model, "CPU", config)
    return compiled.create_infer_request(), compiled


class Models:
    """One cell type at (I, H): the weights and every competitor built from them (lazily)."""

    def __init__(self, kind, input_size, hidden_size, dtype=np.float32, seed=0):
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
        if np.dtype(dtype) != np.float32:
            raise ValueError(f"dtype: the benchmark compares float32 only, got {np.dtype(dtype)}")
        self.kind, self.input_size, self.hidden_size = kind, input_size, hidden_size
        self.gates = GATES[kind]
        self.dtype = np.dtype(dtype)
        self.weights = random_weights(kind, input_size, hidden_size, dtype, seed)
        self._built = {}

    has_cell_state = property(lambda self: has_cell_state(self.kind))
    label = property(lambda self: LABELS[self.kind])

    def _get(self, key, build):
        """Built once: a model, or the Unavailable saying why there is none (raised again)."""
        if key not in self._built:
            try:
                self._built[key] = build()
            except Unavailable as e:
                self._built[key] = e
        got = self._built[key]
        if isinstance(got, Unavailable):
            raise got
        return got

    def fastcell(self, fmt="float32"):
        """fastcell's cell; in a reduced format, fastcell.quantize of the float32 one."""
        check_format(fmt, WEIGHT_FORMATS)
        if fmt == "float32":
            return self._get(("fastcell", fmt), lambda: build_fastcell(self.kind, self.weights))
        fmt_name, args = QUANTIZE_ARGS[fmt]
        return self._get(("fastcell", fmt),
                         lambda: fastcell.quantize(self.fastcell(), fmt_name, **args))

    def torch(self, step, fmt="float32"):
        """nn.*Cell (step=True) or the one-layer nn.RNN/GRU/LSTM, in weight format fmt."""
        return self._get(("torch", step, fmt), lambda: build_torch(self.kind, self.weights, step, fmt))

    def ort_session(self, fmt="float32"):
        return self._get(("ort", fmt), lambda: build_ort_session(self.kind, self.weights, fmt))

    def __repr__(self):
        return f"Models({self.kind!r}, I={self.input_size}, H={self.hidden_size})"


@functools.lru_cache(maxsize=None)
def get_models(kind, input_size, hidden_size):
    """Models are built once per process and shared by every benchmark of that size."""
    return Models(kind, input_size, hidden_size)
