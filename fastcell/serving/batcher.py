"""Batcher: steps the frames of many streams of a StreamPool together, one pool.step per tick.

Any thread submits one frame of one stream at a time (``submit`` returns a
concurrent.futures.Future, ``submit_async`` an awaitable); one worker thread ("fastcell-batcher")
gathers the frames that are waiting, at most one per stream, and advances all their streams with
ONE ``pool.step(ids, x)``: one GIL-free call instead of one Python call and one small GEMV per
frame.

What is serialized: the frames of one stream are stepped in the order they were submitted, one
per tick (a stream's next frame waits for the tick after), so each stream sees exactly the steps
it would see through its own ``model.new_state(1)``, bit for bit. Ticks run one after another on
the worker thread; the frames of different streams carry no order between them. Futures are
resolved on the worker thread, so their done-callbacks run there: keep them short.

Tick policy: when work is waiting, the worker waits up to ``max_delay`` seconds from the time the
oldest waiting frame came for more streams to join, and steps at once when ``max_batch`` streams
are ready, when ``max_delay`` is 0, or when frames were left behind by the previous tick (they
have waited). Under load the next batch fills while the previous step runs.

No locks. A garbage collection may start at any allocation of a tracked object (a tuple, a
Future, ...) and run a finalizer on the same thread, in the middle of any method; a finalizer
that calls the Batcher must find nothing held. So a submit only appends to deques and puts on a
SimpleQueue (single C calls, reentrant), and the worker thread alone owns the per-stream queues:
  _inbox   deque of (sid, frame, future, time) (frame None: close the stream) and _STOP, in
           submit order; appended by any thread, taken by the worker.
  _tokens  deque of one None per entry submitted and not yet taken by a tick: len() is `pending`
           and the bound's count (an atomic counter with no lock).
  _bell    SimpleQueue: how a submit wakes the worker, only when it sleeps for a reason the
           submit ends (idle, or a tick that has become full); close() always rings.
"""

import asyncio
import logging
import os
import sys
import threading
import weakref
from collections import deque
from concurrent.futures import Future
from itertools import islice
from queue import Empty, SimpleQueue
from time import monotonic

import numpy as np

from fastcell.checks import to_numpy

__all__ = ["Batcher", "BatcherFullError"]

log = logging.getLogger("fastcell.batcher")

_SID_MIN, _SID_MAX = -(2 ** 63), 2 ** 63 - 1   # pool.step takes int64 ids
_IDLE, _WAITING = 1, 2                           # what the worker sleeps for, if it sleeps
_STOP = object()                                 # close(): the inbox's last entry to step
_DEFAULT_PENDING = 65536                         # max_pending for a pool without a capacity
# The worker never sleeps longer than this at once (it sleeps again as needed): a timeout near
# threading.TIMEOUT_MAX may overflow once added to the clock.
_LONGEST_SLEEP = 3600.0
_LONGEST_BACKOFF = 1.0   # seconds between two failed rounds of the worker, at most


class BatcherFullError(RuntimeError):
    """Batcher.submit() while ``max_pending`` frames are already waiting: the producers outrun the
    pool. ``pending`` and ``max_pending`` give the numbers."""

    def __init__(self, message, pending, max_pending):
        super().__init__(message)
        self.pending = pending
        self.max_pending = max_pending


class _Default:
    def __repr__(self):
        return "4 * pool.capacity"


_AUTO = _Default()

# Every Batcher of this process, so a forked child can disown them (see _after_fork_in_child).
_live = weakref.WeakSet()
# The idents of the running worker threads: close() never waits on one (see close).
_workers = set()


class Batcher:
    """Batcher(pool, max_batch=None, max_delay=0.002, max_pending=4 * pool.capacity): a
    micro-batcher over a StreamPool.

    ``fut = batcher.submit(sid, frame)`` queues one frame (shape (input_size,) or
    (1, input_size); copied, so the caller may reuse its buffer) of the open pool stream ``sid``;
    the future resolves to that stream's output row, a new (output_size,) array. A frame is
    checked when submitted and a bad one raises there (it never reaches a tick). A frame of a
    stream the pool no longer knows gets the pool's StreamIdError (a ValueError whose ``sid``
    names it, ``sids`` every such id of the tick) on its future; the other streams of that tick
    are stepped as usual. Any other error of a step is set on the futures of that tick, and the
    batcher keeps running. Each future is set on its own: an exception from a done-callback (any
    BaseException) is logged and reaches no other future.

    max_batch: most streams stepped in one tick (None: no limit). max_delay: seconds a frame may
    wait for others to join its tick (0: step whatever is waiting, at once; at most
    threading.TIMEOUT_MAX). max_pending: most frames waiting (submitted, not yet taken by a tick);
    past it ``submit`` raises BatcherFullError at once, it never blocks. The default is
    4 * pool.capacity (65536 for a pool without a ``capacity``); None: no bound. With several
    threads submitting at once the count may pass max_pending by up to the number of those
    threads (each checks, then adds). ``close_stream`` is never refused: a close always gets
    through (and counts as pending until its tick).

    A future cancelled before its tick is dropped: its frame is never stepped. ``close()`` steps
    everything already submitted, then stops the worker; the batcher is also a context manager.

    A finalizer (``__del__``, a ``weakref.finalize`` callback) may call any Batcher method, at
    any moment, on any thread: the Batcher holds no lock a garbage collection could interrupt.
    (It must not wait for a future's result: run on the worker thread, it would wait for
    itself.) A Batcher serves the process that made it: in a forked child it refuses every call
    with RuntimeError (make a new Batcher there).

    The pool may be any object with StreamPool's ``input_size``, ``output_size``, ``dtype``,
    ``step(ids, x, out)`` and ``close(sid)``.
    """

    def __init__(self, pool, max_batch=None, max_delay=0.002, max_pending=_AUTO):
        for name in ("input_size", "output_size", "dtype", "step", "close"):
            if not hasattr(pool, name):
                raise TypeError(f"pool: expected a fastcell.StreamPool, got {type(pool).__name__} "
                                f"(no {name!r})")
        if max_batch is not None and not _is_count(max_batch):
            raise ValueError(f"max_batch: expected None or an integer >= 1, got {max_batch!r}")
        # TIMEOUT_MAX: a longer wait cannot be slept (the worker would fail every round).
        if (isinstance(max_delay, (bool, np.bool_))
                or not isinstance(max_delay, (int, float, np.integer, np.floating))
                or not 0 <= max_delay <= threading.TIMEOUT_MAX):
            raise ValueError(f"max_delay: expected a number of seconds in [0, "
                             f"{threading.TIMEOUT_MAX:g}] (threading.TIMEOUT_MAX), got "
                             f"{max_delay!r}")
        if max_pending is _AUTO:
            capacity = getattr(pool, "capacity", None)
            max_pending = 4 * int(capacity) if _is_count(capacity) else _DEFAULT_PENDING
        elif max_pending is not None and not _is_count(max_pending):
            raise ValueError(f"max_pending: expected None or an integer >= 1, got {max_pending!r}")
        self.pool = pool
        self.max_batch = None if max_batch is None else int(max_batch)
        self.max_delay = float(max_delay)
        self.max_pending = None if max_pending is None else int(max_pending)
        self._limit = sys.maxsize if max_batch is None else int(max_batch)
        self._bound = sys.maxsize if max_pending is None else int(max_pending)
        self._input_size = int(pool.input_size)
        self._output_size = int(pool.output_size)
        self._shape = (self._input_size,)
        self._dtype = np.dtype(pool.dtype)
        # Rows are written here and stepped from here: no allocation per tick but the result rows.
        # Sized for the largest tick so far (max_batch when given).
        self._x = self._y = None
        self._grow(min(self._limit, 64))

        # Shared with any thread (see the module docstring): single C calls on them only.
        self._inbox = deque()
        self._tokens = deque()
        self._bell = SimpleQueue()
        self._sleeping = 0     # _IDLE / _WAITING while the worker sleeps: a submit rings then only
        self._room = 0         # while _WAITING: streams that may still join before the tick is full
        self._closed = False   # close() was called: submits are refused
        self._stopped = False  # the worker has taken its last entry
        self._forked = False   # this is a forked child's copy: it has no worker
        self._pid = os.getpid()
        # The worker's own: sid -> its oldest waiting entry, or a deque of them when it has more
        # than one; in the order the streams are served.
        self._queues = {}
        self._since = 0.0      # the submit time of the oldest waiting entry
        self._due = False      # entries were left behind by the last tick: the next is due now
        self._stopping = False
        self._taken = {}
        _live.add(self)
        self._thread = threading.Thread(target=self._run, name="fastcell-batcher", daemon=True)
        self._thread.start()

    # ---- any thread ----

    def submit(self, sid, frame):
        """Queues one frame of stream ``sid``; returns a Future of its output row. Raises
        BatcherFullError when max_pending frames are waiting."""
        # The common case costs three comparisons; anything else is converted or refused.
        if type(frame) is np.ndarray and frame.dtype == self._dtype and frame.shape == self._shape:
            frame = frame.copy()
        else:
            frame = self._frame(frame)
        if type(sid) is not int or not _SID_MIN <= sid <= _SID_MAX:
            sid = self._sid(sid)
        return self._enqueue(sid, frame, "submit")

    def submit_async(self, sid, frame):
        """``await batcher.submit_async(sid, frame)``: submit() for asyncio code (call it in the
        event loop's thread). A bad frame, or a full batcher, raises here; cancelling the
        awaitable before its tick drops the frame."""
        return asyncio.wrap_future(self.submit(sid, frame))

    def close_stream(self, sid):
        """Closes pool stream ``sid`` on the worker thread, after the frames already submitted for
        it are stepped. Returns a Future resolved to None once closed (the pool's StreamIdError if
        the stream was not open); cancelling it does not stop the close. Frames submitted after
        this get StreamIdError. Never refused by max_pending."""
        if type(sid) is not int or not _SID_MIN <= sid <= _SID_MAX:
            sid = self._sid(sid)
        return self._enqueue(sid, None, "close_stream")

    def _enqueue(self, sid, frame, caller):
        """Queues (sid, frame, future, time) (frame None: a close) and rings the worker when it
        sleeps and should act now: when it is idle, or when its tick may have become full."""
        if self._closed:
            raise RuntimeError(self._refusal(caller))
        tokens = self._tokens
        if frame is not None and len(tokens) >= self._bound:
            n = len(tokens)
            raise BatcherFullError(
                f"{caller}: {n} frames are waiting to be stepped (max_pending={self.max_pending}): "
                "the producers outrun the pool; slow down, or drop frames (a real-time stream "
                "can skip one)", n, self.max_pending)
        fut = Future()
        entry = (sid, frame, fut, monotonic())
        tokens.append(None)     # before the entry: the worker takes a token for every entry
        inbox = self._inbox
        inbox.append(entry)
        # Read after the append; the worker announces its sleep before it looks at the inbox
        # last: one of the two sees the other. Several threads may ring one sleep: harmless.
        sleeping = self._sleeping
        if sleeping and (sleeping == _IDLE or len(inbox) >= self._room):
            self._sleeping = 0
            self._bell.put(None)
        if self._stopped:       # the worker may have looked for the last time before the append
            self._refuse_late()
        return fut

    def close(self):
        """Refuses new frames, steps every frame already submitted, stops the worker thread and
        waits for it. Idempotent. On the worker thread of any Batcher (in a done-callback, or a
        finalizer a collection runs there) it does not wait: the worker stops once drained. In a
        forked child it returns at once."""
        if self._forked:
            return
        if not self._closed:
            self._closed = True
            self._inbox.append(_STOP)
            self._sleeping = 0
            self._bell.put(None)   # always: even a worker waiting out max_delay stops waiting
        # Not on a worker: its own would never end, and two batchers closed from each other's
        # worker would each wait for the other.
        if threading.get_ident() not in _workers:
            self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def closed(self):
        return self._closed

    @property
    def pending(self):
        """Frames (and stream closes) submitted and not yet taken by a tick. Approximate by a few
        while threads submit: a submit in progress may or may not be counted yet."""
        return len(self._tokens)

    def __repr__(self):
        state = "closed" if self._closed else f"pending={self.pending}"
        return (f"Batcher(max_batch={self.max_batch}, max_delay={self.max_delay}, "
                f"max_pending={self.max_pending}, {state}, streams={len(self._queues)})")

    def __reduce__(self):
        raise TypeError("Batcher cannot be pickled: it owns a thread; make one per process")

    def _refusal(self, caller):
        if self._forked:
            return (f"{caller}: this Batcher belongs to process {self._pid}, and this is a process "
                    f"forked from it ({os.getpid()}), where its worker thread does not exist; "
                    "make a new Batcher in this process")
        return f"{caller}: the Batcher is closed"

    def _in_forked_child(self):
        # The worker thread did not survive the fork: nothing would ever step here. A parent
        # thread may have been changing the deques at fork time: new, empty ones.
        self._forked = self._closed = self._stopped = True
        self._inbox, self._tokens, self._bell, self._queues = deque(), deque(), SimpleQueue(), {}

    # ---- argument checks (off the common path) ----

    def _frame(self, frame):
        a = to_numpy(frame, "frame")
        I = self._input_size
        if a.shape != (I,) and a.shape != (1, I):
            raise ValueError(f"frame: expected shape ({I},) or (1, {I}), got {a.shape}")
        return np.array(a.reshape(I), dtype=self._dtype, order="C", copy=True)

    @staticmethod
    def _sid(sid):
        if isinstance(sid, (bool, np.bool_)) or not isinstance(sid, (int, np.integer)):
            raise TypeError(f"sid: expected a stream id (an int from pool.open()), "
                            f"got {type(sid).__name__}")
        sid = int(sid)
        if not _SID_MIN <= sid <= _SID_MAX:
            raise ValueError(f"sid: expected a stream id (an int64 from pool.open()), got {sid}")
        return sid

    # ---- the worker thread ----

    def _grow(self, n):
        self._x = np.empty(n * self._input_size, self._dtype)
        self._y = np.empty((n, self._output_size), self._dtype)

    def _run(self):
        me = threading.get_ident()
        _workers.add(me)
        try:
            self._serve()
        finally:
            _workers.discard(me)

    def _serve(self):
        backoff = 0.0
        while True:
            self._taken = {}   # what this tick took, so nothing is lost if the round fails
            try:
                if not self._round():
                    break
                backoff = 0.0
            except BaseException as exc:  # a bug here: set on the tick's futures and logged, not lost
                log.exception("fastcell.Batcher: a tick failed; its futures get the error")
                for _, _, fut, _ in self._taken.values():
                    if not fut.done():
                        _settle(fut, exc=exc)
                # A failure that repeats must not spin a core nor flood the log: a longer pause
                # each time, up to _LONGEST_BACKOFF. close() rings, and once it has, the pause
                # stays short: the drain is bounded by what was submitted.
                backoff = (0.01 if self._stopping
                           else min(max(2 * backoff, 0.01), _LONGEST_BACKOFF))
                try:
                    self._bell.get(timeout=backoff)
                except Empty:
                    pass
        self._stopped = True
        self._refuse_late()    # entries that came after the last look

    def _round(self):
        """Waits for work by the tick policy, then runs one tick. False once closed and drained."""
        if self._forked:   # fork() was called on this thread (in a callback): the child's copy
            return False
        queues = self._receive()
        if not queues:
            if self._stopping:
                return False
            self._sleep(_IDLE, None)
            return True
        if not (self._due or self._stopping) and self.max_delay > 0:
            while len(queues) < self._limit:
                wait = self._since + self.max_delay - monotonic()
                if wait <= 0:
                    break
                self._room = self._limit - len(queues)
                self._sleep(_WAITING, min(wait, _LONGEST_SLEEP))
                queues = self._receive()
                if self._stopping:
                    break
        self._tick()
        return True

    def _sleep(self, why, timeout):
        """Sleeps until a submit rings (or timeout), unless the inbox already holds its reason."""
        self._sleeping = why
        # Looked at after announcing the sleep: an entry appended before it is seen here, one
        # after it rings.
        if len(self._inbox) < (1 if why == _IDLE else self._room):
            try:
                self._bell.get(timeout=timeout)
            except Empty:
                pass
        self._sleeping = 0
        # Rings left over (threads that saw the sleep at once) are for entries already in the
        # inbox: they need no wake-up of their own.
        bell = self._bell
        for _ in range(bell.qsize()):
            bell.get_nowait()

    def _receive(self):
        """Moves the entries in the inbox to the streams' queues; returns the queues."""
        inbox, queues = self._inbox, self._queues
        for _ in range(len(inbox)):
            entry = inbox.popleft()
            if entry is _STOP:
                self._stopping = True
                continue
            sid = entry[0]
            q = queues.get(sid)
            if q is None:            # the common case: the stream's only waiting entry
                if not queues:       # a new batch: its max_delay runs from this entry's submit
                    self._since, self._due = entry[3], False
                queues[sid] = entry
            elif type(q) is tuple:
                queues[sid] = deque((q, entry))
            else:
                q.append(entry)      # the stream is already served in its turn
        return queues

    def _take(self):
        """The oldest entry of each waiting stream (of the first max_batch streams):
        {sid: entry}. The rest stay queued, due at once (they have waited)."""
        queues = self._queues
        if len(queues) <= self._limit:
            taken, left = queues, {}
        else:
            taken = {sid: queues.pop(sid) for sid in list(islice(queues, self._limit))}
            left = queues
        untoken = self._tokens.pop
        for sid, q in taken.items():
            if type(q) is not tuple:  # a deque: its next entry goes behind the other streams
                taken[sid] = q.popleft()
                if q:
                    left[sid] = q
            untoken()
        self._queues = left
        self._due = bool(left)
        return taken

    def _tick(self):
        entries = self._taken = self._take()
        ids, frames, futs = [], [], []
        for sid, (_, frame, fut, _) in entries.items():
            if frame is None:
                self._close_stream(sid, fut)
                continue
            if not fut.set_running_or_notify_cancel():
                continue   # cancelled: the frame is dropped, its stream not stepped
            ids.append(sid)
            frames.append(frame)
            futs.append(fut)
        while ids:
            n = len(ids)
            if n > len(self._y):
                self._grow(max(n, 2 * len(self._y)))
            x = np.concatenate(frames, out=self._x[:n * self._input_size]).reshape(n, self._input_size)
            try:
                y = self.pool.step(np.array(ids, np.int64), x, self._y[:n])
            except Exception as exc:
                # StreamIdError names every id of the step that is not open (sids; sid, the
                # first): those streams fail (this frame and all they have queued); the step
                # changed no state, so the others are stepped again without them.
                bad = ()
                if isinstance(exc, ValueError):
                    bad = getattr(exc, "sids", None) or (getattr(exc, "sid", None),)
                    bad = [sid for sid in dict.fromkeys(bad) if sid in ids]
                if not bad:
                    for fut in futs:
                        _settle(fut, exc=exc)
                    return
                for sid in bad:
                    i = ids.index(sid)
                    del ids[i], frames[i]
                    _settle(futs.pop(i), exc=exc)
                    self._fail_stream(sid, exc)
                continue
            for fut, row in zip(futs, y):
                _settle(fut, row.copy())   # the caller's own row: the buffer is reused
            return

    def _close_stream(self, sid, fut):
        # Every frame submitted before the close was stepped by an earlier tick. A cancelled
        # future still closes: its stream must not be left open for nobody.
        wanted = fut.set_running_or_notify_cancel()
        try:
            self.pool.close(sid)
        except Exception as exc:
            if wanted:
                _settle(fut, exc=exc)
        else:
            if wanted:
                _settle(fut, None)

    def _fail_stream(self, sid, exc):
        q = self._queues.pop(sid, None)
        if q is None:
            return
        untoken = self._tokens.pop
        for _, _, fut, _ in (q,) if type(q) is tuple else q:
            untoken()
            if fut.set_running_or_notify_cancel():
                _settle(fut, exc=exc)

    def _refuse_late(self):
        """Entries appended after the worker's last look (their submit passed the closed check
        while close() ran): nothing will step them. A frame fails with RuntimeError; a close
        still closes its stream. Any thread: entries are taken one atomic popleft at a time."""
        inbox, untoken = self._inbox, self._tokens.pop
        while True:
            try:
                entry = inbox.popleft()
            except IndexError:
                return
            if entry is _STOP:
                continue
            untoken()
            sid, frame, fut, _ = entry
            if frame is None:
                self._close_stream(sid, fut)
            elif fut.set_running_or_notify_cancel():
                _settle(fut, exc=RuntimeError("submit: the Batcher was closed before this frame "
                                              "was stepped"))


def _settle(fut, result=None, exc=None):
    """Sets one future. Whatever its done-callbacks raise (any BaseException: concurrent.futures
    passes on all but Exception) is logged here: it must reach no other future of the tick, nor
    stop the worker."""
    try:
        if exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)
    except BaseException:
        log.exception("fastcell.Batcher: a done-callback of a future raised; the other futures "
                      "and the batcher are not affected")


def _is_count(v):
    return (not isinstance(v, (bool, np.bool_)) and isinstance(v, (int, np.integer)) and v >= 1)


def _after_fork_in_child():
    _workers.clear()     # their threads are gone (a new thread may get one of their idents)
    for batcher in list(_live):
        batcher._in_forked_child()


if hasattr(os, "register_at_fork"):   # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
