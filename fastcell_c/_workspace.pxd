# Checks shared by the kernels' Python entry points: they run before any pointer is used, so a
# caller that passes inconsistent buffers gets a ValueError instead of a crash.
from libc.stdint cimport int64_t


cdef inline int check_walk(Py_ssize_t T, Py_ssize_t B, Py_ssize_t I, Py_ssize_t gates,
                           const int64_t[::1] lengths, const int64_t[::1] perm) except -1:
    cdef Py_ssize_t j
    # BLAS dimensions are C ints.
    if T * B >= 2 ** 31 or gates >= 2 ** 31 or I >= 2 ** 31:
        raise ValueError(f"sequence too large for BLAS: T*B={T * B}, gates={gates}, I={I}")
    if lengths is None:
        if perm is not None:
            raise ValueError("perm is only used with lengths")
        return 0
    if perm is None or lengths.shape[0] != B or perm.shape[0] != B:
        raise ValueError(f"lengths and perm must both have {B} entries")
    for j in range(B):
        if lengths[j] < 1 or lengths[j] > T or (j > 0 and lengths[j] > lengths[j - 1]):
            raise ValueError("lengths must be non-increasing and within [1, T]")
        if perm[j] < 0 or perm[j] >= B:
            raise ValueError(f"perm entries must be within [0, {B})")
    return 0


cdef inline int check_shape(str name, Py_ssize_t got0, Py_ssize_t got1,
                            Py_ssize_t want0, Py_ssize_t want1) except -1:
    if got0 != want0 or got1 != want1:
        raise ValueError(f"{name}: expected shape ({want0}, {want1}), got ({got0}, {got1})")
    return 0


cdef inline int check_output(object out, Py_ssize_t T, Py_ssize_t B, bint batch_first,
                             Py_ssize_t col, Py_ssize_t width) except -1:
    """out is None, or (T, B, W) ((B, T, W) with batch_first) with room for width columns at col."""
    if out is None:
        return 0
    want = (B, T) if batch_first else (T, B)
    if out.shape[:2] != want or col < 0 or col + width > out.shape[2]:
        raise ValueError(f"out: expected shape {want + (f'>={col + width}',)}, got {tuple(out.shape)}")
    return 0
