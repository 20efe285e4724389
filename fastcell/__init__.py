"""fastcell: fast, exact CPU inference for recurrent networks trained in PyTorch.

Never imports torch: the PyTorch bridge imports it lazily, only when called.
"""

from fastcell._version import __version__
from fastcell.cells import GRUCell, LSTMCell, PeepholeLSTMCell, RNNCell
from fastcell.layers import GRU, LSTM, RNN, PeepholeLSTM, StateDictError

__all__ = [
    "__version__", "RNNCell", "GRUCell", "LSTMCell", "PeepholeLSTMCell",
    "RNN", "GRU", "LSTM", "PeepholeLSTM", "StateDictError",
]
