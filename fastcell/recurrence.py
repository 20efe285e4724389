"""One direction of one recurrent layer: its validated weights, laid out once for its kernel, and
the call into fastcell_c. Cells and layers are built from these.

Weights are kept twice: as given (PyTorch layout and names, for ``state_dict``) and in the form the
kernel reads (folded biases). All arrays are read-only, so one object serves many threads.
"""

import numpy as np

from fastcell._checks import as_weight, check_same_dtype, shape_error
from fastcell_c.gru import gru_sequence
from fastcell_c.lstm import lstm_sequence
from fastcell_c.rnn import rnn_sequence

NONLINEARITIES = ("tanh", "relu")


def _readonly(a):
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


class Recurrence:
    """Base: weight_ih (gates*H, I), weight_hh (gates*H, H_out), optional biases (gates*H,)."""

    gates = 0
    has_cell_state = False

    def __init__(self, weight_ih, weight_hh, bias_ih, bias_hh, suffix="", hidden_out=None):
        w_ih = as_weight(weight_ih, "weight_ih" + suffix, 2)
        rows, I = w_ih.shape
        if rows == 0 or rows % self.gates or I == 0:
            raise shape_error(
                "weight_ih" + suffix, f"({self.gates}*hidden_size, input_size) with both >= 1", w_ih.shape
            )
        H = rows // self.gates
        hout = H if hidden_out is None else hidden_out
        w_hh = as_weight(weight_hh, "weight_hh" + suffix, 2)
        if w_hh.shape != (rows, hout):
            raise shape_error("weight_hh" + suffix, (rows, hout), w_hh.shape)
        if (bias_ih is None) != (bias_hh is None):
            raise ValueError(f"bias_ih{suffix}, bias_hh{suffix}: give both or neither")
        b_ih = b_hh = None
        if bias_ih is not None:
            b_ih = as_weight(bias_ih, "bias_ih" + suffix, 1)
            b_hh = as_weight(bias_hh, "bias_hh" + suffix, 1)
            for name, b in (("bias_ih", b_ih), ("bias_hh", b_hh)):
                if b.shape != (rows,):
                    raise shape_error(name + suffix, (rows,), b.shape)
        self.dtype = w_ih.dtype
        check_same_dtype(self.dtype, **{"weight_hh" + suffix: w_hh, "bias_ih" + suffix: b_ih,
                                        "bias_hh" + suffix: b_hh})
        self.input_size, self.hidden_size, self.output_size = I, H, hout
        self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh = w_ih, w_hh, b_ih, b_hh

    def _folded_bias(self):
        """b_ih + b_hh (zeros without bias): what the kernels add to every gate row."""
        if self.bias_ih is None:
            return np.zeros(self.gates * self.hidden_size, self.dtype)
        return self.bias_ih + self.bias_hh

    def parameters(self):
        """The weights under PyTorch's names (without layer suffix), as given."""
        p = {"weight_ih": self.weight_ih, "weight_hh": self.weight_hh}
        if self.bias_ih is not None:
            p["bias_ih"], p["bias_hh"] = self.bias_ih, self.bias_hh
        return p

    def __setstate__(self, state):
        # Pickle does not keep the read-only flag; restore it.
        self.__dict__.update(state)
        for v in self.__dict__.values():
            if isinstance(v, np.ndarray):
                v.flags.writeable = False


class RNNRecurrence(Recurrence):
    gates = 1

    def __init__(self, weight_ih, weight_hh, bias_ih=None, bias_hh=None, nonlinearity="tanh",
                 suffix=""):
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(weight_ih, weight_hh, bias_ih, bias_hh, suffix)
        self.nonlinearity = nonlinearity
        self._bias = _readonly(self._folded_bias())

    def run(self, x, h, c, out=None, out_col=0, batch_first=False, reverse=False, lengths=None,
            perm=None):
        rnn_sequence(x, self.weight_ih, self.weight_hh, self._bias, self.nonlinearity == "relu",
                     h, out, out_col, batch_first, reverse, lengths, perm)


class GRURecurrence(Recurrence):
    gates = 3

    def __init__(self, weight_ih, weight_hh, bias_ih=None, bias_hh=None, reset_after=True,
                 suffix=""):
        super().__init__(weight_ih, weight_hh, bias_ih, bias_hh, suffix)
        self.reset_after = bool(reset_after)
        H = self.hidden_size
        bias = self._folded_bias()
        b_hn = np.zeros(H, self.dtype)
        if self.reset_after and self.bias_ih is not None:
            # b_hn sits inside r * (W_hn h + b_hn): it cannot be folded into b_in.
            bias[2 * H:] = self.bias_ih[2 * H:]
            b_hn = self.bias_hh[2 * H:]
        self._bias, self._bias_hn = _readonly(bias), _readonly(b_hn)

    def run(self, x, h, c, out=None, out_col=0, batch_first=False, reverse=False, lengths=None,
            perm=None):
        gru_sequence(x, self.weight_ih, self.weight_hh, self._bias, self._bias_hn,
                     self.reset_after, h, out, out_col, batch_first, reverse, lengths, perm)


class LSTMRecurrence(Recurrence):
    """weight_hr (P, H): PyTorch's projection (h has size P). weight_ph (3, H): peepholes."""

    gates = 4
    has_cell_state = True

    def __init__(self, weight_ih, weight_hh, bias_ih=None, bias_hh=None, weight_hr=None,
                 weight_ph=None, suffix=""):
        w_hr = None if weight_hr is None else as_weight(weight_hr, "weight_hr" + suffix, 2)
        if w_hr is not None and w_hr.shape[0] == 0:
            raise shape_error("weight_hr" + suffix, "(proj_size, hidden_size), proj_size >= 1", w_hr.shape)
        super().__init__(weight_ih, weight_hh, bias_ih, bias_hh, suffix,
                         hidden_out=None if w_hr is None else w_hr.shape[0])
        H = self.hidden_size
        if w_hr is not None and w_hr.shape != (w_hr.shape[0], H):
            raise shape_error("weight_hr" + suffix, (w_hr.shape[0], H), w_hr.shape)
        w_ph = None if weight_ph is None else as_weight(weight_ph, "weight_ph" + suffix, 2)
        if w_ph is not None and w_ph.shape != (3, H):
            raise shape_error("weight_ph" + suffix, (3, H), w_ph.shape)
        check_same_dtype(self.dtype, **{"weight_hr" + suffix: w_hr, "weight_ph" + suffix: w_ph})
        self.weight_hr, self.weight_ph = w_hr, w_ph
        self.proj_size = 0 if w_hr is None else w_hr.shape[0]
        self._bias = _readonly(self._folded_bias())

    def parameters(self):
        p = super().parameters()
        if self.weight_hr is not None:
            p["weight_hr"] = self.weight_hr
        if self.weight_ph is not None:
            p["weight_ph"] = self.weight_ph
        return p

    def run(self, x, h, c, out=None, out_col=0, batch_first=False, reverse=False, lengths=None,
            perm=None):
        lstm_sequence(x, self.weight_ih, self.weight_hh, self._bias, self.weight_hr,
                      self.weight_ph, h, c, out, out_col, batch_first, reverse, lengths, perm)
