"""The four cells of docs/SPEC.md, called like PyTorch's nn.*Cell: one step with ``cell(x, hx)``, a
whole sequence in one kernel call with ``cell.run(xs, state)``."""

import numpy as np

from fastcell.checks import Frozen, as_input, shape_error
from fastcell.formats.reduced import REDUCED_FORMATS, input_bits_config
from fastcell.models.recurrence import GRURecurrence, LSTMRecurrence, RNNRecurrence, stored_value
from fastcell_c.stream import Stepper
from fastcell_c.team import team_of, unpickled_threads


class _Cell(Frozen):
    """Shared call logic; subclasses build ``self._rec``, the kernel-ready weights."""

    threads = 1     # a class default, so cells pickled before the option existed load

    def __init__(self, rec, threads=1):
        self._rec = rec
        self._set_threads(*team_of(threads))
        self._frozen = True

    def _set_threads(self, threads, team):
        object.__setattr__(self, "threads", threads)
        self._team = team
        # A twin (with_threads) steps the states of the cell it came from: one family.
        first = self.__dict__.get("_stepper")
        self._stepper = Stepper([self._rec.kernel], first and first.family, None, team)
        # The streaming call goes straight to the compiled stepper: the method below, a Python
        # frame around the same call, would add 85 ns to a 1-2 us step. (A cell's stepper never
        # changes: cells have no load_state_dict.)
        object.__setattr__(self, "step", self._stepper.step)

    def __getstate__(self):
        return {"_rec": self._rec, "threads": self.threads}

    def __setstate__(self, state):
        # the compiled stepper and the team are rebuilt, not pickled
        _Cell.__init__(self, state["_rec"], unpickled_threads(state.get("threads", 1)))

    def with_threads(self, threads):
        """This cell computing on `threads` threads (a team of its own): a new cell sharing this
        one's packed weights (no copy)."""
        threads, team = team_of(threads)
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)     # not copy.copy: that would pickle, a new family
        twin._set_threads(threads, team)
        return twin

    input_size = property(lambda self: self._rec.input_size)
    hidden_size = property(lambda self: self._rec.hidden_size)
    dtype = property(lambda self: self._rec.dtype)
    weight_format = property(lambda self: self._rec.weight_format,
                             doc='How the weight matrices are stored: "float32", "float64", "int8" or "bf16".')
    weight_bytes = property(lambda self: self._rec.resident_bytes(),
                            doc="Bytes of weights this model keeps in memory (packed for its kernel).")
    input_bits = property(lambda self: self._rec.input_bits,
                          doc="int8: the bits x is quantized to per row, 16 or 8; None otherwise.")

    kind = ""

    def state_dict(self):
        """The weights under PyTorch's nn.*Cell names, as read-only float NumPy arrays (a reduced
        format's matrices dequantized, computed now)."""
        return dict(self._rec.parameters())

    def _stored_state_dict(self):
        return dict(self._rec.stored())

    def config(self):
        """Everything but the weights needed to rebuild this cell (the weight file's metadata)."""
        cfg = {"cell": self.kind, "module": "cell", "input_size": self.input_size,
               "hidden_size": self.hidden_size, "bias": self._rec.bias_ih is not None,
               "dtype": self.dtype.name, **self._extra_config()}
        if self.weight_format in REDUCED_FORMATS:
            cfg["weight_format"] = self.weight_format
        cfg.update(input_bits_config(self.input_bits))
        return cfg

    def _extra_config(self):
        return {}

    def __getattr__(self, name):
        # weight_ih, bias_hh, ... read straight from the (read-only) weights.
        rec = self.__dict__.get("_rec")
        if rec is not None:
            if name in rec.matrices:
                return stored_value(rec.matrix(name))  # unpacks this one matrix only
            if name in ("bias_ih", "bias_hh", "weight_ph") and (name != "weight_ph" or self.kind == "peephole_lstm"):
                return getattr(rec, name)  # None for bias=False, as in PyTorch
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self):
        fmt = f", weight_format={self.weight_format!r}" if self.weight_format in REDUCED_FORMATS else ""
        fmt += "" if self.input_bits is None else f", input_bits={self.input_bits}"
        return f"{type(self).__name__}({self.input_size}, {self.hidden_size}, dtype={self.dtype.name}{fmt})"

    # -- argument handling --

    def _inputs(self, value, name, step):
        """x as (T, B, I) plus whether it came unbatched; a step is T = 1."""
        x = as_input(value, name, self._rec.dtype)
        batched_ndim = 2 if step else 3
        if x.ndim not in (batched_ndim - 1, batched_ndim) or x.shape[-1] != self.input_size:
            raise shape_error(name, self._input_shapes(step), x.shape)
        unbatched = x.ndim == batched_ndim - 1
        if unbatched:
            x = x[None] if step else x[:, None]
        if step:
            x = x[None]
        return x, unbatched

    def _input_shapes(self, step):
        I = self.input_size
        return f"(B, {I}) or ({I},)" if step else f"(T, B, {I}) or (T, {I})"

    def _state(self, value, name, size, batch, unbatched):
        """A fresh (B, size) buffer holding the given state (zeros for None)."""
        dtype = self._rec.dtype
        if value is None:
            return np.zeros((batch, size), dtype)
        s = as_input(value, name, dtype)
        want = (size,) if unbatched else (batch, size)
        if s.shape != want:
            raise shape_error(name, want, s.shape)
        return s.reshape(batch, size).copy()   # as_input made it C-contiguous: so is the copy

    def _states(self, state, name, batch, unbatched):
        """[h] or [h, c] buffers for the kernel."""
        rec = self._rec
        if not rec.has_cell_state:
            return [self._state(state, name, rec.output_size, batch, unbatched)]
        if state is None:
            state = (None, None)
        elif not isinstance(state, (tuple, list)) or len(state) != 2:
            raise TypeError(f"{name}: expected an (h, c) pair, got {type(state).__name__}")
        elif state[0] is None or state[1] is None:
            raise TypeError(f"{name}: expected an (h, c) pair of arrays, got a None in it")
        return [self._state(state[0], name + "[0] (h)", rec.output_size, batch, unbatched),
                self._state(state[1], name + "[1] (c)", rec.hidden_size, batch, unbatched)]

    @staticmethod
    def _h_c(states):
        return states[0], (states[1] if len(states) == 2 else None)

    @staticmethod
    def _result(states, unbatched):
        out = [s[0] if unbatched else s for s in states]
        return out[0] if len(out) == 1 else tuple(out)

    # -- the two calls --

    def __call__(self, x, hx=None):
        """One step: x (B, I) or (I,); hx h, or (h, c) for the LSTMs; None means zeros.

        Returns the new state in the same form."""
        x, unbatched = self._inputs(x, "x", step=True)
        states = self._states(hx, "hx", x.shape[1], unbatched)
        self._rec.run(x, *self._h_c(states), team=self._team)
        return self._result(states, unbatched)

    def _require_stepper(self):
        return self._stepper

    def new_state(self, batch=1):
        """A StreamState for `batch` streams (zeros), to advance with step()."""
        return self._stepper.new_state(batch)

    def step(self, x, state, out=None):
        """The streaming call: advances `state` (from new_state) in place by one step of x (B, I)
        or (I,) and returns h (B, H) or (H,), written into `out` when given (then nothing is
        allocated). The same numbers as cell(x, hx). (Each cell binds this name to its compiled
        stepper's step, which does exactly this.)"""
        return self._stepper.step(x, state, out)

    def run(self, xs, state=None):
        """A whole sequence: xs (T, B, I) or (T, I). Returns (outputs (T, B, H_out), final state)."""
        x, unbatched = self._inputs(xs, "xs", step=False)
        T, B = x.shape[:2]
        states = self._states(state, "state", B, unbatched)
        rec = self._rec
        out = np.empty((T, B, rec.output_size), rec.dtype)
        rec.run(x, *self._h_c(states), out=out, team=self._team)
        return (out[:, 0] if unbatched else out), self._result(states, unbatched)


class RNNCell(_Cell):
    """h' = phi(W_ih x + b_ih + W_hh h + b_hh), phi tanh or relu (nn.RNNCell)."""

    def __init__(self, weight_ih, weight_hh, bias_ih=None, bias_hh=None, nonlinearity="tanh", *,
                 threads=1, input_bits=None):
        super().__init__(RNNRecurrence(weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity,
                                       input_bits=input_bits), threads)

    kind = "rnn"
    nonlinearity = property(lambda self: self._rec.nonlinearity)

    def _extra_config(self):
        return {"nonlinearity": self.nonlinearity}


class GRUCell(_Cell):
    """nn.GRUCell (reset_after=True) or the reset-before GRU of Cho et al. 2014."""

    def __init__(self, weight_ih, weight_hh, bias_ih=None, bias_hh=None, reset_after=True, *,
                 threads=1, input_bits=None):
        super().__init__(GRURecurrence(weight_ih, weight_hh, bias_ih, bias_hh, reset_after,
                                       input_bits=input_bits), threads)

    kind = "gru"
    reset_after = property(lambda self: self._rec.reset_after)

    def _extra_config(self):
        return {"reset_after": self.reset_after}


class LSTMCell(_Cell):
    """nn.LSTMCell; the state is an (h, c) pair."""

    def __init__(self, weight_ih, weight_hh, bias_ih=None, bias_hh=None, *, threads=1,
                 input_bits=None):
        super().__init__(LSTMRecurrence(weight_ih, weight_hh, bias_ih, bias_hh,
                                        input_bits=input_bits), threads)

    kind = "lstm"


class PeepholeLSTMCell(_Cell):
    """LSTM with diagonal peepholes weight_ph (3, H), rows p_i, p_f, p_o (docs/SPEC.md)."""

    def __init__(self, weight_ih, weight_hh, weight_ph, bias_ih=None, bias_hh=None, *, threads=1,
                 input_bits=None):
        if weight_ph is None:
            raise TypeError("weight_ph: expected an array of shape (3, hidden_size), got None")
        super().__init__(LSTMRecurrence(weight_ih, weight_hh, bias_ih, bias_hh, weight_ph=weight_ph,
                                        input_bits=input_bits), threads)

    kind = "peephole_lstm"
