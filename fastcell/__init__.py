"""fastcell: fast, exact CPU inference for recurrent networks trained in PyTorch.

Never imports torch: the PyTorch bridge imports it lazily, only when called.
"""

from fastcell import blas

blas.preload()  # before the kernels import it: see blas.py

from fastcell._version import __version__  # noqa: E402
from fastcell.blas import set_blas_threads  # noqa: E402
from fastcell.models import (GRU, LSTM, RNN, GRUCell, LSTMCell, PeepholeLSTM,  # noqa: E402
                             PeepholeLSTMCell, RNNCell, StateDictError)
from fastcell_c.platform import simd_level  # noqa: E402
from fastcell.serving.pool import PoolFullError, StreamIdError, StreamPool  # noqa: E402

blas.install()

# Loaded on first use, so `import fastcell` stays light (cold start) and never pulls in torch.
_LAZY = {
    "save": "fastcell.io.weights_file",
    "load": "fastcell.io.weights_file",
    "FormatError": "fastcell.io.weights_file",
    "from_torch": "fastcell.convert.torch_modules",
    "from_state_dict": "fastcell.convert.state_dict",
    "quantize": "fastcell.models.quantize",
    "from_onnx": "fastcell.convert.onnx_import",   # reading .onnx files needs the onnx package
    "onnx_nodes": "fastcell.convert.onnx_import",
    "onnx_outputs": "fastcell.convert.onnx_import",
    "from_keras": "fastcell.convert.keras_import",  # reading .keras files needs h5py, not keras
    "keras_layers": "fastcell.convert.keras_import",
    "keras_outputs": "fastcell.convert.keras_import",
    "Batcher": "fastcell.serving.batcher",
    "BatcherFullError": "fastcell.serving.batcher",
    "FrameResult": "fastcell.serving.batcher",
    "BatchResult": "fastcell.serving.batcher",
}

__all__ = [
    "__version__", "RNNCell", "GRUCell", "LSTMCell", "PeepholeLSTMCell",
    "RNN", "GRU", "LSTM", "PeepholeLSTM", "StateDictError", "set_blas_threads",
    "StreamPool", "StreamIdError", "PoolFullError", "simd_level", *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastcell' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
