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
"""

import asyncio
import logging
import sys
import threading
from collections import deque
from concurrent.futures import Future
from itertools import islice
from time import monotonic, sleep

import numpy as np

from fastcell.checks import to_numpy

__all__ = ["Batcher"]

log = logging.getLogger("fastcell.batcher")

_SID_MIN, _SID_MAX = -(2 ** 63), 2 ** 63 - 1   # pool.step takes int64 ids
_IDLE, _WAITING = 1, 2                           # what the worker is blocked on, if anything


class Batcher:
    """Batcher(pool, max_batch=None, max_delay=0.002): a micro-batcher over a StreamPool.

    ``fut = batcher.submit(sid, frame)`` queues one frame (shape (input_size,) or
    (1, input_size); copied, so the caller may reuse its buffer) of the open pool stream ``sid``;
    the future resolves to that stream's output row, a new (output_size,) array. A frame is
    checked when submitted and a bad one raises there (it never reaches a tick). A frame of a
    stream the pool no longer knows gets the pool's StreamIdError (a ValueError whose ``sid``
    names it, ``sids`` every such id of the tick) on its future; the other streams of that tick
    are stepped as usual. Any other error
    of a step is set on the futures of that tick, and the batcher keeps running.

    max_batch: most streams stepped in one tick (None: no limit). max_delay: seconds a frame may
    wait for others to join its tick (0: step whatever is waiting, at once).

    A future cancelled before its tick is dropped: its frame is never stepped. ``close()`` steps
    everything already submitted, then stops the worker; the batcher is also a context manager.
    The pool may be any object with StreamPool's ``input_size``, ``output_size``, ``dtype``,
    ``step(ids, x, out)`` and ``close(sid)``.
    """

    def __init__(self, pool, max_batch=None, max_delay=0.002):
        for name in ("input_size", "output_size", "dtype", "step", "close"):
            if not hasattr(pool, name):
                raise TypeError(f"pool: expected a fastcell.StreamPool, got {type(pool).__name__} "
                                f"(no {name!r})")
        if max_batch is not None and (isinstance(max_batch, (bool, np.bool_))
                                      or not isinstance(max_batch, (int, np.integer))
                                      or max_batch < 1):
            raise ValueError(f"max_batch: expected None or an integer >= 1, got {max_batch!r}")
        if (isinstance(max_delay, (bool, np.bool_))
                or not isinstance(max_delay, (int, float, np.integer, np.floating))
                or not 0 <= max_delay < float("inf")):
            raise ValueError(f"max_delay: expected a number of seconds >= 0, got {max_delay!r}")
        self.pool = pool
        self.max_batch = None if max_batch is None else int(max_batch)
        self.max_delay = float(max_delay)
        self._limit = sys.maxsize if max_batch is None else int(max_batch)
        self._input_size = int(pool.input_size)
        self._output_size = int(pool.output_size)
        self._shape = (self._input_size,)
        self._dtype = np.dtype(pool.dtype)
        # Rows are written here and stepped from here: no allocation per tick but the result rows.
        # Sized for the largest tick so far (max_batch when given).
        self._x = self._y = None
        self._grow(min(self._limit, 64))

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # sid -> its oldest waiting (frame, future) (frame None: close the stream), or a deque of
        # them when it has more than one; in the order the streams are served.
        self._queues = {}
        self._since = 0.0      # monotonic time the oldest waiting frame came
        self._sleeping = 0     # _IDLE / _WAITING while the worker waits: submit wakes it then only
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="fastcell-batcher", daemon=True)
        self._thread.start()

    # ---- any thread ----

    def submit(self, sid, frame):
        """Queues one frame of stream ``sid``; returns a Future of its output row."""
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
        event loop's thread). A bad frame raises here; cancelling the awaitable before its tick
        drops the frame."""
        return asyncio.wrap_future(self.submit(sid, frame))

    def close_stream(self, sid):
        """Closes pool stream ``sid`` on the worker thread, after the frames already submitted for
        it are stepped. Returns a Future resolved to None once closed (the pool's StreamIdError if
        the stream was not open); cancelling it does not stop the close. Frames submitted after
        this get StreamIdError."""
        if type(sid) is not int or not _SID_MIN <= sid <= _SID_MAX:
            sid = self._sid(sid)
        return self._enqueue(sid, None, "close_stream")

    def _enqueue(self, sid, frame, caller):
        """Queues (frame, future) behind the stream's waiting entries (frame None: a close) and
        wakes the worker when it should act now: when it is idle, when max_batch streams are
        waiting, or for a close (it may be waiting out max_delay)."""
        fut = Future()
        entry = (frame, fut)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{caller}: the Batcher is closed")
            queues = self._queues
            q = queues.get(sid)
            if q is None:            # the common case: the stream's only waiting entry
                if not queues:
                    self._since = monotonic()
                queues[sid] = entry
                if self._sleeping and (frame is None or self._sleeping == _IDLE
                                       or len(queues) >= self._limit):
                    self._wake.notify()
            elif type(q) is tuple:
                queues[sid] = deque((q, entry))
            else:
                q.append(entry)      # the stream is already served in its turn: no wake-up
        return fut

    def close(self):
        """Refuses new frames, steps every frame already submitted, stops the worker thread and
        waits for it. Idempotent."""
        with self._lock:
            self._closed = True
            self._wake.notify()
        if threading.current_thread() is not self._thread:  # e.g. from a future's callback
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
        """Frames (and stream closes) submitted and not yet taken by a tick."""
        with self._lock:
            return sum(1 if type(q) is tuple else len(q) for q in self._queues.values())

    def __repr__(self):
        state = "closed" if self._closed else f"pending={self.pending}"
        return (f"Batcher(max_batch={self.max_batch}, max_delay={self.max_delay}, {state}, "
                f"streams={len(self._queues)})")

    def __reduce__(self):
        raise TypeError("Batcher cannot be pickled: it owns a thread; make one per process")

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
        while True:
            self._taken = {}   # what this tick took, so nothing is lost if the tick fails
            try:
                if not self._tick():
                    return
            except BaseException as exc:  # a bug here: set on the tick's futures and logged, not lost
                log.exception("fastcell.Batcher: a tick failed; its futures get the error")
                for _, fut in (self._taken or {}).values():
                    if not fut.done():
                        try:
                            fut.set_exception(exc)
                        except Exception:
                            pass
                sleep(0.01)   # a bug that repeats must not spin a core

    def _collect(self):
        """Waits for work by the tick policy, then takes the oldest entry of each waiting stream
        (of the first max_batch streams): {sid: (frame, future)}, or None once closed and drained."""
        with self._lock:
            while True:
                queues = self._queues
                if queues:
                    if self._closed or len(queues) >= self._limit or self.max_delay <= 0:
                        break
                    wait = self._since + self.max_delay - monotonic()
                    if wait <= 0:
                        break
                    self._sleeping = _WAITING
                    self._wake.wait(wait)
                elif self._closed:
                    return None
                else:
                    self._sleeping = _IDLE
                    self._wake.wait()
                self._sleeping = 0
            if len(queues) <= self._limit:
                taken, left = queues, {}
            else:
                taken = {sid: queues.pop(sid) for sid in list(islice(queues, self._limit))}
                left = queues
            for sid, q in taken.items():
                if type(q) is not tuple:  # a deque: its next frame goes behind the other streams
                    taken[sid] = q.popleft()
                    if q:
                        left[sid] = q
            self._queues = left
            # Frames left behind have waited already: _since stays, so the next tick is due at once.
        return taken

    def _tick(self):
        entries = self._taken = self._collect()
        if entries is None:
            return False
        ids, frames, futs = [], [], []
        for sid, (frame, fut) in entries.items():
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
                        fut.set_exception(exc)
                    return True
                for sid in bad:
                    i = ids.index(sid)
                    del ids[i], frames[i]
                    futs.pop(i).set_exception(exc)
                    self._fail_stream(sid, exc)
                continue
            for fut, row in zip(futs, y):
                fut.set_result(row.copy())   # the caller's own row: the buffer is reused
            return True
        return True

    def _close_stream(self, sid, fut):
        # Every frame submitted before the close was stepped by an earlier tick. A cancelled
        # future still closes: its stream must not be left open for nobody.
        wanted = fut.set_running_or_notify_cancel()
        try:
            self.pool.close(sid)
        except Exception as exc:
            if wanted:
                fut.set_exception(exc)
        else:
            if wanted:
                fut.set_result(None)

    def _fail_stream(self, sid, exc):
        with self._lock:
            q = self._queues.pop(sid, None)
        for _, fut in (q,) if type(q) is tuple else q or ():
            if fut.set_running_or_notify_cancel():
                fut.set_exception(exc)
