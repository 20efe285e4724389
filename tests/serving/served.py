"""What the tests of examples/stream_server.py share (test_stream_server.py, test_mux_endpoint.py;
tests/serving/ is on sys.path for them): the example loaded as a module, the server on an event
loop of its own thread (so a test sees its pool), and each stream's reference outputs.
"""

import asyncio
import importlib.util
import threading

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed

from conftest import ROOT

SCRIPT = ROOT / "examples" / "stream_server.py"
_spec = importlib.util.spec_from_file_location("stream_server", SCRIPT)
stream_server = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stream_server)

I, H = 128, 128   # Silero-size: the real frame of the service
TIMEOUT = 20   # seconds for any one client or server operation (never reached when all is well)


def reference(model, frames):
    state = model.new_state(1)
    return np.array([model.step(x, state) for x in frames])


class InThread(stream_server.ServerThread):
    """The server on an event loop of its own thread; stop() closes it and checks that its
    /mux stepper and batcher stopped and its pool is empty."""

    def __init__(self, model, **kwargs):
        super().__init__(model, "127.0.0.1", 0, timeout=TIMEOUT, **kwargs)

    def stop(self):
        super().stop()
        assert not self.server.batcher._thread.is_alive()
        assert self.server.mux._thread is None
        assert len(self.server.pool) == 0


def servers():
    """The body of a `served` fixture: yields start(model, **serve_kwargs) -> InThread, and stops
    every server started."""
    started = []

    def start(model, **kwargs):
        started.append(InThread(model, **kwargs))
        return started[-1]

    yield start
    for s in started:
        s.stop()


def streams_left(server):
    """len(server.pool) once the handlers of the clients that left have closed their streams
    (they do so just after the client sees its connection closed)."""
    for _ in range(int(TIMEOUT / 0.01)):
        if len(server.pool) == 0:
            break
        threading.Event().wait(0.01)
    return len(server.pool)


async def eventually(holds):
    """Whether holds() comes true within TIMEOUT, polled every 10 ms on the event loop."""
    for _ in range(int(TIMEOUT / 0.01)):
        if holds():
            return True
        await asyncio.sleep(0.01)
    return False


async def pool_len_is(server, n):
    """len(server.pool), once it is n (closes land just after the replies that follow them)."""
    await eventually(lambda: len(server.pool) == n)
    return len(server.pool)


async def told_and_closed(ws):
    """The error message the server sends, and the code of the close after it."""
    message = await asyncio.wait_for(ws.recv(), TIMEOUT)
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), TIMEOUT)
    return message, closed.value.rcvd.code


async def keep_pinging(ws):
    """Pings every 50 ms, each answered, until the connection is closed: a live link that sends
    no frames."""
    try:
        while True:
            await asyncio.wait_for(await ws.ping(), TIMEOUT)
            await asyncio.sleep(0.05)
    except ConnectionClosed:
        pass
