"""Reduced weight formats: int8 (one float32 scale per output row) and bf16.

A ``Reduced`` holds one weight matrix in PyTorch's layout (gate rows x inputs) in a reduced
format; it is what a quantized model keeps instead of the float32 matrix (no float copy is kept
beside it: ``dequantize()`` computes one when asked, for ``state_dict()``). The compiled products
read the same values (fastcell_c/products.h, products_int8.h). Which parameters are matrices,
which a reduced format reduces: fastcell.spec.MATRICES.

- int8: ``q = rint(w / s)`` in [-127, 127] with one scale ``s`` per row (a zero row has s = 1 and
  q = 0); the value is ``q * s``. quantize_int8 takes, per row, the s >= max |w_row| / 127 (no
  weight clipped) that rounds the row with the least squared error. Weights quantized elsewhere
  (PyTorch's qint8, per tensor or per channel, symmetric) may also hold -128.
- bf16: the top 16 bits of the float32, rounded to nearest even; the value is exactly that bf16.

An int8 model also quantizes the activations of its products, per row, on every call
(fastcell_c/products_int8.h): h to 8 bits, and each layer's input x to its ``input_bits``, 16 (the
default, the more exact: unit Gaussian features reach 3 to 4) or 8 (fewer multiply-adds: faster
where the input projection dominates, at about twice the error). ``input_bits_for`` checks it.
"""

import numpy as np

FLOAT_FORMATS = ("float32", "float64")
REDUCED_FORMATS = ("int8", "bf16")
FORMATS = FLOAT_FORMATS + REDUCED_FORMATS
INPUT_BITS = (16, 8)      # an int8 model's x bits; the first is the default


def input_bits_for(value, weight_format):
    """The x bits of a model in ``weight_format`` given ``input_bits=value``: int8 takes 16 or 8
    (None: 16); the other formats quantize no activations and take None only (None back).
    Errors name the argument, what it takes and what came."""
    if weight_format != "int8":
        if value is not None:
            raise ValueError(f"input_bits: only int8 models quantize their inputs; a "
                             f"{weight_format} model takes None, got {value!r}")
        return None
    if value is None:
        return INPUT_BITS[0]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"input_bits: expected 16 or 8, got {value!r}")
    if value not in INPUT_BITS:
        raise ValueError(f"input_bits: expected 16 or 8, got {value}")
    return int(value)


def input_bits_config(bits):
    """A model config's "input_bits" entry: {"input_bits": 8}, or nothing for the default 16 and
    the formats without it. Absent means 16, so int8 files of 16 bits are as before, and a
    fastcell that does not know the key (which refuses what it does not know) refuses 8."""
    return {} if bits in (None, INPUT_BITS[0]) else {"input_bits": bits}


class Reduced:
    """One weight matrix in a reduced format: ``data`` (int8, or bf16 as uint16 bit patterns),
    and for int8 ``scale`` (rows,) float32 > 0. Read-only."""

    __slots__ = ("format", "data", "scale")

    def __init__(self, format, data, scale=None):
        if format not in REDUCED_FORMATS:
            raise ValueError(f"format: expected one of {', '.join(REDUCED_FORMATS)}, got {format!r}")
        want = np.int8 if format == "int8" else np.uint16
        data = np.asarray(data)
        if data.dtype != want or data.ndim != 2:
            raise TypeError(f"{format} data: expected a 2-D {np.dtype(want)} array, got "
                            f"{data.dtype} of shape {data.shape}")
        data = np.array(data, order="C", copy=True)
        data.flags.writeable = False
        if format == "int8":
            if scale is None:
                raise TypeError("int8 data needs its scale: one float32 per row")
            scale = np.array(scale, dtype=np.float32, order="C", copy=True).reshape(-1)
            if scale.shape != (data.shape[0],):
                raise ValueError(f"int8 scale: expected shape ({data.shape[0]},), got {scale.shape}")
            if not np.all(np.isfinite(scale) & (scale > 0)):
                raise ValueError("int8 scale: expected finite values > 0")
            scale.flags.writeable = False
        elif scale is not None:
            raise TypeError("bf16 data takes no scale")
        object.__setattr__(self, "format", format)
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "scale", scale)

    def __setattr__(self, name, value):
        raise AttributeError("Reduced weights are read-only")

    def __reduce__(self):
        return (Reduced, (self.format, self.data, self.scale))

    shape = property(lambda self: self.data.shape)
    nbytes = property(lambda self: self.data.nbytes + (0 if self.scale is None else self.scale.nbytes))

    def dequantize(self):
        """The float32 values this matrix holds (a new array)."""
        if self.format == "int8":
            return self.data.astype(np.float32) * self.scale[:, None]
        return bf16_to_float(self.data)

    def __repr__(self):
        return f"Reduced({self.format!r}, shape={self.shape})"


def quantize_int8(w, name="weight"):
    """Reduced int8 of a float matrix: symmetric, one scale per row: the scale that clips no
    weight (s >= max |w_row| / 127) and, among those, rounds the row with the least squared error
    (a grid of 100 scales up to 1.1 max |w_row| / 127, then least-squares refits s = <w, q> / <q, q>
    of the best). Each weight is then within s / 2 of its value."""
    w = np.asarray(w, dtype=np.float32)
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{name}: int8 cannot hold NaN or infinite weights")
    amax = np.abs(w).max(axis=1) if w.shape[1] else np.zeros(w.shape[0], np.float32)
    live = amax > 0
    tiniest = np.finfo(np.float32).smallest_subnormal  # amax / 127 of a subnormal row may be 0
    floor = np.where(live, np.maximum(amax / np.float32(127), tiniest), 1).astype(np.float32)
    # Candidates whose values overflow float32 (q * s = inf, near the float32 limit) have an
    # infinite error and are never kept; so is a refit that is not finite.
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        best = [floor.copy(), _round_int8(w, floor)]  # scale, q and squared error per row
        best.append(_squared_error(w, best[1], floor))

        def consider(scale):
            scale = np.asarray(scale, dtype=np.float32)
            # never below max |w| / 127 (that would clip); zero rows keep s = 1, q = 0
            scale = np.where(live & np.isfinite(scale) & (scale > floor), scale, floor)
            q = _round_int8(w, scale)
            err = _squared_error(w, q, scale)
            better = err < best[2]
            for kept, new in zip(best, (scale, q, err)):
                kept[better] = new[better]

        for ratio in _INT8_RATIOS:
            consider(floor * np.float32(ratio))
        for _ in range(_INT8_REFITS):
            q = best[1]
            consider(np.einsum("ij,ij->i", w, q, dtype=np.float64) /
                     np.einsum("ij,ij->i", q, q, dtype=np.float64))
    return Reduced("int8", best[1].astype(np.int8), best[0])


_INT8_RATIOS = np.linspace(1.0, 1.1, 101)[1:]  # scales tried, as multiples of max |w_row| / 127
_INT8_REFITS = 3


def _round_int8(w, scale):
    """rint(w / scale) per row, in [-127, 127], as float32 (exact integers)."""
    return np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.float32)


def _squared_error(w, q, scale):
    d = q * scale[:, None] - w
    return np.einsum("ij,ij->i", d, d, dtype=np.float64)


def float_to_bf16(w):
    """float32 -> bf16 bit patterns (uint16), rounded to nearest even; NaN stays a (quiet) NaN."""
    bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    rounded = ((bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(w, dtype=np.float32))
    return np.where(nan, ((bits >> 16) | 0x0040).astype(np.uint16), rounded)


def bf16_to_float(h):
    return (np.asarray(h, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


BF16_MAX = float(np.uint32(0x7F7F0000).view(np.float32))  # the largest finite bf16


def to_bf16(w, name="weight"):
    """Reduced bf16 of a float matrix; refuses what bf16 cannot hold (NaN, infinities, and finite
    weights that would round to infinity) rather than computing inf or NaN with it."""
    w = np.asarray(w, dtype=np.float32)
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{name}: bf16 cannot hold NaN or infinite weights")
    h = float_to_bf16(w)
    if np.any((h & 0x7FFF) == 0x7F80):
        raise ValueError(f"{name}: weights beyond bf16's largest finite value ({BF16_MAX:.4g}) "
                         "would round to infinity")
    return Reduced("bf16", h)


def reduce(w, format, name="weight"):
    """A float matrix in a reduced format."""
    if format == "int8":
        return quantize_int8(w, name)
    if format == "bf16":
        return to_bf16(w, name)
    raise ValueError(f"format: expected one of {', '.join(REDUCED_FORMATS)}, got {format!r}")
