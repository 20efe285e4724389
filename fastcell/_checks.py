"""Argument conversion and checking shared by the public classes.

Every error names the argument, what was expected and what came.
"""

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_REAL_KINDS = "biuf"  # bool, signed, unsigned, float


def to_numpy(value, name):
    """Any array-like (NumPy, nested lists, a CPU torch tensor, even one that requires grad) as an
    ndarray, without importing torch."""
    if value is None:
        raise TypeError(f"{name}: expected an array, got None")
    if hasattr(value, "detach") and hasattr(value, "cpu") and not isinstance(value, np.ndarray):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nested lists and the like
        raise TypeError(f"{name}: expected a real array, got {type(value).__name__} ({exc})") from None
    if arr.dtype.kind not in _REAL_KINDS:
        raise TypeError(f"{name}: expected real numbers, got an array of dtype {arr.dtype}")
    return arr


def as_weight(value, name, ndim):
    """A weight: float32 or float64 as given (no silent conversion), C-contiguous, read-only copy."""
    arr = to_numpy(value, name)
    if arr.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected float32 or float64 weights, got {arr.dtype}; "
            f"convert explicitly, e.g. np.asarray({name}, dtype=np.float32)"
        )
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {arr.shape}")
    arr = np.array(arr, order="C", copy=True)
    arr.flags.writeable = False
    return arr


def as_input(value, name, dtype):
    """An input in the model's dtype, C-contiguous (a copy only where needed)."""
    arr = to_numpy(value, name)
    return np.ascontiguousarray(arr, dtype=dtype)


def shape_error(name, expected, got):
    return ValueError(f"{name}: expected shape {expected}, got {tuple(got)}")


def check_same_dtype(dtype, **weights):
    for name, w in weights.items():
        if w is not None and w.dtype != dtype:
            raise TypeError(f"{name}: expected dtype {dtype} like weight_ih, got {w.dtype}")
