"""The models: cells (one step at a time, or a sequence), layers (torch.nn's RNN, GRU, LSTM and
a PeepholeLSTM), and below them one direction's weights handed to its compiled kernel."""

from fastcell.models.cells import GRUCell, LSTMCell, PeepholeLSTMCell, RNNCell, _Cell
from fastcell.models.layers import GRU, LSTM, RNN, PeepholeLSTM, StateDictError, _Layer

__all__ = ["RNNCell", "GRUCell", "LSTMCell", "PeepholeLSTMCell", "RNN", "GRU", "LSTM",
           "PeepholeLSTM", "StateDictError", "LAYERS", "CELLS", "is_model"]

# cell kind (fastcell.spec.KINDS) -> class: the one registry the files and converters build from
LAYERS = {"rnn": RNN, "gru": GRU, "lstm": LSTM, "peephole_lstm": PeepholeLSTM}
CELLS = {"rnn": RNNCell, "gru": GRUCell, "lstm": LSTMCell, "peephole_lstm": PeepholeLSTMCell}


def with_threads(model, threads):
    """A just-built model on `threads` threads (checked by the loader before it built anything):
    the loaders' one way to honour their threads= argument."""
    return model if threads == 1 else model.with_threads(threads)


def is_model(obj):
    """Whether obj is a fastcell model: a layer or a cell."""
    return isinstance(obj, (_Layer, _Cell))
