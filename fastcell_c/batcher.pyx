# The Batcher's engine (fastcell.serving.batcher.Batcher is its Python face): frames of many
# streams, submitted one at a time by any thread, stepped together in one pool.step per tick on
# the Batcher's worker thread.
#
# A submit is one C-level call: it checks the frame, makes the frame's result handle, appends
# (sid, handle) to its stream's queue with the frame copied into a row of a slab, and wakes the
# worker only when it sleeps for a reason this frame ends. No Future, no lock held while a
# Python object is made: the queues are changed only while holding the GIL and with no Python
# code run in the middle of a change (the handle is made first; a garbage collection it triggers
# may run a finalizer that submits too, and that submit completes before this one touches them).
# The worker's sleep and the results' waits use one mutex and two condition variables, never
# held while waiting for the GIL.
#
# A tick takes, in submit order, the first waiting frame of each stream (at most max_batch
# streams): each stream sees exactly the steps of its own StreamState, bit for bit. Results are
# published once per tick: every waiting result() wakes on one broadcast, and the asyncio futures
# of a tick are resolved by one loop callback per event loop.
cimport numpy as cnp
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF
from libc.stdint cimport INT64_MIN, int64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy

import logging
import os
import threading
import weakref
from concurrent.futures import CancelledError

import numpy as np

from fastcell_c.kernel import to_numpy

cnp.import_array()

log = logging.getLogger("fastcell.batcher")


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_mutex_init(pthread_mutex_t*, void*)
    int pthread_mutex_destroy(pthread_mutex_t*)
    int pthread_mutex_lock(pthread_mutex_t*)
    int pthread_mutex_unlock(pthread_mutex_t*)
    int pthread_cond_init(pthread_cond_t*, void*)
    int pthread_cond_destroy(pthread_cond_t*)
    int pthread_cond_signal(pthread_cond_t*)
    int pthread_cond_broadcast(pthread_cond_t*)
    int pthread_cond_wait(pthread_cond_t*, pthread_mutex_t*)


cdef extern from *:
    """
    #include <time.h>
    #include <errno.h>
    /* CLOCK_MONOTONIC seconds: the submit times and the tick deadlines. */
    static double fc_mono(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
    }
    /* Waits on cv until the monotonic time `until` (seconds; a wait is cut to an hour at most,
       the caller loops); the condition variable is set to the monotonic clock at init. */
    static void fc_wait_until(pthread_cond_t *cv, pthread_mutex_t *mu, double until) {
        double now = fc_mono();
        if (until - now > 3600.0) until = now + 3600.0;
        struct timespec ts;
        ts.tv_sec = (time_t)until;
        ts.tv_nsec = (long)((until - (double)ts.tv_sec) * 1e9);
        if (ts.tv_nsec >= 1000000000L) { ts.tv_sec += 1; ts.tv_nsec -= 1000000000L; }
        pthread_cond_timedwait(cv, mu, &ts);
    }
    static int fc_cond_init_monotonic(pthread_cond_t *cv) {
        pthread_condattr_t a;
        pthread_condattr_init(&a);
        pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
        int r = pthread_cond_init(cv, &a);
        pthread_condattr_destroy(&a);
        return r;
    }
    """
    double fc_mono() noexcept nogil
    void fc_wait_until(pthread_cond_t* cv, pthread_mutex_t* mu, double until) noexcept nogil
    int fc_cond_init_monotonic(pthread_cond_t* cv) noexcept nogil


class BatcherFullError(RuntimeError):
    """Batcher.submit() while ``max_pending`` frames are already waiting: the producers outrun the
    pool. ``pending`` and ``max_pending`` give the numbers."""

    def __init__(self, message, pending, max_pending):
        super().__init__(message)
        self.pending = pending
        self.max_pending = max_pending


DEF PENDING = 0       # a result's states; from DONE on it is done
DEF RUNNING = 1       # taken by a tick: no longer cancellable
DEF DONE = 2
DEF FAILED = 3
DEF CANCELLED = 4
DEF IDLE = 1          # what the worker sleeps for, if it sleeps
DEF WAITING = 2

cdef int64_t SID_MIN = INT64_MIN

# The idents of the running worker threads: a close() there never waits (it would wait for
# itself, or two batchers closed from each other's workers for each other).
_workers = set()
# Every batcher of this process, so a forked child can disown them.
_live = weakref.WeakSet()


cdef struct Entry:
    int64_t sid
    PyObject* res           # owned: the frame's result handle
    Py_ssize_t index        # its row of a BatchResult, -1 for a FrameResult
    Py_ssize_t next         # its stream's next entry (-1: none); the free list's link
    bint close              # a close_stream, no frame


cdef struct Stream:         # a stream with entries waiting: their FIFO
    int64_t sid
    Py_ssize_t first, last  # entries (-1: none)


cdef class Result:
    """What the Batcher returns for submitted work: a light future (concurrent.futures.Future's
    result, exception, done, cancelled, cancel, add_done_callback), resolved once per tick."""
    cdef int state
    cdef object exc
    cdef list callbacks
    cdef object afut              # the asyncio future of submit_async, if any
    cdef BatcherCore owner

    def done(self):
        return self.state >= DONE

    def cancelled(self):
        return self.state == CANCELLED

    def running(self):
        return self.state == RUNNING

    def cancel(self):
        """Drops the work if its tick has not taken it yet (True); False once taken or done."""
        if self.state != PENDING:
            return self.state == CANCELLED
        self.state = CANCELLED
        self.owner._published()
        self._run_callbacks()
        return True

    def exception(self, timeout=None):
        self._wait(timeout)
        if self.state == CANCELLED:
            raise CancelledError()
        return self.exc

    def add_done_callback(self, fn):
        """fn(handle) once done: on the worker thread after the tick, or now if already done.
        An exception from fn is logged and reaches nothing else."""
        if self.state < DONE:
            if self.callbacks is None:
                self.callbacks = []
            self.callbacks.append(fn)
            if self.state < DONE:          # (appending may run a collection that settles it)
                return
        _call(fn, self)

    cdef int _wait(self, timeout) except -1:
        if self.state >= DONE:
            return 0
        if self.owner.on_worker():
            raise RuntimeError("result: waited for on the Batcher's worker thread (in a done-"
                               "callback), where it would wait for itself")
        cdef double until = 1e300
        if timeout is not None:
            until = fc_mono() + max(0.0, float(timeout))
        cdef BatcherCore b = self.owner
        with nogil:
            pthread_mutex_lock(&b.mu)
            while self.state < DONE and fc_mono() < until:
                fc_wait_until(&b.done_cv, &b.mu, until)
            pthread_mutex_unlock(&b.mu)
        if self.state < DONE:
            raise TimeoutError(f"result: not done within {timeout} s")
        return 0

    cdef int _check(self) except -1:
        if self.state == CANCELLED:
            raise CancelledError()
        if self.state == FAILED:
            raise self.exc
        return 0

    def _async_done(self, fut):
        """The asyncio future is done: if it was cancelled before its tick, drop the frame."""
        if self.state == PENDING and fut.cancelled():
            self.state = CANCELLED
            self.owner._published()
            self._run_callbacks()

    cdef void _run_callbacks(self):
        cbs, self.callbacks = self.callbacks, None
        if cbs:
            for fn in cbs:
                _call(fn, self)


cdef class FrameResult(Result):
    """The result of one submitted frame: result() is the stream's output row, a new
    (output_size,) array."""
    cdef object y                 # the tick's outputs (DONE): row `row` is this frame's
    cdef Py_ssize_t row

    def result(self, timeout=None):
        self._wait(timeout)
        self._check()
        if self.y is None:        # a close_stream: nothing to return
            return None
        cdef cnp.ndarray y = <cnp.ndarray>self.y
        cdef cnp.npy_intp n = cnp.PyArray_DIM(y, 1)
        cdef cnp.ndarray out = cnp.PyArray_EMPTY(1, &n, cnp.PyArray_TYPE(y), 0)
        memcpy(cnp.PyArray_DATA(out), <char*>cnp.PyArray_DATA(y) + self.row * cnp.PyArray_STRIDE(y, 0),
               n * cnp.PyArray_ITEMSIZE(y))
        return out

    def __repr__(self):
        return f"<FrameResult {('pending', 'running', 'done', 'failed', 'cancelled')[self.state]}>"


cdef class BatchResult(Result):
    """The result of submit_many: result() is the (n, output_size) outputs in the order of the
    sids, once every frame is stepped. If some failed (a closed stream), result() raises the
    first error, and ``outputs`` holds the rows that were computed (NaN in the others)."""
    cdef readonly object outputs
    cdef Py_ssize_t remaining

    def result(self, timeout=None):
        self._wait(timeout)
        self._check()
        return self.outputs

    def __repr__(self):
        return (f"<BatchResult of {len(self.outputs)} frames, "
                f"{('pending', 'running', 'done', 'failed', 'cancelled')[self.state]}>")


cdef void _call(fn, res):
    try:
        fn(res)
    except BaseException:
        log.exception("fastcell.Batcher: a done-callback raised; the other results and the "
                      "batcher are not affected")


def _resolve_async(list pairs):
    """In the event loop's thread, once per tick: every asyncio future of the tick."""
    for fut, res in pairs:
        if fut.done():
            continue
        try:
            if (<Result>res).state == DONE:
                fut.set_result(res.result())
            elif (<Result>res).state == FAILED:
                fut.set_exception((<Result>res).exc)
            else:
                fut.cancel()
        except BaseException:
            log.exception("fastcell.Batcher: resolving an asyncio future failed")


cdef class BatcherCore:
    """The compiled half of fastcell.Batcher (see it for the documentation)."""
    cdef readonly object pool
    cdef object _step, _close
    cdef readonly Py_ssize_t input_size, output_size
    cdef Py_ssize_t isz
    cdef int typenum
    cdef object dtype
    cdef Py_ssize_t limit, bound      # max_batch, max_pending (PY_SSIZE_T_MAX: none)
    cdef readonly double max_delay
    # The waiting entries: a slab of entries (each with its frame's row in `frames`, which never
    # moves), chained per stream; the streams with entries in a queue, in the order they are
    # served (a stream that keeps entries after its tick goes behind the others); a hash map
    # from sid to stream. Every operation is O(1) per entry, whatever the backlog.
    cdef Entry* ent
    cdef char* frames
    cdef Py_ssize_t ent_cap, ent_free
    cdef Stream* st
    cdef Py_ssize_t st_cap, st_free
    cdef Py_ssize_t* queue
    cdef Py_ssize_t q_head, q_len
    cdef Py_ssize_t* map                 # stream indices (-1: empty), open addressing
    cdef Py_ssize_t map_mask
    cdef Py_ssize_t count, nframes       # entries waiting (frames and closes); frames
    cdef double since                 # the submit time of the oldest entry
    cdef bint due                     # entries were left behind by the last tick
    cdef bint _closed, stopping, stopped, forked
    cdef long worker_ident
    cdef long pid                     # the process whose worker thread this is
    cdef int sleeping
    cdef Py_ssize_t room
    cdef pthread_mutex_t mu
    cdef pthread_cond_t wake, done_cv
    cdef unsigned long ticks
    # the worker's per-tick scratch
    cdef object ids_arr, x_arr
    cdef Py_ssize_t tick_cap
    cdef PyObject** tick_res
    cdef Py_ssize_t* tick_index
    cdef Entry* side                  # closes and dropped entries of a tick
    cdef Py_ssize_t side_cap
    cdef Py_ssize_t tick_res_n        # the references tick_res holds (a tick in progress)

    def __cinit__(self):
        pthread_mutex_init(&self.mu, NULL)
        fc_cond_init_monotonic(&self.wake)
        fc_cond_init_monotonic(&self.done_cv)

    def __dealloc__(self):
        cdef Py_ssize_t i, e
        if self.st != NULL and self.queue != NULL:
            for i in range(self.q_len):
                e = self.st[self.queue[(self.q_head + i) % self.st_cap]].first
                while e >= 0:
                    Py_DECREF(<object>self.ent[e].res)
                    e = self.ent[e].next
        free(self.ent)
        free(self.frames)
        free(self.st)
        free(self.queue)
        free(self.map)
        free(self.tick_res)
        free(self.tick_index)
        free(self.side)
        pthread_cond_destroy(&self.wake)
        pthread_cond_destroy(&self.done_cv)
        pthread_mutex_destroy(&self.mu)

    def __init__(self, pool, Py_ssize_t max_batch, Py_ssize_t max_pending, double max_delay):
        """max_batch, max_pending: -1 for none."""
        self.pool = pool
        self._step, self._close = pool.step, pool.close
        self.input_size, self.output_size = int(pool.input_size), int(pool.output_size)
        self.dtype = np.dtype(pool.dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"pool: expected a float32 or float64 pool, got {self.dtype}")
        self.typenum = cnp.NPY_DOUBLE if self.dtype == np.float64 else cnp.NPY_FLOAT
        self.isz = self.dtype.itemsize
        self.limit = max_batch if max_batch > 0 else (<Py_ssize_t>1 << 62)
        self.bound = max_pending if max_pending > 0 else (<Py_ssize_t>1 << 62)
        self.max_delay = max_delay
        self.pid = os.getpid()
        self._grow_entries(64)
        self._grow_streams(64)
        self._grow_tick(min(self.limit, 64))
        _live.add(self)

    # ---- any thread ----

    def submit(self, sid, frame):
        """submit(sid, frame) -> FrameResult: queues one frame (shape (input_size,) or
        (1, input_size); copied) of the open pool stream `sid`. Raises BatcherFullError when
        max_pending frames are waiting."""
        frame = self._frame(frame)
        cdef const char* src = <const char*>cnp.PyArray_DATA(<cnp.ndarray>frame)
        cdef int64_t s = _sid(sid)
        self._admit(1, "submit")
        cdef FrameResult res = FrameResult.__new__(FrameResult)
        res.owner = self
        self._push(s, <PyObject*>res, -1, src, False)
        return res

    def submit_async(self, sid, frame):
        """``await batcher.submit_async(sid, frame)`` (in the event loop's thread): the output
        row. The futures of a tick are resolved by one callback per loop. Cancelling the
        awaitable before its tick drops the frame."""
        frame = self._frame(frame)
        cdef const char* src = <const char*>cnp.PyArray_DATA(<cnp.ndarray>frame)
        cdef int64_t s = _sid(sid)
        self._admit(1, "submit_async")
        fut = _running_loop().create_future()
        cdef FrameResult res = FrameResult.__new__(FrameResult)
        res.owner = self
        res.afut = fut
        fut.add_done_callback(res._async_done)
        self._push(s, <PyObject*>res, -1, src, False)
        return fut

    def submit_many(self, sids, frames):
        """submit_many(sids, frames) -> BatchResult: one frame for each of the streams `sids`
        (int64 (n,), distinct), frames (n, input_size), in one call. Its result() is the
        (n, output_size) outputs in the order of sids."""
        ids = np.asarray(sids)
        if ids.ndim != 1 or (ids.size and (ids.dtype.kind not in "iu" or ids.dtype == np.bool_)):
            raise TypeError(f"sids: expected a 1-d array of int stream ids, got "
                            f"{ids.dtype} array of shape {ids.shape}")
        ids = np.ascontiguousarray(ids, np.int64)
        cdef Py_ssize_t n = ids.shape[0], i, I = self.input_size
        x = to_numpy(frames, "frames")
        if x.shape != (n, I):
            raise ValueError(f"frames: expected shape ({n}, {I}) for {n} sids, got {x.shape}")
        x = np.ascontiguousarray(x, self.dtype)
        if len(np.unique(ids)) != n:
            raise ValueError("sids: a stream appears twice; a tick steps each stream once "
                             "(submit its frames in two calls)")
        self._admit(n, "submit_many")
        cdef BatchResult res = BatchResult.__new__(BatchResult)
        res.owner = self
        res.outputs = np.full((n, self.output_size), np.nan, self.dtype)
        res.remaining = n
        if n == 0:
            res.state = DONE
            return res
        cdef const int64_t* ip = <const int64_t*>cnp.PyArray_DATA(<cnp.ndarray>ids)
        cdef const char* xp = <const char*>cnp.PyArray_DATA(<cnp.ndarray>x)
        self._reserve(n)          # no growth (no failure) between the n pushes
        for i in range(n):
            self._push(ip[i], <PyObject*>res, i, xp + i * I * self.isz, False)
        return res

    def close_stream(self, sid):
        """Closes pool stream `sid` on the worker thread, after the frames already submitted
        for it are stepped. Returns a FrameResult resolved to None once closed (the pool's
        StreamIdError if it was not open). Never refused by max_pending."""
        cdef int64_t s = _sid(sid)
        self._admit(0, "close_stream")
        cdef FrameResult res = FrameResult.__new__(FrameResult)
        res.owner = self
        self._push(s, <PyObject*>res, -1, NULL, True)
        return res

    def close_stream_async(self, sid):
        """``await batcher.close_stream_async(sid)`` (in the event loop's thread): close_stream
        for asyncio code."""
        cdef int64_t s = _sid(sid)
        self._admit(0, "close_stream_async")
        fut = _running_loop().create_future()
        cdef FrameResult res = FrameResult.__new__(FrameResult)
        res.owner = self
        res.afut = fut
        self._push(s, <PyObject*>res, -1, NULL, True)
        return fut

    @property
    def pending(self):
        """Frames (and stream closes) submitted and not yet taken by a tick."""
        return self.count

    @property
    def closed(self):
        return self._closed

    cdef object _frame(self, frame):
        """The frame as an (input_size,) C-contiguous native array of the dtype: itself when it
        is one already (a few C checks), else converted and checked."""
        if (cnp.PyArray_Check(frame) and cnp.PyArray_TYPE(<cnp.ndarray>frame) == self.typenum
                and cnp.PyArray_NDIM(<cnp.ndarray>frame) == 1
                and cnp.PyArray_DIM(<cnp.ndarray>frame, 0) == self.input_size
                and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>frame)
                and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>frame)):
            return frame
        a = to_numpy(frame, "frame")
        I = self.input_size
        if a.shape != (I,) and a.shape != (1, I):
            raise ValueError(f"frame: expected shape ({I},) or (1, {I}), got {a.shape}")
        return np.ascontiguousarray(a.reshape(I), dtype=self.dtype)

    cdef int _admit(self, Py_ssize_t nframes, str caller) except -1:
        if self._closed:
            if self.forked:
                raise RuntimeError(
                    f"{caller}: this Batcher belongs to process {self.pid}, and this is a "
                    f"process forked from it ({os.getpid()}), where its worker thread does not "
                    "exist; make a new Batcher in this process")
            raise RuntimeError(f"{caller}: the Batcher is closed")
        if nframes and self.nframes + nframes > self.bound and self.nframes > 0:
            raise BatcherFullError(
                f"{caller}: {self.nframes} frames are waiting to be stepped (max_pending="
                f"{self.bound}): the producers outrun the pool; slow down, or drop frames (a "
                "real-time stream can skip one)", self.nframes, self.bound)
        return 0

    cdef int _reserve(self, Py_ssize_t n) except -1:
        """Room for n more entries of n new streams: the pushes that follow cannot fail."""
        if self.count + n > self.ent_cap:
            self._grow_entries(max(2 * self.ent_cap, self.count + n))
        if self.q_len + n > self.st_cap:
            self._grow_streams(max(2 * self.st_cap, self.q_len + n))
        return 0

    cdef int _grow_entries(self, Py_ssize_t cap) except -1:
        """cap entries (and frame rows); the new ones on the free list. Indices do not change."""
        cdef Entry* ent = <Entry*>realloc(self.ent, cap * sizeof(Entry))
        if ent == NULL:
            raise MemoryError(f"Batcher: room for {cap} waiting frames")
        self.ent = ent
        cdef char* frames = <char*>realloc(self.frames, cap * self.input_size * self.isz + 1)
        if frames == NULL:
            raise MemoryError(f"Batcher: room for {cap} waiting frames")
        self.frames = frames
        cdef Py_ssize_t i
        for i in range(self.ent_cap, cap):
            self.ent[i].next = i + 1 if i + 1 < cap else self.ent_free
        if cap > self.ent_cap:
            self.ent_free = self.ent_cap
        self.ent_cap = cap
        return 0

    cdef int _grow_streams(self, Py_ssize_t cap) except -1:
        """Room for cap streams: their records, the queue (moved to its start) and a map of at
        least twice as many slots, rehashed."""
        cdef Stream* st = <Stream*>realloc(self.st, cap * sizeof(Stream))
        if st == NULL:
            raise MemoryError(f"Batcher: room for {cap} streams")
        self.st = st
        cdef Py_ssize_t* queue = <Py_ssize_t*>malloc(cap * sizeof(Py_ssize_t))
        cdef Py_ssize_t size = 16, i
        while size < 2 * cap:
            size *= 2
        cdef Py_ssize_t* m = <Py_ssize_t*>malloc(size * sizeof(Py_ssize_t))
        if queue == NULL or m == NULL:
            free(queue)
            free(m)
            raise MemoryError(f"Batcher: room for {cap} streams")
        for i in range(self.q_len):
            queue[i] = self.queue[(self.q_head + i) % self.st_cap]
        for i in range(self.st_cap, cap):          # new records: free, chained by `first`
            self.st[i].first = i + 1 if i + 1 < cap else self.st_free
        if cap > self.st_cap:
            self.st_free = self.st_cap
        for i in range(size):
            m[i] = -1
        free(self.queue)
        free(self.map)
        self.queue, self.q_head, self.map, self.map_mask = queue, 0, m, size - 1
        self.st_cap = cap
        for i in range(self.q_len):                # every live stream is in the queue
            self._map_put(self.queue[i])
        return 0

    cdef inline Py_ssize_t _slot(self, int64_t sid) noexcept:
        cdef unsigned long long h = <unsigned long long>sid * 0x9E3779B97F4A7C15ULL  # Fibonacci
        return <Py_ssize_t>(h >> 20) & self.map_mask

    cdef Py_ssize_t _map_get(self, int64_t sid) noexcept:
        cdef Py_ssize_t k = self._slot(sid), i
        while True:
            i = self.map[k]
            if i < 0 or self.st[i].sid == sid:
                return i
            k = (k + 1) & self.map_mask

    cdef void _map_put(self, Py_ssize_t idx) noexcept:
        cdef Py_ssize_t k = self._slot(self.st[idx].sid)
        while self.map[k] >= 0:
            k = (k + 1) & self.map_mask
        self.map[k] = idx

    cdef void _map_del(self, int64_t sid) noexcept:
        """Removes sid, shifting back the entries of its probe run (no tombstones)."""
        cdef Py_ssize_t k = self._slot(sid), j, h
        while self.st[self.map[k]].sid != sid:
            k = (k + 1) & self.map_mask
        j = k
        while True:
            j = (j + 1) & self.map_mask
            if self.map[j] < 0:
                break
            h = self._slot(self.st[self.map[j]].sid)
            # the entry at j may move to k if its home is not in (k, j] (cyclically)
            if (j > k and (h <= k or h > j)) or (j < k and (h <= k and h > j)):
                self.map[k] = self.map[j]
                k = j
        self.map[k] = -1

    cdef void _free_stream(self, Py_ssize_t idx) noexcept:
        self._map_del(self.st[idx].sid)
        self.st[idx].first = self.st_free
        self.st_free = idx

    cdef int _push(self, int64_t sid, PyObject* res, Py_ssize_t index, const char* frame,
                   bint close) except -1:
        """Appends one entry to its stream (no Python object is made here) and wakes the worker
        if it sleeps for a reason this entry ends."""
        if self.count == self.ent_cap:
            self._grow_entries(2 * self.ent_cap)
        cdef Py_ssize_t idx = self._map_get(sid)
        if idx < 0:
            if self.q_len == self.st_cap:
                self._grow_streams(2 * self.st_cap)
            idx = self.st_free
            self.st_free = self.st[idx].first
            self.st[idx].sid, self.st[idx].first, self.st[idx].last = sid, -1, -1
            self._map_put(idx)
            self.queue[(self.q_head + self.q_len) % self.st_cap] = idx
            self.q_len += 1
        cdef Py_ssize_t e = self.ent_free
        self.ent_free = self.ent[e].next
        cdef Py_ssize_t row = self.input_size * self.isz
        self.ent[e].sid = sid
        self.ent[e].res = res
        self.ent[e].index = index
        self.ent[e].next = -1
        self.ent[e].close = close
        Py_INCREF(<object>res)
        if self.st[idx].last < 0:
            self.st[idx].first = e
        else:
            self.ent[self.st[idx].last].next = e
        self.st[idx].last = e
        if not close:
            memcpy(self.frames + e * row, frame, row)
            self.nframes += 1
        if self.count == 0:
            self.since = fc_mono()
            self.due = False
        self.count += 1
        pthread_mutex_lock(&self.mu)
        if self.sleeping == IDLE or (self.sleeping == WAITING and self.nframes >= self.room):
            self.sleeping = 0
            pthread_cond_signal(&self.wake)
        pthread_mutex_unlock(&self.mu)
        return 0

    cdef inline Py_ssize_t _unlink_first(self, Py_ssize_t idx) noexcept:
        """Takes the first entry off stream idx's FIFO (the caller frees it)."""
        cdef Py_ssize_t e = self.st[idx].first
        self.st[idx].first = self.ent[e].next
        if self.st[idx].first < 0:
            self.st[idx].last = -1
        self.count -= 1
        if not self.ent[e].close:
            self.nframes -= 1
        return e

    cdef inline void _free_entry(self, Py_ssize_t e) noexcept:
        self.ent[e].next = self.ent_free
        self.ent_free = e

    cdef bint on_worker(self):
        return self.worker_ident != 0 and threading.get_ident() == self.worker_ident

    cdef void _published(self) noexcept:
        pthread_mutex_lock(&self.mu)
        pthread_cond_broadcast(&self.done_cv)
        pthread_mutex_unlock(&self.mu)

    def _stop(self):
        """close()'s half: refuses new work; the worker steps what is waiting, then ends."""
        if self.forked:
            return False
        self._closed = True
        pthread_mutex_lock(&self.mu)
        self.stopping = True
        self.sleeping = 0
        pthread_cond_signal(&self.wake)
        pthread_mutex_unlock(&self.mu)
        return True

    def _in_forked_child(self):
        # The worker thread did not survive the fork: nothing would ever step here. The parent's
        # waiting frames are the parent's: dropped.
        self.forked = self._closed = self.stopping = self.stopped = True
        cdef Py_ssize_t e
        held = []
        while self.q_len:
            idx = self.queue[self.q_head]
            self.q_head = (self.q_head + 1) % self.st_cap
            self.q_len -= 1
            while self.st[idx].first >= 0:
                e = self._unlink_first(idx)
                held.append(<object>self.ent[e].res)
                Py_DECREF(<object>self.ent[e].res)
                self._free_entry(e)
            self._free_stream(idx)
        self.tick_res_n = 0                     # a tick in progress at the fork: not ours
        pthread_mutex_init(&self.mu, NULL)       # a parent thread may have held it at the fork
        fc_cond_init_monotonic(&self.wake)
        fc_cond_init_monotonic(&self.done_cv)

    # ---- the worker thread ----

    def _serve(self):
        """The worker thread's loop: waits for work by the tick policy, runs ticks, and ends
        once stopped and drained."""
        me = threading.get_ident()
        self.worker_ident = me
        _workers.add(me)
        cdef double backoff = 0.0
        try:
            while True:
                if not self._wait_for_work():
                    break
                try:
                    self._tick()
                    backoff = 0.0
                except BaseException as exc:      # a bug: reported on the tick's results
                    log.exception("fastcell.Batcher: a tick failed; its results get the error")
                    self._fail_tick(exc)
                    # A failure that repeats must not spin a core nor flood the log.
                    backoff = 0.01 if self.stopping else min(max(2 * backoff, 0.01), 1.0)
                    self._sleep_for(backoff)
        finally:
            self.stopped = True
            _workers.discard(me)

    cdef bint _wait_for_work(self):
        """Sleeps until a tick is due (the tick policy); False once stopping with nothing left."""
        cdef double deadline
        cdef bint go = True
        with nogil:
            pthread_mutex_lock(&self.mu)
            while True:
                if self.count == 0:
                    if self.stopping:
                        go = False
                        break
                    self.sleeping = IDLE
                    fc_wait_until(&self.wake, &self.mu, fc_mono() + 3600.0)
                    self.sleeping = 0
                    continue
                if self.due or self.stopping or self.max_delay <= 0 or self.nframes >= self.limit:
                    break
                deadline = self.since + self.max_delay
                if fc_mono() >= deadline:
                    break
                self.sleeping = WAITING
                self.room = self.limit
                fc_wait_until(&self.wake, &self.mu, deadline)
                self.sleeping = 0
            pthread_mutex_unlock(&self.mu)
        return go

    cdef void _sleep_for(self, double seconds) noexcept:
        cdef double until = fc_mono() + seconds
        with nogil:
            pthread_mutex_lock(&self.mu)
            if not self.stopping:
                fc_wait_until(&self.wake, &self.mu, until)
            pthread_mutex_unlock(&self.mu)

    cdef int _grow_tick(self, Py_ssize_t n) except -1:
        if n <= self.tick_cap:
            return 0
        cdef PyObject** tr = <PyObject**>realloc(self.tick_res, n * sizeof(PyObject*))
        if tr == NULL:
            raise MemoryError(f"Batcher: a tick of {n} streams")
        self.tick_res = tr
        cdef Py_ssize_t* ti = <Py_ssize_t*>realloc(self.tick_index, n * sizeof(Py_ssize_t))
        if ti == NULL:
            raise MemoryError(f"Batcher: a tick of {n} streams")
        self.tick_index = ti
        self.ids_arr = np.empty(n, np.int64)
        self.x_arr = np.empty((n, self.input_size), self.dtype)
        self.tick_cap = n
        return 0

    cdef int _tick(self) except -1:
        """One tick: takes the first entry of each waiting stream (max_batch streams at most),
        closes the streams whose close came up, steps the frames in one pool.step, publishes."""
        # Room first (it may allocate, and so run a finalizer that submits): the scan below
        # runs no Python code at all.
        self._grow_tick(min(self.count, self.limit))
        if self.side_cap < self.count:
            free(self.side)
            self.side = <Entry*>malloc(self.count * sizeof(Entry))
            if self.side == NULL:
                self.side_cap = 0
                raise MemoryError("Batcher: a tick's closes")
            self.side_cap = self.count
        self.ticks += 1
        cdef Py_ssize_t visit = self.q_len, taken = 0, nside = 0, idx, e
        cdef Py_ssize_t row = self.input_size * self.isz
        cdef Py_ssize_t most = min(self.limit, self.tick_cap)
        cdef int64_t* ids = <int64_t*>cnp.PyArray_DATA(<cnp.ndarray>self.ids_arr)
        cdef char* xs = <char*>cnp.PyArray_DATA(<cnp.ndarray>self.x_arr)
        while visit > 0 and taken < most:
            idx = self.queue[self.q_head]
            self.q_head = (self.q_head + 1) % self.st_cap
            self.q_len -= 1
            visit -= 1
            # cancelled entries at the stream's head are dropped: never stepped
            while self.st[idx].first >= 0 and (<Result>self.ent[self.st[idx].first].res).state == CANCELLED:
                e = self._unlink_first(idx)
                self.side[nside] = self.ent[e]
                nside += 1
                self._free_entry(e)
            if self.st[idx].first >= 0:
                e = self._unlink_first(idx)
                if self.ent[e].close:       # after the stream's earlier frames: closes now
                    self.side[nside] = self.ent[e]
                    nside += 1
                else:
                    ids[taken] = self.ent[e].sid
                    memcpy(xs + taken * row, self.frames + e * row, row)
                    self.tick_res[taken] = self.ent[e].res
                    self.tick_index[taken] = self.ent[e].index
                    if (<Result>self.ent[e].res).state == PENDING:
                        (<Result>self.ent[e].res).state = RUNNING
                    taken += 1
                self._free_entry(e)
            if self.st[idx].first >= 0:     # more to come: behind the other streams
                self.queue[(self.q_head + self.q_len) % self.st_cap] = idx
                self.q_len += 1
            else:
                self._free_stream(idx)
        self.tick_res_n = taken
        self.due = self.count > 0
        # Python again from here: the closes, the step, the results.
        self._side_entries(nside)
        if taken:
            self._step_taken(taken)
        return 0

    cdef int _side_entries(self, Py_ssize_t nside) except -1:
        """The tick's closes (each after its stream's earlier frames) and dropped entries."""
        cdef Py_ssize_t i
        cdef Entry e
        cdef Result res
        for i in range(nside):
            e = self.side[i]
            res = <Result>e.res           # the side array's reference, released below
            try:
                if e.close:
                    # A cancelled close still closes: its stream must not stay open for nobody.
                    try:
                        self._close(e.sid)
                    except Exception as exc:
                        if res.state < DONE:
                            res.exc, res.state = exc, FAILED
                    else:
                        if res.state < DONE:
                            res.state = DONE
                    self._published()
                    res._run_callbacks()
                    _settle_async(res)
            finally:
                Py_DECREF(<object>e.res)
        return 0

    cdef int _step_taken(self, Py_ssize_t n) except -1:
        """pool.step over the n frames taken; a stream the pool refuses (StreamIdError) fails
        with its queued frames, and the others are stepped again without it."""
        ids = self.ids_arr[:n]
        x = self.x_arr[:n]
        keep = None
        while True:
            y = np.empty((len(ids), self.output_size), self.dtype)
            try:
                self._step(ids, x, y)
                break
            except Exception as exc:
                bad = ()
                if isinstance(exc, ValueError):
                    bad = getattr(exc, "sids", None) or (getattr(exc, "sid", None),)
                bad = set(int(s) for s in bad if s is not None) & set(ids.tolist())
                if not bad:
                    self._finish(n, None, keep, exc)
                    return 0
                ok = ~np.isin(ids, list(bad))
                failed = np.flatnonzero(~ok)
                idx = np.arange(n) if keep is None else keep
                for j in failed:
                    self._fail_one(idx[j], exc)
                for s in bad:
                    self._fail_stream(s, exc)
                keep = idx[ok]
                ids, x = ids[ok], x[ok]
                if len(ids) == 0:
                    self._finish(n, None, keep, None)
                    return 0
        self._finish(n, y, keep, None)
        return 0

    cdef void _fail_one(self, Py_ssize_t j, exc):
        cdef Result res = <Result>self.tick_res[j]
        if res.state < DONE:
            res.exc, res.state = exc, FAILED

    cdef int _finish(self, Py_ssize_t n, y, keep, exc) except -1:
        """Publishes the tick: results (y's rows, in keep's order, or exc for all), one
        broadcast, then callbacks and one asyncio callback per event loop."""
        cdef Py_ssize_t i, j, r
        cdef Result res
        cdef FrameResult fr
        cdef BatchResult br
        rows = None
        if y is not None:
            rows = np.full(n, -1, np.intp)
            rows[np.arange(n) if keep is None else keep] = np.arange(len(y))
        for i in range(n):
            res = <Result>self.tick_res[i]
            j = self.tick_index[i]
            r = -1 if rows is None else rows[i]
            if j < 0:
                fr = <FrameResult>res
                if fr.state >= DONE:
                    continue
                if r >= 0:
                    fr.y, fr.row, fr.state = y, r, DONE
                elif exc is not None:
                    fr.exc, fr.state = exc, FAILED
                continue
            br = <BatchResult>res
            if r >= 0:
                memcpy(<char*>cnp.PyArray_DATA(<cnp.ndarray>br.outputs) + j * self.output_size * self.isz,
                       <char*>cnp.PyArray_DATA(<cnp.ndarray>y) + r * self.output_size * self.isz,
                       self.output_size * self.isz)
            elif exc is not None and br.exc is None:
                br.exc = exc
            br.remaining -= 1
            if br.remaining == 0 and br.state < DONE:
                br.state = FAILED if br.exc is not None else DONE
        self._published()
        loops = None
        for i in range(n):
            res = <Result>self.tick_res[i]
            if res.state < DONE:
                continue
            if res.callbacks:
                res._run_callbacks()
            if res.afut is not None:
                if loops is None:
                    loops = {}
                loop = res.afut.get_loop()
                loops.setdefault(loop, []).append((res.afut, res))
                res.afut = None
        self.tick_res_n = 0
        for i in range(n):
            Py_DECREF(<object>self.tick_res[i])
        if loops:
            for loop, pairs in loops.items():
                try:
                    loop.call_soon_threadsafe(_resolve_async, pairs)
                except RuntimeError:          # the loop is closed: nobody awaits these
                    pass
        return 0

    cdef void _fail_stream(self, int64_t sid, exc):
        """Fails every queued entry of stream sid (the pool no longer knows it). The stream's
        record stays in the queue, empty, until its turn frees it."""
        cdef Py_ssize_t idx = self._map_get(sid), e
        if idx < 0:
            return
        failed = []
        while self.st[idx].first >= 0:
            e = self._unlink_first(idx)
            failed.append(<object>self.ent[e].res)
            Py_DECREF(<object>self.ent[e].res)      # `failed` holds it
            self._free_entry(e)
        for res in failed:
            if (<Result>res).state < DONE:
                (<Result>res).exc, (<Result>res).state = exc, FAILED
        if failed:
            self._published()
            for res in failed:
                (<Result>res)._run_callbacks()
                _settle_async(res)

    cdef void _fail_tick(self, exc):
        """After a failed tick: the results it had taken get the error (nothing is lost)."""
        cdef Py_ssize_t i, n = self.tick_res_n
        cdef Result res
        self.tick_res_n = 0
        for i in range(n):
            res = <Result>self.tick_res[i]
            if res.state < DONE:
                res.exc, res.state = exc, FAILED
        self._published()
        for i in range(n):
            res = <Result>self.tick_res[i]
            res._run_callbacks()
            _settle_async(res)
            Py_DECREF(<object>self.tick_res[i])

    def __reduce__(self):
        raise TypeError("Batcher cannot be pickled: it owns a thread; make one per process")


_asyncio_get_loop = None


cdef object _running_loop():
    global _asyncio_get_loop
    if _asyncio_get_loop is None:
        import asyncio
        _asyncio_get_loop = asyncio.get_running_loop
    return _asyncio_get_loop()


cdef void _settle_async(res):
    afut = (<Result>res).afut
    if afut is not None:
        (<Result>res).afut = None
        try:
            afut.get_loop().call_soon_threadsafe(_resolve_async, [(afut, res)])
        except RuntimeError:
            pass


cdef int64_t _sid(sid) except? -1:
    if type(sid) is int:
        try:
            return <int64_t>sid
        except OverflowError:
            raise ValueError(f"sid: expected a stream id (an int64 from pool.open()), got {sid}")
    if isinstance(sid, (bool, np.bool_)) or not isinstance(sid, (int, np.integer)):
        raise TypeError(f"sid: expected a stream id (an int from pool.open()), got "
                        f"{type(sid).__name__}")
    return _sid(int(sid))


def _after_fork_in_child():
    _workers.clear()
    for b in list(_live):
        b._in_forked_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
