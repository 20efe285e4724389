"""Loads scipy.linalg.cython_blas, the BLAS the kernels call, without importing the scipy.linalg
package around it: that package's __init__ costs about 0.2 s (half of `import fastcell`), and a
service pays it on every cold start. The extension module is loaded from its file under its own
name, so the kernels' `cimport` finds it in sys.modules; a later `import scipy.linalg` imports the
package as usual and reuses it. Any surprise falls back to the ordinary import."""

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
