"""The benchmark's models: for one cell type at (I, H), random weights with PyTorch's default
initialisation and, from those same weights, fastcell's cell, PyTorch's modules and an ONNX
Runtime session holding a single RNN/GRU/LSTM node.

A benchmark against a competitor that computes something else is worthless, so check_parity()
runs every competitor on the same inputs and holds it to fastcell within PARITY_TOL.

PyTorch and ONNX Runtime are optional: a missing one makes its column "n/a", never an error.
"""

import functools
import importlib

import numpy as np

import fastcell

KINDS = ("rnn", "gru", "lstm", "peephole")
GATES = {"rnn": 1, "gru": 3, "lstm": 4, "peephole": 4}
LABELS = {"rnn": "RNN tanh", "gru": "GRU", "lstm": "LSTM", "peephole": "peephole LSTM"}
PARITY_TOL = 1e-4

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


def build_torch(kind, w, step):
    """PyTorch's module for one step (nn.RNNCell/GRUCell/LSTMCell) or a sequence (nn.RNN/GRU/LSTM,
    one layer), or the torch-ops peephole ones; None without torch."""
    torch = optional_import("torch")
    if torch is None:
        return None
    H, I = w["weight_hh"].shape[1], w["weight_ih"].shape[1]
    if kind == "peephole":
        from bench import torch_peephole
        cls = torch_peephole.PeepholeLSTMCell if step else torch_peephole.PeepholeLSTM
        return _load_torch(cls(I, H), w)
    names = {"rnn": "RNN", "gru": "GRU", "lstm": "LSTM"}
    cls = getattr(torch.nn, names[kind] + ("Cell" if step else ""))
    kwargs = {"nonlinearity": "tanh"} if kind == "rnn" else {}
    return _load_torch(cls(I, H, **kwargs), w, suffix="" if step else "_l0")


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


def build_ort_session(kind, w):
    """An ONNX Runtime CPU session, one thread, sequential; None without onnx/onnxruntime."""
    ort = optional_import("onnxruntime")
    if ort is None or optional_import("onnx") is None:
        return None
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(build_onnx_model(kind, w).SerializeToString(), sess_options=so,
                                providers=["CPUExecutionProvider"])


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
        self.fastcell = build_fastcell(kind, self.weights)

    has_cell_state = property(lambda self: has_cell_state(self.kind))
    label = property(lambda self: LABELS[self.kind])

    @functools.cached_property
    def torch_step(self):
        return build_torch(self.kind, self.weights, step=True)

    @functools.cached_property
    def torch_sequence(self):
        return build_torch(self.kind, self.weights, step=False)

    @functools.cached_property
    def ort_session(self):
        return build_ort_session(self.kind, self.weights)

    def __repr__(self):
        return f"Models({self.kind!r}, I={self.input_size}, H={self.hidden_size})"


@functools.lru_cache(maxsize=None)
def get_models(kind, input_size, hidden_size):
    """Models are built once per process and shared by every benchmark of that size."""
    return Models(kind, input_size, hidden_size)


# Shapes check_parity() covers: a long batch-1 sequence (errors compound over time), a batched
# sequence and a batched step, at the benchmark's smallest and a larger H.
PARITY_CASES = (("sequence", 100, 1, 64), ("sequence", 20, 3, 256), ("step", 1, 2, 64))


def check_parity(kinds=KINDS, cases=PARITY_CASES, tol=PARITY_TOL):
    """Runs PyTorch and ONNX Runtime against fastcell on the same weights, inputs and states.

    Returns {(kind, case, competitor): max abs difference over outputs and final states};
    raises AssertionError naming every pair beyond tol. Missing competitors are left out.
    """
    from bench.scenarios import COMPETITORS, Scenario, make_runner

    diffs, bad = {}, []
    for kind in kinds:
        for mode, T, B, H in cases:
            sc = Scenario(mode, T, B, H)
            m = Models(kind, H, H, seed=1)
            want = make_runner(m, sc, "fastcell").results()
            for comp in COMPETITORS:
                if comp in ("fastcell", "floor"):
                    continue
                r = make_runner(m, sc, comp)
                if not r.available:
                    continue
                got = r.results()
                d = max(float(np.max(np.abs(got[k] - want[k]))) for k in want if k in got)
                diffs[(kind, sc.id, comp)] = d
                if not d <= tol:
                    bad.append(f"{comp} vs fastcell, {LABELS[kind]} {sc.id}: max abs diff {d:.3g}")
    if bad:
        raise AssertionError("competitor models disagree with fastcell (tol %g):\n  %s"
                             % (tol, "\n  ".join(bad)))
    return diffs
