"""Finds scipy's OpenBLAS and gives fastcell_c its thread-local thread control (see
fastcell_c/kernel.pyx): the BLAS calls fastcell makes when given threads (set_blas_threads) use
exactly that many, whatever the process's OpenBLAS setting, and the host's other BLAS calls are
left alone."""

import ctypes
import glob
import os

from fastcell_c import kernel


def _scipy_openblas():
    import scipy

    # pip wheels of scipy carry their OpenBLAS in scipy.libs; it is already loaded by
    # scipy.linalg.cython_blas, so CDLL only returns a handle to it.
    for path in sorted(glob.glob(os.path.join(os.path.dirname(scipy.__file__) + ".libs",
                                              "libscipy_openblas*.so*"))):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def install():
    lib = _scipy_openblas()
    fn = getattr(lib, "openblas_set_num_threads_local", None) if lib is not None else None
    if fn is not None:
        kernel.install_blas_thread_control(ctypes.cast(fn, ctypes.c_void_p).value)


def set_blas_threads(n):
    """Threads for fastcell's input projections: 1 by default, since a service runs many streams on
    many threads, and then fastcell calls no BLAS at all (its own single-threaded GEMM is as
    fast). With n > 1, projections of more than 1024 rows (T * B) go to BLAS with n threads, set
    thread-locally around each call, so other BLAS use in the process keeps its own setting
    (needs OpenBLAS >= 0.3.27, as scipy's wheels ship). Returns the old value."""
    return kernel.set_blas_threads(int(n))
