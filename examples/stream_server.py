"""A WebSocket service that runs one recurrent stream per connection (pip install websockets).

Each connection gets a stream of a fastcell.StreamPool, opened when it connects and closed when it
leaves. A frame is one binary message of input_size little-endian float32 values; the reply to
each frame, in order, is one binary message of output_size float32 values. The frames of all
connections go through one fastcell.Batcher, so the streams that have a frame waiting are stepped
together in one GIL-free pool.step. Anything but a frame of the right size gets a text message
"error: ..." and the connection is closed (1003 for a text message, 1008 for a wrong size); a
full pool refuses a new connection the same way (1013, try again later). A connection that sends
no frame for --idle-timeout seconds (60 by default; pings do not count) gets "error: idle for N s;
the stream is closed" and is closed (1001), its stream with it. When the Batcher already holds
its max_pending frames (4 x capacity) the frame that finds it full gets "error: server busy: ..."
and its connection is closed (1013); the other connections go on. GET /stats answers JSON (open
streams, capacity, frames waiting) for health checks.

    python examples/stream_server.py model.safetensors --port 8765
    python examples/stream_server.py --seed 0          # a random LSTMCell(128, 128), Silero-size

In a program: ``server = await serve(model, port=0)``, then ``server.port``, ``server.pool``,
``server.batcher`` and ``await server.aclose()`` (or ``async with await serve(...) as server``).
"""

import argparse
import asyncio
import json
import logging
import math
import numbers
import signal
import sys

import numpy as np
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

import fastcell

log = logging.getLogger("stream_server")

IDLE_TIMEOUT = 60.0   # seconds without a frame before a connection is closed (slots are scarce)


def random_model(seed=0, input_size=128, hidden_size=128):
    """An LSTMCell with PyTorch's default initialisation U(-1/sqrt(H), 1/sqrt(H)), from a seed."""
    rng = np.random.default_rng(seed)
    k = 1 / np.sqrt(hidden_size)
    G = 4 * hidden_size

    def u(*shape):
        return rng.uniform(-k, k, shape).astype(np.float32)

    return fastcell.LSTMCell(u(G, input_size), u(G, hidden_size), u(G), u(G))


class StreamServer:
    """The pool, the batcher and the WebSocket server around them; made by serve()."""

    def __init__(self, model, capacity, threads=1, max_batch=None, max_delay=0.002,
                 idle_timeout=IDLE_TIMEOUT):
        if idle_timeout is not None and (isinstance(idle_timeout, bool)
                                         or not isinstance(idle_timeout, numbers.Real)
                                         or math.isnan(idle_timeout)):
            raise ValueError("idle_timeout: expected a number of seconds (0 or less, or None: no "
                             f"timeout), got {idle_timeout!r}")
        on = idle_timeout is not None and idle_timeout > 0
        self.idle_timeout = float(idle_timeout) if on else None
        self.pool = fastcell.StreamPool(model, capacity, threads)
        self.batcher = fastcell.Batcher(self.pool, max_batch=max_batch, max_delay=max_delay)
        self.input_size = self.pool.input_size
        self.frame_bytes = 4 * self.input_size
        self._ws = None
        self.host = self.port = None

    async def start(self, host, port):
        # No per-message deflate: float32 noise does not compress, and it costs per frame.
        # A deep backlog: many clients connect at once when a service (re)starts.
        self._ws = await ws_serve(self._connection, host, port, compression=None,
                                  process_request=self._http, backlog=1024)
        self.host, self.port = self._ws.sockets[0].getsockname()[:2]
        return self

    async def aclose(self):
        """Closes every connection (1001, going away), waits for their handlers (which close their
        streams), then stops the batcher."""
        if self._ws is not None:
            self._ws.close()
            await self._ws.wait_closed()
        await asyncio.to_thread(self.batcher.close)   # join() off the event loop

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        await self.aclose()

    def stats(self):
        return {"streams": len(self.pool), "capacity": self.pool.capacity,
                "pending": self.batcher.pending}

    def _http(self, connection, request):
        if request.path == "/stats":
            return connection.respond(200, json.dumps(self.stats()) + "\n")
        return None   # anything else: the WebSocket handshake

    async def _connection(self, ws):
        try:
            sid = self.pool.open()
        except fastcell.PoolFullError:
            await _refuse(ws, CloseCode.TRY_AGAIN_LATER, "server full",
                          f"error: server full: all {self.pool.capacity} streams are in use; "
                          "try again later")
            return
        watch = _IdleWatch(ws, self.idle_timeout) if self.idle_timeout else None
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


class _IdleWatch:
    """Closes the connection of a client that sent no frame for `timeout` seconds (1001, after an
    "error: idle ..." message); its handler then closes its stream. One timer per connection,
    re-armed when it fires rather than per frame: a frame costs one assignment (`last`)."""

    def __init__(self, ws, timeout):
        self._loop = asyncio.get_running_loop()
        self._ws, self._timeout = ws, timeout
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
            f"error: idle for {self._timeout:g} s; the stream is closed"))

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
                max_batch=None, idle_timeout=IDLE_TIMEOUT):
    """A running StreamServer for `model` on host:port (0: any free port; see .port).
    idle_timeout: seconds without a frame before a connection is closed (0, less or None: never)."""
    return await StreamServer(model, capacity, threads, max_batch, max_delay,
                              idle_timeout).start(host, port)


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
