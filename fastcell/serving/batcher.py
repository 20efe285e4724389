"""Batcher: steps the frames of many streams of a StreamPool together, one pool.step per tick.

Any thread submits one frame of one stream at a time (``submit`` returns a light future, a
FrameResult; ``submit_async`` an asyncio future; ``submit_many`` a batch's BatchResult); one
worker thread ("fastcell-batcher") gathers the frames that are waiting, at most one per stream,
and advances all their streams with ONE ``pool.step(ids, x)``: one GIL-free call instead of one
Python call and one small GEMV per frame. The engine is compiled (fastcell_c/batcher.pyx): a
submit is one C-level call that copies the frame into a ring and makes one small handle, and the
results of a tick are published at once (one wake-up for every waiting result(), one callback
per event loop for the asyncio futures).

What is serialized: the frames of one stream are stepped in the order they were submitted, one
per tick (a stream's next frame waits for the tick after), so each stream sees exactly the steps
it would see through its own ``model.new_state(1)``, bit for bit. Ticks run one after another on
the worker thread; the frames of different streams carry no order between them. Done-callbacks
run on the worker thread: keep them short.

Tick policy: when work is waiting, the worker waits up to ``max_delay`` seconds from the time the
oldest waiting frame came for more frames to join, and steps at once when ``max_batch`` frames
are waiting, when ``max_delay`` is 0, or when frames were left behind by the previous tick (they
have waited). Under load the next batch fills while the previous step runs.

No lock is held while a Python object is made: the ring is changed only under the GIL, with no
Python code run in the middle of a change, so a finalizer (which a garbage collection may run at
any allocation, on any thread) may call any Batcher method at any moment.
"""

import threading

import numpy as np

from fastcell_c.batcher import (BatchResult, BatcherCore, BatcherFullError, FrameResult,
                                _workers)

__all__ = ["Batcher", "BatcherFullError", "FrameResult", "BatchResult"]

_DEFAULT_PENDING = 65536                         # max_pending for a pool without a capacity


class _Default:
    def __repr__(self):
        return "4 * pool.capacity"


_AUTO = _Default()


class Batcher(BatcherCore):
    """Batcher(pool, max_batch=None, max_delay=0.002, max_pending=4 * pool.capacity): a
    micro-batcher over a StreamPool.

    ``fut = batcher.submit(sid, frame)`` queues one frame (shape (input_size,) or
    (1, input_size); copied, so the caller may reuse its buffer) of the open pool stream ``sid``;
    ``fut`` is a FrameResult, a light future (``result(timeout)``, ``exception``, ``done``,
    ``cancel``, ``cancelled``, ``add_done_callback``) whose result is that stream's output row, a
    new (output_size,) array. ``submit_async`` does the same for asyncio code (an asyncio future),
    ``submit_many(sids, frames)`` for a caller holding a batch (a BatchResult of (n,
    output_size) outputs); ``close_stream`` and ``close_stream_async`` close a stream behind
    its frames. A frame is checked when submitted and a bad one raises there (it never reaches
    a tick). A frame of a
    stream the pool no longer knows gets the pool's StreamIdError (a ValueError whose ``sid``
    names it, ``sids`` every such id of the tick) on its future; the other streams of that tick
    are stepped as usual. Any other error of a step is set on the futures of that tick, and the
    batcher keeps running. Each future is set on its own: an exception from a done-callback (any
    BaseException) is logged and reaches no other future.

    max_batch: most streams stepped in one tick (None: no limit); a tick is due as soon as this
    many frames wait. max_delay: seconds a frame may wait for others to join its tick (0: step
    whatever is waiting, at once; at most threading.TIMEOUT_MAX). max_pending: most frames waiting (submitted, not yet taken by a tick);
    past it ``submit`` raises BatcherFullError at once, it never blocks. The default is
    4 * pool.capacity (65536 for a pool without a ``capacity``); None: no bound (a
    submit_many larger than the bound is taken when nothing waits). ``close_stream`` is never
    refused: a close always gets through (and counts as pending until its tick).

    A result cancelled before its tick is dropped: its frame is never stepped. ``close()`` steps
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
        super().__init__(pool, -1 if max_batch is None else int(max_batch),
                         -1 if max_pending is None else int(max_pending), float(max_delay))
        self.max_batch = None if max_batch is None else int(max_batch)
        self.max_pending = None if max_pending is None else int(max_pending)
        self._thread = threading.Thread(target=self._serve, name="fastcell-batcher", daemon=True)
        self._thread.start()

    def close(self):
        """Refuses new frames, steps every frame already submitted, stops the worker thread and
        waits for it. Idempotent. On the worker thread of any Batcher (in a done-callback, or a
        finalizer a collection runs there) it does not wait: the worker stops once drained. In a
        forked child it returns at once."""
        if not self._stop():
            return
        if threading.get_ident() not in _workers:
            self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        state = "closed" if self.closed else f"pending={self.pending}"
        return (f"Batcher(max_batch={self.max_batch}, max_delay={self.max_delay}, "
                f"max_pending={self.max_pending}, {state})")


def _is_count(v):
    return (not isinstance(v, (bool, np.bool_)) and isinstance(v, (int, np.integer)) and v >= 1)
