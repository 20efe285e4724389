"""Argument conversion and checking shared by the public classes.

Every error names the argument, what was expected and what came.
"""

import numpy as np

from fastcell_c.kernel import as_int, to_numpy  # noqa: F401  (the compiled layer's, shared)

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def float_array(value, name):
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


def as_weight(value, name, ndim):
    """A weight: float32 or float64 as given (no silent conversion), a C-contiguous private copy,
    returned as a read-only view (a view of a read-only array cannot be made writeable again)."""
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
    return arr[...]


def as_input(value, name, dtype):
    """An input in the model's dtype, C-contiguous (a copy only where needed). A 0-d input stays
    0-d (np.ascontiguousarray would make it (1,)), so shape checks report what came."""
    if type(value) is np.ndarray and value.dtype == dtype and value.flags.c_contiguous:
        return value  # the common case, on every call: nothing to convert or check
    arr = to_numpy(value, name)
    return np.asarray(arr, dtype=dtype, order="C")


def shape_error(name, expected, got):
    return ValueError(f"{name}: expected shape {expected}, got {tuple(got)}")


def check_same_dtype(dtype, **weights):
    for name, w in weights.items():
        if w is not None and w.dtype != dtype:
            raise TypeError(f"{name}: expected dtype {dtype} like weight_ih, got {w.dtype}")


def as_flag(value, name):
    """A bool option: True/False (or 0/1), never a truthy string."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name}: expected True or False, got {value!r}")


class Frozen:
    """Models are immutable once built: public attributes cannot be rebound (weights change only
    through load_state_dict, which swaps the private kernels whole)."""

    def __setattr__(self, name, value):
        if not name.startswith("_") and getattr(self, "_frozen", False):
            raise AttributeError(f"{type(self).__name__} is immutable: cannot set {name!r}")
        object.__setattr__(self, name, value)
