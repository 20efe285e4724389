"""Layers with torch.nn.RNN / GRU / LSTM's constructor, state_dict names and call semantics, plus
PeepholeLSTM. Every layer and direction is one call of the compiled sequence kernel; Python loops
over layers and directions only, never over time."""

import numpy as np

from fastcell import spec
from fastcell.checks import (FLOAT_DTYPES, Frozen, as_flag, as_input, as_int, shape_error,
                             to_numpy)
from fastcell.formats.reduced import (REDUCED_FORMATS, Reduced, input_bits_config, input_bits_for,
                                      reduce)
from fastcell.models.recurrence import GRURecurrence, LSTMRecurrence, RNNRecurrence
from fastcell_c.kernel import run_directions
from fastcell_c.stream import Stepper
from fastcell_c.team import team_of, unpickled_threads


class StateDictError(ValueError):
    """load_state_dict found missing, unexpected or mis-shaped entries (all listed)."""


class _Layer(Frozen):
    """Shared by the four layer types. Subclasses set ``kind``, ``gates`` and ``_make``.

    ``reverse=True`` (not in torch.nn; ONNX's direction="reverse") makes a one-directional layer
    run backwards in time, as a bidirectional layer's backward half does (with lengths: from each
    sequence's last valid element); its weights keep the plain names (``weight_ih_l0``). Such a
    layer, like a bidirectional one, needs the whole sequence: it has no ``step``.

    ``input_bits`` (int8 weights only; fastcell.quantize sets it): the bits to which every layer's
    input x is quantized per row, 16 (None: the default) or 8.
    """

    kind = ""
    gates = 0
    has_cell_state = False
    reverse = False  # a class default too, so layers pickled before the option existed load
    _initial = None  # likewise: no initial state (zeros)
    threads = 1      # likewise: one thread
    _team = None
    _input_bits = None  # likewise: the format's default (16 for int8)

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 bidirectional=False, dtype=np.float32, proj_size=0, reverse=False, *,
                 weights=None, initial_state=None, threads=1, input_bits=None):
        input_size, hidden_size = as_int(input_size, "input_size"), as_int(hidden_size, "hidden_size")
        num_layers, proj_size = as_int(num_layers, "num_layers"), as_int(proj_size, "proj_size", 0)
        if proj_size and proj_size >= hidden_size:
            raise ValueError(f"proj_size: expected 0 or less than hidden_size={hidden_size}, got {proj_size}")
        try:
            # None is PyTorch's default dtype, float32 (NumPy's np.dtype(None) is float64).
            dt = np.dtype(np.float32 if dtype is None else dtype)
        except (TypeError, ValueError):
            raise TypeError(f"dtype: expected float32 or float64, got {dtype!r}") from None
        if dt not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected float32 or float64, got {dt}")
        self.input_size, self.hidden_size = int(input_size), int(hidden_size)
        self.num_layers, self.proj_size = int(num_layers), int(proj_size)
        self.bias, self.batch_first, self.bidirectional = (
            as_flag(bias, "bias"), as_flag(batch_first, "batch_first"), as_flag(bidirectional, "bidirectional"))
        self.reverse = as_flag(reverse, "reverse")
        if self.reverse and self.bidirectional:
            raise ValueError("reverse: a bidirectional layer already runs both ways; reverse=True "
                             "is for a one-directional layer that runs backwards in time")
        self.dtype = dt
        # A reduced weight format (int8, bf16) comes only with its weights (quantize, load).
        self._weight_format = _format_of(weights) or dt.name
        if self._weight_format in REDUCED_FORMATS and dt != np.float32:
            raise TypeError(f"dtype: {self._weight_format} weights compute in float32, got {dt}")
        # int8: the bits every layer's input x is quantized to (16 or 8), for every _make
        self._input_bits = input_bits_for(input_bits, self._weight_format)
        self._initial = self._checked_initial(initial_state)
        self.threads, self._team = team_of(threads)
        if weights is None:
            self._init_random()
        else:
            self.load_state_dict(weights)
        self._frozen = True

    # -- configuration --

    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    @property
    def weight_format(self):
        """How the weight matrices are stored: "float32", "float64", "int8" or "bf16"."""
        return self._weight_format

    @property
    def weight_bytes(self):
        """Bytes of weights this model keeps in memory (packed for its kernels)."""
        return sum(r.resident_bytes() for r in self._weights[0])

    @property
    def input_bits(self):
        """int8: the bits each layer's input x (the first layer's x, the next layers' the
        outputs below) is quantized to per row, 16 or 8; None for the other formats."""
        return self._weights[0][0].input_bits

    @property
    def output_size(self):
        """H_out: the size of h and of each direction's output."""
        return self.proj_size or self.hidden_size

    @property
    def initial_state(self):
        """Where a call starts when hx is None, and where new streams start (new_state, reset,
        a StreamPool's open): None for zeros, as torch.nn; else h_0 (D*L, H_out), or for the
        LSTMs an (h_0, c_0) pair with c_0 (D*L, H), the same for every sequence of a batch (a
        learned initial state, kept with the weights: an ONNX file's constant initial_h)."""
        init = self._initial
        if init is None:
            return None
        return init if self.has_cell_state else init[0]

    def _checked_initial(self, value):
        """The given initial state as a tuple of read-only (D*L, size) arrays, or None."""
        if value is None:
            return None
        n = self.num_layers * self.num_directions
        sizes = [("h_0", self.output_size)] + ([("c_0", self.hidden_size)] if self.has_cell_state else [])
        if self.has_cell_state:
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise TypeError(f"initial_state: expected an (h_0, c_0) pair, got {type(value).__name__}")
            given = list(value)
        else:
            given = [value]
        out = []
        for (name, size), v in zip(sizes, given):
            a = as_input(v, f"initial_state {name}", self.dtype)
            if a.shape != (n, size):
                raise shape_error(f"initial_state {name}", (n, size), a.shape)
            a = np.array(a, self.dtype, copy=True)
            a.flags.writeable = False
            out.append(a)
        return tuple(out)

    def config(self):
        """Everything needed to rebuild this layer (the weight file's metadata)."""
        cfg = {"cell": self.kind, "module": "layer", "input_size": self.input_size, "hidden_size": self.hidden_size,
               "num_layers": self.num_layers, "bias": self.bias, "batch_first": self.batch_first,
               "bidirectional": self.bidirectional, "dtype": self.dtype.name, **self._extra_config()}
        if self.reverse:  # only when set, so every other layer's config is as before
            cfg["reverse"] = True
        if self._initial is not None:   # likewise: its tensors go in the file beside the weights
            cfg["initial_state"] = True
        if self._weight_format in REDUCED_FORMATS:
            cfg["weight_format"] = self._weight_format
        cfg.update(input_bits_config(self.input_bits))
        return cfg

    def constructor_args(self):
        """The keyword arguments that build this layer's architecture again (give them with
        weights= and initial_state= to build it with given weights)."""
        return {k: v for k, v in self.config().items()
                if k not in ("cell", "module", "weight_format", "initial_state")}

    def _extra_config(self):
        return {}

    def _suffixes(self):
        return spec.suffixes(self.num_layers, self.num_directions)

    def expected_shapes(self):
        """{name: shape} of every parameter, under PyTorch's state_dict names."""
        return spec.layer_shapes(self.kind, self.input_size, self.hidden_size, self.num_layers,
                                 self.bias, self.bidirectional, self.proj_size)

    def __repr__(self):
        args = [str(self.input_size), str(self.hidden_size)]
        defaults = {"num_layers": 1, "bias": True, "batch_first": False, "bidirectional": False}
        cfg = self.config()
        args += [f"{k}={cfg[k]}" for k in defaults if cfg[k] != defaults[k]]
        args += ["reverse=True"] if self.reverse else []
        args += [f"{k}={v!r}" for k, v in self._extra_config().items()]
        fmt = f", weight_format={self._weight_format!r}" if self._weight_format in REDUCED_FORMATS else ""
        fmt += "" if self.input_bits is None else f", input_bits={self.input_bits}"
        return f"{type(self).__name__}({', '.join(args)}, dtype={self.dtype.name}{fmt})"

    # -- weights --

    def _init_random(self):
        # PyTorch's default initialisation, so a fresh layer behaves like a fresh torch layer.
        rng = np.random.default_rng()
        k = 1 / np.sqrt(self.hidden_size)
        self._load({n: self._convert(n, rng.uniform(-k, k, s).astype(self.dtype))
                    for n, s in self.expected_shapes().items()})

    def _load(self, weights):
        recs = []
        for _, _, s in self._suffixes():
            w = {n[: -len(s)]: v for n, v in weights.items() if n.endswith(s)}
            recs.append(self._make(w, s))
        # One reference, replaced whole: a call takes it once, so it computes every layer and
        # direction with the old weights or with the new ones, never a mix.
        self._weights = (tuple(recs), self._make_stepper(recs))

    def _make_stepper(self, recs):
        if self.bidirectional or self.reverse:
            return None
        # The family is this layer: states made before a reload keep stepping, with new weights.
        return Stepper([r.kernel for r in recs], self._family(), self._initial, self._team)

    def _family(self):
        return self.__dict__.setdefault("_state_family", _StateFamily())

    def __getstate__(self):
        recs, _ = self._weights
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("_weights", "_state_family", "_team")}
        state["_recs"] = recs
        return state

    def __setstate__(self, state):
        recs = state.pop("_recs")
        self.__dict__.update(state)
        self.__dict__["threads"], self.__dict__["_team"] = team_of(unpickled_threads(self.threads))
        self.__dict__["_weights"] = (recs, self._make_stepper(recs))

    def with_threads(self, threads):
        """This model computing on `threads` threads (its own team): a new model object that
        shares this one's packed weights (no copy). A later load_state_dict on either changes
        that one alone."""
        threads, team = team_of(threads)
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)     # not copy.copy: that would pickle, a new family
        object.__setattr__(twin, "threads", threads)
        object.__setattr__(twin, "_team", team)
        recs = self._weights[0]
        object.__setattr__(twin, "_weights", (recs, twin._make_stepper(recs)))
        return twin

    # -- streaming --

    @property
    def _stepper(self):
        return self._weights[1]

    def _require_stepper(self):
        stepper = self._weights[1]
        if stepper is None:
            which = "a bidirectional" if self.bidirectional else "a reverse (backwards in time)"
            raise ValueError(f"{type(self).__name__}: {which} layer needs the whole "
                             "sequence; call the layer on it instead of stepping")
        return stepper

    def new_state(self, batch=1):
        """A StreamState holding h (and c) of every layer for `batch` streams (zeros) and the
        kernels' workspace, to advance with step(). Unidirectional layers only."""
        return self._require_stepper().new_state(batch)

    def step(self, x, state, out=None):
        """The streaming call: advances `state` (from new_state) in place by one time step of
        x (B, I) or (I,) through every layer, and returns the last layer's output (B, H_out) or
        (H_out,), written into `out` when given (then nothing is allocated)."""
        return self._require_stepper().step(x, state, out)

    def state_dict(self):
        """Every parameter under PyTorch's names, as read-only float NumPy arrays (a reduced
        format's matrices dequantized, computed now)."""
        out = {}
        for rec, (_, _, s) in zip(self._weights[0], self._suffixes()):
            out.update({n + s: v for n, v in rec.parameters().items()})
        return out

    def _stored_state_dict(self):
        """Every parameter as kept: float arrays and, in a reduced format, Reduced matrices."""
        out = {}
        for rec, (_, _, s) in zip(self._weights[0], self._suffixes()):
            out.update({n + s: v for n, v in rec.stored().items()})
        return out

    def _convert(self, name, v):
        """A given parameter in this layer's form: its dtype, or a matrix in its reduced format
        (a float matrix is quantized; a Reduced one must be in this format already)."""
        matrix = spec.is_matrix(name)
        fmt = self._weight_format
        if isinstance(v, Reduced):
            if not matrix or v.format != fmt:
                raise TypeError(f"{name}: a {v.format} matrix cannot go into a {fmt} "
                                f"{'model' if matrix else 'bias or peephole (float only)'}")
            return v
        if matrix and fmt in REDUCED_FORMATS:
            return reduce(np.asarray(v, dtype=np.float32), fmt, name)
        return np.asarray(v, dtype=self.dtype)

    def load_state_dict(self, state_dict):
        """Loads PyTorch tensors or NumPy arrays under PyTorch's names (strict), converted to this
        layer's dtype. Missing, unexpected and mis-shaped entries are all listed in one error."""
        expected = self.expected_shapes()
        try:
            state_dict = dict(state_dict)
        except (TypeError, ValueError):
            raise TypeError(f"state_dict: expected a mapping of names to arrays, "
                            f"got {type(state_dict).__name__}") from None
        given = {str(k): v if isinstance(v, Reduced) else to_numpy(v, str(k))
                 for k, v in state_dict.items()}
        problems = [f"missing: {n} {expected[n]}" for n in expected if n not in given]
        problems += [f"unexpected: {n}" for n in given if n not in expected]
        problems += [f"mis-shaped: {n} expected {expected[n]}, got {given[n].shape}"
                     for n in expected if n in given and given[n].shape != expected[n]]
        if problems:
            raise StateDictError(f"{type(self).__name__}.load_state_dict: " + "; ".join(problems))
        self._load({n: self._convert(n, v) for n, v in given.items()})

    # -- the call --

    def __call__(self, x, hx=None, lengths=None):
        """output, h_n = layer(x, hx, lengths) (LSTMs: output, (h_n, c_n)), as torch.nn.

        x: (T, B, I), (B, T, I) with batch_first, or unbatched (T, I). hx: h_0 (D*L, B, H_out)
        (unbatched (D*L, H_out)), or (h_0, c_0) for the LSTMs; None means zeros (or the layer's
        initial_state, where it has one). lengths: B
        sequence lengths of a padded batch, as pack_padded_sequence(x, lengths,
        enforce_sorted=False): outputs past a length are zero, h_n is taken at each sequence's last
        step, and the output has max(lengths) steps, as pad_packed_sequence returns.
        """
        x = as_input(x, "x", self.dtype)
        if x.ndim not in (2, 3) or x.shape[-1] != self.input_size:
            lead = "(B, T, " if self.batch_first else "(T, B, "
            raise shape_error("x", f"{lead}{self.input_size}) or (T, {self.input_size})", x.shape)
        unbatched = x.ndim == 2
        if unbatched:
            if lengths is not None:
                raise ValueError("lengths: only for a batched x, got an unbatched (T, I) input")
            x = x[None] if self.batch_first else x[:, None]
        T, B = (x.shape[1], x.shape[0]) if self.batch_first else x.shape[:2]
        if T == 0:
            raise ValueError("x: expected a sequence length larger than 0 (as torch.nn), got 0")
        lengths, perm = self._lengths(lengths, T, B)
        if lengths is not None and lengths[0] < T:
            T = int(lengths[0])  # pad_packed_sequence's output length
            x = np.ascontiguousarray(x[:, :T] if self.batch_first else x[:T])
        states = self._initial_states(hx, B, unbatched)
        out = self._run(x, states, lengths, perm, T, B)
        if unbatched:
            out = out[0] if self.batch_first else out[:, 0]
            states = [s[:, 0] for s in states]
        return out, (tuple(states) if self.has_cell_state else states[0])

    def _lengths(self, lengths, T, B):
        """(lengths sorted descending, perm) for the kernels, or (None, None) when every sequence
        is full: the kernels then read x in place."""
        if lengths is None:
            return None, None
        arr = to_numpy(lengths, "lengths")
        if arr.dtype.kind not in "iu":
            raise TypeError(f"lengths: expected integers, got dtype {arr.dtype}")
        if arr.shape != (B,):
            raise shape_error("lengths", (B,), arr.shape)
        if B and (arr.min() < 1 or arr.max() > T):
            raise ValueError(f"lengths: expected values in [1, {T}] (the time steps of x), "
                             f"got min {arr.min()}, max {arr.max()}")
        if B == 0 or arr.min() == T:
            return None, None
        perm = np.argsort(-arr.astype(np.int64), kind="stable")
        return np.ascontiguousarray(arr[perm], dtype=np.int64), perm.astype(np.int64)

    def _initial_states(self, hx, B, unbatched):
        """Fresh (D*L, B, size) buffers holding h_0 (and c_0); the kernels update them in place."""
        n = self.num_layers * self.num_directions
        sizes = [("h_0", self.output_size)] + ([("c_0", self.hidden_size)] if self.has_cell_state else [])
        if hx is None:
            if self._initial is not None:
                return [np.repeat(a[:, None, :], B, axis=1) for a in self._initial]
            return [np.zeros((n, B, size), self.dtype) for _, size in sizes]
        if self.has_cell_state:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(f"hx: expected an (h_0, c_0) pair, got {type(hx).__name__}")
            given = list(hx)
        else:
            given = [hx]
        states = []
        for (name, size), v in zip(sizes, given):
            a = as_input(v, name, self.dtype)
            want = (n, size) if unbatched else (n, B, size)
            if a.shape != want:
                raise shape_error(name, want, a.shape)
            states.append(a.reshape(n, B, size).copy())   # C-contiguous: as_input made it so
        return states

    def _run(self, x, states, lengths, perm, T, B):
        recs = self._weights[0]     # once: every layer and direction of this call from one set
        team = self._team
        D, P = self.num_directions, self.output_size
        shape = (B, T, D * P) if self.batch_first else (T, B, D * P)
        inp = x
        for k in range(self.num_layers):
            # Past a sequence's length nothing is written: those rows must start at zero.
            out = np.zeros(shape, self.dtype) if lengths is not None else np.empty(shape, self.dtype)
            # [h, c or None] of each direction, in processing order
            bufs = []
            for i in range(k * D, k * D + D):
                hc = [s[i] if perm is None else s[i][perm] for s in states]
                bufs += hc if len(hc) == 2 else [hc[0], None]
            if D == 2 and team is not None:     # the two directions at once (run_directions)
                run_directions(recs[2 * k].kernel, recs[2 * k + 1].kernel, inp, bufs, out, P,
                               self.batch_first, lengths, perm, team)
            else:
                for d in range(D):
                    recs[k * D + d].run(inp, bufs[2 * d], bufs[2 * d + 1], out, d * P,
                                        self.batch_first, d == 1 or self.reverse, lengths, perm,
                                        team)
            if perm is not None:
                for d in range(D):
                    for s, buf in zip(states, bufs[2 * d:2 * d + 2]):
                        s[k * D + d][perm] = buf
            inp = out
        return inp


def _format_of(weights):
    """The reduced format of given weights (their Reduced matrices'), or None for float ones."""
    if weights is None or not hasattr(weights, "values"):
        return None
    formats = {v.format for v in weights.values() if isinstance(v, Reduced)}
    if len(formats) > 1:
        raise TypeError(f"weights: expected one weight format, got {sorted(formats)}")
    return formats.pop() if formats else None


class _StateFamily:
    """Names the StreamStates of one layer across its reloads (stream.Stepper's family)."""

    __slots__ = ("__weakref__",)


class RNN(_Layer):
    """torch.nn.RNN: h_t = tanh or relu(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)."""

    kind, gates = "rnn", spec.GATES["rnn"]

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, bidirectional=False, dtype=np.float32, reverse=False, *,
                 weights=None, initial_state=None, threads=1, input_bits=None):
        if nonlinearity not in spec.NONLINEARITIES:
            raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, bidirectional, dtype,
                         reverse=reverse, weights=weights, initial_state=initial_state,
                         threads=threads, input_bits=input_bits)

    def _extra_config(self):
        return {"nonlinearity": self.nonlinearity}

    def _make(self, w, s):
        return RNNRecurrence(**w, nonlinearity=self.nonlinearity, suffix=s,
                             input_bits=self._input_bits)


class GRU(_Layer):
    """torch.nn.GRU (reset_after=True), or the reset-before GRU of Cho et al. 2014."""

    kind, gates = "gru", spec.GATES["gru"]

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 bidirectional=False, reset_after=True, dtype=np.float32, reverse=False, *,
                 weights=None, initial_state=None, threads=1, input_bits=None):
        self.reset_after = as_flag(reset_after, "reset_after")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, bidirectional, dtype,
                         reverse=reverse, weights=weights, initial_state=initial_state,
                         threads=threads, input_bits=input_bits)

    def _extra_config(self):
        return {"reset_after": self.reset_after}

    def _make(self, w, s):
        return GRURecurrence(**w, reset_after=self.reset_after, suffix=s,
                             input_bits=self._input_bits)


class LSTM(_Layer):
    """torch.nn.LSTM, with proj_size (LSTMP): returns output, (h_n, c_n)."""

    kind, gates, has_cell_state = "lstm", spec.GATES["lstm"], True

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 bidirectional=False, proj_size=0, dtype=np.float32, reverse=False, *,
                 weights=None, initial_state=None, threads=1, input_bits=None):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, bidirectional,
                         dtype, proj_size, reverse, weights=weights, initial_state=initial_state,
                         threads=threads, input_bits=input_bits)

    def _extra_config(self):
        return {"proj_size": self.proj_size}

    def _make(self, w, s):
        return LSTMRecurrence(**w, suffix=s, input_bits=self._input_bits)


class PeepholeLSTM(_Layer):
    """LSTM with diagonal peepholes weight_ph_l{k} (3, H), rows p_i, p_f, p_o (docs/SPEC.md); the
    PyTorch twin to train it is fastcell.torch.PeepholeLSTM."""

    kind, gates, has_cell_state = "peephole_lstm", spec.GATES["peephole_lstm"], True

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 bidirectional=False, dtype=np.float32, reverse=False, *, weights=None,
                 initial_state=None, threads=1, input_bits=None):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, bidirectional, dtype,
                         reverse=reverse, weights=weights, initial_state=initial_state,
                         threads=threads, input_bits=input_bits)

    def _make(self, w, s):
        return LSTMRecurrence(**w, suffix=s, input_bits=self._input_bits)
