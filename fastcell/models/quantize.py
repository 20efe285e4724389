"""``quantize(model, format)``: the same model with its weight matrices in a reduced format.

int8 keeps one float32 scale per output row (and quantizes the activations of every product per
row: fastcell_c/products_int8.h; each layer's input x to ``input_bits``, 16 or 8); bf16 rounds each
weight to nearest even. Biases and peepholes stay float32, and the model computes in float32 as
before: same class, same calls.
"""

import numpy as np

from fastcell.formats.reduced import REDUCED_FORMATS, input_bits_for, reduce
from fastcell.models.cells import _Cell
from fastcell.models.layers import _Layer
from fastcell.spec import is_matrix
from fastcell_c.team import check_threads

__all__ = ["quantize"]


def quantize(model, format, *, threads=None, input_bits=None):
    """A new model of the same class whose W_ih, W_hh (and W_hr) are int8 or bf16.

    model: a fastcell layer or cell in float32 or float64 (float64 weights are rounded to float32
    first). format: "int8" or "bf16". threads: the new model's (None: the model's). input_bits
    (int8 only): the bits to which each layer's input x is quantized per row on every call, 16
    (None: the default, the more exact) or 8 (faster where the input projection dominates:
    batches, long sequences; about twice the error). h is quantized to 8 bits either way. The
    model itself is left unchanged.
    """
    if not isinstance(model, (_Layer, _Cell)):
        raise TypeError(f"model: expected a fastcell layer or cell, got {type(model).__module__}."
                        f"{type(model).__qualname__}")
    if format not in REDUCED_FORMATS:
        raise ValueError(f"format: expected one of {', '.join(repr(f) for f in REDUCED_FORMATS)}, "
                         f"got {format!r}")
    if model.weight_format in REDUCED_FORMATS:
        raise ValueError(f"model: its weights are already {model.weight_format}; quantize the "
                         "float model it came from")
    bits = {"input_bits": input_bits_for(input_bits, format)}   # checked before any work
    threads = model.threads if threads is None else check_threads(threads)
    weights = {}
    for name, v in model.state_dict().items():
        v = np.asarray(v, dtype=np.float32)
        weights[name] = reduce(v, format, name) if is_matrix(name) else v
    if isinstance(model, _Layer):
        args = dict(model.constructor_args(), dtype=np.float32)
        return type(model)(**args, weights=weights, initial_state=model.initial_state,
                           threads=threads, **bits)
    return type(model)(**weights, **model._extra_config(), threads=threads, **bits)
