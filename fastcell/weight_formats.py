"""Reduced weight formats: int8 (one float32 scale per output row) and bf16.

A ``Reduced`` holds one weight matrix in PyTorch's layout (gate rows x inputs) in a reduced
format; it is what a quantized model keeps instead of the float32 matrix (no float copy is kept
beside it: ``dequantize()`` computes one when asked, for ``state_dict()``). The compiled products
read the same values (fastcell_c/matmul.h, matmul_int8.h).

- int8: ``q = rint(w / s)`` in [-127, 127] with ``s = max |w_row| / 127`` per row (a zero row has
  s = 1 and q = 0); the value is ``q * s``. Weights quantized elsewhere (PyTorch's qint8, per
  tensor or per channel, symmetric) may also hold -128.
- bf16: the top 16 bits of the float32, rounded to nearest even; the value is exactly that bf16.
"""

import numpy as np

FLOAT_FORMATS = ("float32", "float64")
REDUCED_FORMATS = ("int8", "bf16")
FORMATS = FLOAT_FORMATS + REDUCED_FORMATS


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
    """Reduced int8 of a float matrix: symmetric, one scale per row (max |w_row| / 127)."""
    w = np.asarray(w, dtype=np.float32)
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{name}: int8 cannot hold NaN or infinite weights")
    amax = np.abs(w).max(axis=1) if w.shape[1] else np.zeros(w.shape[0], np.float32)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return Reduced("int8", q, scale)


def float_to_bf16(w):
    """float32 -> bf16 bit patterns (uint16), rounded to nearest even; NaN stays a (quiet) NaN."""
    bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    rounded = ((bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(w, dtype=np.float32))
    return np.where(nan, ((bits >> 16) | 0x0040).astype(np.uint16), rounded)


def bf16_to_float(h):
    return (np.asarray(h, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_bf16(w, name="weight"):
    return Reduced("bf16", float_to_bf16(w))


def reduce(w, format, name="weight"):
    """A float matrix in a reduced format."""
    if format == "int8":
        return quantize_int8(w, name)
    if format == "bf16":
        return to_bf16(w, name)
    raise ValueError(f"format: expected one of {', '.join(REDUCED_FORMATS)}, got {format!r}")
