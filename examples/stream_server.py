"""A WebSocket service of recurrent streams (pip install websockets): one stream per connection,
or many streams per connection on /mux.

One stream per connection (any path but /mux): a connection gets a stream of a
fastcell.StreamPool, opened when it connects and closed when it leaves. A frame is one binary
message of input_size little-endian float32 values; the reply to each frame, in order, is one
binary message of output_size float32 values. The frames of all connections go through one
fastcell.Batcher, so the streams that have a frame waiting are stepped together in one GIL-free
pool.step. Anything but a frame of the right size gets a text message "error: ..." and the
connection is closed (1003 for a text message, 1008 for a wrong size); a full pool refuses a new
connection the same way (1013, try again later). When the Batcher already holds its max_pending
frames (4 x capacity) the frame that finds it full gets "error: server busy: ..." and its
connection is closed (1013); the other connections go on.

Many streams per connection (/mux), for a gateway that carries many calls: a request is one
binary message, all little-endian: uint32 n, n uint64 keys, then n x input_size float32 frames,
row i for key i. A key names a stream of this connection (another connection's key 7 is another
stream); a key seen for the first time opens a stream at the model's initial state. The reply,
one per request and in order, is uint32 n, the same keys in the same order, then n x output_size
float32 outputs. The text message "close <key> <key> ..." (decimal keys) closes those streams
after the requests sent before it; a key used again later starts a new stream. Leaving closes
every stream of the connection. The requests of every /mux connection that are waiting meet in
one pool.step per tick, on a stepping thread of their own (MuxStepper). A malformed message gets
"error: ..." after the replies to the requests before it, and the connection is closed with its
streams: 1003 for a text message that is no close command, 1008 for a malformed request or close
command (short, n = 0, a size that does not match n, a key twice, a close of a key that is not
open); 1013 (try again later) when the pool has no room for a new key. A message larger than
the largest request (capacity rows), and 1 MiB, is refused by websockets before it is read
(1009).

Both: a connection that sends no frame (no request on /mux) for --idle-timeout seconds (60 by
default; pings and close commands do not count) gets "error: idle for N s; ..." and is closed
(1001), its streams with it. GET /stats answers JSON (open streams, capacity, frames waiting,
/mux connections and their frames waiting) for health checks.

    python examples/stream_server.py model.safetensors --port 8765
    python examples/stream_server.py --seed 0          # a random LSTMCell(128, 128), Silero-size

In a program: ``server = await serve(model, port=0)``, then ``server.port``, ``server.pool``,
``server.batcher``, ``server.mux`` and ``await server.aclose()`` (or ``async with await
serve(...) as server``).
"""

import argparse
import asyncio
import json
import logging
import math
import numbers
import signal
import sys
import threading
from collections import deque
from queue import SimpleQueue

import numpy as np
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

import fastcell

log = logging.getLogger("stream_server")

IDLE_TIMEOUT = 60.0   # seconds without a frame before a connection is closed (slots are scarce)
MUX_PATH = "/mux"
# Requests of one /mux connection received and not yet answered, past which the server stops
# reading that connection (TCP then slows the client down): a client cannot queue without bound.
MUX_BACKLOG = 16
_U64_MAX = 2 ** 64 - 1
_LITTLE = sys.byteorder == "little"


def random_model(seed=0, input_size=128, hidden_size=128):
    """An LSTMCell with PyTorch's default initialisation U(-1/sqrt(H), 1/sqrt(H)), from a seed."""
    rng = np.random.default_rng(seed)
    k = 1 / np.sqrt(hidden_size)
    G = 4 * hidden_size

    def u(*shape):
        return rng.uniform(-k, k, shape).astype(np.float32)

    return fastcell.LSTMCell(u(G, input_size), u(G, hidden_size), u(G), u(G))


class _Refusal(Exception):
    """Ends a connection: an "error: ..." text message, then a close with this code."""

    def __init__(self, code, reason, message):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


class StreamServer:
    """The pool, the batcher, the /mux stepper and the WebSocket server around them; made by
    serve()."""

    def __init__(self, model, capacity, threads=1, max_batch=None, max_delay=0.002,
                 idle_timeout=IDLE_TIMEOUT, compression=None):
        if idle_timeout is not None and (isinstance(idle_timeout, bool)
                                         or not isinstance(idle_timeout, numbers.Real)
                                         or math.isnan(idle_timeout)):
            raise ValueError("idle_timeout: expected a number of seconds (0 or less, or None: no "
                             f"timeout), got {idle_timeout!r}")
        if compression not in (None, "deflate"):
            raise ValueError(f"compression: expected None or 'deflate', got {compression!r}")
        on = idle_timeout is not None and idle_timeout > 0
        self.idle_timeout = float(idle_timeout) if on else None
        self.compression = compression
        self.pool = fastcell.StreamPool(model, capacity, threads)
        self.batcher = fastcell.Batcher(self.pool, max_batch=max_batch, max_delay=max_delay)
        self.mux = MuxStepper(self.pool)
        self.input_size = self.pool.input_size
        self.frame_bytes = 4 * self.input_size
        self._ws = None
        self.host = self.port = None

    @property
    def max_message_bytes(self):
        """The largest message read: the largest /mux request (a row for every stream the pool
        can hold), or 1 MiB (websockets' default) if that is more. A larger one is refused by
        websockets before it is read (1009)."""
        return max(2 ** 20, 4 + self.pool.capacity * (8 + self.frame_bytes))

    async def start(self, host, port):
        self.mux.start()
        # No per-message deflate by default: float32 noise does not compress (README: "Why
        # permessage-deflate is off"). A deep backlog: many clients connect at once when a
        # service (re)starts.
        try:
            self._ws = await ws_serve(self._connection, host, port, compression=self.compression,
                                      process_request=self._http, backlog=1024,
                                      max_size=self.max_message_bytes)
        except BaseException:
            await asyncio.to_thread(self.mux.close)
            raise
        self.host, self.port = self._ws.sockets[0].getsockname()[:2]
        return self

    async def aclose(self):
        """Closes every connection (1001, going away), waits for their handlers (which close their
        streams), then stops the /mux stepper and the batcher."""
        if self._ws is not None:
            self._ws.close()
            await self._ws.wait_closed()
        await asyncio.to_thread(self.mux.close)       # join() off the event loop
        await asyncio.to_thread(self.batcher.close)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        await self.aclose()

    def stats(self):
        return {"streams": len(self.pool), "capacity": self.pool.capacity,
                "pending": self.batcher.pending, "mux_connections": self.mux.connections,
                "mux_pending": self.mux.pending}

    def _http(self, connection, request):
        if request.path == "/stats":
            return connection.respond(200, json.dumps(self.stats()) + "\n")
        return None   # anything else: the WebSocket handshake

    async def _connection(self, ws):
        if ws.request.path.partition("?")[0] == MUX_PATH:
            await self._mux_connection(ws)
            return
        try:
            sid = self.pool.open()
        except fastcell.PoolFullError:
            await _refuse(ws, CloseCode.TRY_AGAIN_LATER, "server full",
                          f"error: server full: all {self.pool.capacity} streams are in use; "
                          "try again later")
            return
        watch = (_IdleWatch(ws, self.idle_timeout, "the stream is closed") if self.idle_timeout
                 else None)
        try:
            await self._frames(ws, sid, watch)
        except ConnectionClosed:
            pass   # the client left, maybe with frames in flight: its stream is closed below
        except Exception:
            log.exception("stream %d failed", sid)
            await _refuse(ws, CloseCode.INTERNAL_ERROR, "internal error",
                          "error: internal error; the stream is closed")
        finally:
            if watch is not None:
                watch.stop()
            await self._close_stream(sid)
            if watch is not None and watch.closing is not None:
                await watch.closing   # the idle message and the close it started

    async def _frames(self, ws, sid, watch):
        nbytes, submit = self.frame_bytes, self.batcher.submit_async
        clock = asyncio.get_running_loop().time
        async for message in ws:      # one message at a time: the replies keep the frames' order
            if watch is not None:
                watch.last = clock()
            if type(message) is not bytes or len(message) != nbytes:
                bad = "a text message" if isinstance(message, str) else f"{len(message)} bytes"
                code, reason = ((CloseCode.UNSUPPORTED_DATA, "text message") if isinstance(message, str)
                                else (CloseCode.POLICY_VIOLATION, "wrong frame size"))
                await _refuse(ws, code, reason,
                              f"error: expected a binary frame of {self.input_size} little-endian "
                              f"float32 values ({nbytes} bytes), got {bad}")
                return
            try:
                reply = submit(sid, np.frombuffer(message, "<f4"))
            except fastcell.BatcherFullError as exc:   # the pool cannot keep up: shed this client
                await _refuse(ws, CloseCode.TRY_AGAIN_LATER, "server busy",
                              f"error: server busy: {exc.pending} frames are waiting to be stepped "
                              f"(at most {exc.max_pending}); try again later")
                return
            y = await reply
            await ws.send(y.astype("<f4", copy=False).tobytes())

    async def _close_stream(self, sid):
        # Through the batcher: after any frame of this stream still queued (a cancelled handler).
        try:
            closing = self.batcher.close_stream_async(sid)
        except RuntimeError:   # the batcher is closed: nothing steps any more
            self.pool.close(sid)
            return
        await closing

    # -- /mux: many streams per connection --

    async def _mux_connection(self, ws):
        conn = _MuxConnection(ws)
        watch = (_IdleWatch(ws, self.idle_timeout, "the connection's streams are closed")
                 if self.idle_timeout else None)
        self.mux.connections += 1
        refusal = None
        try:
            refusal = await self._mux_messages(ws, conn, watch)
        except ConnectionClosed:
            pass   # the client left, maybe with requests in flight: its streams are closed below
        except Exception:
            log.exception("a /mux connection failed")
            refusal = _Refusal(CloseCode.INTERNAL_ERROR, "internal error",
                               "error: internal error; the connection's streams are closed")
        finally:
            if watch is not None:
                watch.stop()
            try:
                if refusal is not None:
                    # The requests before the bad message are answered first (if the client
                    # still reads: at most the close timeout).
                    try:
                        await asyncio.wait_for(conn.answered(), ws.close_timeout or 10)
                    except (TimeoutError, ConnectionClosed):
                        pass
            finally:
                # Its streams are closed (after its requests in flight) before the client hears
                # why: a client told "server full" finds the room it held already free.
                await self.mux.drop(conn)
                conn.stop()
                self.mux.connections -= 1
            if refusal is not None and conn.failing is None:
                await _refuse(ws, refusal.code, refusal.reason, refusal.message)
            for telling in (conn.failing, watch and watch.closing):
                if telling is not None:
                    await telling   # the message and the close it started

    async def _mux_messages(self, ws, conn, watch):
        """Reads the connection's messages until it closes (None) or sends a bad one (the
        _Refusal). Each request is resolved to pool ids here, on the event loop, in the order
        the messages came; the stepper steps it and the connection's writer sends the reply."""
        I, row = self.input_size, 8 + self.frame_bytes
        clock = asyncio.get_running_loop().time
        mux, pool = self.mux, self.pool
        async for message in ws:
            if type(message) is str:
                try:
                    mux.close_keys(conn, _close_command(message))
                except _Refusal as r:
                    return r
                continue
            size = len(message)
            n = int.from_bytes(message[:4], "little") if size >= 4 else -1
            if size < 4 or n == 0 or size != 4 + n * row:
                return _Refusal(CloseCode.POLICY_VIOLATION, "malformed request",
                                _request_error(size, n, I, row))
            if watch is not None:
                watch.last = clock()
            head = message[:4 + 8 * n]                    # n and the keys: the reply's head
            try:
                sids = conn.keys.resolve(head, np.frombuffer(message, "<u8", n, 4), pool.open)
            except fastcell.PoolFullError:
                return _Refusal(CloseCode.TRY_AGAIN_LATER, "server full",
                                f"error: server full: all {pool.capacity} streams are in use; "
                                "the connection's streams are closed; try again later")
            except _Refusal as r:
                return r
            x = np.frombuffer(message, "<f4", n * I, 4 + 8 * n).reshape(n, I)
            mux.submit(conn, _Request(head, sids, x))
            if conn.backlog >= MUX_BACKLOG:
                await conn.room()      # the client sends faster than it reads its replies
        return None


def _request_error(size, n, I, row):
    form = (f"uint32 n, n uint64 keys, then n x {I} float32 frames: 4 + n x {row} bytes, "
            "little-endian")
    if size < 4:
        return f"error: a request is {form}; got {size} bytes"
    if n == 0:
        return "error: a request has at least one key; got n = 0"
    return f"error: a request of n = {n} keys is {4 + n * row} bytes ({form}); got {size} bytes"


def _close_command(text):
    """The keys of a "close <key> <key> ..." text message (a list of ints), or a _Refusal."""
    words = text.split()
    if not words or words[0] != "close":
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise _Refusal(CloseCode.UNSUPPORTED_DATA, "unknown command",
                       f"error: unknown command {shown!r}: a text message is \"close <key> "
                       "<key> ...\" (decimal keys); requests are binary")
    if len(words) == 1:
        raise _Refusal(CloseCode.POLICY_VIOLATION, "malformed close",
                       "error: close: expected at least one key, as \"close <key> <key> ...\"")
    keys = []
    for w in words[1:]:
        if not (w.isascii() and w.isdigit()) or int(w) > _U64_MAX:
            shown = w if len(w) <= 24 else w[:24] + "..."
            raise _Refusal(CloseCode.POLICY_VIOLATION, "malformed close",
                           f"error: close: expected decimal keys from 0 to {_U64_MAX}, got "
                           f"{shown!r}")
        keys.append(int(w))
    return keys


class _Request:
    """One /mux request: its head (n and the keys, the reply's head), its streams' pool ids and
    its frames (a view of the message)."""
    __slots__ = ("head", "sids", "x")

    def __init__(self, head, sids, x):
        self.head, self.sids, self.x = head, sids, x


class _Keys:
    """One /mux connection's streams: its keys (uint64) and their pool ids in arrays sorted by
    key, so a request's keys are found with one np.searchsorted, not a dict lookup per frame. A
    closed key is only marked dead (live[i] False: a close costs a search, not a copy of the
    arrays); the next request that opens a key rebuilds the arrays without the dead."""

    def __init__(self):
        self.keys = np.empty(0, np.uint64)
        self.sids = np.empty(0, np.int64)
        self.live = np.empty(0, bool)
        self._last = self._last_sids = None   # the last request's head and ids

    def find(self, keys):
        """(positions, found): where each key is in self.keys, and whether it is open there."""
        if not len(self.keys):
            return np.zeros(len(keys), np.intp), np.zeros(len(keys), bool)
        pos = np.searchsorted(self.keys, keys)
        np.minimum(pos, len(self.keys) - 1, out=pos)
        return pos, (self.keys[pos] == keys) & self.live[pos]

    def resolve(self, head, keys, open_stream):
        """The pool ids of a request's keys (int64, in their order), opening a stream for each new
        key. Raises _Refusal for a key named twice, and PoolFullError when the pool has no room
        (the streams opened so far stay recorded: a retry finds them, a close frees them)."""
        if head == self._last:      # a gateway's usual request: the same streams as the last one
            return self._last_sids
        twice = _twice(keys)
        if twice is not None:
            raise _Refusal(CloseCode.POLICY_VIOLATION, "duplicate key",
                           f"error: key {twice} appears twice in one request")
        pos, found = self.find(keys)
        sids = np.empty(len(keys), np.int64)
        sids[found] = self.sids[pos[found]]
        if not found.all():
            new = np.flatnonzero(~found)
            opened = []
            try:
                for _ in range(len(new)):        # one pool.open per new stream: unavoidable
                    opened.append(open_stream())
            finally:
                if opened:
                    self._add(keys[new[:len(opened)]], np.array(opened, np.int64))
            sids[new] = opened
        self._last, self._last_sids = head, sids
        return sids

    def _add(self, keys, sids):
        live = self.live
        k = np.concatenate([self.keys[live], keys])
        order = np.argsort(k, kind="stable")
        self.keys, self.sids = k[order], np.concatenate([self.sids[live], sids])[order]
        self.live = np.ones(len(k), bool)

    def remove(self, keys):
        """The pool ids of `keys` (a list of ints), no longer mapped; a _Refusal (and nothing
        removed) if a key is named twice or is not open."""
        k = np.array(keys, np.uint64)
        twice = _twice(k)
        if twice is not None:
            raise _Refusal(CloseCode.POLICY_VIOLATION, "malformed close",
                           f"error: close: key {twice} is named twice")
        pos, found = self.find(k)
        if not found.all():
            missing = np.flatnonzero(~found)
            more = f" ({len(missing)} keys in all)" if len(missing) > 1 else ""
            raise _Refusal(CloseCode.POLICY_VIOLATION, "unknown key",
                           f"error: close: key {int(k[missing[0]])} is not an open stream of "
                           f"this connection{more}")
        self.live[pos] = False
        self._last = self._last_sids = None
        return self.sids[pos]

    def remove_all(self):
        sids = self.sids[self.live]
        self.__init__()
        return sids


def _twice(keys):
    """A key that is in `keys` more than once (an int), or None."""
    if len(keys) < 2:
        return None
    s = np.sort(keys)
    twice = np.flatnonzero(s[1:] == s[:-1])
    return int(s[twice[0]]) if len(twice) else None


class _MuxConnection:
    """One /mux connection: its keys, its entries waiting for a tick (requests, and the ids of
    its close commands), and a writer task that sends its replies in order."""

    def __init__(self, ws):
        self.ws = ws
        self.keys = _Keys()
        self.waiting = deque()    # _Request, or an int64 array: streams to close after those before
        self.backlog = 0          # requests received and not yet answered
        self.alive = True
        self.failing = None       # the task telling the client of a failed step
        self._replies = deque()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._answered = asyncio.Event()
        self._answered.set()
        self._writer = asyncio.get_running_loop().create_task(self._write())

    def reply(self, message):
        self._replies.append(message)
        self._wake.set()

    async def _write(self):
        ws = self.ws
        try:
            while True:
                while self._replies:
                    await ws.send(self._replies.popleft())
                    self.backlog -= 1
                    if self.backlog < MUX_BACKLOG:
                        self._room.set()
                    if self.backlog == 0:
                        self._answered.set()
                self._wake.clear()
                await self._wake.wait()
        except ConnectionClosed:
            pass
        finally:    # nothing more will be sent: whoever waits for room or answers goes on
            self._room.set()
            self._answered.set()

    def count_request(self):
        self.backlog += 1
        self._answered.clear()
        if self.backlog >= MUX_BACKLOG:
            self._room.clear()

    async def room(self):
        await self._room.wait()

    async def answered(self):
        await self._answered.wait()

    def fail(self):
        """A step of its requests failed: "error: internal error" and a close (1011); the
        handler, reading on, sees the close and closes its streams."""
        if self.failing is None:
            self.failing = asyncio.get_running_loop().create_task(_refuse(
                self.ws, CloseCode.INTERNAL_ERROR, "internal error",
                "error: internal error; the connection's streams are closed"))
            self._room.set()          # no reply is coming for the requests of that tick
            self._answered.set()

    def stop(self):
        self._writer.cancel()


class _Tick:
    """The work of one pool.step: the requests taken (connection, request, first row, end row),
    the streams to close after the step, and the futures waiting for those closes."""
    __slots__ = ("parts", "n", "closes", "closed", "buf", "error")

    def __init__(self, buf):
        self.parts, self.n, self.closes, self.closed, self.buf, self.error = [], 0, [], [], buf, None


class _Buffers:
    """One tick's ids, x and out, grown (doubled) as needed and reused."""

    def __init__(self, pool, rows):
        self.ids = np.empty(rows, np.int64)
        self.x = np.empty((rows, pool.input_size), pool.dtype)
        self.out = np.empty((rows, pool.output_size), pool.dtype)


class MuxStepper:
    """The /mux tick loop. Every /mux request waiting, from every connection, meets in one
    pool.step per tick: the event loop takes them (at most one request per stream a tick, a
    connection's requests in order), and a stepping thread of its own copies their frames into
    one x, runs the one GIL-free pool.step, closes the streams whose close came due, and hands
    the tick back with one call_soon_threadsafe. The loop then takes the next tick at once (the
    requests that came meanwhile) and, while that one steps, slices the replies of the last.
    Policy: step whatever is waiting, at once; under load a tick gathers everything that came
    during the previous step. Two sets of buffers: one tick steps while the other's replies are
    made."""

    def __init__(self, pool, rows=256):
        self.pool = pool
        self.connections = 0        # /mux connections open
        self.pending = 0            # frames of /mux requests received and not yet stepped
        self.ticks = self.rows = 0  # pool steps made and rows stepped, for /stats and benchmarks
        self._step = pool.step
        self._bufs = [_Buffers(pool, rows), _Buffers(pool, rows)]
        self._flip = 0
        self._ready = {}            # connections with entries waiting, in the order they came
        self._drops = []            # (ids to close, future) of connections that left
        self._busy = False          # a tick is on the stepping thread
        self._kicked = False        # a _kick is scheduled
        self._inbox = SimpleQueue()
        self._thread = None
        self._loop = None

    def start(self):
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="mux-stepper", daemon=True)
            self._thread.start()

    def close(self):
        """Stops the stepping thread (after the tick it has); blocking: call it off the loop."""
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join()
            self._thread = None

    # -- on the event loop --

    def submit(self, conn, request):
        conn.count_request()
        self.pending += len(request.sids)
        self._queue(conn, request)

    def close_keys(self, conn, keys):
        """Closes the streams of `keys` after the requests sent before: the keys are forgotten
        now (a later request with one opens a new stream), the streams closed by the tick that
        takes this entry, after its step."""
        self._queue(conn, conn.keys.remove(keys))

    def drop(self, conn):
        """The connection left: its waiting requests are dropped and all its streams closed after
        the tick in flight. Returns a future, done when they are closed."""
        conn.alive = False
        ids = [conn.keys.remove_all()]
        for entry in conn.waiting:
            if type(entry) is _Request:
                self.pending -= len(entry.sids)
            else:
                ids.append(entry)
        conn.waiting.clear()
        self._ready.pop(conn, None)
        done = self._loop.create_future()
        self._drops.append((np.concatenate(ids), done))
        self._wake()
        return done

    def _queue(self, conn, entry):
        conn.waiting.append(entry)
        self._ready[conn] = None
        self._wake()

    def _wake(self):
        # call_soon: the other requests read in this turn of the loop join the tick.
        if not self._busy and not self._kicked:
            self._kicked = True
            self._loop.call_soon(self._kick)

    def _kick(self):
        self._kicked = False
        if not self._busy:
            self._next()

    def _next(self):
        """Takes the next tick (everything waiting that may go) and hands it to the stepper."""
        if not self._ready and not self._drops:
            return
        buf = self._bufs[self._flip]
        tick = _Tick(buf)
        n = 0
        for conn in list(self._ready):
            waiting, mine = conn.waiting, None
            while waiting:
                entry = waiting[0]
                if type(entry) is not _Request:       # a close: after this tick's step
                    tick.closes.append(waiting.popleft())
                    continue
                if mine is not None and np.isin(entry.sids, np.concatenate(mine)).any():
                    break      # a stream of this request is in the tick already: the next one
                waiting.popleft()
                tick.parts.append((conn, entry, n, n + len(entry.sids)))
                n += len(entry.sids)
                mine = [entry.sids] if mine is None else mine + [entry.sids]
            if not waiting:
                del self._ready[conn]
        for ids, done in self._drops:
            tick.closes.append(ids)
            tick.closed.append(done)
        self._drops = []
        if n > len(buf.ids):
            buf = self._bufs[self._flip] = tick.buf = _Buffers(self.pool, max(n, 2 * len(buf.ids)))
        tick.n = n
        self.pending -= n
        self._flip ^= 1
        self._busy = True
        self._inbox.put(tick)

    def _done(self, tick):
        """A tick is back from the stepper: the next one goes, then this one's replies."""
        self._busy = False
        self.ticks += tick.n > 0
        self.rows += tick.n
        self._next()
        for fut in tick.closed:
            if not fut.done():
                fut.set_result(None)
        if tick.error is not None:
            log.error("a /mux step failed", exc_info=tick.error)
        out = tick.buf.out
        for conn, req, a, b in tick.parts:
            if not conn.alive:
                continue                  # it left: its streams are closed by a later tick
            if tick.error is not None:
                conn.fail()               # nothing right to answer
                continue
            y = out[a:b]
            if not (_LITTLE and y.dtype == np.float32):
                y = y.astype("<f4")
            conn.reply(b"".join((req.head, y)))

    # -- on the stepping thread --

    def _run(self):
        close, loop = self.pool.close, self._loop
        while True:
            tick = self._inbox.get()
            if tick is None:
                return
            n, step = tick.n, self._step
            try:
                if len(tick.parts) == 1:       # one request: stepped in place, no copy
                    _, req, _, _ = tick.parts[0]
                    step(req.sids, req.x, tick.buf.out[:n])
                elif n:
                    buf = tick.buf
                    for _, req, a, b in tick.parts:
                        buf.ids[a:b] = req.sids
                        buf.x[a:b] = req.x
                    step(buf.ids[:n], buf.x[:n], buf.out[:n])
            except Exception as exc:      # a bug, or no memory: its requests fail, not the loop
                tick.error = exc
            for ids in tick.closes:
                for sid in ids.tolist():
                    try:
                        close(sid)
                    except Exception:
                        log.exception("closing /mux stream %d failed", sid)
            loop.call_soon_threadsafe(self._done, tick)


class _IdleWatch:
    """Closes the connection of a client that sent no frame for `timeout` seconds (1001, after an
    "error: idle ..." message); its handler then closes its streams. One timer per connection,
    re-armed when it fires rather than per frame: a frame costs one assignment (`last`)."""

    def __init__(self, ws, timeout, what):
        self._loop = asyncio.get_running_loop()
        self._ws, self._timeout, self._what = ws, timeout, what
        self.last = self._loop.time()    # the last frame's time; the connect time until the first
        self.closing = None              # the task that tells the client and closes
        self._timer = self._loop.call_at(self.last + timeout, self._check)

    def _check(self):
        due = self.last + self._timeout
        if self._loop.time() < due:      # a frame came since: wait from it
            self._timer = self._loop.call_at(due, self._check)
            return
        self.closing = self._loop.create_task(_refuse(
            self._ws, CloseCode.GOING_AWAY, "idle timeout",
            f"error: idle for {self._timeout:g} s; {self._what}"))

    def stop(self):
        self._timer.cancel()


async def _refuse(ws, code, reason, message):
    """An "error: ..." text message, then the close; the client may be gone already."""
    try:
        await ws.send(message)
        await ws.close(code, reason)
    except ConnectionClosed:
        pass


async def serve(model, host="127.0.0.1", port=0, capacity=1024, threads=1, max_delay=0.002,
                max_batch=None, idle_timeout=IDLE_TIMEOUT, compression=None):
    """A running StreamServer for `model` on host:port (0: any free port; see .port).
    idle_timeout: seconds without a frame before a connection is closed (0, less or None: never).
    compression: None (no permessage-deflate), or "deflate" to negotiate it with clients that
    offer it (to measure what it costs: float32 frames do not compress)."""
    return await StreamServer(model, capacity, threads, max_batch, max_delay,
                              idle_timeout, compression).start(host, port)


class ServerThread:
    """serve() on an event loop of a thread of its own, for a program that is not asyncio:
    ``srv = ServerThread(model, port=0, ...)`` (serve()'s arguments), then ``srv.server`` (the
    StreamServer), ``srv.url`` and ``srv.stop()``; ``srv.call(coro)`` runs a coroutine there."""

    def __init__(self, model, host="127.0.0.1", port=0, timeout=30.0, **kwargs):
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="stream-server",
                                       daemon=True)
        self.thread.start()
        try:
            self.server = self.call(serve(model, host, port, **kwargs))
        except BaseException:
            self._end()
            raise
        self.url = f"ws://{self.server.host}:{self.server.port}"

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(self.timeout)

    def stop(self):
        """Closes the server (its connections, the /mux stepper, the batcher), then the loop."""
        try:
            self.call(self.server.aclose())
        finally:
            self._end()

    def _end(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(self.timeout)
        self.loop.close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="a fastcell weight file (default: a random LSTMCell)")
    p.add_argument("--seed", type=int, default=0, help="the random model's seed")
    p.add_argument("--input-size", type=int, default=128, help="the random model's input size")
    p.add_argument("--hidden-size", type=int, default=128, help="the random model's hidden size")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="0: any free port (printed)")
    p.add_argument("--capacity", type=int, default=1024, help="most streams (connections) at once")
    p.add_argument("--threads", type=int, default=1, help="threads of each pool step")
    p.add_argument("--max-delay", type=float, default=0.002,
                   help="seconds a frame may wait for others to join its step")
    p.add_argument("--max-batch", type=int, default=None, help="most streams per step")
    p.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT, metavar="SECONDS",
                   help="close a connection (and its stream) that sends no frame for this long; "
                        "pings do not count; 0 or less: never (default: %(default)g)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    try:
        model = (fastcell.load(args.model) if args.model
                 else random_model(args.seed, args.input_size, args.hidden_size))
        server = StreamServer(model, args.capacity, args.threads, args.max_batch, args.max_delay,
                              args.idle_timeout)
    except (OSError, ValueError, TypeError) as exc:   # a bad file, size or option: one line
        print(f"stream_server: error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_run(server, args.host, args.port))
    except OSError as exc:   # the address is taken, or not this host's
        print(f"stream_server: error: {exc}", file=sys.stderr)
        return 2
    return 0


async def _run(server, host, port):
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await server.start(host, port)
    except OSError:
        await asyncio.to_thread(server.batcher.close)
        raise
    print(f"listening on ws://{server.host}:{server.port}", flush=True)
    await stop.wait()
    await server.aclose()


if __name__ == "__main__":
    sys.exit(main())
