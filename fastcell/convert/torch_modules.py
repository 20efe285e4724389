"""From PyTorch modules to fastcell: ``from_torch(module)``.

Never imports torch: it recognises torch modules through the torch the caller has already
imported (a dynamic quantized module through the torch.ao module its class comes from,
torch_quantized.py).
"""

import sys

import numpy as np

from fastcell import spec
from fastcell.checks import float_array
from fastcell.convert.torch_quantized import dynamic_quantized_kind, from_dynamic_quantized
from fastcell.models import CELLS, LAYERS, with_threads
from fastcell_c.team import check_threads

__all__ = ["from_torch"]


# ---- from_torch ----

def from_torch(module, *, threads=1, input_bits=None):
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
    for h, and ``input_bits`` for x: 16, the default, or 8 as fastcell.quantize takes it), so its
    outputs are close to the torch int8 module's, not bitwise equal. float16 dynamic
    quantization, and other quantized modules, raise TypeError.

    Anything else raises TypeError naming its type. threads: the model's (``model.threads``).
    """
    threads = check_threads(threads)
    return with_threads(_model(module, input_bits), threads)


def _model(module, input_bits=None):
    quantized = dynamic_quantized_kind(module)
    if quantized is not None:
        return from_dynamic_quantized(module, *quantized, input_bits=input_bits)
    if input_bits is not None:
        raise ValueError(f"input_bits: only for PyTorch's dynamic quantized (int8) modules, got "
                         f"input_bits={input_bits!r} for a float {type(module).__name__}; quantize "
                         "its fastcell model instead: fastcell.quantize(model, 'int8', "
                         "input_bits=8)")
    kind, is_cell = _torch_kind(module)
    dtype = _module_dtype(module)
    weights = {name: float_array(t, name) for name, t in module.state_dict().items()}
    if is_cell:
        kw = {"nonlinearity": module.nonlinearity} if kind == "rnn" else {}
        return CELLS[kind](**weights, **kw)
    args = dict(input_size=module.input_size, hidden_size=module.hidden_size,
                num_layers=module.num_layers, bias=module.bias, batch_first=module.batch_first,
                bidirectional=module.bidirectional, dtype=dtype)
    if kind == "rnn":
        args["nonlinearity"] = module.nonlinearity
    if kind == "lstm":
        args["proj_size"] = module.proj_size
    return LAYERS[kind](**args, weights=weights)


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
            if kind[0] == "rnn" and module.nonlinearity not in spec.NONLINEARITIES:
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


def _module_dtype(module):
    dtypes = {str(p.dtype).replace("torch.", "") for p in module.parameters()}
    if len(dtypes) != 1:
        raise TypeError(f"{type(module).__name__}: expected parameters of one dtype, got {sorted(dtypes)}")
    name = dtypes.pop()
    if name not in ("float32", "float64"):
        raise TypeError(f"{type(module).__name__}: fastcell computes in float32 or float64, the module's "
                        f"parameters are {name}; convert first, e.g. module.float() or module.double()")
    return np.dtype(name)
