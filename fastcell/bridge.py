"""From PyTorch to fastcell: ``from_torch(module)`` and ``from_state_dict(state_dict, **overrides)``.

Never imports torch: ``from_torch`` recognises torch modules through the torch the caller has
already imported (a dynamic quantized module through the torch.ao module its class comes from),
and ``from_state_dict`` reads tensors through their ``numpy()`` view.
"""

import re
import sys

import numpy as np

from fastcell._checks import FLOAT_DTYPES, to_numpy
from fastcell.cells import GRUCell, LSTMCell, PeepholeLSTMCell, RNNCell
from fastcell.layers import GRU, LSTM, RNN, PeepholeLSTM
from fastcell.weight_formats import Reduced

__all__ = ["from_torch", "from_state_dict"]

_LAYERS = {"rnn": RNN, "gru": GRU, "lstm": LSTM, "peephole_lstm": PeepholeLSTM}
_CELLS = {"rnn": RNNCell, "gru": GRUCell, "lstm": LSTMCell, "peephole_lstm": PeepholeLSTMCell}
_GATES = {1: "rnn", 3: "gru", 4: "lstm"}

# What names cannot tell, with its default and the cell type it belongs to (None: every layer).
_OVERRIDES = {"nonlinearity": ("tanh", "rnn"), "reset_after": (True, "gru"), "batch_first": (False, None)}


# ---- from_torch ----

def from_torch(module):
    """The fastcell layer or cell computing what a PyTorch module computes, with its weights.

    Takes ``nn.RNN``, ``nn.GRU``, ``nn.LSTM`` (any num_layers, bidirectional, batch_first,
    proj_size), ``nn.RNNCell``, ``nn.GRUCell``, ``nn.LSTMCell``, ``fastcell.torch.PeepholeLSTM``
    and ``fastcell.torch.PeepholeLSTMCell``, on any device, trainable or not; the weights are
    copied (detached, on the CPU) in the module's dtype, which must be float32 or float64.
    Dropout between layers is a training-time operation and does not apply.

    Also takes the qint8 dynamic quantized modules ``torch.ao.quantization.quantize_dynamic``
    makes (``torch.ao.nn.quantized.dynamic`` LSTM, GRU, LSTMCell, GRUCell, RNNCell): the result is
    an int8 model (``weight_format == "int8"``) holding exactly the module's int8 weights and
    scales (a per-tensor scale repeated for every row, or its per-channel scales; zero points must
    be 0) and its float32 biases. fastcell quantizes the activations its own way (per row, 8 bits
    for h, 16 for x), so its outputs are close to the torch int8 module's, not bitwise equal.
    float16 dynamic quantization, and other quantized modules, raise TypeError.

    Anything else raises TypeError naming its type.
    """
    quantized = _dynamic_quantized_kind(module)
    if quantized is not None:
        return _from_dynamic_quantized(module, *quantized)
    kind, is_cell = _torch_kind(module)
    dtype = _module_dtype(module)
    weights = {name: _tensor_to_numpy(t, name) for name, t in module.state_dict().items()}
    if is_cell:
        kw = {"nonlinearity": module.nonlinearity} if kind == "rnn" else {}
        return _CELLS[kind](**weights, **kw)
    args = dict(input_size=module.input_size, hidden_size=module.hidden_size,
                num_layers=module.num_layers, bias=module.bias, batch_first=module.batch_first,
                bidirectional=module.bidirectional, dtype=dtype)
    if kind == "rnn":
        args["nonlinearity"] = module.nonlinearity
    if kind == "lstm":
        args["proj_size"] = module.proj_size
    layer = _LAYERS[kind](**args)
    layer.load_state_dict(weights)
    return layer


def _torch_kind(module):
    """(cell type, is_cell) of a supported module, or TypeError naming its type."""
    kinds = []
    nn = getattr(sys.modules.get("torch"), "nn", None)  # imported by the caller if module is torch's
    if nn is not None:
        kinds += [(nn.RNN, ("rnn", False)), (nn.GRU, ("gru", False)), (nn.LSTM, ("lstm", False)),
                  (nn.RNNCell, ("rnn", True)), (nn.GRUCell, ("gru", True)), (nn.LSTMCell, ("lstm", True))]
    ours = sys.modules.get("fastcell.torch")
    if ours is not None:
        kinds += [(ours.PeepholeLSTM, ("peephole_lstm", False)),
                  (ours.PeepholeLSTMCell, ("peephole_lstm", True))]
    for cls, kind in kinds:
        if isinstance(module, cls):
            if kind[0] == "rnn" and module.nonlinearity not in ("tanh", "relu"):
                raise ValueError(f"{type(module).__name__}: nonlinearity {module.nonlinearity!r} "
                                 "is not 'tanh' or 'relu'")
            return kind
    t = type(module)
    raise TypeError(
        f"from_torch: unsupported module type {t.__module__}.{t.__qualname__}; expected torch.nn.RNN, "
        "GRU, LSTM, RNNCell, GRUCell, LSTMCell, their qint8 dynamic quantized versions "
        "(torch.ao.nn.quantized.dynamic LSTM, GRU, LSTMCell, GRUCell, RNNCell), or "
        "fastcell.torch.PeepholeLSTM / PeepholeLSTMCell"
    )


# ---- from_torch: dynamic quantized modules (torch.ao.quantization.quantize_dynamic) ----
#
# What torch keeps, and where (torch.ao.nn.quantized.dynamic.modules.rnn):
# - LSTM / GRU: ``_all_weight_values``, one PackedParameter per layer and direction (index
#   layer * D + direction), whose ``param`` is a CellParamsBase. Its ``__getstate__()`` is
#   ((tag, [b_ih, b_hh], [], [reduce_range], [packed_ih, packed_hh]), class name), the tag
#   "quantized_dynamic" for qint8 and "quantized_fp16" for float16.
# - LSTMCell / GRUCell / RNNCell: ``_packed_weight_ih`` and ``_packed_weight_hh``.
# Each packed_* is a LinearPackedParamsBase: ``torch.ops.quantized.linear_unpack`` gives back the
# qint8 weight tensor and the float bias. The packed biases are the ones torch computes with (its
# CPU cells add ``linear_ih(x) + linear_hh(h)``, each with its packed bias): a dynamic cell's
# ``bias_ih`` attribute is the random tensor its constructor made, not the model's bias.

_QUANTIZED_MODULE = "torch.ao.nn.quantized.dynamic.modules.rnn"


def _dynamic_quantized_kind(module):
    """(cell type, is_cell) of a dynamic quantized recurrent module, None for anything else."""
    qd = sys.modules.get(_QUANTIZED_MODULE)  # loaded if module is one of its classes
    if qd is None:
        return None
    kinds = [(qd.LSTM, ("lstm", False)), (qd.GRU, ("gru", False)), (qd.LSTMCell, ("lstm", True)),
             (qd.GRUCell, ("gru", True)), (qd.RNNCell, ("rnn", True))]
    for cls, kind in kinds:
        if isinstance(module, cls):
            return kind
    return None


def _from_dynamic_quantized(module, kind, is_cell):
    torch = sys.modules["torch"]
    what = _type_name(module)
    dtype = getattr(module, "weight_dtype" if is_cell else "dtype", None)
    if dtype != torch.qint8:
        detail = ("float16 dynamic quantization" if dtype == torch.float16
                  else f"weights quantized to {str(dtype).replace('torch.', '')}")
        raise TypeError(f"from_torch: {what} holds {detail}; fastcell reads qint8 dynamic "
                        "quantization (quantize_dynamic(..., dtype=torch.qint8)). For reduced "
                        "weights from a float module, use fastcell.quantize(fastcell.from_torch("
                        "float_module), 'int8' or 'bf16')")
    if is_cell:
        if kind == "rnn" and module.nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"from_torch: {what}: nonlinearity {module.nonlinearity!r} is not "
                             "'tanh' or 'relu'")
        weights = {}
        for part in ("ih", "hh"):
            w, b = _unpack(module, getattr(module, f"_packed_weight_{part}"), f"weight_{part}")
            weights[f"weight_{part}"], weights[f"bias_{part}"] = w, b
        weights = _fill_biases(weights, [""])
        kw = {"nonlinearity": module.nonlinearity} if kind == "rnn" else {}
        return _CELLS[kind](**weights, **kw)

    if not module.bias:
        # quantize_dynamic refuses bias=False; a layer built so holds the random biases its
        # constructor packed, and computes with them (GRU) or refuses to run (LSTM).
        raise ValueError(f"from_torch: {what} with bias=False: PyTorch's dynamic quantized layers "
                         "compute with the biases packed beside their weights, which such a layer "
                         "holds only as placeholders; quantize_dynamic makes layers with bias=True")
    D = 2 if module.bidirectional else 1
    suffixes = [f"_l{k}" + ("_reverse" if d else "") for k in range(module.num_layers) for d in range(D)]
    packed = list(module._all_weight_values)
    if len(packed) != len(suffixes):
        raise ValueError(f"from_torch: {what} with num_layers={module.num_layers}, bidirectional="
                         f"{module.bidirectional} should hold {len(suffixes)} packed weight sets, "
                         f"it holds {len(packed)}")
    gates = {"lstm": 4, "gru": 3}[kind]
    H = module.hidden_size
    weights = {}
    for s, p in zip(suffixes, packed):
        state = p.param.__getstate__()[0]
        if state[0] != "quantized_dynamic":
            raise TypeError(f"from_torch: {what}: the packed weights of layer {s[1:]} are "
                            f"{state[0]!r}, not qint8 dynamic quantization ('quantized_dynamic')")
        for part, pk in zip(("ih", "hh"), state[4]):
            w, b = _unpack(module, pk, f"weight_{part}{s}")
            weights[f"weight_{part}{s}"], weights[f"bias_{part}{s}"] = w, b
        w_hh = weights["weight_hh" + s]
        if w_hh.shape != (gates * H, H):
            hint = ""
            if kind == "lstm" and w_hh.shape[0] == gates * H and w_hh.shape[1] < H:
                hint = (f": an LSTM with proj_size={w_hh.shape[1]} loses its projection (weight_hr) in "
                        "quantize_dynamic, and the module cannot run in PyTorch either; convert the "
                        "float LSTM instead, fastcell.quantize(fastcell.from_torch(lstm), 'int8')")
            raise ValueError(f"from_torch: {what} with hidden_size {H}: weight_hh{s} has shape "
                             f"{w_hh.shape}, expected {(gates * H, H)}{hint}")
    weights = _fill_biases(weights, suffixes)
    args = dict(input_size=module.input_size, hidden_size=H, num_layers=module.num_layers,
                bias=f"bias_ih{suffixes[0]}" in weights, batch_first=module.batch_first,
                bidirectional=module.bidirectional, dtype=np.float32)
    return _LAYERS[kind]._from_weights(weights, weight_format="int8", **args)


def _unpack(module, packed, name):
    """(Reduced int8 weight, float32 bias or None) of one LinearPackedParams."""
    torch = sys.modules["torch"]
    try:
        qweight, bias = torch.ops.quantized.linear_unpack(packed)
    except RuntimeError as e:
        raise TypeError(f"from_torch: {_type_name(module)}: cannot read {name} as qint8 packed "
                        f"weights ({str(e).splitlines()[0]})") from None
    w = _int8_rows(qweight, f"{_type_name(module)} {name}")
    b = None if bias is None else _tensor_to_numpy(bias, "bias" + name[len("weight"):]).astype(np.float32)
    return w, b


def _int8_rows(qweight, name):
    """A qint8 tensor as Reduced int8 with one scale per row, exactly: the integers as stored,
    the scales as float32 (what torch's int8 kernels compute with)."""
    torch = sys.modules["torch"]
    if qweight.dtype != torch.qint8:
        raise TypeError(f"from_torch: {name}: fastcell reads qint8 weights, got "
                        f"{str(qweight.dtype).replace('torch.', '')}")
    if qweight.dim() != 2:
        raise ValueError(f"from_torch: {name}: expected a 2-D weight, got shape {tuple(qweight.shape)}")
    rows = qweight.shape[0]
    q = qweight.int_repr().cpu().numpy().astype(np.int16)
    scheme = qweight.qscheme()
    if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        scale = np.full(rows, qweight.q_scale(), np.float64)
        zero = np.full(rows, qweight.q_zero_point(), np.int64)
    elif scheme in (torch.per_channel_affine, torch.per_channel_symmetric):
        if qweight.q_per_channel_axis() != 0:
            raise ValueError(f"from_torch: {name}: per-channel scales along axis "
                             f"{qweight.q_per_channel_axis()}; fastcell keeps one scale per output "
                             "row (axis 0)")
        scale = qweight.q_per_channel_scales().cpu().numpy().astype(np.float64)
        zero = qweight.q_per_channel_zero_points().cpu().numpy().astype(np.int64)
    else:
        raise TypeError(f"from_torch: {name}: quantization scheme {str(scheme).replace('torch.', '')} "
                        "is not supported; expected per tensor or per channel (axis 0), symmetric")
    if not np.all(np.isfinite(scale) & (scale > 0)):
        raise ValueError(f"from_torch: {name}: expected finite scales > 0")
    if np.any(zero != 0):
        # w = scale * (q - zero): exact in int8 when every q - zero fits.
        q = q - zero[:, None]
        if q.size and (q.min() < -128 or q.max() > 127):
            raise ValueError(f"from_torch: {name} has non-zero zero points (|zero point| up to "
                             f"{int(np.abs(zero).max())}) and q - zero_point spans [{q.min()}, "
                             f"{q.max()}], outside int8: fastcell's int8 weights are symmetric "
                             "(zero point 0); quantize with a symmetric qconfig "
                             "(torch.ao.quantization.default_dynamic_qconfig or "
                             "per_channel_dynamic_qconfig)")
    return Reduced("int8", q.astype(np.int8), scale.astype(np.float32))


def _fill_biases(weights, suffixes):
    """Without any packed bias, no bias; where only some are missing, zeros (the same sums)."""
    names = [f"bias_{p}{s}" for s in suffixes for p in ("ih", "hh")]
    if all(weights[n] is None for n in names):
        return {k: v for k, v in weights.items() if k not in names}
    for n in names:
        if weights[n] is None:
            weights[n] = np.zeros(weights["weight" + n[len("bias"):]].shape[0], np.float32)
    return weights


def _type_name(module):
    t = type(module)
    return f"{t.__module__}.{t.__qualname__}"


def _module_dtype(module):
    dtypes = {str(p.dtype).replace("torch.", "") for p in module.parameters()}
    if len(dtypes) != 1:
        raise TypeError(f"{type(module).__name__}: expected parameters of one dtype, got {sorted(dtypes)}")
    name = dtypes.pop()
    if name not in ("float32", "float64"):
        raise TypeError(f"{type(module).__name__}: fastcell computes in float32 or float64, the module's "
                        f"parameters are {name}; convert first, e.g. module.float() or module.double()")
    return np.dtype(name)


def _tensor_to_numpy(value, name):
    """A tensor or array as a NumPy array, refusing dtypes fastcell does not compute in (a torch
    bfloat16 tensor has no NumPy view at all) with a message naming the entry."""
    dt = getattr(value, "dtype", None)
    if dt is not None and not isinstance(value, np.ndarray) and hasattr(value, "detach"):
        dname = str(dt).replace("torch.", "")
        if dname not in ("float32", "float64"):
            raise TypeError(f"{name}: fastcell computes in float32 or float64, got a {dname} tensor; "
                            "convert first, e.g. tensor.float()")
    arr = to_numpy(value, name)
    if arr.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: fastcell computes in float32 or float64, got {arr.dtype}; "
                        f"convert first, e.g. np.asarray({name}, dtype=np.float32)")
    return arr


# ---- from_state_dict ----

_NAME = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr|weight_ph)(?:_l(\d+)(_reverse)?)?$")


def from_state_dict(state_dict, **overrides):
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
    """
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
        weights[k] = _tensor_to_numpy(v, k)
    if not weights:
        raise ValueError("from_state_dict: the state_dict is empty")
    parsed = _parse_names(weights)
    dtype = _common_dtype(weights)
    if all(layer is None for _, layer, _ in parsed.values()):
        return _cell(weights, opts, dtype)
    return _layer(weights, parsed, opts, dtype)


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
        m = _NAME.match(name)
        if m is None:
            unknown.append(name)
        else:
            parsed[name] = (m.group(1), None if m.group(2) is None else int(m.group(2)), bool(m.group(3)))
    if unknown:
        msg = f"from_state_dict: unknown names {', '.join(sorted(unknown))}"
        prefix = _common_prefix(list(weights))
        if prefix and all(_NAME.match(n[len(prefix):]) for n in weights):
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
    if hidden == 0 or rows % hidden or rows // hidden not in _GATES:
        ratio = f"{rows}/{hidden}" if hidden else f"{rows}/0"
        raise ValueError(f"from_state_dict: {where}: rows / hidden size = {ratio} is not 1 (RNN), "
                         f"3 (GRU) or 4 (LSTM) gates{hint}")
    return _GATES[rows // hidden]


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
    return _CELLS[kind](**weights, **kw)


def _layer(weights, parsed, opts, dtype):
    # Which (layer, direction) slots hold what.
    slots = {}
    for name, (base, k, rev) in parsed.items():
        slots.setdefault((k, int(rev)), set()).add(base)
    num_layers = max(k for k, _ in slots) + 1
    bidirectional = any(d for _, d in slots)
    D = 2 if bidirectional else 1
    missing_slots = [f"_l{k}" + ("_reverse" if d else "") for k in range(num_layers) for d in range(D)
                     if (k, d) not in slots]
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
    layer = _LAYERS[kind](**args)
    expected = layer.expected_shapes()
    problems = [f"{n} has shape {weights[n].shape}, expected {expected[n]}"
                for n in expected if weights[n].shape != tuple(expected[n])]
    if problems:
        desc = (f"{kind} layer: input_size {input_size} (weight_ih_l0), hidden_size {H}"
                + (f", proj_size {proj_size} (weight_hr_l0)" if proj else " (weight_hh_l0)")
                + f", num_layers {num_layers}" + (", bidirectional" if bidirectional else ""))
        raise ValueError(f"from_state_dict: inferred a {desc}; inconsistent: " + "; ".join(problems))
    layer.load_state_dict(weights)
    return layer


def _suffixes(num_layers, D):
    return [f"_l{k}" + ("_reverse" if d else "") for k in range(num_layers) for d in range(D)]
