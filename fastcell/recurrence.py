"""One direction of one recurrent layer: its validated weights, laid out once for its kernel, and
the call into fastcell_c. Cells and layers are built from these.

Weights are kept twice: as given (PyTorch layout and names, for ``state_dict``) and in the form the
kernel reads: transposed, so that a one-row product is a contiguous AXPY (fastcell_c/matmul.h), with
each gate block padded with zero columns to a multiple of the SIMD width, and biases folded where
the cell allows. All arrays are read-only, so one object serves many threads.

The weight matrices (W_ih, W_hh, W_hr) may be float32, float64, or ``Reduced`` (int8 or bf16,
fastcell.weight_formats), all in one format; a reduced recurrence computes in float32 with float32
biases and peepholes, and keeps no float copy of its matrices.
"""

import numpy as np

from fastcell._checks import as_flag, as_weight, check_same_dtype, shape_error
from fastcell.weight_formats import REDUCED_FORMATS, Reduced
from fastcell_c.gru import GRUKernel
from fastcell_c.kernel import INT8_MAX_ROWS, LANES
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


def as_matrix(value, name):
    """A weight matrix: a Reduced one as it is, else as_weight (float32 or float64)."""
    if isinstance(value, Reduced):
        if value.format == "int8" and value.shape[1] > INT8_MAX_ROWS:
            raise ValueError(f"{name}: int8 weights take at most {INT8_MAX_ROWS} inputs per row (an "
                             f"int32 sum must not overflow), got {value.shape[1]}")
        return value
    return as_weight(value, name, 2)


def kernel_matrix(w, gates):
    """What a kernel takes for one weight matrix: W^T with padded gate blocks in its own format
    (bf16 as bit patterns), and int8's per-column scales padded alike (None otherwise)."""
    if isinstance(w, Reduced):
        return gate_columns(w.data, gates), (gate_vector(w.scale, gates) if w.scale is not None else None)
    return gate_columns(w, gates), None


def stored_value(w):
    """A matrix as state_dict shows it: float as kept; a reduced one dequantized, when asked."""
    if isinstance(w, Reduced):
        out = w.dequantize()
        out.flags.writeable = False
        return out
    return w


class Recurrence:
    """Base: weight_ih (gates*H, I), weight_hh (gates*H, H_out), optional biases (gates*H,)."""

    gates = 0
    has_cell_state = False

    def __init__(self, weight_ih, weight_hh, bias_ih, bias_hh, suffix="", hidden_out=None):
        self._arguments = {"suffix": suffix}
        w_ih = as_matrix(weight_ih, "weight_ih" + suffix)
        rows, I = w_ih.shape
        if rows == 0 or rows % self.gates or I == 0:
            raise shape_error(
                "weight_ih" + suffix, f"({self.gates}*hidden_size, input_size) with both >= 1", w_ih.shape
            )
        H = rows // self.gates
        hout = H if hidden_out is None else hidden_out
        w_hh = as_matrix(weight_hh, "weight_hh" + suffix)
        if w_hh.shape != (rows, hout):
            raise shape_error("weight_hh" + suffix, (rows, hout), w_hh.shape)
        self.weight_format = _format_of(w_ih)
        check_same_format(self.weight_format, **{"weight_hh" + suffix: w_hh})
        # Reduced formats compute in float32, with float32 biases and peepholes.
        self.dtype = np.dtype(np.float32) if isinstance(w_ih, Reduced) else w_ih.dtype
        if (bias_ih is None) != (bias_hh is None):
            raise ValueError(f"bias_ih{suffix}, bias_hh{suffix}: give both or neither")
        b_ih = b_hh = None
        if bias_ih is not None:
            b_ih = self._vector(bias_ih, "bias_ih" + suffix, 1)
            b_hh = self._vector(bias_hh, "bias_hh" + suffix, 1)
            for name, b in (("bias_ih", b_ih), ("bias_hh", b_hh)):
                if b.shape != (rows,):
                    raise shape_error(name + suffix, (rows,), b.shape)
        check_same_dtype(self.dtype, **{"bias_ih" + suffix: b_ih, "bias_hh" + suffix: b_hh})
        self.input_size, self.hidden_size, self.output_size = I, H, hout
        self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh = w_ih, w_hh, b_ih, b_hh
        self._arguments.update(weight_ih=w_ih, weight_hh=w_hh, bias_ih=b_ih, bias_hh=b_hh)

    def _vector(self, value, name, ndim):
        """A bias or peephole: in a reduced recurrence, float32 whatever came (exactly
        representable for float32 input)."""
        a = as_weight(value, name, ndim)
        if self.weight_format in REDUCED_FORMATS and a.dtype != np.float32:
            a = as_weight(a.astype(np.float32), name, ndim)
        return a

    def _kernel_format(self, **scales):
        """The weight-format arguments of the kernels."""
        if self.weight_format not in REDUCED_FORMATS:
            return {"weight_format": self.weight_format}
        return {"weight_format": self.weight_format, **scales}

    def _folded_bias(self):
        """b_ih + b_hh (zeros without bias): what the kernels add to every gate row."""
        if self.bias_ih is None:
            return np.zeros(self.gates * self.hidden_size, self.dtype)
        return self.bias_ih + self.bias_hh

    def run(self, x, h, c=None, out=None, out_col=0, batch_first=False, reverse=False,
            lengths=None, perm=None):
        """One GIL-free kernel call over a whole batch of sequences: see fastcell_c.kernel.Kernel.run."""
        self.kernel.run(x, h, c, out, out_col, batch_first, reverse, lengths, perm)

    def resident_bytes(self):
        """Bytes of weights kept: as given (or reduced) and as the kernel holds them."""
        return sum(v.nbytes for v in self.stored().values()) + self.kernel.resident_bytes

    def stored(self):
        """The weights under PyTorch's names (without layer suffix), as kept: float arrays, or
        Reduced matrices (weights_file saves these)."""
        p = {"weight_ih": self.weight_ih, "weight_hh": self.weight_hh}
        if self.bias_ih is not None:
            p["bias_ih"], p["bias_hh"] = self.bias_ih, self.bias_hh
        return p

    def parameters(self):
        """The weights under PyTorch's names (without layer suffix), as float arrays: as given,
        or dequantized from a reduced format (computed now, not kept)."""
        return {n: stored_value(v) for n, v in self.stored().items()}

    def __reduce__(self):
        # The compiled kernel holds raw pointers: pickle the weights and rebuild it on load.
        return (_rebuild, (type(self), self._arguments))


def _rebuild(cls, arguments):
    return cls(**arguments)


def _format_of(w):
    return w.format if isinstance(w, Reduced) else w.dtype.name


def check_same_format(fmt, **weights):
    for name, w in weights.items():
        if w is not None and _format_of(w) != fmt:
            what = "dtype" if not isinstance(w, Reduced) and fmt in ("float32", "float64") else "weight format"
            raise TypeError(f"{name}: expected {what} {fmt} like weight_ih, got {_format_of(w)}")


class RNNRecurrence(Recurrence):
    gates = 1

    def __init__(self, weight_ih, weight_hh, bias_ih=None, bias_hh=None, nonlinearity="tanh",
                 suffix=""):
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(weight_ih, weight_hh, bias_ih, bias_hh, suffix)
        self.nonlinearity = nonlinearity
        self._arguments["nonlinearity"] = nonlinearity
        (w_ih, s_ih), (w_hh, s_hh) = kernel_matrix(self.weight_ih, 1), kernel_matrix(self.weight_hh, 1)
        self.kernel = RNNKernel(w_ih, w_hh, gate_vector(self._folded_bias(), 1), self.hidden_size,
                                nonlinearity == "relu", **self._kernel_format(scale_ih=s_ih, scale_hh=s_hh))


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
        (w_ih, s_ih), (w_hh, s_hh) = kernel_matrix(self.weight_ih, 3), kernel_matrix(self.weight_hh, 3)
        self.kernel = GRUKernel(w_ih, w_hh, gate_vector(bias, 3), gate_vector(b_hn, 1), H,
                                self.reset_after, **self._kernel_format(scale_ih=s_ih, scale_hh=s_hh))


class LSTMRecurrence(Recurrence):
    """weight_hr (P, H): PyTorch's projection (h has size P). weight_ph (3, H): peepholes."""

    gates = 4
    has_cell_state = True

    def __init__(self, weight_ih, weight_hh, bias_ih=None, bias_hh=None, weight_hr=None,
                 weight_ph=None, suffix=""):
        w_hr = None if weight_hr is None else as_matrix(weight_hr, "weight_hr" + suffix)
        if w_hr is not None and w_hr.shape[0] == 0:
            raise shape_error("weight_hr" + suffix, "(proj_size, hidden_size), proj_size >= 1", w_hr.shape)
        super().__init__(weight_ih, weight_hh, bias_ih, bias_hh, suffix,
                         hidden_out=None if w_hr is None else w_hr.shape[0])
        H = self.hidden_size
        if w_hr is not None and w_hr.shape != (w_hr.shape[0], H):
            raise shape_error("weight_hr" + suffix, (w_hr.shape[0], H), w_hr.shape)
        check_same_format(self.weight_format, **{"weight_hr" + suffix: w_hr})
        w_ph = None if weight_ph is None else self._vector(weight_ph, "weight_ph" + suffix, 2)
        if w_ph is not None and w_ph.shape != (3, H):
            raise shape_error("weight_ph" + suffix, (3, H), w_ph.shape)
        check_same_dtype(self.dtype, **{"weight_ph" + suffix: w_ph})
        self.weight_hr, self.weight_ph = w_hr, w_ph
        self._arguments.update(weight_hr=w_hr, weight_ph=w_ph)
        self.proj_size = 0 if w_hr is None else w_hr.shape[0]
        (w_ih, s_ih), (w_hh, s_hh) = kernel_matrix(self.weight_ih, 4), kernel_matrix(self.weight_hh, 4)
        w_hr_t, s_hr = (None, None) if w_hr is None else kernel_matrix(w_hr, 1)
        self.kernel = LSTMKernel(
            w_ih, w_hh, gate_vector(self._folded_bias(), 4), H, w_hr_t,
            None if w_ph is None else gate_vector(w_ph.reshape(-1), 3).reshape(3, -1),
            **self._kernel_format(scale_ih=s_ih, scale_hh=s_hh, scale_hr=s_hr))

    def stored(self):
        p = super().stored()
        if self.weight_hr is not None:
            p["weight_hr"] = self.weight_hr
        if self.weight_ph is not None:
            p["weight_ph"] = self.weight_ph
        return p
