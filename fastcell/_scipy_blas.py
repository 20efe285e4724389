"""Loads scipy.linalg.cython_blas, the BLAS the kernels call, without importing the scipy.linalg
package around it: that package's __init__ costs about 0.2 s (half of `import fastcell`), and a
service pays it on every cold start. The extension module is loaded from its file under its own
name, so the kernels' `cimport` finds it in sys.modules; a later `import scipy.linalg` imports the
package as usual and reuses it, and a one-shot import hook binds it there as the attribute
`scipy.linalg.cython_blas` (which the import system sets only for a module it loads itself). Any
surprise falls back to the ordinary import."""

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
