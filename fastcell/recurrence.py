"""One direction of one recurrent layer: its validated weights, laid out once for its kernel, and
the call into fastcell_c. Cells and layers are built from these.

Weights are kept twice: as given (PyTorch layout and names, for ``state_dict``) and in the form the
kernel reads: transposed, so that a one-row product is a contiguous AXPY (fastcell_c/matmul.h), with
each gate block padded with zero columns to a multiple of the SIMD width, and biases folded where
the cell allows. All arrays are read-only, so one object serves many threads.
"""

import numpy as np

from fastcell._checks import as_flag, as_weight, check_same_dtype, shape_error
from fastcell_c.gru import GRUKernel
from fastcell_c.kernel import LANES
from fastcell_c.lstm import LSTMKernel
from fastcell_c.rnn import RNNKernel

NONLINEARITIES = ("tanh", "relu")


def padded(n):
    return -(-n // LANES) * LANES


def aligned_zeros(shape, dtype, align=64):
    """Zeros whose data starts on an `align`-byte boundary (NumPy only promises 16): a vector load
    that straddles two cache lines costs two, which halves the kernels' bandwidth from L2."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    raw = np.zeros(n * dtype.itemsize + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + n * dtype.itemsize].view(dtype).reshape(shape)


def gate_columns(w, gates):
    """(gates*H, K) in PyTorch layout -> (K, gates*padded(H)): transposed, each gate block padded,
    64-byte aligned (every row too: its width is a multiple of LANES elements)."""
    H = w.shape[0] // gates
    Hp = padded(H)
    out = aligned_zeros((w.shape[1], gates * Hp), w.dtype)
    for g in range(gates):
        out[:, g * Hp:g * Hp + H] = w[g * H:(g + 1) * H].T
    return out


def gate_vector(b, gates):
    """(gates*H,) -> (gates*padded(H),), each gate block padded with zeros."""
    return gate_columns(b[:, None], gates)[0]


class Recurrence:
    """Base: weight_ih (gates*H, I), weight_hh (gates*H, H_out), optional biases (gates*H,)."""

    gates = 0
    has_cell_state = False

    def __init__(self, weight_ih, weight_hh, bias_ih, bias_hh, suffix="", hidden_out=None):
        self._arguments = {"suffix": suffix}
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
        self._arguments.update(weight_ih=w_ih, weight_hh=w_hh, bias_ih=b_ih, bias_hh=b_hh)

    def _folded_bias(self):
        """b_ih + b_hh (zeros without bias): what the kernels add to every gate row."""
        if self.bias_ih is None:
            return np.zeros(self.gates * self.hidden_size, self.dtype)
        return self.bias_ih + self.bias_hh

    def run(self, x, h, c=None, out=None, out_col=0, batch_first=False, reverse=False,
            lengths=None, perm=None):
        """One GIL-free kernel call over a whole batch of sequences: see fastcell_c.kernel.Kernel.run."""
        self.kernel.run(x, h, c, out, out_col, batch_first, reverse, lengths, perm)

    def parameters(self):
        """The weights under PyTorch's names (without layer suffix), as given."""
        p = {"weight_ih": self.weight_ih, "weight_hh": self.weight_hh}
        if self.bias_ih is not None:
            p["bias_ih"], p["bias_hh"] = self.bias_ih, self.bias_hh
        return p

    def __reduce__(self):
        # The compiled kernel holds raw pointers: pickle the weights and rebuild it on load.
        return (_rebuild, (type(self), self._arguments))


def _rebuild(cls, arguments):
    return cls(**arguments)


class RNNRecurrence(Recurrence):
    gates = 1

    def __init__(self, weight_ih, weight_hh, bias_ih=None, bias_hh=None, nonlinearity="tanh",
                 suffix=""):
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(weight_ih, weight_hh, bias_ih, bias_hh, suffix)
        self.nonlinearity = nonlinearity
        self._arguments["nonlinearity"] = nonlinearity
        self.kernel = RNNKernel(gate_columns(self.weight_ih, 1), gate_columns(self.weight_hh, 1),
                                gate_vector(self._folded_bias(), 1), self.hidden_size,
                                nonlinearity == "relu")


class GRURecurrence(Recurrence):
    gates = 3

    def __init__(self, weight_ih, weight_hh, bias_ih=None, bias_hh=None, reset_after=True,
                 suffix=""):
        super().__init__(weight_ih, weight_hh, bias_ih, bias_hh, suffix)
        self.reset_after = as_flag(reset_after, "reset_after")
        self._arguments["reset_after"] = self.reset_after
        H = self.hidden_size
        bias = self._folded_bias()
        b_hn = np.zeros(H, self.dtype)
        if self.reset_after and self.bias_ih is not None:
            # b_hn sits inside r * (W_hn h + b_hn): it cannot be folded into b_in.
            bias[2 * H:] = self.bias_ih[2 * H:]
            b_hn = self.bias_hh[2 * H:]
        self.kernel = GRUKernel(gate_columns(self.weight_ih, 3), gate_columns(self.weight_hh, 3),
                                gate_vector(bias, 3), gate_vector(b_hn, 1), H, self.reset_after)


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
        self._arguments.update(weight_hr=w_hr, weight_ph=w_ph)
        self.proj_size = 0 if w_hr is None else w_hr.shape[0]
        self.kernel = LSTMKernel(
            gate_columns(self.weight_ih, 4), gate_columns(self.weight_hh, 4),
            gate_vector(self._folded_bias(), 4), H,
            None if w_hr is None else gate_columns(w_hr, 1),
            None if w_ph is None else gate_vector(w_ph.reshape(-1), 3).reshape(3, -1))

    def parameters(self):
        p = super().parameters()
        if self.weight_hr is not None:
            p["weight_hr"] = self.weight_hr
        if self.weight_ph is not None:
            p["weight_ph"] = self.weight_ph
        return p
