"""From PyTorch's dynamic quantized modules (``torch.ao.quantization.quantize_dynamic``, qint8) to
int8 fastcell models holding exactly their int8 weights and scales.

What torch keeps, and where (torch.ao.nn.quantized.dynamic.modules.rnn):
- LSTM / GRU: ``_all_weight_values``, one PackedParameter per layer and direction (index
  layer * D + direction), whose ``param`` is a CellParamsBase. Its ``__getstate__()`` is
  ((tag, [b_ih, b_hh], [], [reduce_range], [packed_ih, packed_hh]), class name), the tag
  "quantized_dynamic" for qint8 and "quantized_fp16" for float16.
- LSTMCell / GRUCell / RNNCell: ``_packed_weight_ih`` and ``_packed_weight_hh``.
Each packed_* is a LinearPackedParamsBase: ``torch.ops.quantized.linear_unpack`` gives back the
qint8 weight tensor and the float bias. The packed biases are the ones torch computes with (its
CPU cells add ``linear_ih(x) + linear_hh(h)``, each with its packed bias): a dynamic cell's
``bias_ih`` attribute is the random tensor its constructor made, not the model's bias.
"""

import sys

import numpy as np

from fastcell import spec
from fastcell.checks import float_array
from fastcell.formats.reduced import Reduced, input_bits_for
from fastcell.models import CELLS, LAYERS

__all__ = ["dynamic_quantized_kind", "from_dynamic_quantized"]

_QUANTIZED_MODULE = "torch.ao.nn.quantized.dynamic.modules.rnn"


def dynamic_quantized_kind(module):
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


def from_dynamic_quantized(module, kind, is_cell, input_bits=None):
    """The int8 fastcell model of a dynamic quantized module (its x quantized to input_bits)."""
    input_bits_for(input_bits, "int8")      # a bad value is refused before anything is read
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
        if kind == "rnn" and module.nonlinearity not in spec.NONLINEARITIES:
            raise ValueError(f"from_torch: {what}: nonlinearity {module.nonlinearity!r} is not "
                             "'tanh' or 'relu'")
        weights = {}
        for part in ("ih", "hh"):
            w, b = _unpack(module, getattr(module, f"_packed_weight_{part}"), f"weight_{part}")
            weights[f"weight_{part}"], weights[f"bias_{part}"] = w, b
        weights = _fill_biases(weights, [""])
        kw = {"nonlinearity": module.nonlinearity} if kind == "rnn" else {}
        return CELLS[kind](**weights, **kw, input_bits=input_bits)

    if not module.bias:
        # quantize_dynamic refuses bias=False; a layer built so holds the random biases its
        # constructor packed, and computes with them (GRU) or refuses to run (LSTM).
        raise ValueError(f"from_torch: {what} with bias=False: PyTorch's dynamic quantized layers "
                         "compute with the biases packed beside their weights, which such a layer "
                         "holds only as placeholders; quantize_dynamic makes layers with bias=True")
    D = 2 if module.bidirectional else 1
    suffixes = [s for _, _, s in spec.suffixes(module.num_layers, D)]
    packed = list(module._all_weight_values)
    if len(packed) != len(suffixes):
        raise ValueError(f"from_torch: {what} with num_layers={module.num_layers}, bidirectional="
                         f"{module.bidirectional} should hold {len(suffixes)} packed weight sets, "
                         f"it holds {len(packed)}")
    gates = spec.GATES[kind]
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
    return LAYERS[kind](**args, weights=weights, input_bits=input_bits)


def _unpack(module, packed, name):
    """(Reduced int8 weight, float32 bias or None) of one LinearPackedParams."""
    torch = sys.modules["torch"]
    try:
        qweight, bias = torch.ops.quantized.linear_unpack(packed)
    except RuntimeError as e:
        raise TypeError(f"from_torch: {_type_name(module)}: cannot read {name} as qint8 packed "
                        f"weights ({str(e).splitlines()[0]})") from None
    w = _int8_rows(qweight, f"{_type_name(module)} {name}")
    b = None if bias is None else float_array(bias, "bias" + name[len("weight"):]).astype(np.float32)
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
