# The stream pool: the states of up to `capacity` streams in one block, stepped by stream id. A
# service opens a stream when a client arrives and closes it when the client leaves; each tick
# steps whichever streams have a frame, in one GIL-free call that gathers their state rows,
# runs the layers' fused products on them and writes the new rows back (docs/DESIGN.md, "The path
# of a pool tick"). A row's numbers do not depend on which rows share its product (products.h), so a
# pool step gives each stream exactly the bits of its own StreamState.
cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset

import os
import sys
import weakref

import numpy as np

from fastcell_c.walk cimport Walk, make_walk
from fastcell_c.kernel import as_int, to_numpy
from fastcell_c.kernel cimport Kernel, UnitsLayout, alloc_aligned, buffer_of, has_dims, is_array
from fastcell_c.stream cimport Stepper

cnp.import_array()


cdef extern from "pthread.h" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t*, void*)
    int pthread_mutex_destroy(pthread_mutex_t*)
    int pthread_mutex_lock(pthread_mutex_t*)
    int pthread_mutex_trylock(pthread_mutex_t*)
    int pthread_mutex_unlock(pthread_mutex_t*)


cdef extern from *:
    """
    /* Asks for the state rows of the next chunk while this one computes: a stream's row was
       last touched a whole frame period ago, so it comes from L3 or memory. */
    static inline void fc_prefetch_rows(const char *block, const int32_t *slots, Py_ssize_t m,
                                        Py_ssize_t row) {
        for (Py_ssize_t j = 0; j < m; j++)
            for (Py_ssize_t b = 0; b < row; b += 64)
                __builtin_prefetch(block + slots[j] * row + b, 0, 2);
    }
    static inline Py_ssize_t fc_claim(Py_ssize_t *next, Py_ssize_t k) {
        return __atomic_fetch_add(next, k, __ATOMIC_RELAXED);
    }
    """
    Py_ssize_t fc_claim(Py_ssize_t* next, Py_ssize_t k) noexcept nogil
    void fc_prefetch_rows(const char* block, const int32_t* slots, Py_ssize_t m,
                          Py_ssize_t row) noexcept nogil


from fastcell_c.team import check_threads
from fastcell_c.team cimport Team


# Rows gathered and stepped together: the chunk's states, [x h] rows and gate rows stay in L2
# while the packed weights stream past them (the products block rows the same way, products.h).
DEF CHUNK = 64
# Threads take chunks from a shared counter, so a worker that wakes late only takes fewer: a
# step is cut into at least this many chunks per thread (of no fewer than MIN_CHUNK rows).
DEF CHUNKS_PER_THREAD = 4
DEF MIN_CHUNK = 16
# A step of fewer rows than this per thread runs on the calling thread alone: handing rows to a
# worker costs tens of microseconds on a VM, as much as stepping them. Under load a serving
# loop's ticks grow past it by themselves, and then the workers join.
DEF ROWS_PER_THREAD = 32
DEF SLOT_BITS = 32
DEF GEN_MASK = 0x7FFFFFFF


class PoolFullError(RuntimeError):
    """StreamPool.open() on a pool whose every slot holds an open stream."""


class StreamIdError(ValueError):
    """A stream id that is not open in this pool: closed, never opened, from another pool, or
    an old id of a slot that now serves a newer stream. `sid` is the (first) such id; `sids`,
    every such id of the call, in order."""

    def __init__(self, message, sid, sids=None):
        super().__init__(message)
        self.sid = sid
        self.sids = (sid,) if sids is None else tuple(sids)


cdef inline void _take(pthread_mutex_t* m):
    """Takes a pool lock, letting other Python threads run while it waits (its holder may need
    the GIL to finish)."""
    if pthread_mutex_trylock(m) != 0:
        with nogil:
            pthread_mutex_lock(m)


cdef struct StepJob:
    Py_ssize_t n                # rows of the step
    const int32_t* slots        # their slots, in row order
    const char* x               # (n, I)
    char* out                   # (n, H_out)
    bint flip
    void* pool                  # the StatePool (borrowed: step() holds a reference)
    Py_ssize_t unit             # rows per chunk
    Py_ssize_t next             # the first row no thread has claimed (atomic)


cdef void _step_part(void* arg, int part, int nparts) noexcept nogil:
    """One thread's share of a step (a worker's entry point): chunks claimed from the shared
    counter until none is left, each next one claimed first so its rows load meanwhile."""
    cdef StepJob* job = <StepJob*>arg
    cdef Py_ssize_t r = fc_claim(&job.next, job.unit), r2
    while r < job.n:
        r2 = fc_claim(&job.next, job.unit)
        (<StatePool>job.pool)._rows(job, part, r, min(job.unit, job.n - r),
                                     r2, min(job.unit, job.n - r2), False)
        r = r2


cdef class StatePool:
    """The states of up to `capacity` streams of one unidirectional model, stepped by id: the
    compiled half of fastcell.StreamPool, which hands it the model's Stepper (its kernels and
    initial state).

    StatePool(stepper, capacity, threads=1). `sid = pool.open()` starts a stream at the initial
    state; `pool.step(ids, x)` advances the streams `ids` (distinct, any subset, any order) by one
    step of x (n, I) and returns their outputs (n, H_out) in the order of ids; `pool.close(sid)`
    ends one. Ids are opaque ints carrying a slot and a generation: an id is valid from its
    open() to its close(), and a reused slot refuses the old id.

    With threads > 1 the rows of a step are split among that many native threads (the caller
    and threads - 1 workers the pool owns). Every method is thread-safe: one lock per pool,
    which a step holds for its whole (GIL-free) computation, so the steps, opens and closes of
    one pool are serialized; separate pools run in parallel.
    """
    cdef readonly object dtype
    cdef readonly Py_ssize_t capacity, threads, num_layers
    cdef readonly Py_ssize_t input_size, hidden_size, output_size
    cdef readonly bint has_cell_state
    cdef tuple _kernels                 # keeps the kernels alive: _kptr points at them
    cdef void** _kptr
    cdef Py_ssize_t _isz                # bytes per number
    cdef Py_ssize_t _row                # bytes of one slot: h of every layer, then c, padded
    cdef char* _block                   # capacity slots
    cdef char* _start                   # one slot's row at the model's initial state (NULL: zeros)
    cdef uint32_t* _gen                 # a slot's current generation
    cdef unsigned char* _live
    cdef int32_t* _free                 # a stack of free slots
    cdef Py_ssize_t _nfree
    cdef uint64_t* _seen                # the step that last named a slot (duplicate check)
    cdef uint64_t _tick
    cdef int32_t* _slots                # one step's slots, in row order
    cdef char** _hbuf                   # per thread: the chunk's h rows, layer by layer
    cdef char** _cbuf                   # per thread: the chunk's c rows
    cdef char** _work                   # per thread: the kernels' workspace for CHUNK rows
    cdef void** _qwork                  # per thread and layer: the int8 products' scratch
    cdef UnitsLayout* _units            # per layer (threads > 1): a step's split by hidden units
    cdef int _typenum
    cdef bint _parity
    cdef pthread_mutex_t _mu            # the streams' states: step, close, reset, get/set_state
    cdef pthread_mutex_t _ids_mu        # which slots are open (_live, _gen, _free): held briefly
    cdef bint _mu_ok
    cdef readonly Team _team            # its threads (read by the tests' stall hook)
    cdef object __weakref__             # the fork hooks keep a weak set of live pools

    def __cinit__(self):
        self._mu_ok = (pthread_mutex_init(&self._mu, NULL) == 0
                       and pthread_mutex_init(&self._ids_mu, NULL) == 0)

    def __init__(self, Stepper stepper not None, capacity, threads=1):
        if not self._mu_ok:
            raise MemoryError("StreamPool: cannot create its lock")
        if self._block != NULL:
            raise RuntimeError("StreamPool: already initialised")
        capacity, threads = as_int(capacity, "capacity"), check_threads(threads)
        if capacity > 2 ** 31 - 1:
            raise ValueError(f"capacity: expected at most {2 ** 31 - 1} streams, got {capacity}")
        self._kernels = tuple(stepper.kernels)
        cdef Kernel k = self._kernels[0]
        self.dtype = k.dtype
        self._typenum = cnp.NPY_DOUBLE if k.is_double else cnp.NPY_FLOAT
        self._isz = 8 if k.is_double else 4
        self.num_layers = len(self._kernels)
        self.input_size = stepper.input_size
        self.hidden_size = stepper.hidden_size
        self.output_size = stepper.output_size
        self.has_cell_state = stepper.has_cell_state
        self.capacity = capacity
        self.threads = threads
        cdef Py_ssize_t L = self.num_layers, elems
        elems = L * (self.output_size + (self.hidden_size if self.has_cell_state else 0))
        self._row = (elems * self._isz + 63) // 64 * 64
        if capacity > sys.maxsize // (2 * self._row):
            raise MemoryError(f"capacity: {capacity} streams need more memory than can be addressed")
        # Not zeroed here: open() zeroes a slot's row, so untouched pages are never mapped.
        self._block = alloc_aligned(capacity * self._row)
        self._gen = <uint32_t*>malloc(capacity * sizeof(uint32_t))
        self._live = <unsigned char*>malloc(capacity)
        self._free = <int32_t*>malloc(capacity * sizeof(int32_t))
        self._seen = <uint64_t*>malloc(capacity * sizeof(uint64_t))
        self._slots = <int32_t*>malloc(capacity * sizeof(int32_t))
        self._kptr = <void**>malloc(L * sizeof(void*))
        self._start = self._start_row(stepper)
        self._hbuf = <char**>calloc(threads, sizeof(char*))     # NULLs: __dealloc__ frees them
        self._cbuf = <char**>calloc(threads, sizeof(char*))
        self._work = <char**>calloc(threads, sizeof(char*))
        self._qwork = <void**>malloc(threads * L * sizeof(void*))
        if (self._block == NULL or self._gen == NULL or self._live == NULL or self._free == NULL
                or self._seen == NULL or self._slots == NULL or self._kptr == NULL
                or self._hbuf == NULL or self._cbuf == NULL or self._work == NULL
                or self._qwork == NULL):
            raise MemoryError(f"capacity: {capacity} streams of {self._row} bytes each")
        cdef Py_ssize_t i, t, l, work = 0
        for l in range(L):
            k = self._kernels[l]
            self._kptr[l] = <void*>k
            work = max(work, k.work_elems(1, CHUNK, False))
        for t in range(threads):
            self._hbuf[t] = alloc_aligned(L * CHUNK * self.output_size * self._isz)
            self._cbuf[t] = alloc_aligned(L * CHUNK * self.hidden_size * self._isz)
            self._work[t] = alloc_aligned(work * self._isz)
            if self._hbuf[t] == NULL or self._cbuf[t] == NULL or self._work[t] == NULL:
                raise MemoryError(f"threads: workspace for {threads} threads")
            for l in range(L):
                k = self._kernels[l]
                # qwork_of for CHUNK rows also serves fewer: it lies past a smaller workspace too
                self._qwork[t * L + l] = k.qwork_of(self._work[t], 1, CHUNK, False)
        # A random first generation per pool: an id from another pool is refused (but for a
        # 1 in 2^31 chance), not taken for the stream in this pool's slot of the same number.
        cdef uint32_t salt = int.from_bytes(os.urandom(4), "little") & GEN_MASK
        for i in range(capacity):
            self._gen[i] = salt
            self._live[i] = 0
            self._seen[i] = 0
            self._free[i] = <int32_t>(capacity - 1 - i)     # slot 0 is handed out first
        self._nfree = capacity
        self._tick = 0
        if threads > 1:
            # A step too small to split by rows splits each layer by hidden units where that
            # pays (a big model's few streams): its buffer made once, for up to CHUNK rows.
            self._units = <UnitsLayout*>calloc(L, sizeof(UnitsLayout))
            if self._units == NULL:
                raise MemoryError(f"threads: workspace for {threads} threads")
            for l in range(L):
                k = self._kernels[l]
                if (<Kernel>k).unit_parts(CHUNK, <int>threads) >= 2:
                    k.units_layout(1, CHUNK, False, <int>threads, &self._units[l])
        self._team = Team(threads)
        _live_pools.add(self)

    def __dealloc__(self):
        cdef Py_ssize_t t
        self._team = None                       # joins the workers first: they read the rest
        if self._hbuf != NULL:
            for t in range(self.threads):
                free(self._hbuf[t])
                free(self._cbuf[t])
                free(self._work[t])
        free(self._block)
        free(self._gen)
        free(self._live)
        free(self._free)
        free(self._seen)
        free(self._slots)
        free(self._kptr)
        free(self._start)
        free(self._hbuf)
        free(self._cbuf)
        free(self._work)
        free(self._qwork)
        if self._units != NULL:
            for t in range(self.num_layers):
                free(self._units[t].buf)
            free(self._units)
        if self._mu_ok:
            pthread_mutex_destroy(&self._mu)
            pthread_mutex_destroy(&self._ids_mu)

    # -- the locks --
    # Two, always taken in this order: _mu for the streams' states, which a step holds for its
    # whole computation, then _ids_mu for the table of open slots, which every call holds only
    # while it checks or changes that table. open() takes _ids_mu alone: the slot it hands out
    # is free, so no step can be using it, and an open never waits for a step.

    # -- ids --

    cdef inline Py_ssize_t _slot_of(self, int64_t sid) noexcept nogil:
        """sid's slot when sid is open in this pool, else -1."""
        cdef int64_t slot = sid & ((<int64_t>1 << SLOT_BITS) - 1)
        if sid < 0 or slot >= self.capacity or not self._live[slot]:
            return -1
        if <uint32_t>(sid >> SLOT_BITS) != self._gen[slot]:
            return -1
        return <Py_ssize_t>slot

    cdef int64_t _sid_value(self, object sid, str name, bint* valid) except? -1:
        """sid as an int64 (valid[0] False when it cannot be one of this pool's ids), or
        TypeError naming the argument. Checked before any lock is taken."""
        if isinstance(sid, (bool, np.bool_)) or not isinstance(sid, (int, np.integer)):
            raise TypeError(f"{name}: expected a stream id (an int from open()), got {sid!r}")
        valid[0] = -2 ** 63 <= sid < 2 ** 63
        return <int64_t>sid if valid[0] else 0

    cdef Py_ssize_t _hold(self, object sid, str name) except -1:
        """Takes _mu and returns sid's slot: the stream stays open and no step touches it until
        _mu is released. Raises, holding nothing, when sid is not open. No Python object is made
        while a lock is held: a garbage collection there could run a finalizer that calls this
        pool on this thread and waits forever for the lock it holds."""
        cdef bint valid
        cdef int64_t v = self._sid_value(sid, name, &valid)
        cdef Py_ssize_t slot = -1
        _take(&self._mu)
        _take(&self._ids_mu)
        if valid:
            slot = self._slot_of(v)
        pthread_mutex_unlock(&self._ids_mu)
        if slot < 0:
            pthread_mutex_unlock(&self._mu)
            raise StreamIdError(f"{name}: stream {sid} is not open in this pool (closed, never "
                                "opened, from another pool, or its slot now serves a newer "
                                "stream)", sid)
        return slot

    cdef char* _start_row(self, stepper) except? NULL:
        """A slot's row at the stepper's initial state (malloc'd), or NULL for zeros."""
        if stepper.initial is None:
            return NULL
        cdef char* row = <char*>calloc(1, self._row)
        if row == NULL:
            raise MemoryError("the initial state's row")
        cdef Py_ssize_t off = 0
        for a in stepper.initial:
            a = np.ascontiguousarray(a, dtype=self.dtype)
            memcpy(row + off, cnp.PyArray_DATA(<cnp.ndarray>a), a.nbytes)
            off += a.nbytes
        return row

    cdef inline void _begin(self, Py_ssize_t slot) noexcept nogil:
        """A slot's state back where every stream starts: zeros, or the model's initial state."""
        if self._start == NULL:
            memset(self._block + slot * self._row, 0, self._row)
        else:
            memcpy(self._block + slot * self._row, self._start, self._row)

    def open(self):
        """A new stream at the model's initial state (zeros, or its initial_state); returns its
        id."""
        cdef Py_ssize_t slot = -1
        cdef int64_t sid = 0
        _take(&self._ids_mu)
        if self._nfree > 0:        # no Python object is made under the lock: a garbage
            self._nfree -= 1       # collection there could run a finalizer that calls the pool
            slot = self._free[self._nfree]
            self._gen[slot] = (self._gen[slot] + 1) & GEN_MASK
            self._begin(slot)
            self._live[slot] = 1
            sid = (<int64_t>self._gen[slot] << SLOT_BITS) | slot
        pthread_mutex_unlock(&self._ids_mu)
        if slot < 0:
            raise PoolFullError(f"StreamPool: all {self.capacity} streams are open; close one or "
                                "make a larger pool")
        return sid

    def close(self, sid):
        """Ends the stream: its id is refused from now on and its slot may serve a new stream."""
        cdef Py_ssize_t slot = self._hold(sid, "sid")
        try:
            memset(self._block + slot * self._row, 0, self._row)   # nothing of it stays behind
            _take(&self._ids_mu)
            self._live[slot] = 0
            self._free[self._nfree] = <int32_t>slot
            self._nfree += 1
            pthread_mutex_unlock(&self._ids_mu)
        finally:
            pthread_mutex_unlock(&self._mu)

    def reset(self, sid):
        """Back to the initial state (zeros, or the model's initial_state), in place (the id
        stays valid)."""
        cdef Py_ssize_t slot = self._hold(sid, "sid")
        self._begin(slot)
        pthread_mutex_unlock(&self._mu)

    def is_open(self, sid):
        """Whether sid is an open stream of this pool."""
        if isinstance(sid, (bool, np.bool_)) or not isinstance(sid, (int, np.integer)):
            return False
        if not -2 ** 63 <= sid < 2 ** 63:
            return False
        cdef int64_t v = <int64_t>sid
        cdef bint live
        _take(&self._ids_mu)
        live = self._slot_of(v) >= 0
        pthread_mutex_unlock(&self._ids_mu)
        return live

    def __len__(self):
        return self.capacity - self._nfree

    def open_ids(self):
        """The ids of every open stream, int64, in slot order."""
        cdef Py_ssize_t i, n = 0
        ids = np.empty(self.capacity, np.int64)     # made before the lock: see _hold
        cdef int64_t* p = <int64_t*>cnp.PyArray_DATA(<cnp.ndarray>ids)
        _take(&self._ids_mu)
        for i in range(self.capacity):
            if self._live[i]:
                p[n] = (<int64_t>self._gen[i] << SLOT_BITS) | i
                n += 1
        pthread_mutex_unlock(&self._ids_mu)
        return ids[:n].copy()

    # -- one stream's state --

    def get_state(self, sid):
        """(h, c): copies of the stream's state, h (num_layers, H_out) and c (num_layers, H) for
        the LSTMs, else None."""
        cdef Py_ssize_t L = self.num_layers, slot
        cdef char* row
        h = np.empty((L, self.output_size), self.dtype)
        c = np.empty((L, self.hidden_size), self.dtype) if self.has_cell_state else None
        slot = self._hold(sid, "sid")
        try:
            row = self._block + slot * self._row
            memcpy(cnp.PyArray_DATA(<cnp.ndarray>h), row, L * self.output_size * self._isz)
            if c is not None:
                memcpy(cnp.PyArray_DATA(<cnp.ndarray>c), row + L * self.output_size * self._isz,
                       L * self.hidden_size * self._isz)
        finally:
            pthread_mutex_unlock(&self._mu)
        return h, c

    def set_state(self, sid, h, c=None):
        """Writes the stream's state: h (num_layers, H_out) and, for the LSTMs, c
        (num_layers, H) (either may be (H,) for one layer)."""
        cdef Py_ssize_t L = self.num_layers, slot
        cdef char* row
        hs = self._state_arg(h, "h", self.output_size)
        if self.has_cell_state:
            if c is None:
                raise TypeError("c: expected the cell state of an LSTM stream, got None")
            cs = self._state_arg(c, "c", self.hidden_size)
        elif c is not None:
            raise TypeError(f"c: this model has no cell state, got {type(c).__name__}")
        slot = self._hold(sid, "sid")
        try:
            row = self._block + slot * self._row
            memcpy(row, cnp.PyArray_DATA(<cnp.ndarray>hs), L * self.output_size * self._isz)
            if self.has_cell_state:
                memcpy(row + L * self.output_size * self._isz, cnp.PyArray_DATA(<cnp.ndarray>cs),
                       L * self.hidden_size * self._isz)
        finally:
            pthread_mutex_unlock(&self._mu)

    cdef object _state_arg(self, object v, str name, Py_ssize_t width):
        L = self.num_layers
        a = to_numpy(v, name)
        if a.shape != (L, width) and not (L == 1 and a.shape == (width,)):
            want = f"({L}, {width})" + (f" or ({width},)" if L == 1 else "")
            raise ValueError(f"{name}: expected shape {want}, got {a.shape}")
        return np.ascontiguousarray(a, dtype=self.dtype).reshape(L, width)

    # -- the step --

    def step(self, ids, x, out=None):
        """y = step(ids, x, out=None): advances the streams `ids` (int64 (n,), distinct, open)
        by one step of x (n, I); returns their outputs (n, H_out), row i for ids[i], in a new
        array or in `out`. Everything is checked before any state changes."""
        cdef Py_ssize_t n, I = self.input_size, Ho = self.output_size, i, slot
        if not (is_array(ids, cnp.NPY_INT64, 1) and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>ids)):
            ids = self._ids_arg(ids)
        n = cnp.PyArray_DIM(<cnp.ndarray>ids, 0)
        if not has_dims(x, self._typenum, 2, n, I, -1, False):
            x = self._x_arg(x, n)
        cdef cnp.npy_intp dims[2]
        dims[0] = n
        dims[1] = Ho
        if out is None:
            out = cnp.PyArray_EMPTY(2, dims, self._typenum, 0)
        elif not has_dims(out, self._typenum, 2, n, Ho, -1, True):
            buffer_of(out, "out", self._typenum, (n, Ho), True)
        cdef const int64_t* idp = <const int64_t*>cnp.PyArray_DATA(<cnp.ndarray>ids)
        cdef const char* xp = <const char*>cnp.PyArray_DATA(<cnp.ndarray>x)
        cdef char* op = <char*>cnp.PyArray_DATA(<cnp.ndarray>out)
        # Rows are read and written chunk by chunk: out may be x itself, not a part of it.
        # (x itself only when rows are the same width: a wider out row would overwrite rows of x
        # that a later chunk still has to read)
        if ((op != xp or I != Ho) and op < xp + n * I * self._isz
                and xp < op + n * Ho * self._isz):
            raise ValueError("out: overlaps x; pass a separate array (or x itself when "
                             "output_size == input_size)")
        if n == 0:
            return out
        cdef StepJob job
        cdef Py_ssize_t nparts
        cdef bint units
        cdef Py_ssize_t bad = -1
        cdef uint64_t tick
        if n > self.capacity:       # then some id is closed or repeated; a _slots entry each
            self._refuse(idp, n, -1)
        # Every id checked before any state changes: a refused step changes nothing. Once
        # checked, the streams stay open until _mu is released (close() takes it). Nothing
        # Python is made, and nothing can raise, under the locks (see _hold): a refusal is
        # raised after them.
        _take(&self._mu)
        _take(&self._ids_mu)
        self._tick += 1
        tick = self._tick
        with nogil:
            for i in range(n):
                slot = self._slot_of(idp[i])
                if slot < 0 or self._seen[slot] == tick:
                    bad = i
                    break
                self._seen[slot] = tick
                self._slots[i] = <int32_t>slot
        pthread_mutex_unlock(&self._ids_mu)
        if bad >= 0:
            pthread_mutex_unlock(&self._mu)
            self._refuse(idp, n, bad)
        job.n = n
        job.slots = self._slots
        job.x = xp
        job.out = op
        job.flip = self._parity
        job.pool = <void*>self
        self._parity = not self._parity
        job.next = 0
        nparts = min(self.threads, max(1, n // ROWS_PER_THREAD))
        if nparts > 1 and not self._team.ready():     # standing down after a stall (team.h)
            nparts = 1
        job.unit = min(CHUNK, max(MIN_CHUNK, (n // (nparts * CHUNKS_PER_THREAD) + 7) // 8 * 8))
        if nparts == 1:
            job.unit = CHUNK
        units = self._units != NULL and nparts == 1 and n <= CHUNK and self._team.ready()
        with nogil:
            if units:
                self._rows(&job, 0, 0, n, 0, 0, True)
            elif nparts == 1:
                _step_part(&job, 0, 1)
            else:
                self._team.run(_step_part, &job, <int>nparts)
            pthread_mutex_unlock(&self._mu)
        return out

    cdef void _refuse(self, const int64_t* ids, Py_ssize_t n, Py_ssize_t bad) except *:
        """Raises for a step whose ids[bad] failed the check (bad < 0: not known yet), holding
        no lock: StreamIdError naming every id that is not open (so a caller drops them all at
        once), else the first repeated one. Which ids are open is read under _ids_mu into C
        memory, and the exception is made after it is released."""
        cdef Py_ssize_t i, j, nclosed = 0, first = -1
        closed_arr = np.empty(n, np.intp)
        cdef Py_ssize_t* closed = <Py_ssize_t*>cnp.PyArray_DATA(<cnp.ndarray>closed_arr)
        _take(&self._ids_mu)
        for i in range(n):
            if self._slot_of(ids[i]) < 0:
                closed[nclosed] = i
                nclosed += 1
        pthread_mutex_unlock(&self._ids_mu)
        if nclosed:
            i = closed[0]
            raise StreamIdError(f"ids[{i}]: stream {ids[i]} is not open in this pool (closed, "
                                "never opened, from another pool, or its slot now serves a newer "
                                f"stream){f'; {nclosed} ids in all' if nclosed > 1 else ''}",
                                ids[i], [ids[closed[j]] for j in range(nclosed)])
        if bad < 0:                 # every id open: some id is repeated
            seen = {}
            for i in range(n):
                if ids[i] in seen:
                    first, bad = seen[ids[i]], i
                    break
                seen[ids[i]] = i
        else:
            for i in range(bad):
                if ids[i] == ids[bad]:
                    first = i
                    break
        if first < 0:               # a stream was closed and its id reopened meanwhile
            raise StreamIdError(f"ids: a stream of this step was closed while it was checked",
                                ids[max(bad, 0)])
        raise ValueError(f"ids: stream {ids[bad]} appears twice (ids[{first}] and ids[{bad}]); a "
                         "step advances each stream once")

    cdef object _ids_arg(self, object ids):
        if ids is None:
            raise TypeError("ids: expected an int64 array of stream ids, got None")
        try:
            a = np.asarray(ids)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"ids: expected an int64 array of stream ids, got "
                            f"{type(ids).__name__} ({exc})") from None
        if a.ndim != 1:
            raise ValueError(f"ids: expected shape (n,), got {a.shape}")
        if a.size == 0:
            return np.empty(0, np.int64)
        if a.dtype.kind not in "iu" or a.dtype == np.bool_:
            raise TypeError(f"ids: expected integer stream ids, got an array of dtype {a.dtype}")
        if a.dtype.kind == "u" and a.size and a.max() > np.iinfo(np.int64).max:
            raise StreamIdError(f"ids: stream {int(a.max())} is not open in this pool",
                                int(a.max()))
        return np.ascontiguousarray(a, dtype=np.int64)

    cdef object _x_arg(self, object x, Py_ssize_t n):
        a = to_numpy(x, "x")
        if a.shape != (n, self.input_size):
            raise ValueError(f"x: expected shape ({n}, {self.input_size}) for {n} ids, got "
                             f"{a.shape}")
        return np.ascontiguousarray(a, dtype=self.dtype)

    cdef void _rows(self, const StepJob* job, int part, Py_ssize_t r, Py_ssize_t m,
                    Py_ssize_t r_next, Py_ssize_t m_next, bint units) noexcept nogil:
        """Steps the m <= CHUNK rows from r of the job with thread `part`'s buffers: gathers
        their state rows, runs each layer as a StreamState step of m rows does, writes the rows
        back and the last layer's h to out. Asks for the state rows of the m_next rows from
        r_next (this thread's next chunk) meanwhile. units: the caller alone holds the pool's
        team, and each layer whose step pays splits over it by hidden units (the same bits)."""
        cdef Py_ssize_t L = self.num_layers, Ho = self.output_size, H = self.hidden_size
        cdef Py_ssize_t isz = self._isz, hb = Ho * isz, cbytes = H * isz
        cdef char* hbuf = self._hbuf[part]
        cdef char* cbuf = self._cbuf[part] if self.has_cell_state else NULL
        cdef char* work = self._work[part]
        cdef Py_ssize_t j, l
        cdef int nparts
        cdef char* row
        cdef const char* src
        cdef Walk w
        if m_next > 0:
            fc_prefetch_rows(self._block, job.slots + r_next, m_next, self._row)
        for j in range(m):
            row = self._block + job.slots[r + j] * self._row
            for l in range(L):
                memcpy(hbuf + (l * CHUNK + j) * hb, row + l * hb, hb)
                if cbuf != NULL:
                    memcpy(cbuf + (l * CHUNK + j) * cbytes, row + L * hb + l * cbytes, cbytes)
        src = job.x + r * self.input_size * isz
        for l in range(L):
            w = make_walk(1, m, False, 0, NULL, NULL, False)
            w.flip = job.flip
            w.qwork = self._qwork[part * L + l]
            nparts = (<Kernel>self._kptr[l]).unit_parts(m, <int>self.threads) if units else 0
            if nparts >= 2 and self._units[l].buf != NULL:
                (<Kernel>self._kptr[l]).run_units_in(
                    &w, src, hbuf + l * CHUNK * hb,
                    NULL if cbuf == NULL else cbuf + l * CHUNK * cbytes, NULL,
                    &self._units[l], self._team, nparts)
            else:
                (<Kernel>self._kptr[l]).run_walk(
                    &w, src, hbuf + l * CHUNK * hb,
                    NULL if cbuf == NULL else cbuf + l * CHUNK * cbytes, NULL, work)
            src = hbuf + l * CHUNK * hb     # the next layer reads this layer's new h
        for j in range(m):
            row = self._block + job.slots[r + j] * self._row
            for l in range(L):
                memcpy(row + l * hb, hbuf + (l * CHUNK + j) * hb, hb)
                if cbuf != NULL:
                    memcpy(row + L * hb + l * cbytes, cbuf + (l * CHUNK + j) * cbytes, cbytes)
            memcpy(job.out + (r + j) * hb, hbuf + ((L - 1) * CHUNK + j) * hb, hb)

    # -- new weights --

    def swap(self, Stepper stepper not None):
        """Steps with `stepper`'s kernels from the next step on, keeping every stream's state: a
        stepper of the same architecture (cell type, layers, sizes, dtype and weight format).
        A step runs with the old kernels or the new ones, never a mix; a step in progress
        finishes with the old ones. ValueError for another architecture."""
        kernels = tuple(stepper.kernels)
        cdef Py_ssize_t L = self.num_layers, l, t
        cdef Kernel a, b
        same = len(kernels) == L
        for l in range(min(L, len(kernels))):
            a, b = self._kernels[l], kernels[l]
            same = same and (type(a) is type(b) and a.input_size == b.input_size
                             and a.hidden_size == b.hidden_size and a.output_size == b.output_size
                             and a.weight_format == b.weight_format and a.width == b.width
                             and a.work_elems(1, CHUNK, False) == b.work_elems(1, CHUNK, False)
                             and a.qwork_of(NULL, 1, CHUNK, False) == b.qwork_of(NULL, 1, CHUNK, False))
        if not same:
            raise ValueError("stepper: expected this pool's architecture (cell type, layers, "
                             "sizes, dtype and weight format)")
        cdef char* start = self._start_row(stepper)
        cdef void** kptr = <void**>malloc(L * sizeof(void*))
        if kptr == NULL:
            free(start)
            raise MemoryError("reload")
        for l in range(L):
            kptr[l] = <void*>kernels[l]
        # The old reference lives on in this local until after the lock: a last reference
        # dropped under it could run a finalizer (weakref.finalize of a kernel's owner, say).
        old_kernels = self._kernels
        cdef void** old_kptr
        cdef char* old_start
        _take(&self._mu)
        old_kptr, self._kptr = self._kptr, kptr
        old_start, self._start = self._start, start
        self._kernels = kernels
        pthread_mutex_unlock(&self._mu)
        free(old_kptr)
        free(old_start)

    # -- fork --
    # A process forked while another thread steps this pool would inherit _mu locked by a thread
    # that does not exist there. So every lock of every pool is taken around the fork (the hooks
    # below): the fork waits for a step in progress, and the child starts with the locks free
    # (held by its one thread, which releases them) and steps on that thread alone (team.h).

    cdef void _fork_lock(self):
        _take(&self._mu)         # releases the GIL while it waits: the stepping thread needs it
        _take(&self._ids_mu)

    cdef void _fork_unlock(self):
        pthread_mutex_unlock(&self._ids_mu)
        pthread_mutex_unlock(&self._mu)

    def __reduce__(self):
        raise TypeError("StreamPool cannot be pickled: its streams live in this process. Pickle "
                        "the model and, if needed, each stream's get_state(), then open() and "
                        "set_state() them in a new pool")



_live_pools = weakref.WeakSet()
_fork_locked = []


def _before_fork():
    pools = sorted(_live_pools, key=id)     # one order for every fork
    for p in pools:
        (<StatePool>p)._fork_lock()
        _fork_locked.append(p)


def _after_fork():
    for p in _fork_locked:
        (<StatePool>p)._fork_unlock()
    _fork_locked.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork,
                        after_in_child=_after_fork)
