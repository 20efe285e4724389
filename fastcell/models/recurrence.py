"""One direction of one recurrent layer: its validated weights, handed once to its kernel, and the
call into fastcell_c. Cells and layers are built from these.

The weight matrices are kept once, packed in the layout the kernel reads (fastcell_c/kernel.pyx:
gate blocks side by side, each packed part padded to whole SIMD vectors, none for a matrix
narrower than one); ``stored()`` and ``parameters()`` unpack them when asked. Biases and
peepholes, small, are kept as given too (the kernel folds b_ih + b_hh, which cannot be split
again). All arrays are read-only, so one object serves many threads.

The weight matrices (W_ih, W_hh, W_hr) may be float32, float64, or ``Reduced`` (int8 or bf16,
fastcell.formats.reduced), all in one format; a reduced recurrence computes in float32 with float32
biases and peepholes. An int8 one quantizes its input x to ``input_bits`` (16 or 8) per row.
"""

import numpy as np

from fastcell import spec
from fastcell.checks import FLOAT_DTYPES, as_flag, as_weight, check_same_dtype, shape_error, to_numpy
from fastcell.formats.reduced import REDUCED_FORMATS, Reduced, input_bits_config, input_bits_for
from fastcell_c.gru import GRUKernel
from fastcell_c.kernel import INT8_MAX_ROWS, gate_layout
from fastcell_c.lstm import LSTMKernel
from fastcell_c.rnn import RNNKernel

def as_matrix(value, name):
    """A weight matrix for a kernel to pack: a Reduced one as it is, else a C-contiguous float32 or
    float64 array (no copy where it is one already: the kernel keeps its packed copy only)."""
    if isinstance(value, Reduced):
        if value.format == "int8" and value.shape[1] > INT8_MAX_ROWS:
            raise ValueError(f"{name}: int8 weights take at most {INT8_MAX_ROWS} inputs per row (an "
                             f"int32 sum must not overflow), got {value.shape[1]}")
        return value
    arr = to_numpy(value, name)
    if arr.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected float32 or float64 weights, got {arr.dtype}; "
            f"convert explicitly, e.g. np.asarray({name}, dtype=np.float32)"
        )
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))


def packed_bytes(gates, hidden_size, input_size, hidden_out, itemsize, split_gates=0):
    """The bytes a kernel's packed W_ih over W_hh will take (fastcell_c.kernel.gate_layout): the
    rows I + H_out times the gate row's width, for a check before anything is built."""
    _, widths = gate_layout(gates, hidden_size, split_gates)
    return (input_size + hidden_out) * sum(widths) * itemsize


def kernel_matrix(w):
    """(data, int8 per-row scales or None) of a matrix, as a kernel takes it (bf16 as its bits)."""
    if isinstance(w, Reduced):
        return w.data, w.scale
    return w, None


class Recurrence:
    """Base: weight_ih (gates*H, I), weight_hh (gates*H, H_out), optional biases (gates*H,)."""

    gates = 0
    has_cell_state = False
    matrices = ("weight_ih", "weight_hh")

    def __init__(self, weight_ih, weight_hh, bias_ih, bias_hh, suffix="", hidden_out=None,
                 input_bits=None):
        self.suffix = suffix
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
        # int8: the bits x is quantized to (None for the other formats)
        self.input_bits = input_bits_for(input_bits, self.weight_format)
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
        self.bias_ih, self.bias_hh = b_ih, b_hh
        self._given = {"weight_ih": w_ih, "weight_hh": w_hh}   # until the kernel has packed them

    def _vector(self, value, name, ndim):
        """A bias or peephole: in a reduced recurrence, float32 whatever came (exactly
        representable for float32 input)."""
        a = as_weight(value, name, ndim)
        if self.weight_format in REDUCED_FORMATS and a.dtype != np.float32:
            a = as_weight(a.astype(np.float32), name, ndim)
        return a

    def _kernel_args(self, *names):
        """The given matrices' data, then the weight-format keyword arguments of the kernels (the
        int8 scales under scale_<ih|hh|hr>). The given matrices are let go: the kernel keeps
        its packed copy only."""
        given = self.__dict__.pop("_given")
        data, fmt = [], {"weight_format": self.weight_format}
        for name in names:
            d, scale = kernel_matrix(given[name])
            data.append(d)
            if self.weight_format in REDUCED_FORMATS:
                fmt["scale_" + name.split("_")[1]] = scale
        if self.input_bits is not None:
            fmt["input_bits"] = self.input_bits
        return data, fmt

    def _folded_bias(self):
        """b_ih + b_hh (zeros without bias): what the kernels add to every gate row."""
        if self.bias_ih is None:
            return np.zeros(self.gates * self.hidden_size, self.dtype)
        return self.bias_ih + self.bias_hh

    def run(self, x, h, c=None, out=None, out_col=0, batch_first=False, reverse=False,
            lengths=None, perm=None, team=None):
        """One GIL-free kernel call over a whole batch of sequences, on a team's threads where
        given and it pays: see fastcell_c.kernel.Kernel.run."""
        self.kernel.run(x, h, c, out, out_col, batch_first, reverse, lengths, perm, team)

    def resident_bytes(self):
        """Bytes of weights kept: the kernel's (packed matrices, laid-out biases, int8 scales)
        and the biases and peepholes as given."""
        kept = [self.bias_ih, self.bias_hh, getattr(self, "weight_ph", None)]
        return self.kernel.resident_bytes + sum(a.nbytes for a in kept if a is not None)

    def matrix(self, name):
        """One weight matrix as kept, unpacked now: a float array, or a Reduced one (read-only)."""
        slot, segment = {"weight_ih": (0, 0), "weight_hh": (0, 1), "weight_hr": (1, 0)}[name]
        data, scale = self.kernel.unpack(slot, segment)
        if self.weight_format in REDUCED_FORMATS:
            return Reduced(self.weight_format, data, scale)
        data.flags.writeable = False
        return data

    def stored(self):
        """The weights under PyTorch's names (without layer suffix), as kept: float arrays, or
        Reduced matrices (weights_file saves these); the matrices unpacked now."""
        p = {name: self.matrix(name) for name in ("weight_ih", "weight_hh")}
        if self.bias_ih is not None:
            p["bias_ih"], p["bias_hh"] = self.bias_ih, self.bias_hh
        return p

    def parameters(self):
        """The weights under PyTorch's names (without layer suffix), as float arrays: as given,
        or dequantized from a reduced format (computed now, not kept)."""
        return {n: stored_value(v) for n, v in self.stored().items()}

    def _options(self):
        return {}

    def __reduce__(self):
        # The compiled kernel holds raw pointers: pickle the weights and rebuild it on load.
        # input_bits only where not the default: int8 pickles of 16 bits load in older fastcells.
        return (_rebuild, (type(self), {**self.stored(), **self._options(),
                                        **input_bits_config(self.input_bits),
                                        "suffix": self.suffix}))


def stored_value(w):
    """A matrix as state_dict shows it: float as kept; a reduced one dequantized, when asked."""
    if isinstance(w, Reduced):
        out = w.dequantize()
        out.flags.writeable = False
        return out
    return w


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
    gates = spec.GATES["rnn"]

    def __init__(self, weight_ih, weight_hh, bias_ih=None, bias_hh=None, nonlinearity="tanh",
                 suffix="", input_bits=None):
        if nonlinearity not in spec.NONLINEARITIES:
            raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(weight_ih, weight_hh, bias_ih, bias_hh, suffix, input_bits=input_bits)
        self.nonlinearity = nonlinearity
        (w_ih, w_hh), fmt = self._kernel_args("weight_ih", "weight_hh")
        self.kernel = RNNKernel(w_ih, w_hh, self._folded_bias(), self.hidden_size,
                                nonlinearity == "relu", **fmt)

    def _options(self):
        return {"nonlinearity": self.nonlinearity}


class GRURecurrence(Recurrence):
    gates = spec.GATES["gru"]

    def __init__(self, weight_ih, weight_hh, bias_ih=None, bias_hh=None, reset_after=True,
                 suffix="", input_bits=None):
        super().__init__(weight_ih, weight_hh, bias_ih, bias_hh, suffix, input_bits=input_bits)
        self.reset_after = as_flag(reset_after, "reset_after")
        H = self.hidden_size
        bias = self._folded_bias()
        b_hn = np.zeros(H, self.dtype)
        if self.reset_after and self.bias_ih is not None:
            # b_hn sits inside r * (W_hn h + b_hn): it cannot be folded into b_in.
            bias[2 * H:] = self.bias_ih[2 * H:]
            b_hn = self.bias_hh[2 * H:]
        (w_ih, w_hh), fmt = self._kernel_args("weight_ih", "weight_hh")
        self.kernel = GRUKernel(w_ih, w_hh, bias, b_hn, H, self.reset_after, **fmt)

    def _options(self):
        return {"reset_after": self.reset_after}


class LSTMRecurrence(Recurrence):
    """weight_hr (P, H): PyTorch's projection (h has size P). weight_ph (3, H): peepholes."""

    gates = spec.GATES["lstm"]
    has_cell_state = True

    def __init__(self, weight_ih, weight_hh, bias_ih=None, bias_hh=None, weight_hr=None,
                 weight_ph=None, suffix="", input_bits=None):
        w_hr = None if weight_hr is None else as_matrix(weight_hr, "weight_hr" + suffix)
        if w_hr is not None and w_hr.shape[0] == 0:
            raise shape_error("weight_hr" + suffix, "(proj_size, hidden_size), proj_size >= 1", w_hr.shape)
        super().__init__(weight_ih, weight_hh, bias_ih, bias_hh, suffix,
                         hidden_out=None if w_hr is None else w_hr.shape[0], input_bits=input_bits)
        H = self.hidden_size
        if w_hr is not None and w_hr.shape != (w_hr.shape[0], H):
            raise shape_error("weight_hr" + suffix, (w_hr.shape[0], H), w_hr.shape)
        check_same_format(self.weight_format, **{"weight_hr" + suffix: w_hr})
        w_ph = None if weight_ph is None else self._vector(weight_ph, "weight_ph" + suffix, 2)
        if w_ph is not None and w_ph.shape != (3, H):
            raise shape_error("weight_ph" + suffix, (3, H), w_ph.shape)
        check_same_dtype(self.dtype, **{"weight_ph" + suffix: w_ph})
        self.weight_ph = w_ph
        self.proj_size = 0 if w_hr is None else w_hr.shape[0]
        if w_hr is not None:
            self._given["weight_hr"] = w_hr
            self.matrices = ("weight_ih", "weight_hh", "weight_hr")
        (w_ih, w_hh, *hr), fmt = self._kernel_args(*self.matrices)
        self.kernel = LSTMKernel(w_ih, w_hh, self._folded_bias(), H, hr[0] if hr else None, w_ph,
                                 **fmt)

    @property
    def weight_hr(self):
        return self.matrix("weight_hr") if self.proj_size else None

    def stored(self):
        p = super().stored()            # PyTorch's order: weight_hr after the biases
        if self.proj_size:
            p["weight_hr"] = self.matrix("weight_hr")
        if self.weight_ph is not None:
            p["weight_ph"] = self.weight_ph
        return p
