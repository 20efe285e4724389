"""Build the compiled kernels in fastcell_c.

Environment switches:
  FASTCELL_CYTHON_CHECKS=1  bounds, wraparound and initialisation checks on (a checked test build)
  FASTCELL_NATIVE=1         -march=native (a build for this machine only; the default is portable)
"""
import os
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

CHECKS = os.environ.get("FASTCELL_CYTHON_CHECKS") == "1"
NATIVE = os.environ.get("FASTCELL_NATIVE") == "1"

# -O3 for the gate loops. -fno-trapping-math lets GCC if-convert the selects in activations.h
# (results are unchanged); never the fast-math flag (it sets flush-to-zero for the whole host process).
compile_args = ["-O3", "-fno-math-errno", "-fno-trapping-math"]
if NATIVE:
    compile_args.append("-march=native")

directives = {
    "language_level": 3,
    "boundscheck": CHECKS,
    "wraparound": CHECKS,
    "initializedcheck": CHECKS,
    "cdivision": True,
    "embedsignature": True,
}

KERNELS = ["platform", "team", "kernel", "rnn", "gru", "lstm", "stream", "stream_pool", "batcher", "blas_floor"]
HEADERS = sorted(str(p) for p in Path("fastcell_c").glob("*.h"))

extensions = [
    Extension(
        f"fastcell_c.{name}",
        [f"fastcell_c/{name}.pyx"],
        include_dirs=["fastcell_c", np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=compile_args,
        depends=HEADERS,  # the C headers: an edit to one rebuilds every module
    )
    for name in KERNELS
]

setup(
    ext_modules=cythonize(extensions, compiler_directives=directives),
)
