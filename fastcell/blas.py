"""scipy's BLAS, which the kernels call through scipy.linalg.cython_blas: loaded without the
scipy.linalg package around it, and given thread-local thread control.

preload(): loads scipy.linalg.cython_blas without importing the scipy.linalg package around it:
that package's __init__ costs about 0.2 s (half of `import fastcell`), and a service pays it on
every cold start. The extension module is loaded from its file under its own name, so the
kernels' `cimport` finds it in sys.modules; a later `import scipy.linalg` imports the package as
usual and reuses it, and a one-shot import hook binds it there as the attribute
`scipy.linalg.cython_blas` (which the import system sets only for a module it loads itself). Any
surprise falls back to the ordinary import.

install() finds scipy's OpenBLAS and gives fastcell_c its thread-local thread control (see
fastcell_c/kernel.pyx): the BLAS calls fastcell makes when given threads (set_blas_threads) use
exactly that many, whatever the process's OpenBLAS setting, and the host's other BLAS calls are
left alone.
"""

import ctypes
import glob
import importlib.machinery
import importlib.util
import os
import sys

NAME = "scipy.linalg.cython_blas"


def preload():
    if NAME in sys.modules:
        return
    try:
        import scipy

        suffixes = importlib.machinery.EXTENSION_SUFFIXES
        paths = [p for p in glob.glob(os.path.join(os.path.dirname(scipy.__file__), "linalg", "cython_blas*"))
                 if any(p.endswith(s) for s in suffixes)]
        if len(paths) != 1:
            return
        loader = importlib.machinery.ExtensionFileLoader(NAME, paths[0])
        spec = importlib.util.spec_from_file_location(NAME, paths[0], loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        sys.modules[NAME] = module
    except Exception:  # noqa: BLE001 - the ordinary import below still works
        sys.modules.pop(NAME, None)
        return
    if "scipy.linalg" not in sys.modules:
        sys.meta_path.insert(0, _BindOnImport())


class _BindOnImport:
    """Finds scipy.linalg through the other finders, once, and has its loader set the attribute
    cython_blas after the package's own __init__ ran; any trouble leaves the import untouched."""

    def find_spec(self, name, path=None, target=None):
        if name != "scipy.linalg":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return None
        run = loader.exec_module

        def exec_module(module):
            run(module)
            if NAME in sys.modules and not hasattr(module, "cython_blas"):
                module.cython_blas = sys.modules[NAME]

        loader.exec_module = exec_module
        return spec


# ---- thread control ----

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
    from fastcell_c import kernel   # after preload(): the kernels cimport cython_blas

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
    from fastcell_c import kernel

    return kernel.set_blas_threads(int(n))
