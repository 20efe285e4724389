# Streaming: a service keeps one StreamState per stream (h and c of every layer, plus the kernels'
# workspace) and advances it one step per call. The hot path is a few pointer checks, one GIL-free
# T = 1 walk per layer, and a copy of the output row: no allocation when `out` is given, no NumPy
# call, nothing else in Python.
cimport numpy as cnp
from libc.stdlib cimport free
from libc.string cimport memmove

import sys

import numpy as np

from fastcell_c.walk cimport Walk, make_walk
from fastcell_c.kernel import as_int, to_numpy
from fastcell_c.kernel cimport (Kernel, alloc_aligned, blas_pays, buffer_of, enter_blas,
                                has_dims, is_array, leave_blas)

cnp.import_array()


cdef class StreamState:
    """h (and c) of every layer for `batch` streams, and the scratch memory a step needs.

    Made by `model.new_state(batch)`; `h` is (num_layers, batch, H_out), `c` (num_layers, batch, H)
    for the LSTMs, else None: views you may read and write. A state serves one stream (or one
    batch of streams) at a time: two threads must not step the same state at once. It serves
    the model that made it, also after that model loads new weights (load_state_dict): its next
    step uses them.
    """

    def __cinit__(self, Stepper owner, batch):
        batch = as_int(batch, "batch")
        cdef Kernel k
        cdef Py_ssize_t n = 0
        # Bytes one stream needs (h, c and the largest workspace): a batch whose total does not
        # fit in Py_ssize_t cannot be allocated (checked before any size is computed).
        for k in owner.kernels:
            n = max(n, k.work_elems(1, 1, False))
        n += len(owner.kernels) * (owner.output_size + owner.hidden_size)
        if batch > sys.maxsize // (n * owner.dtype.itemsize):
            raise MemoryError(f"batch: {batch} streams need more memory than can be addressed")
        n = 0
        for k in owner.kernels:
            n = max(n, k.work_elems(1, batch, False))
        self.owner = owner
        self.batch = batch
        # Views: NumPy refuses to resize an array that does not own its data, so the buffers
        # step() writes into keep their size for the state's lifetime.
        self.h = np.zeros((len(owner.kernels), batch, owner.output_size), owner.dtype)[...]
        self.c = np.zeros((len(owner.kernels), batch, owner.hidden_size), owner.dtype)[...] \
            if owner.has_cell_state else None
        self.work = alloc_aligned(n * owner.dtype.itemsize)
        if self.work == NULL:
            raise MemoryError(f"stream workspace for batch={batch}")
        self.reset()

    def __dealloc__(self):
        free(self.work)

    def reset(self):
        """Back to the model's initial state (zeros, or its initial_state), in place."""
        init = self.owner.initial
        if init is None:
            self.h[...] = 0
            if self.c is not None:
                self.c[...] = 0
            return
        self.h[...] = init[0][:, None, :]
        if self.c is not None:
            self.c[...] = init[1][:, None, :]

    def copy(self):
        """An independent state with the same h (and c)."""
        cdef StreamState s = StreamState(self.owner, self.batch)
        s.h[...] = self.h
        if self.c is not None:
            s.c[...] = self.c
        return s

    __copy__ = copy

    def __deepcopy__(self, memo):
        return self.copy()

    def __reduce__(self):
        # A state serves the model instance that made it (step() checks), and an unpickled model is
        # another instance; the kernels behind `owner` hold raw pointers and do not pickle.
        raise TypeError("StreamState cannot be pickled: pickle the model and the arrays state.h "
                        "(and state.c), then copy them into the unpickled model's new_state()")

    def __repr__(self):
        return f"StreamState(batch={self.batch}, layers={self.h.shape[0]}, dtype={self.h.dtype})"


cdef class Stepper:
    """Advances StreamStates of a stack of unidirectional layers (or of one cell).

    family: an object naming the model this stepper computes for; a model that loads new weights
    makes a new stepper of the same family (and the same shapes), whose steps take the states
    its earlier steppers made. None: a family of its own."""

    def __init__(self, kernels, family=None, initial=None, Team team=None):
        self.kernels = tuple(kernels)
        self.family = self if family is None else family
        self.initial = None if initial is None else tuple(initial)
        self.team = team
        cdef Kernel first = self.kernels[0]
        cdef Kernel last = self.kernels[len(self.kernels) - 1]
        self.dtype = first.dtype
        self.typenum = cnp.NPY_DOUBLE if first.is_double else cnp.NPY_FLOAT
        self.input_size = first.input_size
        self.hidden_size = first.hidden_size
        self.output_size = last.output_size
        self.has_cell_state = first.has_cell_state

    def __reduce__(self):
        return (Stepper, (self.kernels, None, self.initial, self.team))

    def new_state(self, batch=1):
        return StreamState(self, batch)

    def step(self, x, StreamState state not None, out=None):
        """y = step(x, state, out=None): one step of x (B, I) (or (I,) for one stream) from
        `state`, which is updated in place. Returns the output row (B, H_out) (or (H_out,)): a new
        array, or `out` filled in place, with no allocation at all."""
        cdef Py_ssize_t B, I = self.input_size, i
        cdef int nd
        if state.owner is not self and state.owner.family is not self.family:
            raise ValueError("state: expected a state made by this model's new_state()")
        if not ((is_array(x, self.typenum, 2) or is_array(x, self.typenum, 1))
                and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>x)):
            x = self._coerce(x)  # also a byte-swapped array: the kernels read native numbers
        # Shapes through the C API: a Python attribute lookup here would cost more than the math.
        nd = cnp.PyArray_NDIM(<cnp.ndarray>x)
        B = 1 if nd == 1 else cnp.PyArray_DIM(<cnp.ndarray>x, 0)
        if cnp.PyArray_DIM(<cnp.ndarray>x, nd - 1) != I or B != state.batch:
            want = f"({I},) or (1, {I})" if state.batch == 1 else f"({state.batch}, {I})"
            raise ValueError(f"x: expected shape {want} for a state of batch {state.batch}, "
                             f"got {tuple(x.shape)}")
        cdef char* dst
        cdef cnp.npy_intp dims[2]
        dims[0] = B
        dims[1] = self.output_size
        if out is None:
            out = cnp.PyArray_EMPTY(nd, dims + 2 - nd, self.typenum, 0)
        elif not has_dims(out, self.typenum, nd, dims[2 - nd], dims[1], -1, True):
            buffer_of(out, "out", self.typenum, (B, self.output_size)[2 - nd:], True)
        dst = <char*>cnp.PyArray_DATA(<cnp.ndarray>out)
        cdef const char* src = <const char*>cnp.PyArray_DATA(<cnp.ndarray>x)
        cdef char* h = <char*>cnp.PyArray_DATA(<cnp.ndarray>state.h)
        cdef char* c = NULL if state.c is None else <char*>cnp.PyArray_DATA(<cnp.ndarray>state.c)
        cdef Py_ssize_t itemsize = 8 if self.typenum == cnp.NPY_DOUBLE else 4
        cdef Walk w = make_walk(1, B, False, 0, NULL, NULL, False)
        w.flip = state.parity
        cdef bint use_blas = blas_pays(B)
        state.parity = not state.parity
        cdef Kernel k
        cdef int previous
        for i in range(len(self.kernels)):
            k = <Kernel>self.kernels[i]
            w.use_blas = use_blas and k.blas_ok            # float formats only
            w.qwork = k.qwork_of(state.work, 1, B, False)
            # Split over the team where that pays (with a scratch of its own: a step that large
            # pays for it), else on this thread.
            if (self.team is None or w.use_blas
                    or not k.run_parts(&w, src, h, c, NULL, self.team)):
                with nogil:
                    previous = enter_blas() if w.use_blas else -1
                    k.run_walk(&w, src, h, c, NULL, state.work)
                    leave_blas(previous)
            src = h    # the next layer reads this layer's new h
            h += B * k.output_size * itemsize
            if c != NULL:
                c += B * k.hidden_size * itemsize
        memmove(dst, src, B * self.output_size * itemsize)  # out may overlap state.h
        return out

    cdef object _coerce(self, x):
        """Anything else array-like: converted (a copy), with the errors a caller can act on."""
        a = to_numpy(x, "x")
        if a.ndim not in (1, 2):
            raise ValueError(f"x: expected shape (B, {self.input_size}) or ({self.input_size},), "
                             f"got {a.shape}")
        return np.ascontiguousarray(a, dtype=self.dtype)
