"""fastcell.from_onnx and fastcell.onnx_nodes (fastcell/convert/onnx_import.py), and the layers' reverse
option it uses for direction="reverse".

Parity: models built with onnx.helper, every op x direction x layout x linear_before_reset x
peepholes x with and without B, sequence_lens and initial states, sizes 1, 3 and 17, float32 and
float64. fastcell's outputs are compared with ONNX Runtime's (float32, layout 0: <= 1e-5) and
with ``onnx_spec`` below, a plain float64 NumPy reading of the ONNX operator spec's equations
(<= 1e-5 in float32, <= 1e-12 in float64): ONNX Runtime's CPU provider runs neither float64 nor
layout = 1. The reading is itself held to ONNX Runtime on every float32 layout-0 case.
"""

import os
import pickle
import tracemalloc

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import fastcell  # noqa: E402
from fastcell import FormatError  # noqa: E402
from fastcell.convert.onnx_import import onnx_outputs  # noqa: E402
from conftest import hang_guard, max_diff  # noqa: E402

GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
ELEM = {np.float32: TensorProto.FLOAT, np.float64: TensorProto.DOUBLE, np.float16: TensorProto.FLOAT16}
DIRECTIONS = ("forward", "reverse", "bidirectional")


# ---- the ONNX operator spec in float64 NumPy (onnx.ai/onnx/operators/onnx__{RNN,GRU,LSTM}) ----

def _sigmoid(v):
    return 1 / (1 + np.exp(-v))


SPEC_ACTIVATIONS = {"Tanh": np.tanh, "Relu": lambda v: np.maximum(v, 0), "Sigmoid": _sigmoid}
SPEC_DEFAULTS = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}


def onnx_spec(op, attrs, X, W, R, B=None, sequence_lens=None, initial_h=None, initial_c=None, P=None):
    """Y, Y_h (and Y_c) of one ONNX RNN/GRU/LSTM node, from the spec's equations, in float64.

    Weights as ONNX stores them: W [D, G*H, I], R [D, G*H, H] with blocks RNN i; GRU z, r, h;
    LSTM i, o, f, c; B [D, 2*G*H] = [Wb, Rb]; P [D, 3*H] = i, o, f. A sequence b runs over its
    first sequence_lens[b] steps (backwards from its last one for the reverse direction); Y is 0
    after it and Y_h, Y_c are the states after its last step.
    """
    def f64(a):
        return None if a is None else np.asarray(a, dtype=np.float64)

    X, W, R, B, P, h0, c0 = map(f64, (X, W, R, B, P, initial_h, initial_c))
    layout = attrs.get("layout", 0)
    if layout:  # X [B, T, I], states [B, D, H]
        X = X.transpose(1, 0, 2)
        h0 = None if h0 is None else h0.transpose(1, 0, 2)
        c0 = None if c0 is None else c0.transpose(1, 0, 2)
    T, N, _ = X.shape
    D, _, H = R.shape
    direction = attrs.get("direction", "forward")
    per = len(SPEC_DEFAULTS[op])
    acts = attrs.get("activations", SPEC_DEFAULTS[op] * D)
    lens = np.full(N, T) if sequence_lens is None else np.asarray(sequence_lens)
    Y = np.zeros((T, D, N, H))
    Y_h, Y_c = np.zeros((D, N, H)), np.zeros((D, N, H))
    for d in range(D):
        f, g, h = ([SPEC_ACTIVATIONS[a] for a in acts[d * per:(d + 1) * per]] + [None, None])[:3]
        GH = W.shape[1]
        Wb, Rb = (np.zeros(GH), np.zeros(GH)) if B is None else (B[d, :GH], B[d, GH:])
        Ht = np.zeros((N, H)) if h0 is None else h0[d].copy()
        Ct = np.zeros((N, H)) if c0 is None else c0[d].copy()
        backward = direction == "reverse" or d == 1
        for t in (range(T - 1, -1, -1) if backward else range(T)):
            live = (t < lens)[:, None]   # backward, each sequence starts at its own last step
            Xt = X[t]
            if op == "RNN":
                Hn = f(Xt @ W[d].T + Ht @ R[d].T + Wb + Rb)
            elif op == "GRU":
                (Wz, Wr, Wh), (Rz, Rr, Rh) = np.split(W[d], 3), np.split(R[d], 3)
                (Wbz, Wbr, Wbh), (Rbz, Rbr, Rbh) = np.split(Wb, 3), np.split(Rb, 3)
                zt = f(Xt @ Wz.T + Ht @ Rz.T + Wbz + Rbz)
                rt = f(Xt @ Wr.T + Ht @ Rr.T + Wbr + Rbr)
                if attrs.get("linear_before_reset", 0):
                    ht = g(Xt @ Wh.T + rt * (Ht @ Rh.T + Rbh) + Wbh)
                else:
                    ht = g(Xt @ Wh.T + (rt * Ht) @ Rh.T + Rbh + Wbh)
                Hn = (1 - zt) * ht + zt * Ht
            else:
                (Wi, Wo, Wf, Wc), (Ri, Ro, Rf, Rc) = np.split(W[d], 4), np.split(R[d], 4)
                (Wbi, Wbo, Wbf, Wbc), (Rbi, Rbo, Rbf, Rbc) = np.split(Wb, 4), np.split(Rb, 4)
                Pi, Po, Pf = np.split(P[d], 3) if P is not None else (0, 0, 0)
                it = f(Xt @ Wi.T + Ht @ Ri.T + Pi * Ct + Wbi + Rbi)
                ft = f(Xt @ Wf.T + Ht @ Rf.T + Pf * Ct + Wbf + Rbf)
                ct = g(Xt @ Wc.T + Ht @ Rc.T + Wbc + Rbc)
                Cn = ft * Ct + it * ct
                ot = f(Xt @ Wo.T + Ht @ Ro.T + Po * Cn + Wbo + Rbo)
                Hn = ot * h(Cn)
                Ct = np.where(live, Cn, Ct)
            Ht = np.where(live, Hn, Ht)
            Y[t, d] = np.where(live, Ht, 0)
        Y_h[d], Y_c[d] = Ht, Ct
    if layout:
        Y, Y_h, Y_c = Y.transpose(2, 0, 1, 3), Y_h.transpose(1, 0, 2), Y_c.transpose(1, 0, 2)
    return (Y, Y_h, Y_c) if op == "LSTM" else (Y, Y_h)


# ---- building nodes and models ----

def session(model_bytes):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


class Case:
    """One recurrent node with random weights (PyTorch's initialisation scale), a model holding
    it, and inputs for it."""

    def __init__(self, op, rng, *, I=3, H=4, batch=2, T=5, dtype=np.float32, direction="forward",
                 layout=0, bias=True, peepholes=False, lengths=False, init=False, attrs=None,
                 name="rnn"):
        self.op, self.dtype, self.layout, self.name = op, dtype, layout, name
        D = 2 if direction == "bidirectional" else 1
        G, k = GATES[op], 1 / np.sqrt(H)

        def u(*shape):
            return rng.uniform(-k, k, shape).astype(dtype)

        self.weights = {"W": u(D, G * H, I), "R": u(D, G * H, H)}
        if bias:
            self.weights["B"] = u(D, 2 * G * H)
        if peepholes:
            self.weights["P"] = u(D, 3 * H)
        self.attrs = {"hidden_size": H, "direction": direction, **(attrs or {})}
        if layout:
            self.attrs["layout"] = layout
        self.feed = {"X": rng.standard_normal((batch, T, I) if layout else (T, batch, I)).astype(dtype)}
        if lengths:
            lens = rng.integers(1, T + 1, batch)
            lens[0] = rng.integers(1, T) if T > 1 else 1   # at least one shorter sequence
            self.feed["sequence_lens"] = lens.astype(np.int32)
        if init:
            shape = (batch, D, H) if layout else (D, batch, H)
            self.feed["initial_h"] = rng.standard_normal(shape).astype(dtype) * 0.5
            if op == "LSTM":
                self.feed["initial_c"] = rng.standard_normal(shape).astype(dtype) * 0.5
        self.outputs = ["Y", "Y_h", "Y_c"] if op == "LSTM" else ["Y", "Y_h"]

    def node_inputs(self):
        names = ["X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"]
        names = names if self.op == "LSTM" else names[:6]
        present = {**self.weights, **self.feed}
        used = [n if n in present else "" for n in names]
        while used[-1] == "":
            used.pop()
        return used

    def graph_inputs(self):
        def info(n, a):
            elem = TensorProto.INT32 if n == "sequence_lens" else ELEM[self.dtype]
            return helper.make_tensor_value_info(n, elem, list(a.shape))
        return [info(n, a) for n, a in self.feed.items()]

    def node(self, **inputs_renamed):
        ins = [inputs_renamed.get(n, n) for n in self.node_inputs()]
        return helper.make_node(self.op, ins, self.outputs, name=self.name, **self.attrs)

    def model(self, opset=14, nodes=(), initializers=None, weights_renamed=None):
        """The model bytes: the weights as initializers (or whatever `nodes` and `initializers`
        make of them, under the names in `weights_renamed`)."""
        renamed = weights_renamed or {}
        inits = initializers if initializers is not None else [
            numpy_helper.from_array(a, n) for n, a in self.weights.items()]
        outs = [helper.make_tensor_value_info(o, ELEM[self.dtype], None) for o in self.outputs]
        graph = helper.make_graph([*nodes, self.node(**renamed)], "main", self.graph_inputs(), outs,
                                  initializer=inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        return m.SerializeToString()

    def spec(self):
        return onnx_spec(self.op, self.attrs, self.feed["X"], **self.weights,
                         **{k: v for k, v in self.feed.items() if k != "X"})

    def fastcell(self, model_bytes=None):
        layer = fastcell.from_onnx(model_bytes or self.model())
        return layer, onnx_outputs(layer, **self.feed)

    def ort(self, model_bytes=None):
        return tuple(session(model_bytes or self.model()).run(self.outputs, self.feed))


def variant_case(variant, rng, direction, **kw):
    op, attrs, peepholes = VARIANTS[variant]
    attrs = dict(attrs)
    if "activations" in attrs:
        attrs["activations"] = attrs["activations"] * (2 if direction == "bidirectional" else 1)
    return Case(op, rng, direction=direction, attrs=attrs, peepholes=peepholes, **kw)


VARIANTS = {  # name: (op, attributes, peepholes)
    "rnn_tanh": ("RNN", {}, False),
    "rnn_relu": ("RNN", {"activations": ["Relu"]}, False),
    "gru_reset_before": ("GRU", {}, False),                       # linear_before_reset = 0
    "gru_reset_after": ("GRU", {"linear_before_reset": 1}, False),
    "lstm": ("LSTM", {}, False),
    "lstm_peepholes": ("LSTM", {}, True),
}
# (bias, sequence_lens, initial states) x (I, H, batch, T): every size 1, 3 and 17 in each role.
COMBOS = [(b, s, i) for b in (True, False) for s in (False, True) for i in (False, True)]
SHAPES = [(3, 17, 3, 17), (17, 1, 17, 3), (1, 3, 3, 17), (3, 3, 17, 1),
          (17, 17, 3, 3), (1, 17, 1, 17), (3, 1, 17, 17), (17, 3, 3, 3)]
TOL = {np.float32: 1e-5, np.float64: 1e-12}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", [0, 1], ids=["layout0", "layout1"])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_with_onnx_runtime_and_the_spec(variant, direction, layout, dtype, rng):
    op, attrs, peepholes = VARIANTS[variant]
    for (bias, lengths, init), (I, H, batch, T) in zip(COMBOS, SHAPES):
        what = f"B={bias} sequence_lens={lengths} initial={init} I={I} H={H} batch={batch} T={T}"
        case = variant_case(variant, rng, direction, I=I, H=H, batch=batch, T=T, dtype=dtype,
                            layout=layout, bias=bias, lengths=lengths, init=init)
        layer, got = case.fastcell()
        # The layer is what the node says.
        assert layer.dtype == dtype and layer.bias is bias and layer.batch_first is (layout == 1)
        assert layer.bidirectional is (direction == "bidirectional")
        assert layer.reverse is (direction == "reverse")
        assert type(layer).__name__ == {"RNN": "RNN", "GRU": "GRU"}.get(
            op, "PeepholeLSTM" if peepholes else "LSTM")
        if op == "RNN":
            assert layer.nonlinearity == ("relu" if "activations" in attrs else "tanh")
        if op == "GRU":
            assert layer.reset_after is bool(attrs.get("linear_before_reset", 0))

        want = case.spec()
        assert [a.shape for a in got] == [a.shape for a in want], what
        assert max_diff(got, want) <= TOL[dtype], what
        if dtype == np.float32 and layout == 0:
            ref = case.ort()
            assert max_diff(got, ref) <= 1e-5, what
            assert max_diff(want, ref) <= 1e-5, what   # the reading, held to ONNX Runtime


@pytest.mark.parametrize("op,acts", [("RNN", ["Tanh", "Tanh"]), ("RNN", ["Relu", "Relu"]),
                                     ("GRU", ["Sigmoid", "Tanh"] * 2),
                                     ("LSTM", ["Sigmoid", "Tanh", "Tanh"] * 2)])
def test_default_activations_written_out_are_accepted(op, acts, rng):
    case = Case(op, rng, direction="bidirectional", attrs={"activations": acts})
    layer, got = case.fastcell()
    assert max_diff(got, case.ort()) <= 1e-5


@pytest.mark.parametrize("op", ["GRU", "LSTM"])
def test_initial_h_alone_or_initial_c_alone(op, rng):
    case = Case(op, rng, direction="bidirectional", init=True, lengths=True, batch=3)
    for drop in (["initial_c"] if op == "LSTM" else []) + ["initial_h"]:
        c = Case(op, np.random.default_rng(1), direction="bidirectional", init=True, lengths=True,
                 batch=3)
        del c.feed[drop]
        _, got = c.fastcell()
        assert max_diff(got, c.ort()) <= 1e-5, drop
    assert max_diff(case.fastcell()[1], case.ort()) <= 1e-5


def test_optional_attributes_left_out_and_initializers_that_are_also_inputs(rng):
    """The weights declared as graph inputs too (torch's keep_initializers_as_inputs): the
    initializer is their value. No hidden_size and no direction attribute (both optional in the
    spec; ONNX Runtime insists on hidden_size, so that model is held to the spec reading)."""
    case = Case("LSTM", rng, lengths=True, init=True, batch=3)
    del case.attrs["direction"]
    m = onnx.load_from_string(case.model())
    m.graph.input.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, list(a.shape))
                          for n, a in case.weights.items()])
    data = m.SerializeToString()
    assert max_diff(case.fastcell(data)[1], case.ort(data)) <= 1e-5
    del case.attrs["hidden_size"]
    node, = fastcell.onnx_nodes(case.model())
    assert (node.direction, node.input_size, node.hidden_size) == ("forward", 3, 4)
    assert max_diff(case.fastcell()[1], case.spec()) <= 1e-5


# ---- gate orders, pinned (docs/SPEC.md "Other frameworks' conventions") ----

def _labelled(D, G, H, cols):
    """Each ONNX gate block k of direction d holds the value 10*d + k + 1."""
    return np.concatenate([np.full((D, H, cols), 0.0, np.float32) + 10 * np.arange(D)[:, None, None] + k + 1
                           for k in range(G)], axis=1).astype(np.float32)


def _block_values(a, G):
    return [float(v) for v in np.asarray(a).reshape(G, -1).mean(axis=1)]


@pytest.mark.parametrize("op,order", [("LSTM", [1, 3, 4, 2]), ("GRU", [2, 1, 3]), ("RNN", [1])])
def test_gate_orders(op, order, rng):
    """LSTM: ONNX i, o, f, c -> i, f, g, o. GRU: z, r, h -> r, z, n. B = [Wb, Rb]. P: i, o, f ->
    p_i, p_f, p_o. The backward direction goes to the _reverse names."""
    G, H, I, D = GATES[op], 2, 3, 2
    case = Case(op, rng, I=I, H=H, direction="bidirectional", peepholes=op == "LSTM")
    case.weights["W"] = _labelled(D, G, H, I)
    case.weights["R"] = _labelled(D, G, H, H)
    Wb, Rb = _labelled(D, G, H, 1)[..., 0], _labelled(D, G, H, 1)[..., 0] + 100
    case.weights["B"] = np.concatenate([Wb, Rb], axis=1)
    if op == "LSTM":
        case.weights["P"] = np.concatenate([np.full((D, H), k + 1.0) + 10 * np.arange(D)[:, None]
                                            for k in range(3)], axis=1).astype(np.float32)
    sd = fastcell.from_onnx(case.model()).state_dict()
    for d, s in ((0, "_l0"), (1, "_l0_reverse")):
        want = [10 * d + k for k in order]
        assert _block_values(sd["weight_ih" + s], G) == want
        assert _block_values(sd["weight_hh" + s], G) == want
        assert _block_values(sd["bias_ih" + s], G) == want
        assert _block_values(sd["bias_hh" + s], G) == [v + 100 for v in want]
        if op == "LSTM":
            assert _block_values(sd["weight_ph" + s], 3) == [10 * d + k for k in (1, 3, 2)]


# ---- from PyTorch through torch.onnx.export ----

def _torch_export(torch, module, x, fold):
    import io
    import warnings

    f = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (x,), f, dynamo=False, do_constant_folding=fold,
                              opset_version=17)
    except Exception as exc:  # pragma: no cover - depends on the installed torch
        pytest.skip(f"torch.onnx.export (TorchScript exporter) is not available here: {exc}")
    return f.getvalue()


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
def test_torch_export_gives_the_numbers_of_from_torch(fold):
    """With do_constant_folding=False the weights arrive as Unsqueeze(Concat(Slice(...)))."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    nn = torch.nn
    for module, batch_first in ((nn.LSTM(3, 5, bidirectional=True), False),
                                (nn.GRU(4, 6, batch_first=True), True),
                                (nn.RNN(3, 4, nonlinearity="relu"), False),
                                (nn.LSTM(2, 3, num_layers=2, bidirectional=True), False)):
        x = torch.randn(2, 7, module.input_size) if batch_first else torch.randn(7, 2, module.input_size)
        data = _torch_export(torch, module, x, fold)
        ref = fastcell.from_torch(module)
        nodes = fastcell.onnx_nodes(data)
        assert len(nodes) == module.num_layers
        for k, node in enumerate(nodes):
            assert node.input_size == (module.input_size if k == 0 else 2 * module.hidden_size)
            layer = fastcell.from_onnx(data, node=k)
            # The same weights bit for bit (a permutation of gate blocks) ...
            want = {n.replace(f"_l{k}", "_l0"): v for n, v in ref.state_dict().items() if f"_l{k}" in n}
            got = layer.state_dict()
            assert got.keys() == want.keys()
            for n in want:
                np.testing.assert_array_equal(got[n], want[n], err_msg=n)
        if module.num_layers == 1:   # ... and the numbers of from_torch and of PyTorch
            xn = x.numpy()
            out_ref, _ = ref(xn)
            layer = fastcell.from_onnx(data)
            out, _ = layer(xn.transpose(1, 0, 2) if batch_first else xn)  # the export transposes
            out = out.transpose(1, 0, 2) if batch_first else out
            assert max_diff(out, out_ref) <= 1e-5
            with torch.no_grad():
                assert max_diff(out, module(x)[0].numpy()) <= 1e-5
            y_ort = session(data).run(None, {session(data).get_inputs()[0].name: xn})[0]
            assert max_diff(out, y_ort) <= 1e-5


def test_torch_exported_cells_have_no_recurrent_node():
    """torch.onnx.export writes nn.LSTMCell as Gemm and activation nodes (this torch's exporter),
    so there is no node to import: the error says so and points to from_torch."""
    torch = pytest.importorskip("torch")
    data = _torch_export(torch, torch.nn.LSTMCell(3, 4), torch.randn(2, 3), True)
    assert fastcell.onnx_nodes(data) == []
    with pytest.raises(FormatError, match="no RNN, GRU or LSTM node.*Gemm.*from_torch"):
        fastcell.from_onnx(data)


# ---- weights folded from constants ----

def _const(name, a):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(a), name + "_v"))


def chain(kind, name, a, opset):
    """(nodes, initializers) computing the array `a` under `name` from constants, through `kind`."""
    p = name + "_"
    nodes, inits = [], []
    if kind == "unsqueeze_concat":   # what torch.onnx.export of an LSTMCell-like module emits
        parts = []
        for d in range(a.shape[0]):
            nodes.append(_const(f"{p}c{d}", a[d]))
            if opset < 13:
                nodes.append(helper.make_node("Unsqueeze", [f"{p}c{d}"], [f"{p}u{d}"], axes=[0]))
            else:
                nodes.append(_const(f"{p}ax{d}", np.array([0], np.int64)))
                nodes.append(helper.make_node("Unsqueeze", [f"{p}c{d}", f"{p}ax{d}"], [f"{p}u{d}"]))
            parts.append(f"{p}u{d}")
        nodes.append(helper.make_node("Concat", parts, [name], axis=0))
    elif kind == "reshape_transpose":
        perm = list(range(a.ndim))[::-1]
        inits.append(numpy_helper.from_array(np.ascontiguousarray(a.transpose(perm)).reshape(-1), p + "flat"))
        nodes.append(_const(p + "shape", np.array([a.shape[k] for k in perm], np.int64)))
        nodes.append(helper.make_node("Reshape", [p + "flat", p + "shape"], [p + "r"]))
        nodes.append(helper.make_node("Transpose", [p + "r"], [name], perm=perm))
    elif kind == "slice":   # from inside a bigger array; opset 10+: a reversed copy, step -1
        n = a.shape[-1]
        pad0, pad1 = np.zeros_like(a[..., :1]), np.ones_like(a[..., :2])
        if opset < 10:   # starts, ends, axes as attributes; no steps
            big = np.concatenate([pad0, a, pad1], axis=-1)
            inits.append(numpy_helper.from_array(big, p + "big"))
            nodes.append(helper.make_node("Slice", [p + "big"], [name], starts=[1], ends=[n + 1],
                                          axes=[a.ndim - 1]))
        else:
            big = np.concatenate([a[..., ::-1], pad1], axis=-1)   # back from n - 1 to the start
            inits.append(numpy_helper.from_array(big, p + "big"))
            for k, v in (("s", [n - 1]), ("e", [-(2**62)]), ("a", [-1]), ("st", [-1])):
                nodes.append(_const(p + k, np.array(v, np.int64)))
            nodes.append(helper.make_node("Slice", [p + "big", p + "s", p + "e", p + "a", p + "st"], [name]))
    elif kind == "split":
        junk = np.full(a.shape[:-1] + (a.shape[-1],), 7, a.dtype)
        inits.append(numpy_helper.from_array(np.concatenate([a, junk], axis=-1), p + "both"))
        outs = [name, p + "junk"]
        if opset < 13:
            nodes.append(helper.make_node("Split", [p + "both"], outs, axis=-1, split=[a.shape[-1]] * 2))
        elif opset < 18:
            nodes.append(_const(p + "sizes", np.array([a.shape[-1]] * 2, np.int64)))
            nodes.append(helper.make_node("Split", [p + "both", p + "sizes"], outs, axis=-1))
        else:
            nodes.append(helper.make_node("Split", [p + "both"], outs, axis=-1, num_outputs=2))
    elif kind == "cast_identity":   # float64 and float16 storage, cast to the node's float32
        half = a.astype(np.float16)
        assert np.array_equal(half.astype(a.dtype), a)
        inits.append(numpy_helper.from_array(half, p + "h"))
        nodes.append(helper.make_node("Cast", [p + "h"], [p + "d"], to=TensorProto.DOUBLE))
        nodes.append(helper.make_node("Cast", [p + "d"], [p + "f"], to=TensorProto.FLOAT))
        nodes.append(helper.make_node("Identity", [p + "f"], [name]))
    elif kind == "squeeze_value_floats":
        nodes.append(helper.make_node("Constant", [], [p + "flat"], value_floats=a.reshape(-1).tolist()))
        nodes.append(helper.make_node("Constant", [], [p + "shape"], value_ints=[1, *a.shape]))
        nodes.append(helper.make_node("Reshape", [p + "flat", p + "shape"], [p + "r"]))
        if opset < 13:
            nodes.append(helper.make_node("Squeeze", [p + "r"], [name], axes=[0]))
        else:
            nodes.append(_const(p + "ax", np.array([0], np.int64)))
            nodes.append(helper.make_node("Squeeze", [p + "r", p + "ax"], [name]))
    else:
        raise AssertionError(kind)
    return nodes, inits


FOLDS = ["unsqueeze_concat", "reshape_transpose", "slice", "split", "cast_identity",
         "squeeze_value_floats"]


@pytest.mark.parametrize("opset", [9, 11, 13, 18])
@pytest.mark.parametrize("kind", FOLDS)
def test_weights_folded_from_constants(kind, opset, rng):
    case = Case("LSTM", rng, I=3, H=4, batch=2, T=6, direction="bidirectional", peepholes=True,
                lengths=True, init=True)
    # float16-exact weights, so the cast chain stores them exactly
    case.weights = {n: a.astype(np.float16).astype(np.float32) for n, a in case.weights.items()}
    nodes, inits = [], []
    for n, a in case.weights.items():
        more_nodes, more_inits = chain(kind, "f_" + n, a, opset)
        nodes += more_nodes
        inits += more_inits
    folded = case.model(opset, nodes, inits, {n: "f_" + n for n in case.weights})
    direct = fastcell.from_onnx(case.model(opset)).state_dict()
    layer, got = case.fastcell(folded)
    for n, v in direct.items():
        np.testing.assert_array_equal(layer.state_dict()[n], v, err_msg=n)
    assert max_diff(got, case.ort(folded)) <= 1e-5   # ONNX Runtime folds them the same


def test_weights_from_an_enclosing_graph_and_nodes_in_subgraphs(rng):
    """An LSTM in an If's then-branch reads W and R from the main graph's initializers and B from
    its Constant node; the else-branch has a GRU with its own initializers; a Loop body in the
    main graph holds an RNN, and a Scan inside that Loop body another."""
    T, N, I, H = 5, 2, 3, 4
    lstm = Case("LSTM", rng, I=I, H=H, batch=N, T=T, name="lstm_then")
    gru = Case("GRU", rng, I=I, H=H, batch=N, T=T, name="gru_else")
    rnn = Case("RNN", rng, I=I, H=H, batch=N, T=T, name="rnn_in_loop", direction="reverse")

    def branch(case, prefix, inits):
        node = helper.make_node(case.op, ["X", *[prefix + n for n in ("W", "R", "B")]],
                                ["", prefix + "Y_h"], name=case.name, hidden_size=H)
        return helper.make_graph([node], prefix + "branch", [],
                                 [helper.make_tensor_value_info(prefix + "Y_h", TensorProto.FLOAT, [1, N, H])],
                                 initializer=inits)

    then_g = branch(lstm, "l_", [])
    else_g = branch(gru, "g_", [numpy_helper.from_array(gru.weights[n], "g_" + n) for n in ("W", "R", "B")])
    if_node = helper.make_node("If", ["cond"], ["Y_h"], name="choose", then_branch=then_g, else_branch=else_g)

    scan_body = helper.make_graph(
        [helper.make_node("RNN", ["X", "r_W", "r_R"], ["", "s_h"], name="rnn_in_scan", hidden_size=H)],
        "scan_body", [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [N, H])],
        [helper.make_tensor_value_info("s_h", TensorProto.FLOAT, None)])
    loop_body = helper.make_graph(
        [helper.make_node(rnn.op, ["X", "r_W", "r_R", "r_B", "", "carried"], ["", "h_out"],
                          name=rnn.name, hidden_size=H, direction="reverse"),
         helper.make_node("RNN", ["X", "carried", "r_R"], ["", "bad_out"], name="rnn_weight_from_body_input",
                          hidden_size=H),
         helper.make_node("Scan", ["h_out"], ["scanned"], name="scan", body=scan_body, num_scan_inputs=1),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "loop_body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                      helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                      helper.make_tensor_value_info("carried", TensorProto.FLOAT, [1, N, H])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, N, H])])
    loop = helper.make_node("Loop", ["", "", "h_start"], ["h_loop"], name="loop", body=loop_body)

    inits = [numpy_helper.from_array(lstm.weights["W"], "l_W"), numpy_helper.from_array(lstm.weights["R"], "l_R"),
             *[numpy_helper.from_array(rnn.weights[n], "r_" + n) for n in ("W", "R", "B")],
             numpy_helper.from_array(np.zeros((1, N, H), np.float32), "h_start")]

    def model(*nodes):
        graph = helper.make_graph(
            [_const("l_B", lstm.weights["B"]), *nodes], "main",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, [T, N, I]),
             helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
            [helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, [1, N, H])], initializer=inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
        m.ir_version = 8
        return m.SerializeToString()

    data = model(if_node, loop)

    nodes = fastcell.onnx_nodes(data)
    assert [(n.op_type, n.name, n.graph, n.direction) for n in nodes] == [
        ("GRU", "gru_else", "main/choose.else_branch", "forward"),   # the file's attribute order
        ("LSTM", "lstm_then", "main/choose.then_branch", "forward"),
        ("RNN", "rnn_in_loop", "main/loop.body", "reverse"),
        ("RNN", "rnn_weight_from_body_input", "main/loop.body", "forward"),
        ("RNN", "rnn_in_scan", "main/loop.body/scan.body", "forward")]
    assert all(n.input_size == I for n in nodes[:3]) and nodes[3].input_size is None
    assert all(n.hidden_size == H for n in nodes)

    x = lstm.feed["X"]
    s = session(model(if_node))   # ONNX Runtime runs the If (the Loop is not meant to run)
    for case, cond in ((lstm, True), (gru, False)):
        y_h = onnx_outputs(fastcell.from_onnx(data, node=case.name), x)[1]
        want = s.run(None, {"X": x, "cond": np.array(cond)})[0]
        assert max_diff(y_h, want) <= 1e-5, case.name
    layer = fastcell.from_onnx(data, node="rnn_in_loop")
    assert layer.reverse and layer.state_dict()["bias_hh_l0"].tolist() == rnn.weights["B"][0, H:].tolist()
    assert fastcell.from_onnx(data, node=4).input_size == I
    with pytest.raises(FormatError, match="W depends on the graph input 'carried' of main/loop.body"):
        fastcell.from_onnx(data, node="rnn_weight_from_body_input")


# ---- what is refused, by name ----

def _model_with(op, rng, attrs=None, direction="forward", mutate=None, **kw):
    case = Case(op, rng, direction=direction, attrs=attrs, **kw)
    if mutate:
        mutate(case)
    return case.model()


@pytest.mark.parametrize("op,attrs,direction,fragment", [
    ("RNN", {"activations": ["Sigmoid"]}, "forward", "activations is ['Sigmoid']"),
    ("RNN", {"activations": ["tanh"]}, "forward", "activations is ['tanh']"),
    ("RNN", {"activations": ["Tanh"]}, "bidirectional", "activations has 1 entries"),
    ("RNN", {"activations": ["Tanh", "Relu"]}, "bidirectional", "activations: the two directions"),
    ("RNN", {"activations": ["LeakyRelu"], "activation_alpha": [0.1]}, "forward", "activation_alpha"),
    ("GRU", {"activation_beta": [1.0]}, "forward", "activation_beta"),
    ("GRU", {"activations": ["Sigmoid", "Relu"]}, "forward", "activations is ['Sigmoid', 'Relu']"),
    ("LSTM", {"activations": ["Sigmoid", "Tanh", "Relu"]}, "forward", "activations"),
    ("LSTM", {"activations": ["HardSigmoid", "Tanh", "Tanh"] * 2}, "bidirectional", "activations"),
    ("LSTM", {"clip": 3.0}, "forward", "clip"),
    ("LSTM", {"input_forget": 1}, "forward", "input_forget = 1"),
    ("GRU", {"linear_before_reset": 2}, "forward", "linear_before_reset is 2"),
    ("GRU", {"layout": 2}, "forward", "layout is 2"),
    ("RNN", {"direction": "sideways"}, "forward", "direction is 'sideways'"),
    ("RNN", {"hidden_size": 5}, "forward", "hidden_size is 5"),
    ("RNN", {"hidden_size": 4.0}, "forward", "hidden_size has type FLOAT"),
    ("LSTM", {"peephole": 1}, "forward", "attribute 'peephole' is not one of"),
])
def test_refused_attributes_are_named(op, attrs, direction, fragment, rng):
    with pytest.raises(FormatError, match="node 'rnn'") as e:
        fastcell.from_onnx(_model_with(op, rng, attrs, direction))
    assert fragment in str(e.value)


def _set(name, value):
    def mutate(case):
        case.weights[name] = value(case)
    return mutate


@pytest.mark.parametrize("mutate,fragment", [
    (_set("W", lambda c: c.weights["W"].astype(np.float16)), "W has dtype float16"),
    (_set("R", lambda c: c.weights["R"].astype(np.float64)), "R has dtype float64, expected float32"),
    (_set("W", lambda c: c.weights["W"][:, :-1]), "W has shape"),
    (_set("B", lambda c: c.weights["B"][:, 1:]), "B has shape (1, 7), expected [1, 8]"),
    (_set("W", lambda c: c.weights["W"].astype(np.int32)), "W has dtype int32"),
])
def test_refused_weights_are_named(mutate, fragment, rng):
    with pytest.raises(FormatError) as e:
        fastcell.from_onnx(_model_with("RNN", rng, mutate=mutate))
    assert fragment in str(e.value)


def test_a_weight_that_is_not_a_constant_is_refused(rng):
    case = Case("GRU", rng)
    inputs = case.graph_inputs() + [helper.make_tensor_value_info("W_in", TensorProto.FLOAT, [1, 12, 3])]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in case.outputs]
    inits = [numpy_helper.from_array(case.weights[n], n) for n in ("R", "B")]

    def build(nodes, w):
        g = helper.make_graph([*nodes, case.node(W=w)], "main", inputs, outs, initializer=inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)]).SerializeToString()

    with pytest.raises(FormatError, match="W depends on the graph input 'W_in'"):
        fastcell.from_onnx(build([], "W_in"))
    twice = helper.make_node("Unsqueeze", ["W_in", "ax"], ["W_u"])
    with pytest.raises(FormatError, match="W depends on the graph input 'W_in'"):
        fastcell.from_onnx(build([_const("ax", np.array([0], np.int64)), twice], "W_u"))
    mm = helper.make_node("MatMul", ["W_in", "W_in"], ["W_mm"], name="mm")
    with pytest.raises(FormatError, match="comes from a MatMul node 'mm'"):
        fastcell.from_onnx(build([mm], "W_mm"))
    with pytest.raises(FormatError, match="'nowhere' is produced by no node"):
        fastcell.from_onnx(build([], "nowhere"))
    # onnx_nodes still lists the node, without the sizes it cannot know
    node, = fastcell.onnx_nodes(build([mm], "W_mm"))
    assert node.input_size is None and node.hidden_size == 4


# ---- choosing a node ----

def _two_nodes(rng, names=("a", "b")):
    a, b = Case("RNN", rng, name=names[0]), Case("LSTM", rng, H=5, name=names[1], direction="bidirectional")
    inits = [numpy_helper.from_array(v, "a" + n) for n, v in a.weights.items()]
    inits += [numpy_helper.from_array(v, "b" + n) for n, v in b.weights.items()]
    na = helper.make_node("RNN", ["X", "aW", "aR", "aB"], ["aY"], name=names[0], hidden_size=4)
    nb = helper.make_node("LSTM", ["X", "bW", "bR", "bB"], ["bY"], name=names[1], hidden_size=5,
                          direction="bidirectional")
    g = helper.make_graph([na, nb], "main", a.graph_inputs(),
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("aY", "bY")],
                          initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)]).SerializeToString(), a, b


def test_choosing_a_node(rng):
    data, a, b = _two_nodes(rng)
    with pytest.raises(ValueError, match=r"2 recurrent nodes, name one .*#0 RNN 'a' in main.*#1 LSTM 'b'"):
        fastcell.from_onnx(data)
    assert isinstance(fastcell.from_onnx(data, node="a"), fastcell.RNN)
    assert fastcell.from_onnx(data, node="b").bidirectional
    assert isinstance(fastcell.from_onnx(data, node=1), fastcell.LSTM)
    with pytest.raises(ValueError, match="no RNN, GRU or LSTM node named 'c'; the model has #0 RNN 'a'"):
        fastcell.from_onnx(data, node="c")
    with pytest.raises(ValueError, match="index 2 is out of range"):
        fastcell.from_onnx(data, node=2)
    with pytest.raises(TypeError, match="node: expected a node name"):
        fastcell.from_onnx(data, node=1.0)
    same, _, _ = _two_nodes(rng, ("x", "x"))
    with pytest.raises(ValueError, match="2 recurrent nodes are named 'x'"):
        fastcell.from_onnx(same, node="x")
    assert fastcell.from_onnx(same, node=1).hidden_size == 5
    assert [n.describe() for n in fastcell.onnx_nodes(data)] == [
        "#0 RNN 'a' in main: forward, input_size 3, hidden_size 4, layout 0",
        "#1 LSTM 'b' in main: bidirectional, input_size 3, hidden_size 5, layout 0"]


def test_a_model_without_recurrent_nodes(rng):
    g = helper.make_graph([helper.make_node("Relu", ["X"], ["Y"])], "main",
                          [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2])])
    data = helper.make_model(g).SerializeToString()
    assert fastcell.onnx_nodes(data) == []
    with pytest.raises(FormatError, match="no RNN, GRU or LSTM node in the model$"):
        fastcell.from_onnx(data)


# ---- files: paths, saving, external data ----

def test_from_a_path_then_saved_as_a_fastcell_file(tmp_path, rng):
    case = Case("GRU", rng, direction="reverse", layout=1, lengths=True, init=True, batch=3)
    (tmp_path / "m.onnx").write_bytes(case.model())
    layer = fastcell.from_onnx(tmp_path / "m.onnx")
    fastcell.save(layer, tmp_path / "m.safetensors")
    again = fastcell.load(tmp_path / "m.safetensors")
    assert again.config() == layer.config() and again.reverse and again.batch_first
    assert max_diff(onnx_outputs(again, **case.feed), case.spec()) <= 1e-5
    assert fastcell.onnx_nodes(str(tmp_path / "m.onnx"))[0].direction == "reverse"


def _external_model(tmp_path, rng, location="w.bin", folder="model"):
    """A model whose W lives in an external file (its bytes at offset 16 of w.bin)."""
    case = Case("LSTM", rng, peepholes=True)
    m = onnx.load_from_string(case.model())
    w = next(t for t in m.graph.initializer if t.name == "W")
    raw = w.raw_data
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "16"), ("length", str(len(raw)))):
        e = w.external_data.add()
        e.key, e.value = k, v
    d = tmp_path / folder
    d.mkdir(exist_ok=True)
    (d / "w.bin").write_bytes(b"\0" * 16 + raw + b"tail")
    (d / "m.onnx").write_bytes(m.SerializeToString())
    return case, d / "m.onnx", raw


def test_external_data_inside_the_folder(tmp_path, rng):
    case, path, _ = _external_model(tmp_path, rng)
    layer = fastcell.from_onnx(path)
    got = onnx_outputs(layer, **case.feed)
    assert max_diff(got, tuple(session(str(path)).run(None, case.feed))) <= 1e-5
    with pytest.raises(FormatError, match="external file; load the model from its path"):
        fastcell.from_onnx(path.read_bytes())
    # A model written by onnx's own external-data writer reads too.
    m = onnx.load_from_string(case.model())
    onnx.save_model(m, tmp_path / "o.onnx", save_as_external_data=True, location="o.data",
                    size_threshold=0)
    assert max_diff(onnx_outputs(fastcell.from_onnx(tmp_path / "o.onnx"), **case.feed), case.ort()) <= 1e-5


def test_external_data_outside_the_folder_is_refused(tmp_path, rng):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "w.bin").write_bytes(b"\0" * 4096)
    for location, fragment in ((str(outside / "w.bin"), "an absolute path or '..'"),
                               ("../outside/w.bin", "an absolute path or '..'"),
                               ("sub/../../outside/w.bin", "an absolute path or '..'"),
                               ("C:/w.bin", "an absolute path")):
        _, path, _ = _external_model(tmp_path, rng, location)
        with pytest.raises(FormatError, match="outside the model's folder") as e:
            fastcell.from_onnx(path)
        assert fragment in str(e.value)
    # a symlink out
    _, path, _ = _external_model(tmp_path, rng, "link.bin", "m2")
    os.symlink(outside / "w.bin", path.parent / "link.bin")
    with pytest.raises(FormatError, match="resolves to .*outside the model's folder"):
        fastcell.from_onnx(path)
    # a symlinked folder out
    _, path, _ = _external_model(tmp_path, rng, "linkdir/w.bin", "m3")
    os.symlink(outside, path.parent / "linkdir")
    with pytest.raises(FormatError, match="outside the model's folder"):
        fastcell.from_onnx(path)


def test_external_data_that_is_not_what_it_claims(tmp_path, rng):
    _, path, raw = _external_model(tmp_path, rng)
    m = onnx.load(path, load_external_data=False)
    w = next(t for t in m.graph.initializer if t.name == "W")

    def with_entries(**entries):
        del w.external_data[:]
        for k, v in entries.items():
            e = w.external_data.add()
            e.key, e.value = k, v
        path.write_bytes(m.SerializeToString())

    cases = [({"location": "w.bin", "offset": "16", "length": str(len(raw) + 4)}, "length"),
             ({"location": "w.bin", "offset": str(10**6)}, "runs past the end"),
             ({"location": "w.bin", "offset": "-1"}, "offset '-1' is not a non-negative integer"),
             ({"location": "missing.bin"}, "cannot read external data 'missing.bin'"),
             ({"location": ""}, "without a valid location"),
             ({"location": "."}, "cannot read external data '.' (Is a directory)")]
    for entries, fragment in cases:
        with_entries(**entries)
        with pytest.raises(FormatError, match="initializer 'W'") as e:
            fastcell.from_onnx(path)
        assert fragment in str(e.value), entries
    os.mkfifo(path.parent / "fifo.bin")
    with_entries(location="fifo.bin")
    with hang_guard(10), pytest.raises(FormatError, match="'fifo.bin' is not a regular file"):
        fastcell.from_onnx(path)


# ---- untrusted bytes ----

def _lstm_bytes(rng):
    return Case("LSTM", rng, I=3, H=4, direction="bidirectional", peepholes=True).model()


def _edit(data, edit):
    m = onnx.load_from_string(data)
    edit(m)
    return m.SerializeToString()


def _tensor(m, name):
    return next(t for t in m.graph.initializer if t.name == name)


def test_tensor_sizes_are_checked_before_allocating(rng):
    data = _lstm_bytes(rng)

    def huge(m):
        t = _tensor(m, "W")
        del t.dims[:]
        t.dims.extend([2**40, 2**20, 4])

    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=r"initializer 'W': dims \[1099511627776, 1048576, 4\] "
                                              r"of FLOAT need 18446744073709551616 bytes, raw_data holds 384"):
            fastcell.from_onnx(_edit(data, huge))
        assert tracemalloc.get_traced_memory()[1] < 8 << 20
    finally:
        tracemalloc.stop()

    def short(m):
        _tensor(m, "R").raw_data = _tensor(m, "R").raw_data[:-4]

    def typed(m):
        t = _tensor(m, "B")
        vals = numpy_helper.to_array(t).reshape(-1).tolist()
        t.ClearField("raw_data")
        t.float_data.extend(vals[:-1])

    def negative(m):
        _tensor(m, "P").dims[0] = -1

    def strings(m):
        _tensor(m, "P").data_type = TensorProto.STRING

    def both(m):
        _tensor(m, "P").float_data.append(1.0)

    for edit, fragment in ((short, "initializer 'R': dims [2, 16, 4] of FLOAT need 512 bytes, raw_data holds 508"),
                           (typed, "initializer 'B': dims [2, 32] hold 64 values, float_data has 63"),
                           (negative, "initializer 'P': dims [-1, 12]"),
                           (strings, "data type STRING is not one fastcell reads"),
                           (both, "data in both raw_data and float_data")):
        with pytest.raises(FormatError) as e:
            fastcell.from_onnx(_edit(data, edit))
        assert fragment in str(e.value)


def test_truncated_and_garbage_files(tmp_path, rng):
    data = _lstm_bytes(rng)
    with hang_guard(30):
        for cut in sorted(set(np.linspace(0, len(data) - 1, 60).astype(int))):
            with pytest.raises(FormatError):
                fastcell.from_onnx(data[:cut])
        for garbage in (b"", b"not an onnx model at all\n", b"PK\x03\x04" + bytes(100),
                        b"\x08" * 1000, bytes(range(256)) * 4):
            with pytest.raises(FormatError):
                fastcell.from_onnx(garbage)
            with pytest.raises(FormatError):
                fastcell.onnx_nodes(garbage)
    (tmp_path / "t.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match=r"t\.onnx: "):
        fastcell.from_onnx(tmp_path / "t.onnx")
    with pytest.raises(FileNotFoundError):
        fastcell.from_onnx(tmp_path / "missing.onnx")
    with pytest.raises(IsADirectoryError):
        fastcell.from_onnx(tmp_path)
    os.mkfifo(tmp_path / "fifo.onnx")
    with hang_guard(10), pytest.raises(FormatError, match="not a regular file"):
        fastcell.from_onnx(tmp_path / "fifo.onnx")


def test_random_corruption_gives_a_model_or_a_format_error(rng):
    """Bytes flipped and files cut at random: a model (a flip in weight data) or FormatError,
    never another exception, a crash or a hang."""
    case = Case("LSTM", rng, I=2, H=3, direction="bidirectional", peepholes=True)
    nodes, inits = [], []
    for n, a in case.weights.items():   # folded weights, so the folder is fuzzed too
        more_nodes, more_inits = chain("unsqueeze_concat" if n in "WP" else "slice", "f_" + n, a, 14)
        nodes += more_nodes
        inits += more_inits
    data = case.model(14, nodes, inits, {n: "f_" + n for n in case.weights})
    fastcell.from_onnx(data)
    fuzz = np.random.default_rng(12)
    outcomes = {"model": 0, "FormatError": 0}
    with hang_guard(60):
        for trial in range(400):
            b = bytearray(data)
            for _ in range(fuzz.integers(1, 4)):
                b[fuzz.integers(len(b))] = fuzz.integers(256)
            if trial % 4 == 0:
                b = b[:fuzz.integers(len(b))]
            try:
                fastcell.from_onnx(bytes(b))
                fastcell.onnx_nodes(bytes(b))
                outcomes["model"] += 1
            except FormatError:
                outcomes["FormatError"] += 1
    assert outcomes["model"] > 20 and outcomes["FormatError"] > 100, outcomes


def _graph_model(nodes, w_name, inits=(), opset=14):
    case = Case("RNN", np.random.default_rng(0))
    g = helper.make_graph([*nodes, case.node(W=w_name)], "main", case.graph_inputs(),
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                          initializer=[*inits, numpy_helper.from_array(case.weights["R"], "R"),
                                       numpy_helper.from_array(case.weights["B"], "B")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]).SerializeToString()


def test_hostile_constant_graphs():
    seed = numpy_helper.from_array(np.zeros(1024, np.float32), "w0")
    doubling = [helper.make_node("Concat", [f"w{k}", f"w{k}"], [f"w{k + 1}"], axis=0) for k in range(40)]
    with hang_guard(30), pytest.raises(FormatError, match="folding the model's constants would take more than"):
        fastcell.from_onnx(_graph_model(doubling, "w40", [seed]))
    cycle = [helper.make_node("Identity", ["b"], ["a"]), helper.make_node("Identity", ["a"], ["b"])]
    with pytest.raises(FormatError, match="depends on itself"):
        fastcell.from_onnx(_graph_model(cycle, "a"))
    deep = [helper.make_node("Identity", [f"w{k}"], [f"w{k + 1}"]) for k in range(100)]
    with pytest.raises(FormatError, match="chain of more than 64 nodes"):
        fastcell.from_onnx(_graph_model(deep, "w100", [seed]))
    bad_reshape = [_const("s", np.array([5, 7], np.int64)), helper.make_node("Reshape", ["w0", "s"], ["r"])]
    with pytest.raises(FormatError, match="Reshape node .*cannot evaluate it"):
        fastcell.from_onnx(_graph_model(bad_reshape, "r", [seed]))
    twice = [helper.make_node("Identity", ["w0"], ["x"]), helper.make_node("Relu", ["w0"], ["x"])]
    with pytest.raises(FormatError, match="value 'x' is produced twice"):
        fastcell.from_onnx(_graph_model(twice, "x", [seed]))


def test_deeply_nested_subgraphs_are_refused():
    leaf = helper.make_graph([], "leaf", [], [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    g = leaf
    for k in range(20):
        g = helper.make_graph([helper.make_node("If", ["c"], ["o"], then_branch=g, else_branch=leaf)],
                              f"g{k}", [], [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    data = helper.make_model(g).SerializeToString()
    with hang_guard(30), pytest.raises(FormatError, match="subgraphs nested more than 16 deep"):
        fastcell.onnx_nodes(data)


def test_onnx_outputs_checks_its_arguments(rng):
    case = Case("LSTM", rng, layout=1, init=True)
    layer = fastcell.from_onnx(case.model())
    with pytest.raises(ValueError, match=r"initial_h: expected shape \(2, 1, 4\)"):
        onnx_outputs(layer, case.feed["X"], initial_h=np.zeros((1, 2, 4), np.float32))
    with pytest.raises(ValueError, match="X: expected a 3-d array"):
        onnx_outputs(layer, case.feed["X"][0])
    with pytest.raises(ValueError, match="one-layer"):
        onnx_outputs(fastcell.LSTM(3, 4, num_layers=2), case.feed["X"])


def test_import_fastcell_does_not_import_onnx():
    import subprocess
    import sys

    from conftest import ENV

    code = ("import sys, fastcell\nassert 'onnx' not in sys.modules\n"
            "assert callable(fastcell.from_onnx) and callable(fastcell.onnx_nodes)\n"
            "assert 'onnx' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr


# ---- the layers' reverse option (direction="reverse") ----

LAYERS = {"rnn": (fastcell.RNN, {"nonlinearity": "relu"}), "gru": (fastcell.GRU, {"reset_after": False}),
          "lstm": (fastcell.LSTM, {}), "peephole_lstm": (fastcell.PeepholeLSTM, {})}


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_a_reverse_layer_is_the_backward_half_of_a_bidirectional_one(kind, batch_first, rng):
    cls, extra = LAYERS[kind]
    bi = cls(3, 5, bidirectional=True, batch_first=batch_first, **extra)
    rev = cls(3, 5, reverse=True, batch_first=batch_first, **extra)
    rev.load_state_dict({n.replace("_reverse", ""): v for n, v in bi.state_dict().items() if "_reverse" in n})
    x = rng.standard_normal((4, 6, 3) if batch_first else (6, 4, 3)).astype(np.float32)
    lengths = np.array([6, 2, 5, 1])
    states = [rng.standard_normal((2, 4, 5)).astype(np.float32) for _ in range(2)]
    hx_bi = tuple(states) if bi.has_cell_state else states[0]
    hx_rev = tuple(s[1:] for s in states) if bi.has_cell_state else states[0][1:]
    for kw in ({}, {"lengths": lengths}):
        out_bi, st_bi = bi(x, hx_bi, **kw)
        out_rev, st_rev = rev(x, hx_rev, **kw)
        np.testing.assert_array_equal(out_rev, out_bi[..., 5:])   # the same kernel call: same bits
        for a, b in zip(st_rev if isinstance(st_rev, tuple) else (st_rev,),
                        st_bi if isinstance(st_bi, tuple) else (st_bi,)):
            np.testing.assert_array_equal(a[0], b[1])
    # a reverse layer of several layers runs each backwards
    two = cls(3, 5, num_layers=2, reverse=True, **extra)
    assert two(x if not batch_first else x.transpose(1, 0, 2))[0].shape == (6, 4, 5)


def test_the_reverse_option_round_trips_and_refuses_what_it_cannot_do(tmp_path, rng):
    layer = fastcell.GRU(3, 4, reverse=True)
    assert layer.config()["reverse"] is True and "reverse" not in fastcell.GRU(3, 4).config()
    assert "reverse=True" in repr(layer)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    fastcell.save(layer, tmp_path / "r.safetensors")
    for again in (fastcell.load(tmp_path / "r.safetensors"), pickle.loads(pickle.dumps(layer))):
        assert again.reverse
        np.testing.assert_array_equal(again(x)[0], layer(x)[0])
    q = fastcell.quantize(layer, "int8")
    assert q.reverse and max_diff(q(x)[0], layer(x)[0]) < 1e-2
    with pytest.raises(ValueError, match="reverse: a bidirectional layer already runs both ways"):
        fastcell.LSTM(3, 4, bidirectional=True, reverse=True)
    with pytest.raises(ValueError, match="a reverse .* layer needs the whole sequence"):
        layer.new_state()
    with pytest.raises(TypeError):
        fastcell.RNN(3, 4, reverse="yes")


def test_weight_files_check_the_reverse_key(tmp_path):
    import json

    from fastcell.io import weights_file

    cfg = fastcell.RNN(3, 4).config()
    for reverse, bidirectional, fragment in (("yes", False, "'reverse' is 'yes', expected true or false"),
                                             (True, True, "a bidirectional layer runs both ways")):
        bad = dict(cfg, reverse=reverse, bidirectional=bidirectional)
        with pytest.raises(ValueError, match=fragment):
            weights_file._check_config(bad)
    with pytest.raises(ValueError, match="unexpected key 'reverse'"):
        weights_file._check_config(dict(fastcell.RNNCell(np.zeros((4, 3), np.float32),
                                                         np.zeros((4, 4), np.float32)).config(), reverse=True))
    weights_file._check_config(json.loads(json.dumps(dict(cfg, reverse=False))))  # accepted


# ---- constant run-time inputs: kept as the layer's initial state, or refused ----

def constants_in_the_file(case, names):
    """The case's model with its feed entries `names` stored as initializers (constants)."""
    case.weights.update({n: case.feed.pop(n) for n in names})
    return case.model()


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("direction,layout", [("forward", 0), ("bidirectional", 1), ("reverse", 0)])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_constant_initial_state_becomes_the_layers_initial_state(op, direction, layout, batch,
                                                                   tmp_path, rng):
    case = Case(op, rng, I=3, H=17, batch=batch, T=6, direction=direction, layout=layout,
                init=True)
    names = ["initial_h", "initial_c"] if op == "LSTM" else ["initial_h"]
    # one state per direction, the same for every sequence of the batch (a learned one)
    axis = 0 if layout else 1
    for n in names:
        case.feed[n] = np.repeat(np.take(case.feed[n], [0], axis=axis), batch, axis=axis)
    model = constants_in_the_file(case, names)
    layer, got = case.fastcell(model)
    want = case.ort(model) if layout == 0 else case.spec()
    assert max_diff(got, want) <= 1e-5
    init = layer.initial_state if op == "LSTM" else (layer.initial_state,)
    for a, n in zip(init, names):
        given = case.weights[n]
        assert np.array_equal(a, given[0] if layout else given[:, 0])
    # kept in its file
    fastcell.save(layer, tmp_path / "m.safetensors")
    again = fastcell.load(tmp_path / "m.safetensors")
    assert max_diff(onnx_outputs(again, **case.feed), got) == 0
    if direction == "forward":
        # new streams start there too: a state's step, a pool's open and reset
        x = case.feed["X"][:, 0]                 # layout 0: (T, I) of the first sequence
        state = again.new_state()
        pool = fastcell.StreamPool(again, 4)
        sid = pool.open()
        ref = layer(x)[0]
        for t in range(x.shape[0]):
            y = again.step(x[t], state)
            assert np.array_equal(pool.step(np.array([sid]), x[t:t + 1])[0], y)
            assert np.array_equal(y, ref[t])
        state.reset()
        pool.reset(sid)
        assert np.array_equal(again.step(x[0], state), pool.step(np.array([sid]), x[:1])[0])


def test_constant_states_that_differ_between_sequences_are_refused(rng):
    case = Case("LSTM", rng, I=3, H=4, batch=2, init=True)
    with pytest.raises(FormatError, match="input initial_c is a constant that differs between the 2"):
        fastcell.from_onnx(constants_in_the_file(case, ["initial_c"]))


def test_a_constant_sequence_lens_is_refused(rng):
    case = Case("GRU", rng, I=3, H=4, batch=2, lengths=True)
    with pytest.raises(FormatError, match="input sequence_lens is a constant in the file"):
        fastcell.from_onnx(constants_in_the_file(case, ["sequence_lens"]))


def test_run_time_states_stay_call_arguments(rng):
    # initial_h as a graph input, or computed from one: the layer takes it at call time
    case = Case("RNN", rng, I=3, H=4, batch=2, init=True)
    assert fastcell.from_onnx(case.model()).initial_state is None


def test_an_attribute_name_that_is_not_utf8_is_a_format_error(rng):
    case = Case("GRU", rng, I=3, H=4, attrs={"linear_before_reset": 1})
    data = case.model().replace(b"linear_before_reset", b"\xff\xfenear_before_reset")
    with pytest.raises(FormatError, match="linear_before_reset|attribute"):
        fastcell.from_onnx(data)
