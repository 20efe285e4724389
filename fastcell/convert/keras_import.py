"""Recurrent layers from Keras 3: ``keras_layers`` lists a model's recurrent layers, ``from_keras``
turns one (or a stack of them) into a fastcell layer, ``keras_outputs`` gives a converted layer's
outputs in Keras' own layout.

One mapping serves both sources: a live Keras object is described by the same JSON config that
Keras writes to a ``.keras`` file's config.json (``keras.saving.serialize_keras_object``), and its
variables are found by the same paths Keras writes them under in model.weights.h5; only where the
arrays come from differs (``_LiveSource``: the objects; ``_FileSource``: the untrusted file, read
by ``fastcell.convert.keras_file``). Importing this module imports neither keras nor h5py.

What Keras stores, and what fastcell takes (docs/SPEC.md, "Other frameworks' conventions"):

    Keras variable     shape             gate blocks       fastcell (PyTorch names)
    kernel             (I, G*H)          LSTM i, f, c, o   weight_ih = kernel.T, blocks i, f, g, o
    recurrent_kernel   (H, G*H)          GRU  z, r, h      weight_hh = recurrent_kernel.T, r, z, n
    bias               (G*H,)            LSTM, SimpleRNN,  bias_ih = bias, bias_hh = 0
                                         GRU reset_after=False
                       (2, G*H)          GRU reset_after   bias_ih = bias[0], bias_hh = bias[1]

A Keras layer is batch-first, so the fastcell layer is ``batch_first=True``; ``go_backwards``
is ``reverse=True``; ``Bidirectional`` is ``bidirectional=True`` (any merge mode: the layer
computes both halves, ``keras_outputs`` merges them).
"""

import json
from dataclasses import dataclass, field

import numpy as np

from fastcell import spec
from fastcell.convert.choosing import choose
from fastcell.convert.keras_file import FormatError, KerasArchive, unique_names
from fastcell.models import LAYERS, with_threads
from fastcell_c.team import check_threads

__all__ = ["keras_layers", "from_keras", "keras_outputs", "KerasLayer"]

# Keras' recurrent layer classes -> fastcell's cell kind (None: decided by the cell it holds).
_LAYER_KINDS = {"SimpleRNN": "rnn", "GRU": "gru", "LSTM": "lstm"}
_CELL_KINDS = {"SimpleRNNCell": "rnn", "GRUCell": "gru", "LSTMCell": "lstm"}
_WRAPPERS = ("RNN", "Bidirectional")
# Recurrent, but not something fastcell computes: listed, with the reason, and refused.
_OTHER_RECURRENT = {"ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D"}
_MODELS = ("Sequential", "Functional")

# The config keys fastcell reads or knows not to matter at inference (initializers, regularizers,
# constraints and dropout act in training only; unroll and implementation change how Keras loops,
# not what it computes). Any other key is refused: fastcell cannot tell what it would change.
_RNN_KEYS = {"name", "trainable", "dtype", "return_sequences", "return_state", "go_backwards",
             "stateful", "unroll", "zero_output_for_mask", "time_major", "activity_regularizer",
             "input_shape", "batch_input_shape", "batch_shape"}
_CELL_KEYS = {"name", "trainable", "dtype", "units", "activation", "recurrent_activation",
              "use_bias", "kernel_initializer", "recurrent_initializer", "bias_initializer",
              "unit_forget_bias", "kernel_regularizer", "recurrent_regularizer", "bias_regularizer",
              "kernel_constraint", "recurrent_constraint", "bias_constraint", "dropout",
              "recurrent_dropout", "seed", "reset_after", "implementation"}
_CELL_OPTION_KEYS = {"rnn": {"recurrent_activation", "unit_forget_bias", "reset_after"},
                     "gru": {"unit_forget_bias"}, "lstm": {"reset_after"}}   # keys a kind lacks
_BIDIRECTIONAL_KEYS = {"name", "trainable", "dtype", "layer", "merge_mode", "backward_layer"}
_MERGE_MODES = ("concat", "sum", "mul", "ave", None)

# Keras layers that hand their input's mask on unchanged (supports_masking with the default
# compute_mask, in Keras 3), and those that drop it (supports_masking False). A masked input through
# any layer in neither list, or a custom one, leaves the mask unknown: a recurrent layer it reaches
# is refused.
_MASK_PASS = {"Dense", "Activation", "Dropout", "GaussianNoise", "GaussianDropout", "AlphaDropout",
              "SpatialDropout1D", "LayerNormalization", "BatchNormalization", "Identity",
              "ActivityRegularization", "Rescaling", "UnitNormalization", "GroupNormalization",
              "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax", "Normalization", "TimeDistributed"}
_MASK_DROP = {"Flatten", "Conv1D", "Reshape", "Permute", "RepeatVector", "GlobalMaxPooling1D",
              "GlobalAveragePooling1D", "Cropping1D", "ZeroPadding1D", "UpSampling1D",
              "MaxPooling1D", "AveragePooling1D", "SeparableConv1D", "DepthwiseConv1D",
              "Conv1DTranspose", "InputLayer"}


# How many layers back a mask is followed (each a few Python frames): past this, it is unknown.
_MAX_DEPTH = 200


class _Refusal(Exception):
    """What fastcell cannot convert; raised as FormatError for a file, ValueError for an object."""


# ---- the description ----

@dataclass(frozen=True)
class KerasLayer:
    """One recurrent layer of a Keras model, as ``keras_layers`` lists it.

    index: its position in the list (``from_keras(obj, layer=index)``); name: the Keras layer's
    name; path: the names of the models holding it and its own, joined by "/" ("encoder/lstm");
    type: the Keras class ("LSTM", "Bidirectional(GRU)", "RNN(LSTMCell)", "RNN(2 x GRUCell)");
    cell: the fastcell kind it becomes ("rnn", "gru", "lstm"; None if refused); input_size (None
    if the layer is not built) and units; num_layers: stacked cells in one RNN, else 1;
    direction: "forward", "backward" (go_backwards) or "bidirectional"; options: what else the
    config says (activation, reset_after, use_bias, dtype, return_sequences, return_state,
    stateful, merge_mode, zero_output_for_mask, unroll, initial_state from the graph); mask: None,
    or where the layer's mask comes from (pass ``lengths`` when calling the converted layer);
    problem: None, or why ``from_keras`` refuses it.
    """

    index: int
    name: str
    path: str
    type: str
    cell: str | None
    input_size: int | None
    units: int | None
    num_layers: int
    direction: str
    options: dict = field(default_factory=dict)
    mask: str | None = None
    problem: str | None = None

    @property
    def output_options(self):
        """The keyword arguments of ``keras_outputs`` that give this layer's output layout:
        ``fastcell.keras_outputs(model, x, **info.output_options)``."""
        o = self.options
        out = {"return_sequences": o.get("return_sequences", False),
               "return_state": o.get("return_state", False)}
        if self.direction == "bidirectional":
            out["merge_mode"] = o.get("merge_mode", "concat")
        else:
            out["zero_output_for_mask"] = o.get("zero_output_for_mask", False)
        return out

    @property
    def changed_options(self):
        """The options that differ from Keras' defaults (dtype aside)."""
        return {k: v for k, v in self.options.items() if k != "dtype" and _DEFAULTS.get(k, ...) != v}

    def describe(self):
        size = "?" if self.input_size is None else self.input_size
        text = (f"#{self.index} {self.type} {self.path!r}: {self.direction}, input_size {size}, "
                f"units {self.units}")
        if self.num_layers > 1:
            text += f", {self.num_layers} layers"
        if self.options:
            text += f", {self.options.get('dtype', 'float32')}"
        shown = self.changed_options
        if shown:
            text += ", " + ", ".join(f"{k}={v!r}" for k, v in shown.items())
        if self.mask:
            text += f"; masked by {self.mask}"
        if self.problem:
            text += f"; refused: {self.problem}"
        return text


# Options left out of a description when they have Keras' default value.
_DEFAULTS = {"activation": "tanh", "use_bias": True, "reset_after": True, "return_sequences": False,
             "return_state": False, "stateful": False, "unroll": False, "zero_output_for_mask": False,
             "merge_mode": "concat"}


@dataclass
class _Found:
    """A recurrent layer found in the config, with what converting it needs."""

    entry: dict                 # its config entry ({"class_name", "config", ...})
    name: str
    path: str
    ref: object                 # where its variables are (source-specific)
    container: str              # the path of the model holding it
    mask: tuple | None = None
    feeds_from: tuple | None = None   # the layer whose output it reads (for stacks)
    initial_state: bool = False


@dataclass
class _Spec:
    """A recurrent layer parsed: what fastcell builds from it."""

    kind: str
    type: str
    units: int
    nonlinearity: str | None
    reset_after: bool | None
    use_bias: bool
    dtype: str
    direction: str
    options: dict
    # weight paths, relative to the layer: per stacked layer, per direction
    cells: list


# ---- config parsing ----

def _is_builtin(entry):
    """Keras' own class: from Keras' modules, registered under no other name (a custom class
    has its own module, and a registered name such as "Custom>MyLSTM")."""
    module, registered = entry.get("module"), entry.get("registered_name")
    return (registered is None or registered == entry.get("class_name")) and \
        isinstance(module, str) and (module == "keras" or module.startswith("keras."))


def _is_op(entry):
    module = entry.get("module")
    return isinstance(module, str) and (module.startswith("keras.src.ops") or
                                        module.startswith("keras.ops"))


def _class(entry):
    c = entry.get("class_name") if isinstance(entry, dict) else None
    return c if isinstance(c, str) else "?"


def _config(entry, where):
    cfg = entry.get("config") if isinstance(entry, dict) else None
    if not isinstance(cfg, dict):
        raise _Refusal(f"{where}: its config is not a JSON object")
    return cfg


def _entry_name(entry):
    name = entry.get("name") if isinstance(entry, dict) else None
    if not isinstance(name, str):
        cfg = entry.get("config") if isinstance(entry, dict) else None
        name = cfg.get("name") if isinstance(cfg, dict) else None
    return name if isinstance(name, str) else "?"


def _custom(entry, what):
    reg = entry.get("registered_name")
    return _Refusal(f"{what} is a custom class ({_class(entry)!r}"
                    + (f", registered as {reg!r}" if isinstance(reg, str) else "")
                    + "): fastcell converts only Keras' own SimpleRNN, GRU, LSTM, RNN(SimpleRNNCell, "
                      "GRUCell, LSTMCell) and Bidirectional, and never runs code from a model")


def _dtype(value, where):
    """'float32' or 'float64' from a dtype or dtype policy; other policies are refused."""
    if value is None:
        return "float32"
    name = value
    if isinstance(value, dict):
        inner = value.get("config")
        name = inner.get("name") if isinstance(inner, dict) else None
        if value.get("class_name") not in ("DTypePolicy", "FloatDTypePolicy", "Policy"):
            raise _Refusal(f"{where}: attribute dtype is a {value.get('class_name')!r} policy"
                           + (f" ({name!r})" if isinstance(name, str) else "")
                           + ": fastcell computes in float32 or float64")
    if name in ("float32", "float64"):
        return name
    hint = " (a mixed-precision policy computes in 16 bits)" if str(name).startswith("mixed") else ""
    raise _Refusal(f"{where}: attribute dtype is {name!r}{hint}: fastcell computes in float32 or "
                   "float64")


def _activation(value):
    """An activation's Keras name, or a description of what it is instead."""
    if value is None:
        return "linear"
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return f"{value.get('config')!r} (a {value.get('class_name')})"
    return repr(value)


def _flag(cfg, key, default, where):
    v = cfg.get(key, default)
    if not isinstance(v, bool):
        raise _Refusal(f"{where}: attribute {key} is {v!r}, expected true or false")
    return v


def _units(cfg, where):
    u = cfg.get("units")
    if not isinstance(u, int) or isinstance(u, bool) or not 1 <= u <= 2**31 - 1:
        raise _Refusal(f"{where}: attribute units is {u!r}, expected a positive integer")
    return u


def _check_keys(cfg, allowed, where):
    unknown = sorted(k for k in cfg if k not in allowed)
    if unknown:
        raise _Refusal(f"{where}: attribute {unknown[0]!r} ({cfg[unknown[0]]!r}) is not one fastcell "
                       f"knows for this layer, so it cannot tell what it changes")


def _cell(kind, cfg, where):
    """(units, nonlinearity, reset_after, use_bias, dtype, options) of a cell's settings, which
    a SimpleRNN/GRU/LSTM layer keeps in its own config and an RNN layer in its cell's."""
    units = _units(cfg, where)
    act = _activation(cfg.get("activation", "tanh"))
    options = {}
    if kind == "rnn":
        if act not in spec.NONLINEARITIES:
            raise _Refusal(f"{where}: attribute activation is {act}: fastcell's SimpleRNN computes "
                           "'tanh' or 'relu'")
        nonlinearity = act
        options["activation"] = act
    else:
        if act != "tanh":
            raise _Refusal(f"{where}: attribute activation is {act}: fastcell's "
                           f"{'GRU' if kind == 'gru' else 'LSTM'} computes 'tanh'")
        nonlinearity = None
        ract = _activation(cfg.get("recurrent_activation", "sigmoid"))
        if ract != "sigmoid":
            extra = " (Keras' hard_sigmoid is a piecewise-linear approximation)" \
                if ract == "hard_sigmoid" else ""
            raise _Refusal(f"{where}: attribute recurrent_activation is {ract}{extra}: fastcell's "
                           "gates compute 'sigmoid'")
    use_bias = _flag(cfg, "use_bias", True, where)
    reset_after = None
    if kind == "gru":
        reset_after = _flag(cfg, "reset_after", True, where)
        options["reset_after"] = reset_after
    options["use_bias"] = use_bias
    dtype = _dtype(cfg.get("dtype"), where)
    impl = cfg.get("implementation", 1)
    if impl not in (0, 1, 2):
        raise _Refusal(f"{where}: attribute implementation is {impl!r}, expected 1 or 2")
    return units, nonlinearity, reset_after, use_bias, dtype, options


def _recurrent(entry, where):
    """The _Spec of a SimpleRNN, GRU, LSTM or RNN(cell) entry (one direction)."""
    cls = _class(entry)
    if not _is_builtin(entry):
        raise _custom(entry, where)
    cfg = _config(entry, where)
    if cls in _LAYER_KINDS:
        kind = _LAYER_KINDS[cls]
        _check_keys(cfg, (_RNN_KEYS | _CELL_KEYS) - _CELL_OPTION_KEYS[kind], where)
        cells = [(kind, cfg, ["cell"], cls)]
        type_ = cls
    elif cls == "RNN":
        _check_keys(cfg, _RNN_KEYS | {"cell"}, where)
        cell = cfg.get("cell")
        if not isinstance(cell, dict):
            raise _Refusal(f"{where}: attribute cell is {cell!r}, expected a Keras cell")
        if _class(cell) == "StackedRNNCells" and _is_builtin(cell):
            stacked = _config(cell, f"{where}: its StackedRNNCells")
            members = stacked.get("cells")
            if not isinstance(members, list) or not members:
                raise _Refusal(f"{where}: its StackedRNNCells holds no list of cells")
            _check_keys(stacked, {"name", "trainable", "dtype", "cells"}, f"{where}: its StackedRNNCells")
            names = unique_names([_class(c) for c in members])
            cells = []
            for k, c in enumerate(members):
                cells.append(_rnn_cell(c, f"{where}: cell {k}", ["cell", ("cells", k, names[k])]))
            classes = {c[3] for c in cells}
            type_ = f"RNN({len(cells)} x {cells[0][3]})" if len(classes) == 1 else \
                f"RNN({', '.join(c[3] for c in cells)})"
        else:
            cells = [_rnn_cell(cell, f"{where}: its cell", ["cell"])]
            type_ = f"RNN({cells[0][3]})"
    else:
        raise _Refusal(f"{where} is a {cls}, not a recurrent layer fastcell converts")

    parsed = []
    for k, (kind, c, path, cell_class) in enumerate(cells):
        at = where if cls in _LAYER_KINDS else (
            f"{where}: cell {k} ({cell_class})" if len(cells) > 1 else f"{where}: its {cell_class}")
        parsed.append((_cell(kind, c, at), kind, path))
    (units, nonlinearity, reset_after, use_bias, dtype, options), kind, _ = parsed[0]
    for k, ((u, nl, ra, ub, dt, _), kd, _) in enumerate(parsed[1:], 1):
        for attr, a, b in (("cell type", kd, kind), ("units", u, units),
                           ("activation", nl, nonlinearity), ("reset_after", ra, reset_after),
                           ("use_bias", ub, use_bias), ("dtype", dt, dtype)):
            if a != b:
                raise _Refusal(f"{where}: stacked cell {k} has {attr} {a!r}, cell 0 {b!r}: a fastcell "
                               "model's layers share one cell type and size")
    # The cell's dtype is its weights'; a layer of another float dtype only casts the outputs.
    _dtype(cfg.get("dtype"), where)
    if cfg.get("time_major", False) is not False:
        raise _Refusal(f"{where}: attribute time_major is {cfg['time_major']!r}: fastcell reads "
                       "Keras' batch-major inputs (time_major=False)")
    options = dict(options)
    for key in ("return_sequences", "return_state", "stateful", "unroll", "zero_output_for_mask"):
        options[key] = _flag(cfg, key, False, where)
    backwards = _flag(cfg, "go_backwards", False, where)
    options["dtype"] = dtype
    return _Spec(kind, type_, units, nonlinearity, reset_after, use_bias, dtype,
                 "backward" if backwards else "forward", options,
                 [[path] for _, _, path in parsed])


def _rnn_cell(cell, where, path):
    """(kind, config, path, class) of a cell inside an RNN layer."""
    cls = _class(cell)
    if not _is_builtin(cell) or cls not in _CELL_KINDS:
        if _is_builtin(cell):
            raise _Refusal(f"{where} is a {cls}: fastcell converts RNN layers of SimpleRNNCell, "
                           "GRUCell or LSTMCell")
        raise _custom(cell, where)
    kind = _CELL_KINDS[cls]
    cfg = _config(cell, where)
    _check_keys(cfg, _CELL_KEYS - _CELL_OPTION_KEYS[kind], where)
    return kind, cfg, path, cls


def _bidirectional(entry, where):
    if not _is_builtin(entry):
        raise _custom(entry, where)
    cfg = _config(entry, where)
    _check_keys(cfg, _BIDIRECTIONAL_KEYS, where)
    merge = cfg.get("merge_mode", "concat")
    if merge not in _MERGE_MODES:
        raise _Refusal(f"{where}: attribute merge_mode is {merge!r}, expected one of "
                       f"{list(_MERGE_MODES)}")
    inner = cfg.get("layer")
    if not isinstance(inner, dict):
        raise _Refusal(f"{where}: attribute layer is {inner!r}, expected a Keras layer")
    fwd = _recurrent(inner, f"{where}: its forward layer")
    back_entry = cfg.get("backward_layer")
    if back_entry is None:   # Keras makes it from the forward layer, going backwards
        back_entry = {**inner, "config": {**inner["config"], "go_backwards": True}}
    bwd = _recurrent(back_entry, f"{where}: its backward layer")
    if fwd.direction != "forward" or bwd.direction != "backward":
        raise _Refusal(f"{where}: its forward layer has go_backwards={fwd.direction == 'backward'} "
                       f"and its backward layer go_backwards={bwd.direction == 'backward'}: fastcell's "
                       "bidirectional layer runs the first forwards and the second backwards")
    for attr in ("kind", "type", "units", "nonlinearity", "reset_after", "use_bias", "dtype"):
        a, b = getattr(fwd, attr), getattr(bwd, attr)
        if a != b:
            raise _Refusal(f"{where}: its backward layer has {attr} {b!r}, its forward layer {a!r}: "
                           "fastcell's bidirectional layer runs one cell type and size both ways")
    for key in ("return_sequences", "return_state", "stateful"):
        if fwd.options[key] != bwd.options[key]:
            raise _Refusal(f"{where}: its halves differ in {key}")
    options = {k: v for k, v in fwd.options.items() if k not in ("zero_output_for_mask",)}
    options["merge_mode"] = merge
    _dtype(cfg.get("dtype"), where)    # its halves' dtype is the weights'; this one casts only
    cells = [[["forward_layer", *f[0]], ["backward_layer", *b[0]]] for f, b in zip(fwd.cells, bwd.cells)]
    return _Spec(fwd.kind, f"Bidirectional({fwd.type})", fwd.units, fwd.nonlinearity,
                 fwd.reset_after, fwd.use_bias, fwd.dtype, "bidirectional", options, cells)


def _parse(found):
    where = f"layer {found.path!r}"
    cls = _class(found.entry)
    if cls == "Bidirectional":
        return _bidirectional(found.entry, where)
    return _recurrent(found.entry, where)


def _is_recurrent(entry):
    """Keras' recurrent layers, and custom classes with their config (to be listed, and refused)."""
    cls = _class(entry)
    if _is_builtin(entry):
        return cls in _LAYER_KINDS or cls in _WRAPPERS or cls in _OTHER_RECURRENT
    cfg = entry.get("config") if isinstance(entry, dict) else None
    return isinstance(cfg, dict) and "return_sequences" in cfg and ("units" in cfg or "cell" in cfg)


# ---- the model's structure: where each recurrent layer is, and its mask ----

def _tensor(arg):
    """(layer name, node index, tensor index) of a serialized KerasTensor, else None."""
    if isinstance(arg, dict) and arg.get("class_name") == "__keras_tensor__":
        hist = (arg.get("config") or {}).get("keras_history")
        if isinstance(hist, list) and len(hist) == 3 and isinstance(hist[0], str):
            return tuple(hist)
    return None


def _first_tensor(args):
    """The first KerasTensor in a call's positional arguments (descending into lists)."""
    for a in args if isinstance(args, list) else []:
        t = _tensor(a)
        if t is not None:
            return t
        if isinstance(a, list):
            t = _first_tensor(a)
            if t is not None:
                return t
    return None


def _tensors(args):
    out = []
    for a in args if isinstance(args, list) else []:
        t = _tensor(a)
        if t is not None:
            out.append(t)
        elif isinstance(a, (list, dict)):
            out += _tensors(list(a.values()) if isinstance(a, dict) else a)
    return out


def _endpoints(value):
    """[(name, node, tensor)] of a Functional config's input_layers or output_layers (a list of
    such triples, or one)."""
    if isinstance(value, list) and len(value) == 3 and isinstance(value[0], str):
        value = [value]
    out = []
    for v in value if isinstance(value, list) else []:
        if isinstance(v, list) and len(v) == 3 and isinstance(v[0], str):
            out.append(tuple(v))
    return out


def _describe_mask(mask):
    """Where a mask comes from, for a listing: the layer that makes it, a model input, or why it
    is unknown."""
    kind = mask[0]
    if kind == "masking":
        return f"Masking {mask[2]!r} (mask_value={mask[1]!r})" if mask[2] else \
            f"ops.any(x != {mask[1]!r}, axis=-1)"
    if kind == "tokens":
        return f"Embedding {mask[1]!r} (mask_zero=True)" if mask[1] else "ops.not_equal(x, 0)"
    if kind == "input":
        return f"the model input {mask[1]!r}"
    return mask[1]


class _Walker:
    """Walks a model's config (Sequential, Functional, nested), finding its recurrent layers with
    their masks, in the order keras_layers lists them (depth first, config order)."""

    def __init__(self, source):
        self.source = source
        self.found = []

    def model(self, entry, prefix, ref, in_mask):
        """Collects the recurrent layers of a Sequential or Functional entry; returns its output
        mask."""
        cls = _class(entry)
        cfg = _config(entry, f"model {prefix or _entry_name(entry)!r}")
        entries = cfg.get("layers")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise _Refusal(f"model {prefix!r}: its config has no list of layers")
        if cls == "Sequential":
            layers = entries[1:] if entries and _class(entries[0]) == "InputLayer" else entries
            names, classes = [_entry_name(e) for e in layers], [_class(e) for e in layers]
            mask, prev = in_mask, None
            for i, e in enumerate(layers):
                ref_i = self._ref(e, ref, names, classes, i)
                path = f"{prefix}/{names[i]}" if prefix else names[i]
                if _is_recurrent(e):
                    self.found.append(_Found(e, names[i], path, ref_i, prefix, mask,
                                             (prev, 0, 0) if prev else None))
                mask = self.transfer(e, mask, 0, path, ref_i)
                prev = names[i]
            return mask
        return _Graph(self, cfg, prefix, ref).walk(in_mask)

    def _ref(self, e, model_ref, names, classes, i):
        """Where a layer's variables are: found only for the recurrent layers and nested models."""
        if _is_recurrent(e) or (_class(e) in _MODELS and _is_builtin(e)):
            return self.source.layer(model_ref, names, classes, i)
        return None

    def transfer(self, e, mask, tensor_index, path, ref):
        """The mask on a layer's output, given the mask it was fed."""
        cls = _class(e)
        builtin = _is_builtin(e)
        cfg = e.get("config") if isinstance(e.get("config"), dict) else {}
        if builtin and cls in _MODELS:
            return self.model(e, path, ref, mask)
        if builtin and cls == "Masking":
            return ("masking", cfg.get("mask_value", 0.0), _entry_name(e))
        if builtin and cls == "Embedding":
            return ("tokens", _entry_name(e)) if cfg.get("mask_zero") else None
        if builtin and _is_recurrent(e):     # output 0 keeps the mask with return_sequences
            inner = cfg.get("layer") if cls == "Bidirectional" else None
            seqs = (inner.get("config", {}) if isinstance(inner, dict) else cfg).get("return_sequences")
            return mask if seqs is True and tensor_index == 0 else None
        if mask is None:
            return None
        if builtin and cls in _MASK_PASS:
            return mask
        if builtin and (cls in _MASK_DROP or (cls == "Lambda" and cfg.get("mask") is None)):
            return None     # supports_masking False: Keras drops the mask (and warns)
        if mask[0] == "unknown":
            return mask
        what = "a custom layer" if not builtin else "a layer"
        return ("unknown", f"an unknown mask: the mask of {_describe_mask(mask)} goes through "
                           f"{what} {_entry_name(e)!r} ({cls}), which fastcell cannot tell whether "
                           "it keeps, changes or drops")


class _Graph:
    """A Functional model's layers and the tensors between them (config.json's inbound_nodes)."""

    def __init__(self, walker, cfg, prefix, ref):
        self.walker, self.cfg, self.prefix, self.ref = walker, cfg, prefix, ref
        self.entries = cfg["layers"]
        self.by_name = {}
        for e in self.entries:
            self.by_name.setdefault(_entry_name(e), e)
        layers = [e for e in self.entries if not _is_op(e)]
        self.names = [_entry_name(e) for e in layers]
        self.classes = [_class(e) for e in layers]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.masks = {}      # (name, node, tensor) -> the mask on that output
        self.runtime = {}    # (name, node, tensor) -> its run-time-only mask (runtime_only)

    def walk(self, in_mask):
        inputs = _endpoints(self.cfg.get("input_layers"))
        if inputs:   # a nested model's first input carries the mask it was called with
            self.masks[inputs[0]] = in_mask
        for e in self.entries:
            if _is_op(e):
                continue
            name = _entry_name(e)
            raw = e.get("inbound_nodes")
            nodes = raw if isinstance(raw, list) else []
            nested = _class(e) in _MODELS and _is_builtin(e)
            if _is_recurrent(e) or nested:
                ref = self.walker._ref(e, self.ref, self.names, self.classes, self.index[name])
                path = f"{self.prefix}/{name}" if self.prefix else name
                fed = [self.fed(node) for node in nodes if isinstance(node, dict)]
                if nested:
                    # A nested model is walked once, with the mask of its first call.
                    out = self.walker.transfer(e, fed[0] if fed else None, 0, path, ref)
                    for k in range(len(nodes)):
                        self.masks[(name, k, 0)] = out
                else:
                    mask = fed[0] if fed else None
                    if any(m != mask for m in fed):
                        mask = ("unknown", f"an unknown mask: the layer is called {len(fed)} "
                                           "times with different masks")
                    first = nodes[0] if nodes and isinstance(nodes[0], dict) else {}
                    args = first.get("args", [])
                    kwargs = first.get("kwargs") if isinstance(first.get("kwargs"), dict) else {}
                    init = kwargs.get("initial_state") is not None or len(_tensors(args)) > 1
                    self.walker.found.append(_Found(e, name, path, ref, self.prefix, mask,
                                                    _first_tensor(args), init))
            # config.json lists a Functional model's layers in order, so with each layer's
            # masks known here, following a mask back never recurses past one layer.
            for k in range(len(nodes)):
                self.out_mask((name, k, 0))
                self.runtime_only((name, k, 0))
        outputs = _endpoints(self.cfg.get("output_layers"))
        return self.out_mask(outputs[0]) if outputs else None

    def fed(self, node, depth=0):
        """The mask a layer gets in one call. Keras records the mask a layer got when the model
        was traced: a tensor (resolved by mask_tensor), or null for none. At run time a layer
        also gets the mask on its input (Layer.__call__, when the input is its one tensor
        argument: a layer called with initial_state tensors too gets none), which can differ
        from the traced one only where a nested model made it (runtime_only)."""
        kwargs = node.get("kwargs") if isinstance(node.get("kwargs"), dict) else {}
        args = node.get("args") if isinstance(node.get("args"), list) else []
        first = _first_tensor(args)
        if "mask" in kwargs:
            explicit = _tensor(kwargs["mask"])
            if explicit is not None:
                return self.mask_tensor(explicit)
            if kwargs["mask"] is not None:
                return ("unknown", f"an unknown mask: the layer's mask argument is "
                                   f"{str(kwargs['mask'])[:80]}")
            return self.runtime_only(first, depth + 1) if first else None
        tensor_args = sum(1 for a in args if _tensors([a]))
        tensor_args += sum(1 for k, v in kwargs.items() if k != "training" and _tensors([v]))
        return self.out_mask(first, depth + 1) if first and tensor_args == 1 else None

    def runtime_only(self, hist, depth=0):
        """The mask on a tensor at run time that tracing did not see: one a nested model makes
        (or, inside a nested model, the mask it is called with), carried on by the layers that
        hand masks on."""
        if hist in self.masks:
            return self.masks[hist]
        if hist in self.runtime:
            return self.runtime[hist]
        if depth > _MAX_DEPTH:
            return ("unknown", "an unknown mask: the model's graph is too deep to follow")
        self.runtime[hist] = None       # a cycle (a malformed file) ends here
        self.runtime[hist] = mask = self._runtime_only(hist, depth)
        return mask

    def _runtime_only(self, hist, depth):
        e = self.by_name.get(hist[0])
        if e is None or _is_op(e):
            return None
        cls, builtin = _class(e), _is_builtin(e)
        nodes = e.get("inbound_nodes") if isinstance(e.get("inbound_nodes"), list) else []
        node = nodes[hist[1]] if isinstance(hist[1], int) and 0 <= hist[1] < len(nodes) else None
        first = _first_tensor(node.get("args", [])) if isinstance(node, dict) else None
        if first is None or cls in ("Masking", "Embedding", "InputLayer") or (
                builtin and (cls in _MASK_DROP or (cls == "Lambda" and
                                                   (e.get("config") or {}).get("mask") is None))):
            return None
        if cls in _MODELS:
            return None     # walked in config order: its output mask is in self.masks already
        below = self.runtime_only(first, depth + 1)
        if below is None or below[0] == "unknown":
            return below
        return self.walker.transfer(e, below, hist[2], "", None)

    def out_mask(self, hist, depth=0):
        """The mask on the tensor (layer name, node index, tensor index)."""
        if hist in self.masks:
            return self.masks[hist]
        if depth > _MAX_DEPTH:
            return ("unknown", "an unknown mask: the model's graph is too deep to follow")
        self.masks[hist] = None   # a cycle (a malformed file) ends here
        e = self.by_name.get(hist[0])
        mask = None
        if e is not None and not _is_op(e):
            nodes = e.get("inbound_nodes") if isinstance(e.get("inbound_nodes"), list) else []
            node = nodes[hist[1]] if isinstance(hist[1], int) and 0 <= hist[1] < len(nodes) else None
            fed = self.fed(node, depth) if isinstance(node, dict) else None
            if _class(e) != "InputLayer" and not (_class(e) in _MODELS and _is_builtin(e)):
                mask = self.walker.transfer(e, fed, hist[2], "", None)
        self.masks[hist] = mask
        return mask

    def mask_tensor(self, hist):
        """What an explicit mask tensor is: Masking's any(x != v, axis=-1), Embedding's
        tokens != 0, a model input, or unknown."""
        e = self.by_name.get(hist[0])
        cls = _class(e) if e else "?"
        node = None
        if e is not None:
            nodes = e.get("inbound_nodes") if isinstance(e.get("inbound_nodes"), list) else []
            node = nodes[hist[1]] if isinstance(hist[1], int) and 0 <= hist[1] < len(nodes) else None
        if e is not None and cls == "InputLayer":
            return ("input", hist[0])
        if e is not None and _is_op(e) and isinstance(node, dict):
            args = node.get("args", [])
            cfg = e.get("config") if isinstance(e.get("config"), dict) else {}
            if cls == "Any" and cfg.get("axis") == -1 and not cfg.get("keepdims"):
                inner = _first_tensor(args)
                ne = self.by_name.get(inner[0]) if inner else None
                if ne is not None and _class(ne) == "NotEqual" and _is_op(ne):
                    value = self._not_equal_value(ne, inner[1])
                    if value is not None:
                        src = self._source_layer(ne, inner[1], "Masking")
                        return ("masking", value, src)
            if cls == "NotEqual":
                value = self._not_equal_value(e, hist[1])
                if value == 0:
                    src = self._source_layer(e, hist[1], "Embedding")
                    return ("tokens", src)
        return ("unknown", f"an unknown mask: the layer's mask is computed by {cls} "
                           f"{hist[0]!r}, not by a Masking or Embedding(mask_zero=True) layer")

    def _not_equal_value(self, e, k):
        nodes = e.get("inbound_nodes") or []
        node = nodes[k] if isinstance(k, int) and 0 <= k < len(nodes) else {}
        args = node.get("args", []) if isinstance(node, dict) else []
        if len(args) == 2 and _tensor(args[0]) and isinstance(args[1], (int, float)) \
                and not isinstance(args[1], bool):
            return args[1]
        return None

    def _source_layer(self, op, k, cls):
        """The name of the Masking/Embedding layer that reads the same tensor as a mask op."""
        node = (op.get("inbound_nodes") or [{}])[k]
        t = _first_tensor(node.get("args", []))
        for e in self.entries:
            if _class(e) == cls and _is_builtin(e):
                for n in e.get("inbound_nodes") or []:
                    if isinstance(n, dict) and _first_tensor(n.get("args", [])) == t:
                        return _entry_name(e)
        return None


# ---- where the variables come from ----

class _FileSource:
    """Variables of a .keras file (model.weights.h5), by the paths Keras writes them under; a
    layer's reference is its group path."""

    def __init__(self, archive):
        self.archive = archive
        self.weights = archive.weights

    def layer(self, model_ref, names, classes, i):
        return self.weights.layer_path(model_ref, names, classes, i)

    def _path(self, ref, rel):
        parts = [ref] + [p if isinstance(p, str) else f"{p[0]}/{p[2]}" for p in rel]
        return "/".join(parts)

    def variables(self, ref, rel, where):
        """{key: dataset} of the object at rel under a layer (nothing read yet)."""
        if ref is None:
            return {}
        return self.weights.variables(self._path(ref, rel))

    def where(self, ref, rel):
        return f"{self._path(ref or '?', rel)}/vars"

    def read(self, handle, shape, what):
        return self.weights.read(handle, shape, what)


class _LiveSource:
    """Variables of live Keras objects: the arrays ``save_own_variables`` hands Keras' saver, by
    the same paths; a layer's reference is the layer object."""

    def layer(self, model_ref, names, classes, i):
        return model_ref.get_layer(names[i])

    def variables(self, ref, rel, where):
        obj = ref
        for p in rel:
            obj = getattr(obj, p) if isinstance(p, str) else getattr(obj, p[0])[p[1]]
        store = {}
        obj.save_own_variables(store)
        return {k: np.asarray(v) for k, v in store.items()}

    def where(self, ref, rel):
        return "/".join(p if isinstance(p, str) else f"{p[0]}[{p[1]}]" for p in rel)

    def read(self, handle, shape, what):
        if handle.shape != tuple(shape):
            raise _Refusal(f"{what} has shape {handle.shape}, expected {tuple(shape)}")
        if handle.dtype not in (np.float32, np.float64):
            raise _Refusal(f"{what} has dtype {handle.dtype}; fastcell computes in float32 or "
                           "float64")
        return np.array(handle, copy=True)


# ---- the model ----

class _Model:
    """A Keras source (a live object or an opened .keras file): its recurrent layers found and
    described, and their conversion. ``fail`` makes the error for what the source holds."""

    def __init__(self, obj):
        self.archive = None
        if isinstance(obj, (str, bytes, bytearray, memoryview)) or hasattr(obj, "__fspath__"):
            self.archive = KerasArchive(obj)
            self.source = _FileSource(self.archive)
            root, ref, self.label = self.archive.config, "", self.archive.label
        else:
            root, ref, self.label = _serialize(obj), obj, None
            self.source = _LiveSource()
        with self.errors():
            self.walker = _Walker(self.source)
            self._walk(root, ref)
        self.found = self.walker.found

    def close(self):
        if self.archive is not None:
            self.archive.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def fail(self, message):
        if self.archive is not None:
            return self.archive.fail(message)
        return ValueError(message)

    def errors(self):
        """Refusals raised as FormatError (a file) or ValueError (an object); for a file, any
        error in reading it as FormatError too."""
        return _Errors(self)

    def _walk(self, root, ref):
        cls = _class(root)
        if cls in _MODELS and _is_builtin(root):
            self.walker.model(root, "", ref, None)
        elif _is_recurrent(root) and self.archive is None:
            name = _entry_name(root)
            self.walker.found.append(_Found(root, name, name, ref, ""))
        elif not _is_builtin(root):
            raise _Refusal(f"the model is a subclassed Keras model ({cls!r}): its config does not "
                           "describe its layers; convert its recurrent layer itself, e.g. "
                           "fastcell.from_keras(model.lstm)")
        elif self.archive is None:
            raise _Refusal(f"obj is a Keras {cls} layer: expected a recurrent layer (SimpleRNN, GRU, "
                           "LSTM, RNN, Bidirectional), a Sequential or Functional model, or the path "
                           "of a .keras file")
        else:
            raise _Refusal(f"config.json describes a {cls!r}, expected a Sequential or Functional "
                           "model")

    # -- listing --

    def describe(self, i):
        f = self.found[i]
        try:
            parsed = self._parse(f)
        except _Refusal as exc:
            units = (f.entry.get("config") or {}).get("units") if isinstance(f.entry.get("config"), dict) else None
            return KerasLayer(i, f.name, f.path, _class(f.entry), None, None,
                              units if isinstance(units, int) else None, 1, "?",
                              {}, _mask_text(f.mask), str(exc))
        options = dict(parsed.options)
        if f.initial_state:
            options["initial_state"] = "from the graph"
        input_size = self._input_size(f, parsed)
        return KerasLayer(i, f.name, f.path, parsed.type, parsed.kind, input_size, parsed.units,
                          len(parsed.cells), parsed.direction, options, _mask_text(f.mask))

    def _parse(self, f):
        if _class(f.entry) in _OTHER_RECURRENT:
            raise _Refusal(f"layer {f.path!r} is a {_class(f.entry)}: fastcell computes no "
                           "convolutional recurrence")
        parsed = _parse(f)
        if f.mask is not None and f.mask[0] == "unknown":
            raise _Refusal(f"layer {f.path!r} is masked by {f.mask[1]}; fastcell takes the lengths "
                           "of right-padded sequences (a Masking or Embedding(mask_zero=True) mask). "
                           "Convert the layer itself (from_keras(model.get_layer(name))) and pass "
                           "lengths if its mask is right-padded")
        return parsed

    def _input_size(self, f, parsed):
        v = self.source.variables(f.ref, parsed.cells[0][0], "")
        kernel = v.get("0")
        return int(kernel.shape[0]) if kernel is not None and len(kernel.shape) == 2 else None

    # -- choosing --

    def listing(self):
        n = len(self.found)
        text = "; ".join(self.describe(i).describe() for i in range(min(n, 12)))
        return text + (f"; and {n - 12} more" if n > 12 else "")

    def select(self, layer):
        """Indices of the chosen recurrent layers (several: a stack)."""
        if isinstance(layer, (list, tuple)):
            if not layer:
                raise ValueError("layer: an empty list; give one layer, or several to stack")
            chosen = [self._one(x) for x in layer]
            if len(set(chosen)) != len(chosen):
                raise ValueError(f"layer: {list(layer)!r} names a layer twice")
            return chosen
        return [self._one(layer)]

    def _one(self, layer):
        def matches(name):      # an exact path first: a nested layer may share a name
            return [[i for i, f in enumerate(self.found) if f.path == name],
                    [i for i, f in enumerate(self.found) if name in (f.path, f.name)]]

        def empty():
            return self.fail("no recurrent layer in the model (fastcell converts SimpleRNN, GRU, "
                             "LSTM, RNN and Bidirectional layers)")

        return choose(layer, len(self.found), argument="layer", item="recurrent layer",
                      named="recurrent layer", listing=self.listing, matches=matches,
                      index_hint="give its index, or a list of them to stack",
                      ambiguous_hint="give its path or index",
                      expected="a layer name, an index, a list of them or None", empty=empty)

    # -- converting --

    def parsed(self, chosen):
        return [(self.found[i], self._parse(self.found[i])) for i in chosen]

    def convert(self, specs):
        f0, s0 = specs[0]
        D = 2 if s0.direction == "bidirectional" else 1
        H, G = s0.units, spec.GATES[s0.kind]
        dtype = np.dtype(s0.dtype)
        weights, k, input_size = {}, 0, None
        for f, s in specs:
            for cell_paths in s.cells:
                for d, rel in enumerate(cell_paths):
                    I = input_size if k == 0 else D * H
                    w = self._cell_weights(f, s, rel, I, H, G, dtype)
                    if k == 0 and d == 0:
                        input_size = w["weight_ih"].shape[1]
                    elif w["weight_ih"].shape[1] != (input_size if k == 0 else D * H):
                        raise _Refusal(f"layer {f.path!r}: its kernel has {w['weight_ih'].shape[1]} "
                                       f"rows, expected {input_size if k == 0 else D * H}")
                    weights.update({n + spec.suffix(k, d): v for n, v in w.items()})
                k += 1
        config = {"input_size": input_size, "hidden_size": H, "num_layers": k,
                  "bias": s0.use_bias, "batch_first": True, "bidirectional": D == 2,
                  "reverse": s0.direction == "backward", "dtype": dtype}
        if s0.kind == "rnn":
            config["nonlinearity"] = s0.nonlinearity
        elif s0.kind == "gru":
            config["reset_after"] = s0.reset_after
        return LAYERS[s0.kind](**config, weights=weights)

    def _cell_weights(self, f, s, rel, I, H, G, dtype):
        """PyTorch's names (no suffix) for one cell's variables: kernel, recurrent_kernel, bias."""
        where = self.source.where(f.ref, rel)
        v = self.source.variables(f.ref, rel, where)
        want = ["0", "1"] + (["2"] if s.use_bias else [])
        roles = {"0": "kernel", "1": "recurrent_kernel", "2": "bias"}
        if not v:
            raise _Refusal(f"layer {f.path!r}: no variables at {where}"
                           + ("" if self.archive else " (the layer is not built: call it on an "
                              "input first)"))
        missing = [f"{k} ({roles[k]})" for k in want if k not in v]
        extra = sorted(k for k in v if k not in want)
        if missing or extra:
            raise _Refusal(f"layer {f.path!r}: the variables at {where} are "
                           f"{sorted(v) or 'none'}, expected {want} (kernel, recurrent_kernel"
                           + (", bias" if s.use_bias else "; use_bias is false") + ")"
                           + (f"; missing {', '.join(missing)}" if missing else ""))
        kshape = v["0"].shape
        if len(kshape) != 2 or kshape[1] != G * H or kshape[0] == 0 or (I is not None and kshape[0] != I):
            raise _Refusal(f"layer {f.path!r}: {where}/0 (kernel) has shape {tuple(kshape)}, expected "
                           f"({'input_size' if I is None else I}, {G * H}) for units {H}")
        I = kshape[0]
        kernel = self.source.read(v["0"], (I, G * H), "kernel")
        recurrent = self.source.read(v["1"], (H, G * H), "recurrent_kernel")
        for name, a in (("kernel", kernel), ("recurrent_kernel", recurrent)):
            if a.dtype != dtype:
                raise _Refusal(f"layer {f.path!r}: {name} has dtype {a.dtype}, the layer's dtype "
                               f"is {dtype}")
        order = spec.KERAS_GATE_ORDER[s.kind]
        out = {"weight_ih": spec.reorder(kernel.T, order, H),
               "weight_hh": spec.reorder(recurrent.T, order, H)}
        if s.use_bias:
            two = s.kind == "gru" and s.reset_after
            bias = self.source.read(v["2"], (2, G * H) if two else (G * H,), "bias")
            if bias.dtype != dtype:
                raise _Refusal(f"layer {f.path!r}: bias has dtype {bias.dtype}, the layer's dtype "
                               f"is {dtype}")
            # Keras adds one bias to the input product (reset-before GRU: W_hn (r*h) has none).
            ih, hh = (bias[0], bias[1]) if two else (bias, np.zeros_like(bias))
            out["bias_ih"] = spec.reorder(ih, order, H)
            out["bias_hh"] = spec.reorder(hh, order, H)
        return out

    @staticmethod
    def check_stack(specs):
        """Several layers become one multi-layer model only where Keras computes the same thing:
        one type and direction, each fed by the previous one's whole sequence (ValueError: a
        choice of layers, not the model, is wrong)."""
        (f0, s0) = specs[0]
        for (fp, sp), (f, s) in zip(specs, specs[1:]):
            where = f"layer: stacking {fp.path!r} and {f.path!r}"
            if f.container != fp.container:
                raise ValueError(f"{where}: they sit in different models "
                                 f"({fp.container or 'the top model'!r} and "
                                 f"{f.container or 'the top model'!r})")
            for attr in ("kind", "units", "nonlinearity", "reset_after", "use_bias", "dtype",
                         "direction"):
                if getattr(s, attr) != getattr(s0, attr):
                    raise ValueError(f"{where}: {f.path!r} has {attr} {getattr(s, attr)!r}, "
                                   f"{f0.path!r} {getattr(s0, attr)!r}; a fastcell model's layers "
                                   "share one cell type, size and direction")
            if s.direction == "backward":
                raise ValueError(f"{where}: go_backwards layers return their sequence reversed, so the "
                               "second reads the first's output backwards in time, which a fastcell "
                               "reverse stack does not compute; convert each alone")
            if not sp.options["return_sequences"]:
                raise ValueError(f"{where}: {fp.path!r} has return_sequences=False, so it does not "
                               "feed a sequence to the next")
            if sp.direction == "bidirectional" and sp.options["merge_mode"] != "concat":
                raise ValueError(f"{where}: {fp.path!r} has merge_mode={sp.options['merge_mode']!r}; "
                               "a fastcell bidirectional stack feeds each layer both halves "
                               "side by side (merge_mode='concat')")
            if f.feeds_from is None or f.feeds_from[0] != fp.name or f.feeds_from[2] != 0:
                src = "nothing" if f.feeds_from is None else repr(f.feeds_from[0])
                raise ValueError(f"{where}: {f.path!r} reads the output of {src}, not of "
                               f"{fp.path!r}")


class _Errors:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, (FormatError, MemoryError)):
            return False
        if isinstance(exc, _Refusal):
            raise self.model.fail(str(exc)) from None
        if self.model.archive is not None and not isinstance(exc, (ImportError, KeyboardInterrupt)):
            with self.model.archive.errors():
                raise exc
        return False


def _mask_text(mask):
    return None if mask is None else _describe_mask(mask)


def _serialize(obj):
    """The config Keras writes for a live object in config.json: serialized, then through JSON,
    as Keras' saver does (tuples become lists), so the file's reading applies as it is."""
    module = type(obj).__module__
    if module.split(".")[0] != "keras" or not hasattr(obj, "get_config"):
        raise TypeError(f"obj: expected a Keras layer or model, or the path (or bytes) of a .keras "
                        f"file, got {module}.{type(obj).__qualname__}")
    import keras

    try:
        config = keras.saving.serialize_keras_object(obj)
        return json.loads(json.dumps(config))
    except Exception as exc:    # a custom layer without get_config, say: Keras' error, in a sentence
        raise ValueError(f"obj: Keras cannot describe this {type(obj).__name__} "
                         f"({type(exc).__name__}: {str(exc)[:200]}); convert its recurrent layer "
                         "itself: fastcell.from_keras(model.get_layer(name))") from None


# ---- the public functions ----

def keras_layers(obj):
    """The recurrent layers of a Keras model: a list of ``KerasLayer`` (index, name, path, type,
    cell, sizes, direction, options, mask, and why one would be refused), depth first in the
    model's order, nested models included.

    obj: a Keras layer or model (Sequential or Functional), or the path (or bytes) of a .keras
    file, read without Keras (needs h5py). Raises FormatError for a file it cannot read.
    """
    with _Model(obj) as model, model.errors():
        return [model.describe(i) for i in range(len(model.found))]


def from_keras(obj, layer=None, *, threads=1):
    """The fastcell layer of a Keras recurrent layer, with its weights.

    obj: a Keras recurrent layer or model, or the path (or bytes) of a .keras file (read without
    Keras or TensorFlow: needs h5py). layer: for a model, the recurrent layer to convert: its
    name (or "outer/inner" path), its index in ``keras_layers(obj)``, or None when the model has
    just one; a list of them converts a stack of layers into one multi-layer model where Keras
    computes the same (one type, size and direction, each reading the previous one's whole
    sequence; not go_backwards).

    Returns ``fastcell.RNN`` (SimpleRNN, tanh or relu), ``GRU`` (reset_after as Keras'), or
    ``LSTM``: ``batch_first=True`` as Keras' inputs, ``reverse=True`` for go_backwards,
    ``bidirectional=True`` for Bidirectional (any merge_mode), ``bias=use_bias``, in the weights'
    dtype. Its output is fastcell's (PyTorch's) layout; ``keras_outputs`` gives Keras'.

    Raises ValueError (FormatError for a file) naming the attribute for what fastcell does not
    compute: an activation other than tanh (or relu for SimpleRNN), a recurrent_activation other
    than sigmoid, a dtype other than float32/float64, a custom layer or cell, a mask fastcell
    cannot follow; and FormatError for a file it cannot read. threads: the layer's
    (``layer.threads``).
    """
    threads = check_threads(threads)
    with _Model(obj) as model:
        chosen = model.select(layer)
        with model.errors():
            specs = model.parsed(chosen)
        model.check_stack(specs)
        with model.errors():
            converted = model.convert(specs)
    return with_threads(converted, threads)


def keras_outputs(model, x, *, lengths=None, mask=None, initial_state=None,
                  return_sequences=False, return_state=False, merge_mode="concat",
                  zero_output_for_mask=None):
    """Run a fastcell layer (from ``from_keras``) on Keras' inputs and return what the Keras layer
    returns, in its layout (``**KerasLayer.output_options`` gives the layer's keywords).

    x (B, T, I), as Keras takes it. lengths (B,) in [0, T], or mask (B, T) of booleans that must
    be right-padded (each row True then False): the steps a Masking or Embedding(mask_zero=True)
    layer would let through; a sequence of length 0 keeps its initial state, as in Keras.
    initial_state: as Keras' ``initial_state``: [h] (SimpleRNN, GRU) or [h, c] (LSTM), each (B, H),
    for a Bidirectional layer the forward half's then the backward half's ([h_f, c_f, h_b, c_b]);
    for a multi-layer model one such list per layer (None for a layer left at its default).
    Missing: the layer's initial state (zeros).

    What differs from fastcell's own output, and is done here: Keras returns a go_backwards
    layer's sequence in the order it processed it (reversed in time); a masked step repeats the
    last output where fastcell gives zeros (unless zero_output_for_mask, which a Bidirectional
    layer forces when it returns sequences); return_sequences=False returns the last output; a
    Bidirectional layer merges its halves by merge_mode ("concat", "sum", "mul", "ave", or None
    for both); return_state appends the final states, per direction ([h_f, c_f, h_b, c_b]), for a
    multi-layer model one list per layer (as an RNN of stacked cells returns them).

    Returns the output array, or a tuple: (output, *states), (forward, backward) for merge_mode
    None, (forward, backward, *states) for both.
    """
    from fastcell.models import is_model

    if not is_model(model) or not hasattr(model, "num_layers"):
        raise TypeError(f"model: expected a fastcell layer (as from_keras gives), got "
                        f"{type(model).__name__}")
    x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"x: expected Keras' (batch, timesteps, features) input, got shape {x.shape}")
    B, T = x.shape[:2]
    L, D, H = model.num_layers, model.num_directions, model.output_size
    if D == 2:
        if merge_mode not in _MERGE_MODES:
            raise ValueError(f"merge_mode: expected one of {list(_MERGE_MODES)}, got {merge_mode!r}")
        if zero_output_for_mask not in (None, return_sequences):
            raise ValueError(f"zero_output_for_mask: Keras' Bidirectional sets it to "
                             f"return_sequences ({return_sequences}), got {zero_output_for_mask}")
        zero = return_sequences
    else:
        if merge_mode != "concat":
            raise ValueError(f"merge_mode: only for a bidirectional layer, got {merge_mode!r}")
        zero = bool(zero_output_for_mask)
    lens = _keras_lengths(lengths, mask, B, T)
    init = _keras_initial(model, initial_state, B)

    live = np.arange(B) if lens is None else np.flatnonzero(lens > 0)
    out = np.zeros((B, T, D * H), model.dtype)
    final = [a.copy() for a in init]
    if live.size:
        sub = x[live] if model.batch_first else x[live].transpose(1, 0, 2)
        hx = [a[:, live] for a in init]
        sub_lens = None if lens is None or (lens[live] == T).all() else lens[live]
        y, state = model(sub, tuple(hx) if model.has_cell_state else hx[0], lengths=sub_lens)
        y = y if model.batch_first else y.transpose(1, 0, 2)
        out[live, :y.shape[1]] = y
        for a, s in zip(final, state if model.has_cell_state else (state,)):
            a[:, live] = s

    halves = []
    for d in range(D):
        y = out[..., d * H:(d + 1) * H]
        if d == 1 or model.reverse:
            seq = y[:, ::-1]        # processing order: masked steps come first, as zeros
        else:
            seq = y.copy()
            if lens is not None and not zero:   # a masked step repeats the last output
                for b in np.flatnonzero((lens > 0) & (lens < T)):
                    seq[b, lens[b]:] = y[b, lens[b] - 1]
        half = seq if return_sequences else seq[:, -1]
        if d == 1 and return_sequences:
            half = half[:, ::-1]    # Bidirectional aligns the backward half with the input
        halves.append(np.ascontiguousarray(half))
    if D == 1:
        outputs = (halves[0],)
    elif merge_mode == "concat":
        outputs = (np.concatenate(halves, axis=-1),)
    elif merge_mode == "sum":
        outputs = (halves[0] + halves[1],)
    elif merge_mode == "ave":
        outputs = ((halves[0] + halves[1]) / 2,)
    elif merge_mode == "mul":
        outputs = (halves[0] * halves[1],)
    else:
        outputs = tuple(halves)
    if not return_state:
        return outputs[0] if len(outputs) == 1 else outputs
    per_layer = [[a[k * D + d] for d in range(D) for a in final] for k in range(L)]
    states = per_layer[0] if L == 1 else per_layer
    return (*outputs, *states)


def _keras_lengths(lengths, mask, B, T):
    """Per-sequence step counts (int64, in [0, T]) from lengths or a right-padded mask, or None."""
    if lengths is not None and mask is not None:
        raise ValueError("lengths, mask: give one of them")
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != (B, T):
            raise ValueError(f"mask: expected shape {(B, T)} (batch, timesteps), got {m.shape}")
        m = m.astype(bool)
        lens = m.sum(axis=1)
        bad = np.flatnonzero((m != (np.arange(T) < lens[:, None])).any(axis=1))
        if bad.size:
            b = int(bad[0])
            t = int(np.flatnonzero(m[b] != (np.arange(T) < lens[b]))[0])
            how = "kept after a masked step" if m[b, t] else "masked before a kept step"
            raise ValueError(f"mask: sequence {b} is not right-padded (step {t} is {how}): fastcell "
                             "computes masks that keep each sequence's first steps and mask the rest "
                             "(lengths)")
        return lens.astype(np.int64)
    if lengths is None:
        return None
    arr = np.asarray(lengths)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"lengths: expected integers, got dtype {arr.dtype}")
    if arr.shape != (B,):
        raise ValueError(f"lengths: expected shape {(B,)}, got {arr.shape}")
    if B and (arr.min() < 0 or arr.max() > T):
        raise ValueError(f"lengths: expected values in [0, {T}], got min {arr.min()}, max {arr.max()}")
    return arr.astype(np.int64)


def _keras_initial(model, initial_state, B):
    """[h_0 (L*D, B, H_out)] (and c_0) for the call, from Keras' initial_state lists, the
    layer's initial state, or zeros."""
    L, D = model.num_layers, model.num_directions
    sizes = [("h", model.output_size)] + ([("c", model.hidden_size)] if model.has_cell_state else [])
    default = model.initial_state
    if default is not None and not model.has_cell_state:
        default = (default,)
    init = [np.repeat(np.asarray(default[j])[:, None, :], B, axis=1).astype(model.dtype)
            if default is not None else np.zeros((L * D, B, size), model.dtype)
            for j, (_, size) in enumerate(sizes)]
    if initial_state is None:
        return init
    per = D * len(sizes)
    what = "[" + ", ".join(f"{n}_{h}" if D == 2 else n for h in ("f", "b")[:D] for n, _ in sizes) + "]"
    if L == 1:
        layers = [initial_state]
    else:
        if not isinstance(initial_state, (list, tuple)) or len(initial_state) != L:
            raise ValueError(f"initial_state: a {L}-layer model takes one list per layer "
                             f"({L} lists of {what}, or None for a layer), got "
                             f"{type(initial_state).__name__}")
        layers = list(initial_state)
    for k, st in enumerate(layers):
        if st is None:
            continue
        name = "initial_state" if L == 1 else f"initial_state[{k}]"
        if per == 1 and not isinstance(st, (list, tuple)):
            st = [st]
        if not isinstance(st, (list, tuple)) or len(st) != per:
            raise ValueError(f"{name}: expected {what}, got "
                             + (f"{len(st)} arrays" if isinstance(st, (list, tuple)) else type(st).__name__))
        for d in range(D):
            for j, (n, size) in enumerate(sizes):
                a = np.asarray(st[d * len(sizes) + j])
                if a.shape != (B, size):
                    raise ValueError(f"{name}: {n}{'_' + 'fb'[d] if D == 2 else ''} expected shape "
                                     f"{(B, size)}, got {a.shape}")
                init[j][k * D + d] = a
    return init
