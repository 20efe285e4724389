"""The contract in code: the cell kinds, their gate counts and gate orders, PyTorch's parameter
names and their suffixes, and the shapes they imply (docs/SPEC.md). The layers, the weight file
and every converter (PyTorch, torch.ao, state_dicts, ONNX, Keras) read them from here; nothing
else spells them.

Gate blocks are rows of the stacked weights, in PyTorch's order: RNN one block; GRU r, z, n; LSTM
and the peephole LSTM i, f, g, o; peepholes p_i, p_f, p_o. Another framework's order is given as,
for each of fastcell's blocks, the index of the block it holds it in (``reorder`` applies one).
"""

import re

import numpy as np

# cell kind -> gate blocks per weight matrix
GATES = {"rnn": 1, "gru": 3, "lstm": 4, "peephole_lstm": 4}
KINDS = tuple(GATES)
CELL_STATE_KINDS = ("lstm", "peephole_lstm")     # the kinds with a cell state c
NONLINEARITIES = ("tanh", "relu")                # the vanilla RNN's

MATRICES = ("weight_ih", "weight_hh", "weight_hr")   # what a reduced weight format reduces
PARAMETERS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr", "weight_ph")
REVERSE = "_reverse"      # the backward direction of a bidirectional layer

# Other frameworks' gate orders (for each fastcell block, its block there).
ONNX_GATE_ORDER = {"RNN": (0,), "GRU": (1, 0, 2), "LSTM": (0, 2, 3, 1)}   # z r h; i o f c
ONNX_PEEPHOLE_ORDER = (0, 2, 1)                                          # P: i o f
KERAS_GATE_ORDER = {"rnn": (0,), "gru": (1, 0, 2), "lstm": (0, 1, 2, 3)}  # z r h; i f c o

_NAME = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr|weight_ph)"
                   r"(?:_l(\d+)(" + REVERSE + r")?)?$")


def suffix(layer, direction=0):
    """The suffix of a layer's parameters: layer k, direction 0 (forward) or 1 (backward)."""
    return f"_l{layer}" + (REVERSE if direction else "")


def suffixes(num_layers, num_directions):
    """Every layer and direction's suffix, in PyTorch's order: (layer, direction, suffix)."""
    return [(k, d, suffix(k, d)) for k in range(num_layers) for d in range(num_directions)]


def parse_name(name):
    """(base, layer or None for a cell's name, backward?) of a PyTorch parameter name, or None."""
    m = _NAME.match(name)
    if m is None:
        return None
    return m.group(1), None if m.group(2) is None else int(m.group(2)), bool(m.group(3))


def is_matrix(name):
    """Whether a parameter (with or without its suffix) is a weight matrix, which a reduced
    format reduces; biases and peepholes stay float."""
    parsed = parse_name(name)
    return parsed is not None and parsed[0] in MATRICES


def cell_shapes(kind, input_size, hidden_size, bias=True):
    """{name: shape} of a cell's parameters (names without suffix)."""
    G = GATES[kind] * hidden_size
    shapes = {"weight_ih": (G, input_size), "weight_hh": (G, hidden_size)}
    if bias:
        shapes["bias_ih"] = shapes["bias_hh"] = (G,)
    if kind == "peephole_lstm":
        shapes["weight_ph"] = (3, hidden_size)
    return shapes


def layer_shapes(kind, input_size, hidden_size, num_layers=1, bias=True, bidirectional=False,
                 proj_size=0):
    """{name: shape} of a layer's parameters under PyTorch's state_dict names, in its order
    (per layer and direction: weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, weight_ph).
    Pure arithmetic: it can be checked before anything is built."""
    G, H, P = GATES[kind] * hidden_size, hidden_size, proj_size or hidden_size
    D = 2 if bidirectional else 1
    shapes = {}
    for k, _, s in suffixes(num_layers, D):
        shapes["weight_ih" + s] = (G, input_size if k == 0 else D * P)
        shapes["weight_hh" + s] = (G, P)
        if bias:
            shapes["bias_ih" + s] = shapes["bias_hh" + s] = (G,)
        if proj_size:
            shapes["weight_hr" + s] = (proj_size, H)
        if kind == "peephole_lstm":
            shapes["weight_ph" + s] = (3, H)
    return shapes


def reorder(a, order, H):
    """Gate blocks of H rows (or H values) of another framework's matrix or vector, in fastcell's
    order: block g is a's block order[g]. A contiguous copy."""
    return np.ascontiguousarray(np.concatenate([a[k * H:(k + 1) * H] for k in order], axis=0))
