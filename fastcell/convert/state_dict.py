"""From a PyTorch-style state_dict to fastcell: ``from_state_dict(state_dict, **overrides)`` infers
the architecture from the names and shapes (fastcell.spec) and builds the model. Tensors are read
through their ``numpy()`` view: torch is never imported.
"""

import numpy as np

from fastcell import spec
from fastcell.checks import float_array
from fastcell.models import CELLS, LAYERS, with_threads
from fastcell_c.team import check_threads

__all__ = ["from_state_dict"]

# rows of weight_hh / hidden size -> the cell kind (the peephole LSTM: by its weight_ph)
_KIND_OF_GATES = {spec.GATES[k]: k for k in ("rnn", "gru", "lstm")}

# What names cannot tell, with its default and the cell type it belongs to (None: every layer).
_OVERRIDES = {"nonlinearity": ("tanh", "rnn"), "reset_after": (True, "gru"), "batch_first": (False, None)}


def from_state_dict(state_dict, *, threads=1, **overrides):
    """The fastcell layer or cell a PyTorch-style state_dict describes, with its weights.

    Inferred from the names and shapes: a cell (names without ``_l{k}``) or a layer; the cell type
    from the gate count (rows of weight_hh over hidden size: 1 RNN, 3 GRU, 4 LSTM; weight_ph makes
    it a peephole LSTM); num_layers; bidirectional (``_reverse``); input_size, hidden_size,
    proj_size (weight_hr); bias (bias_* present); dtype (float32 or float64, one for all).
    Values may be torch tensors or NumPy arrays.

    Keyword overrides, for what names cannot tell: ``nonlinearity`` ('tanh' or 'relu', RNN only,
    default 'tanh'), ``reset_after`` (GRU only, default True), ``batch_first`` (layers only,
    default False). None means "not given"; an override the inferred model does not have is
    refused unless it is that option's default. Unknown keywords raise TypeError; unknown names,
    and names or shapes that do not fit one architecture, raise ValueError saying what is wrong.
    threads: the model's (``model.threads``).
    """
    threads = check_threads(threads)
    unknown = sorted(set(overrides) - set(_OVERRIDES))
    if unknown:
        raise TypeError(f"from_state_dict: unexpected keyword argument(s) {', '.join(unknown)}; "
                        f"expected {', '.join(_OVERRIDES)}")
    opts = _check_overrides(overrides)
    if not hasattr(state_dict, "items"):
        raise TypeError(f"from_state_dict: expected a mapping of names to arrays, got {type(state_dict).__name__}")
    weights = {}
    for k, v in state_dict.items():
        if not isinstance(k, str):
            raise ValueError(f"from_state_dict: names must be strings, got {k!r}")
        weights[k] = float_array(v, k)
    if not weights:
        raise ValueError("from_state_dict: the state_dict is empty")
    parsed = _parse_names(weights)
    dtype = _common_dtype(weights)
    if all(layer is None for _, layer, _ in parsed.values()):
        return with_threads(_cell(weights, opts, dtype), threads)
    return with_threads(_layer(weights, parsed, opts, dtype), threads)


def _check_overrides(overrides):
    opts = {}
    for name, value in overrides.items():
        if value is None:
            continue
        if name == "nonlinearity":
            if value not in ("tanh", "relu"):
                raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {value!r}")
        elif not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name}: expected True or False, got {value!r}")
        opts[name] = value if name == "nonlinearity" else bool(value)
    return opts


def _applicable(opts, kind, is_cell):
    """The overrides for this model; those it does not have must be left at their default."""
    out = {}
    for name, value in opts.items():
        default, owner = _OVERRIDES[name]
        applies = (owner == kind) if owner else not is_cell
        if applies:
            out[name] = value
        elif value != default:
            what = f"a {kind} cell" if is_cell else f"a {kind} layer"
            where = f"{owner} models" if owner else "layers"
            raise ValueError(f"from_state_dict: {name}={value!r} applies to {where}, but the "
                             f"state_dict holds {what}")
    return out


def _parse_names(weights):
    """{name: (base, layer or None, reverse)}; unknown names and a cell/layer mix are refused."""
    parsed, unknown = {}, []
    for name in weights:
        p = spec.parse_name(name)
        if p is None:
            unknown.append(name)
        else:
            parsed[name] = p
    if unknown:
        msg = f"from_state_dict: unknown names {', '.join(sorted(unknown))}"
        prefix = _common_prefix(list(weights))
        if prefix and all(spec.parse_name(n[len(prefix):]) for n in weights):
            msg += (f"; every name starts with {prefix!r} (a module wrapped in another one?): "
                    f"strip it, e.g. {{k.removeprefix({prefix!r}): v for k, v in sd.items()}}")
        else:
            msg += ("; expected PyTorch's recurrent names weight_ih, weight_hh, bias_ih, bias_hh, "
                    "weight_hr, weight_ph, with _l{k} and _reverse for layers")
        raise ValueError(msg)
    cell_names = sorted(n for n, p in parsed.items() if p[1] is None)
    layer_names = sorted(n for n, p in parsed.items() if p[1] is not None)
    if cell_names and layer_names:
        raise ValueError(f"from_state_dict: cell names ({', '.join(cell_names)}) mixed with layer "
                         f"names ({', '.join(layer_names)})")
    return parsed


def _common_prefix(names):
    prefix = names[0]
    for n in names[1:]:
        while not n.startswith(prefix):
            prefix = prefix[:-1]
    cut = prefix.rfind(".")
    return prefix[: cut + 1] if cut >= 0 else ""


def _common_dtype(weights):
    dtypes = {}
    for name, a in weights.items():
        dtypes.setdefault(a.dtype.name, []).append(name)
    if len(dtypes) > 1:
        detail = "; ".join(f"{dt}: {', '.join(sorted(ns))}" for dt, ns in sorted(dtypes.items()))
        raise ValueError(f"from_state_dict: the arrays mix dtypes ({detail}); expected one dtype")
    return next(iter(weights.values())).dtype


def _rank(weights, name, ndim):
    a = weights[name]
    if a.ndim != ndim:
        raise ValueError(f"from_state_dict: {name} should be {ndim}-D, got shape {a.shape}")
    return a.shape


def _gates(rows, hidden, where, hint=""):
    """The cell type from the rows of weight_hh and the hidden size."""
    if hidden == 0 or rows % hidden or rows // hidden not in _KIND_OF_GATES:
        ratio = f"{rows}/{hidden}" if hidden else f"{rows}/0"
        raise ValueError(f"from_state_dict: {where}: rows / hidden size = {ratio} is not 1 (RNN), "
                         f"3 (GRU) or 4 (LSTM) gates{hint}")
    return _KIND_OF_GATES[rows // hidden]


def _cell(weights, opts, dtype):
    for name in ("weight_ih", "weight_hh"):
        if name not in weights:
            raise ValueError(f"from_state_dict: a cell state_dict needs {name}; got {', '.join(sorted(weights))}")
    if "weight_hr" in weights:
        raise ValueError("from_state_dict: weight_hr (a projection) in a cell state_dict: cells have "
                         "no projection (nn.LSTMCell has none); projected LSTMs are layers (weight_hr_l0)")
    if ("bias_ih" in weights) != ("bias_hh" in weights):
        raise ValueError("from_state_dict: bias_ih and bias_hh come together; got only "
                         + ("bias_ih" if "bias_ih" in weights else "bias_hh"))
    rows, _ = _rank(weights, "weight_ih", 2)
    hrows, H = _rank(weights, "weight_hh", 2)
    kind = _gates(hrows, H, f"weight_hh {weights['weight_hh'].shape}")
    if "weight_ph" in weights:
        if kind != "lstm":
            raise ValueError(f"from_state_dict: weight_ph (peepholes) needs an LSTM's 4 gates, but "
                             f"weight_hh {weights['weight_hh'].shape} has {hrows // H}")
        kind = "peephole_lstm"
    if rows != hrows:
        raise ValueError(f"from_state_dict: weight_ih has {rows} rows, weight_hh {hrows}: the gate "
                         f"rows (gates x hidden_size) must match")
    problems = []
    for name in ("bias_ih", "bias_hh"):
        if name in weights and weights[name].shape != (hrows,):
            problems.append(f"{name} has shape {weights[name].shape}, expected ({hrows},)")
    if "weight_ph" in weights and weights["weight_ph"].shape != (3, H):
        problems.append(f"weight_ph has shape {weights['weight_ph'].shape}, expected (3, {H})")
    if problems:
        raise ValueError(f"from_state_dict: inferred a {kind} cell with hidden_size {H} from weight_hh "
                         f"{weights['weight_hh'].shape}; " + "; ".join(problems))
    kw = _applicable(opts, kind, is_cell=True)
    return CELLS[kind](**weights, **kw)


def _layer(weights, parsed, opts, dtype):
    # Which (layer, direction) slots hold what.
    slots = {}
    for name, (base, k, rev) in parsed.items():
        slots.setdefault((k, int(rev)), set()).add(base)
    num_layers = max(k for k, _ in slots) + 1
    bidirectional = any(d for _, d in slots)
    D = 2 if bidirectional else 1
    missing_slots = [s for k, d, s in spec.suffixes(num_layers, D) if (k, d) not in slots]
    if missing_slots:
        raise ValueError(f"from_state_dict: found layers up to _l{num_layers - 1}"
                         + (" with _reverse (bidirectional)" if bidirectional else "")
                         + f", but nothing for {', '.join(missing_slots)}")
    for base in ("weight_ih", "weight_hh"):
        missing = [base + s for s in _suffixes(num_layers, D) if base + s not in weights]
        if missing:
            raise ValueError(f"from_state_dict: missing {', '.join(missing)}")
    for group in (("bias_ih", "bias_hh"), ("weight_hr",), ("weight_ph",)):
        have = [b + s for b in group for s in _suffixes(num_layers, D) if b + s in weights]
        lack = [b + s for b in group for s in _suffixes(num_layers, D) if b + s not in weights]
        if have and lack:
            raise ValueError(f"from_state_dict: {' / '.join(group)} given for some layers or directions "
                             f"but not all: present {', '.join(have)}; missing {', '.join(lack)}")
    bias = "bias_ih_l0" in weights
    proj = "weight_hr_l0" in weights
    peephole = "weight_ph_l0" in weights

    input_size = _rank(weights, "weight_ih_l0", 2)[1]
    rows = _rank(weights, "weight_hh_l0", 2)[0]
    if proj:
        proj_size, H = _rank(weights, "weight_hr_l0", 2)
        kind = _gates(rows, H, f"weight_hh_l0 {weights['weight_hh_l0'].shape} with hidden_size {H} "
                               f"from weight_hr_l0 {weights['weight_hr_l0'].shape}")
        if kind != "lstm":
            raise ValueError(f"from_state_dict: weight_hr (a projection) needs an LSTM's 4 gates, but "
                             f"weight_hh_l0 {weights['weight_hh_l0'].shape} has {rows // H} x hidden_size {H}")
        if proj_size >= H:
            raise ValueError(f"from_state_dict: weight_hr_l0 {weights['weight_hr_l0'].shape}: proj_size "
                             f"{proj_size} must be less than hidden_size {H}")
    else:
        proj_size, H = 0, weights["weight_hh_l0"].shape[1]
        kind = _gates(rows, H, f"weight_hh_l0 {weights['weight_hh_l0'].shape}",
                      " (a projected LSTM also needs its weight_hr_l{k})")
    if peephole:
        if kind != "lstm":
            raise ValueError(f"from_state_dict: weight_ph (peepholes) needs an LSTM's 4 gates, but "
                             f"weight_hh_l0 {weights['weight_hh_l0'].shape} has {rows // H}")
        if proj:
            raise ValueError("from_state_dict: weight_ph (peepholes) together with weight_hr "
                             "(projection): fastcell's PeepholeLSTM has no projection")
        kind = "peephole_lstm"
    kw = _applicable(opts, kind, is_cell=False)
    args = dict(input_size=input_size, hidden_size=H, num_layers=num_layers, bias=bias,
                bidirectional=bidirectional, dtype=dtype, **kw)
    if kind == "lstm":
        args["proj_size"] = proj_size
    expected = spec.layer_shapes(kind, input_size, H, num_layers, bias, bidirectional, proj_size)
    problems = [f"{n} has shape {weights[n].shape}, expected {expected[n]}"
                for n in expected if weights[n].shape != tuple(expected[n])]
    if problems:
        desc = (f"{kind} layer: input_size {input_size} (weight_ih_l0), hidden_size {H}"
                + (f", proj_size {proj_size} (weight_hr_l0)" if proj else " (weight_hh_l0)")
                + f", num_layers {num_layers}" + (", bidirectional" if bidirectional else ""))
        raise ValueError(f"from_state_dict: inferred a {desc}; inconsistent: " + "; ".join(problems))
    return LAYERS[kind](**args, weights=weights)


def _suffixes(num_layers, D):
    return [s for _, _, s in spec.suffixes(num_layers, D)]
