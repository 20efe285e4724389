"""fastcell: fast, exact CPU inference for recurrent networks trained in PyTorch.

Never imports torch: the PyTorch bridge imports it lazily, only when called.
"""

from fastcell import _scipy_blas

_scipy_blas.preload()  # before the kernels import it: see _scipy_blas.py

from fastcell import _blas_threads  # noqa: E402
from fastcell._blas_threads import set_blas_threads  # noqa: E402
from fastcell._version import __version__  # noqa: E402
from fastcell.cells import GRUCell, LSTMCell, PeepholeLSTMCell, RNNCell  # noqa: E402
from fastcell.layers import GRU, LSTM, RNN, PeepholeLSTM, StateDictError  # noqa: E402
from fastcell_c.stream_pool import PoolFullError, StreamIdError, StreamPool  # noqa: E402

_blas_threads.install()

# Loaded on first use, so `import fastcell` stays light (cold start) and never pulls in torch.
_LAZY = {
    "save": "fastcell.weights_file",
    "load": "fastcell.weights_file",
    "FormatError": "fastcell.weights_file",
    "from_torch": "fastcell.bridge",
    "from_state_dict": "fastcell.bridge",
    "quantize": "fastcell.quantization",
    "from_onnx": "fastcell.onnx_import",   # reading .onnx files needs the onnx package (an extra)
    "onnx_nodes": "fastcell.onnx_import",
    "Batcher": "fastcell.batcher",
    "BatcherFullError": "fastcell.batcher",
}

__all__ = [
    "__version__", "RNNCell", "GRUCell", "LSTMCell", "PeepholeLSTMCell",
    "RNN", "GRU", "LSTM", "PeepholeLSTM", "StateDictError", "set_blas_threads",
    "StreamPool", "StreamIdError", "PoolFullError", *_LAZY,
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
