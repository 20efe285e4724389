"""examples/stream_server.py, /mux: many streams per connection, named by keys of the connection.

Real clients over TCP (websockets) on 127.0.0.1. Every reply must carry the request's keys in
order and, row by row, the bits of that stream's own StreamState stepped with the same frames
(tracked by the client as it sends: a key's state starts at zero when the key is first used, and
again after a close). The server runs in this process, on an event loop of its own thread, so a
test sees its pool and its MuxStepper.
"""

import asyncio
import json
import signal
import subprocess
import sys
import threading
import urllib.request
from collections import deque

import numpy as np
import pytest

from conftest import ENV, hang_guard

websockets = pytest.importorskip("websockets", minversion="12")
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402
from served import (H, I, SCRIPT, TIMEOUT, eventually, keep_pinging, pool_len_is,  # noqa: E402
                    servers, stream_server, streams_left, told_and_closed)

U64 = 2 ** 64 - 1
ROW = 8 + 4 * I          # a request's bytes per stream: its key and its frame


@pytest.fixture
def served():
    yield from servers()


def request(keys, x):
    keys = np.asarray(keys, np.uint64)
    return (len(keys).to_bytes(4, "little") + keys.astype("<u8").tobytes()
            + np.ascontiguousarray(x, "<f4").tobytes())


def parse(reply):
    """(keys, outputs) of a reply, checking its layout."""
    assert type(reply) is bytes, reply
    n = int.from_bytes(reply[:4], "little")
    assert len(reply) == 4 + n * (8 + 4 * H)
    return np.frombuffer(reply, "<u8", n, 4), np.frombuffer(reply, "<f4", offset=4 + 8 * n).reshape(n, H)


class Client:
    """A /mux connection that knows every reply it must get: one StreamState per open key, stepped
    with each request's frames as it is sent; replies are checked in order."""

    def __init__(self, ws, model, rng):
        self.ws, self.model, self.rng = ws, model, rng
        self.states = {}
        self.expected = deque()     # (keys, outputs) of each request sent and not yet answered
        self.answered = self.opened = self.rows = 0

    async def send(self, keys):
        x = self.rng.standard_normal((len(keys), I)).astype(np.float32)
        want = np.empty((len(keys), H), np.float32)
        for i, k in enumerate(keys):
            if k not in self.states:
                self.states[k] = self.model.new_state(1)
                self.opened += 1
            want[i] = self.model.step(x[i], self.states[k])
        self.expected.append((np.array(keys, np.uint64), want))
        self.rows += len(keys)
        await self.ws.send(request(keys, x))

    async def close(self, keys):
        await self.ws.send("close " + " ".join(map(str, keys)))
        for k in keys:
            del self.states[k]

    async def check(self, replies=1):
        for _ in range(replies):
            keys, y = parse(await asyncio.wait_for(self.ws.recv(), TIMEOUT))
            want_keys, want = self.expected.popleft()
            assert np.array_equal(keys, want_keys)
            assert np.array_equal(y, want), "not the bits of the stream's own StreamState"
            self.answered += 1

    async def check_all(self):
        await self.check(len(self.expected))


def connect_mux(url):
    return connect(url + "/mux", compression=None, open_timeout=TIMEOUT)


KEYS = [0, 1, 3, 7, 99, 12345, 2 ** 63, U64]   # every connection uses these: streams of its own


async def script(client, rounds):
    """Requests of random subsets of KEYS in random order, up to 4 sent before their replies are
    read, and now and then a close of some open keys (maybe still in flight), reused later."""
    rng = client.rng
    reopened = 0
    closed = set()
    for _ in range(rounds):
        if client.states and rng.random() < 0.2:
            open_keys = list(client.states)
            shut = [open_keys[i] for i in rng.choice(len(open_keys), int(rng.integers(1, 3)),
                                                     replace=False)] if len(open_keys) > 1 else open_keys
            await client.close(shut)
            closed.update(shut)
        keys = [KEYS[i] for i in rng.permutation(len(KEYS))[:int(rng.integers(1, len(KEYS) + 1))]]
        reopened += len(closed.intersection(k for k in keys if k not in client.states))
        await client.send(keys)
        if len(client.expected) >= int(rng.integers(1, 5)):
            await client.check(int(rng.integers(1, len(client.expected) + 1)))
    if client.states:       # a last request: every close before it has landed when it is answered
        await client.send(list(client.states))
    await client.check_all()
    return reopened


async def one_stream_client(url, model, frames):
    """The one-stream-per-connection path, at the same time, on the same pool."""
    state, replies = model.new_state(1), []
    async with connect(url, compression=None, open_timeout=TIMEOUT) as ws:
        for x in frames:
            await ws.send(x.tobytes())
            replies.append(np.array_equal(np.frombuffer(await ws.recv(), "<f4"),
                                          model.step(x, state)))
    return all(replies)


def test_many_connections_with_shared_keys_are_exact(served, rng):
    """5 connections, all on the same keys (each its own streams), interleaved and pipelined, with
    new keys along the way, closes (some behind requests in flight) and closed keys reused
    (new streams at zero), beside a one-stream connection: every reply exact; the pool holds
    exactly the keys still open; leaving frees them all."""
    model = stream_server.random_model(11, I, H)
    srv = served(model, capacity=64)
    frames = rng.standard_normal((40, I)).astype(np.float32)

    async def main():
        async with connect_mux(srv.url) as a, connect_mux(srv.url) as b, \
                connect_mux(srv.url) as c, connect_mux(srv.url) as d, connect_mux(srv.url) as e:
            clients = [Client(ws, model, np.random.default_rng(k))
                       for k, ws in enumerate([a, b, c, d, e])]
            reopened, single = await asyncio.gather(
                asyncio.gather(*(script(cl, 60) for cl in clients)),
                one_stream_client(srv.url, model, frames))
            held = await pool_len_is(srv.server, sum(len(cl.states) for cl in clients))
            stats = srv.server.stats()
        return clients, reopened, single, held, stats

    with hang_guard(60):
        clients, reopened, single, held, stats = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert single
    assert all(cl.answered >= 60 for cl in clients)
    assert sum(reopened) > 0            # closed keys were used again: new streams at zero
    assert held == sum(len(cl.states) for cl in clients) > len(KEYS)
    assert stats["mux_connections"] == 5 and stats["mux_pending"] == 0
    mux = srv.server.mux
    assert mux.rows == sum(cl.rows for cl in clients)   # every frame stepped once
    assert mux.ticks <= sum(cl.answered for cl in clients)
    assert streams_left(srv.server) == 0


def test_a_closed_key_starts_over_even_in_the_same_request(served, rng):
    """The same request again and again (a gateway's usual message), with closes between, some
    sent before the replies to the requests ahead of them: a closed key is a new stream at zero
    the next time, and the closed stream is gone from the pool."""
    model = stream_server.random_model(19, I, H)
    srv = served(model, capacity=16)

    async def main():
        async with connect_mux(srv.url) as ws:
            client = Client(ws, model, np.random.default_rng(3))
            await client.send([1, 2, U64])
            await client.send([1, 2, U64])
            await client.check(2)
            await client.close([1])
            await client.send([1, 2, U64])          # key 1: a new stream
            await client.check()
            await client.send([1, 2, U64])
            await client.close([2, U64])            # behind a request in flight
            await client.send([1, 2, U64])
            await client.close([1])
            await client.send([1, 2, U64])
            await client.check_all()
            open_now = await pool_len_is(srv.server, 3)
            await client.close([1, 2, U64])
            await client.send([7])
            await client.check()
            return client.opened, open_now, await pool_len_is(srv.server, 1)

    with hang_guard(30):
        opened, open_now, last = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert (opened, open_now, last) == (3 + 1 + 2 + 1 + 1, 3, 1)
    assert streams_left(srv.server) == 0


def test_waiting_requests_of_every_connection_meet_in_one_step(served, rng):
    """The stepper held in a step: the requests that come meanwhile from four connections go in
    ONE pool.step, except one that names a stream already in that tick (same connection, same
    key): it waits for the next, and the replies keep each connection's order."""
    model = stream_server.random_model(12, I, H)
    srv = served(model, capacity=64)
    mux = srv.server.mux
    held, release = threading.Event(), threading.Event()
    steps = []
    real_step = mux._step

    def step(ids, x, out):
        steps.append(len(ids))
        if len(steps) == 1:
            held.set()
            release.wait(TIMEOUT)
        return real_step(ids, x, out)

    mux._step = step

    async def main():
        async with connect_mux(srv.url) as a, connect_mux(srv.url) as b, \
                connect_mux(srv.url) as c, connect_mux(srv.url) as d:
            ca, cb, cc, cd = (Client(ws, model, np.random.default_rng(k))
                              for k, ws in enumerate([a, b, c, d]))
            await ca.send([1, 2])                    # tick 1, held
            assert await asyncio.to_thread(held.wait, TIMEOUT)
            await cb.send([1, 2, 3])                 # the same keys: other streams
            await cc.send([5])
            await cd.send([1, 9, 8, 7])
            await ca.send([3, 4])                    # a's, no stream in common with [1, 2]
            await ca.send([4, 1])                    # key 4 again: the tick after
            await cb.send([6])
            assert await eventually(lambda: mux.pending == 3 + 1 + 4 + 2 + 2 + 1)
            release.set()
            for cl in (ca, cb, cc, cd):
                await cl.check_all()

    with hang_guard(30):
        try:
            asyncio.run(asyncio.wait_for(main(), TIMEOUT))
        finally:
            release.set()
    # b's second request ([6]) goes with its first: no stream in common.
    assert steps == [2, 3 + 1 + 4 + 2 + 1, 2]
    assert mux.ticks == 3 and mux.rows == 2 + 11 + 2
    assert streams_left(srv.server) == 0


TEXT_CASES = {
    "hello": (1003, "error: unknown command 'hello': a text message is \"close <key> <key> ...\" "
                    "(decimal keys); requests are binary"),
    "CLOSE 1": (1003, "error: unknown command 'CLOSE 1': a text message is \"close <key> <key> "
                      "...\" (decimal keys); requests are binary"),
    "close": (1008, "error: close: expected at least one key, as \"close <key> <key> ...\""),
    "close 1 x2": (1008, f"error: close: expected decimal keys from 0 to {U64}, got 'x2'"),
    "close -1": (1008, f"error: close: expected decimal keys from 0 to {U64}, got '-1'"),
    "close 1.0": (1008, f"error: close: expected decimal keys from 0 to {U64}, got '1.0'"),
    f"close {U64 + 1}": (1008, f"error: close: expected decimal keys from 0 to {U64}, got "
                               f"'{U64 + 1}'"),
    "close 2 1 2": (1008, "error: close: key 2 is named twice"),
    "close 1 5 6": (1008, "error: close: key 5 is not an open stream of this connection "
                          "(2 keys in all)"),
}
FORM = (f"uint32 n, n uint64 keys, then n x {I} float32 frames: 4 + n x {ROW} bytes, "
        "little-endian")
x1 = np.zeros((1, I), np.float32)
BINARY_CASES = {
    "3 bytes": (b"\1\0\0", f"error: a request is {FORM}; got 3 bytes"),
    "empty": (b"", f"error: a request is {FORM}; got 0 bytes"),
    "n = 0": (b"\0\0\0\0", "error: a request has at least one key; got n = 0"),
    "n = 0 and more": (b"\0\0\0\0" + bytes(ROW), "error: a request has at least one key; got n = 0"),
    "a byte short": (request([4, 5], np.zeros((2, I)))[:-1],
                     f"error: a request of n = 2 keys is {4 + 2 * ROW} bytes ({FORM}); got "
                     f"{3 + 2 * ROW} bytes"),
    "a row too many": (b"\2\0\0\0" + request([4, 5, 6], np.zeros((3, I)))[4:],
                       f"error: a request of n = 2 keys is {4 + 2 * ROW} bytes ({FORM}); got "
                       f"{4 + 3 * ROW} bytes"),
    "n = 2**32 - 1": (b"\xff\xff\xff\xff" + request([4], x1)[4:],
                      f"error: a request of n = {2 ** 32 - 1} keys is {4 + (2 ** 32 - 1) * ROW} "
                      f"bytes ({FORM}); got {4 + ROW} bytes"),
    "a key twice": (request([4, 7, 5, 7], np.zeros((4, I))),
                    "error: key 7 appears twice in one request"),
}


@pytest.mark.parametrize("case", list(TEXT_CASES) + list(BINARY_CASES))
def test_a_bad_message_is_refused_after_the_replies_before_it(served, rng, case):
    """Two good requests (streams 1 and 2 open), then the bad message: both replies, exact, then
    "error: ..." naming what is wrong, the close (1003: not a close command; 1008: a malformed
    request or close command), and the connection's streams closed. Another connection, on the
    same keys, goes on exactly."""
    model = stream_server.random_model(13, I, H)
    srv = served(model, capacity=16)
    if case in TEXT_CASES:
        (code, error), message = TEXT_CASES[case], case
    else:
        (message, error), code = BINARY_CASES[case], 1008

    async def main():
        async with connect_mux(srv.url) as good, connect_mux(srv.url) as bad:
            other = Client(good, model, np.random.default_rng(1))
            await other.send([1, 2])
            await other.check()
            client = Client(bad, model, np.random.default_rng(2))
            await client.send([1, 2])
            await client.send([2])
            await bad.send(message)
            await client.check(2)
            got = await told_and_closed(bad)
            left = len(srv.server.pool)        # its streams are closed before it is told
            await other.send([2, 1, 3])
            await other.check()
            return got, left

    with hang_guard(30):
        got, left = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert got == (error, code)
    assert left == 2
    assert streams_left(srv.server) == 0


@pytest.mark.parametrize("capacity", [4, 2100])
def test_a_message_larger_than_any_request_is_not_read(served, capacity):
    """Messages are read up to the largest request (`capacity` rows), or 1 MiB if that is more:
    a message of that size is the server's to refuse (here: its n does not match, 1008), one
    byte more is refused by websockets before it is read (1009); the streams are freed."""
    model = stream_server.random_model(14, I, H)
    srv = served(model, capacity=capacity)
    limit = srv.server.max_message_bytes
    assert limit == max(2 ** 20, 4 + capacity * ROW)

    async def send(size):
        async with connect_mux(srv.url) as ws:
            client = Client(ws, model, np.random.default_rng(0))
            await client.send([1])
            await client.check()
            await ws.send(b"\1\0\0\0" + bytes(size - 4))
            return await told_and_closed(ws) if size == limit else (None, await closed_code(ws))

    async def closed_code(ws):
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
        return closed.value.rcvd.code

    with hang_guard(30):
        at = asyncio.run(asyncio.wait_for(send(limit), TIMEOUT))
        over = asyncio.run(asyncio.wait_for(send(limit + 1), TIMEOUT))
    assert at == (f"error: a request of n = 1 keys is {4 + ROW} bytes ({FORM}); got {limit} "
                  "bytes", 1008)
    assert over == (None, 1009)
    assert streams_left(srv.server) == 0


def test_clients_that_leave_mid_stream_free_their_streams(served, rng):
    """Clients that leave with requests (and a close) in flight, by a close handshake or a dropped
    TCP link, or after reading nothing at all: all their streams are freed, and a client staying
    throughout gets exact replies."""
    model = stream_server.random_model(15, I, H)
    srv = served(model, capacity=256)

    async def leaving(k):
        async with connect_mux(srv.url) as ws:
            client = Client(ws, model, np.random.default_rng(100 + k))
            keys = list(range(k * 3, k * 3 + 20))
            await client.send(keys)
            await client.check()
            for _ in range(3):
                await client.send(keys[:10])
            await client.close(keys[:2])
            await client.send(keys[5:])
            if k % 2:
                ws.transport.abort()
                return
        # the context manager closed it (1000) without reading the replies on their way

    async def silent_reader():
        async with connect_mux(srv.url) as ws:       # sends, never reads
            client = Client(ws, model, np.random.default_rng(7))
            for _ in range(5):
                await client.send(list(range(30)))

    async def staying():
        async with connect_mux(srv.url) as ws:
            client = Client(ws, model, np.random.default_rng(8))
            for t in range(40):
                await client.send([t % 3, 10 + t % 5, 99])
                await client.check()
            return client.answered

    async def main():
        answered, *_ = await asyncio.gather(staying(), silent_reader(),
                                            *(leaving(k) for k in range(6)))
        return answered

    with hang_guard(30):
        assert asyncio.run(asyncio.wait_for(main(), TIMEOUT)) == 40
    assert streams_left(srv.server) == 0


def test_leaving_while_its_requests_and_closes_wait_frees_every_stream(served):
    """The stepper held in a step: a client sends requests and a close, then drops its TCP link
    before any of them is stepped; its waiting requests are dropped, and every stream it opened,
    the closed one too, is freed once the stepper goes on."""
    model = stream_server.random_model(20, I, H)
    srv = served(model, capacity=16)
    mux = srv.server.mux
    held, release = threading.Event(), threading.Event()
    real_step = mux._step

    def step(ids, x, out):
        if not held.is_set():
            held.set()
            release.wait(TIMEOUT)
        return real_step(ids, x, out)

    mux._step = step

    async def main():
        async with connect_mux(srv.url) as a, connect_mux(srv.url) as b:
            ca, cb = Client(a, model, np.random.default_rng(1)), Client(b, model, np.random.default_rng(2))
            await ca.send([1])
            assert await asyncio.to_thread(held.wait, TIMEOUT)
            await cb.send([1, 2, 3])
            await cb.close([1])
            await cb.send([2, 4])
            assert await eventually(lambda: mux.pending == 5) and len(srv.server.pool) == 5
            b.transport.abort()
            assert await eventually(lambda: mux.pending == 0)    # its requests dropped, not stepped
            release.set()
            await ca.check()
            return await pool_len_is(srv.server, 1)

    with hang_guard(30):
        try:
            assert asyncio.run(asyncio.wait_for(main(), TIMEOUT)) == 1
        finally:
            release.set()
    assert mux.rows == 1
    assert streams_left(srv.server) == 0


def test_idle_mux_connections_are_closed_with_their_streams(served, rng):
    """idle_timeout 0.5 s: /mux connections with open streams that send no request (one pings all
    along: pings are no requests; one closes some of its streams first) get the message and a
    1001 close, their streams closed; one sending requests meanwhile goes on, exactly."""
    model = stream_server.random_model(16, I, H)
    srv = served(model, capacity=16, idle_timeout=0.5)

    async def idle(close_some):
        async with connect_mux(srv.url) as ws:
            client = Client(ws, model, np.random.default_rng(1))
            await client.send([1, 2, 3])
            await client.check()

            async def busy_otherwise():
                if close_some:
                    try:
                        await client.close([1])
                        await client.close([2])
                    except ConnectionClosed:
                        return
                await keep_pinging(ws)

            other = asyncio.create_task(busy_otherwise())
            try:
                return await told_and_closed(ws)
            finally:
                other.cancel()

    async def active(idle_ones):
        async with connect_mux(srv.url) as ws:
            client = Client(ws, model, np.random.default_rng(2))
            t = 0
            while not idle_ones.done() or t < 3:
                await client.send([5, 6] if t % 2 else [6])
                await client.check()
                t += 1
                await asyncio.sleep(0.01)
            open_now = await pool_len_is(srv.server, 2)
            await client.send([5, 6])
            await client.check()
            return open_now

    async def main():
        idle_ones = asyncio.gather(idle(False), idle(True))
        open_now = await active(idle_ones)
        return await idle_ones, open_now

    with hang_guard(60):
        told, open_now = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert told == [("error: idle for 0.5 s; the connection's streams are closed", 1001)] * 2
    assert open_now == 2
    assert streams_left(srv.server) == 0


def test_a_full_pool_refuses_the_new_key_with_1013(served, rng):
    """capacity 6, shared by a one-stream connection and /mux: a request whose new keys find no
    room gets "error: server full" and a 1013 close, and its connection's streams (those opened by
    that very request too) are freed; the others go on, and a new client then finds room."""
    model = stream_server.random_model(17, I, H)
    srv = served(model, capacity=6)
    x = rng.standard_normal((2, I)).astype(np.float32)

    async def main():
        async with connect(srv.url, compression=None, open_timeout=TIMEOUT) as single, \
                connect_mux(srv.url) as a, connect_mux(srv.url) as b:
            state = model.new_state(1)
            await single.send(x[0].tobytes())        # its stream is open once it has a reply
            assert np.array_equal(np.frombuffer(await single.recv(), "<f4"), model.step(x[0], state))
            ca, cb = Client(a, model, np.random.default_rng(1)), Client(b, model, np.random.default_rng(2))
            await ca.send([1, 2, 3])
            await ca.check()
            await cb.send([1])
            await cb.check()                            # 5 streams open, room for 1
            cb.expected.clear()
            await b.send(request([1, 2, 3], np.zeros((3, I))))    # 2 opens, 3 finds no room
            told = await told_and_closed(b)
            left = len(srv.server.pool)
            await ca.send([3, 2, 1])
            await ca.check()
            async with connect_mux(srv.url) as c:
                cc = Client(c, model, np.random.default_rng(3))
                await cc.send([7, 8])
                await cc.check()
            await single.send(x[1].tobytes())
            assert np.array_equal(np.frombuffer(await single.recv(), "<f4"), model.step(x[1], state))
            return told, left

    with hang_guard(30):
        told, left = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert told == ("error: server full: all 6 streams are in use; the connection's streams are "
                    "closed; try again later", 1013)
    assert left == 4
    assert streams_left(srv.server) == 0


def test_a_failed_step_fails_its_connections_only(served, rng, caplog):
    """A pool.step that raises (a bug, or no memory): the connections of that tick get "error:
    internal error" and a 1011 close, their streams freed; the error is logged; the next ticks
    serve the others."""
    model = stream_server.random_model(18, I, H)
    srv = served(model, capacity=16)
    mux = srv.server.mux
    real_step = mux._step
    fail = threading.Event()

    def step(ids, x, out):
        if fail.is_set():
            fail.clear()
            raise MemoryError("no memory for this step")
        return real_step(ids, x, out)

    mux._step = step

    async def main():
        async with connect_mux(srv.url) as a, connect_mux(srv.url) as b:
            ca, cb = Client(a, model, np.random.default_rng(1)), Client(b, model, np.random.default_rng(2))
            await cb.send([1, 2])
            await cb.check()
            fail.set()
            await ca.send([1])
            told = await told_and_closed(a)
            await cb.send([2, 1])
            await cb.check()
            return told

    with hang_guard(30):
        told = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert told == ("error: internal error; the connection's streams are closed", 1011)
    assert "a /mux step failed" in caplog.text and "no memory for this step" in caplog.text
    assert streams_left(srv.server) == 0


def test_mux_from_the_command_line(rng):
    """The program serves /mux and /stats; SIGTERM closes a /mux connection (1001) and exits 0."""
    model = stream_server.random_model(7, 4, 6)
    proc = subprocess.Popen([sys.executable, SCRIPT, "--seed", "7", "--input-size", "4",
                             "--hidden-size", "6", "--port", "0", "--capacity", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        with hang_guard(30):
            line = proc.stdout.readline()
            assert line.startswith("listening on ws://127.0.0.1:"), (line, proc.stderr.read())
            url = line.split()[-1]
            x = rng.standard_normal((2, 3, 4)).astype(np.float32)

            async def main():
                async with connect(url + "/mux", open_timeout=TIMEOUT) as ws:
                    replies = []
                    for t in range(2):
                        await ws.send(request([5, U64, 0], x[t]))
                        reply = await ws.recv()
                        n = int.from_bytes(reply[:4], "little")
                        assert n == 3 and len(reply) == 4 + 3 * (8 + 4 * 6)
                        replies.append(np.frombuffer(reply, "<f4", offset=4 + 24).reshape(3, 6))
                        assert np.array_equal(np.frombuffer(reply, "<u8", 3, 4), [5, U64, 0])
                    stats = json.loads(await asyncio.to_thread(
                        lambda: urllib.request.urlopen(url.replace("ws:", "http:") + "/stats",
                                                       timeout=TIMEOUT).read()))
                    proc.send_signal(signal.SIGTERM)
                    with pytest.raises(ConnectionClosed) as closed:
                        await ws.recv()
                return np.array(replies), stats, closed.value.rcvd.code

            replies, stats, code = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
            states = [model.new_state(1) for _ in range(3)]
            for t in range(2):
                for i in range(3):
                    assert np.array_equal(replies[t, i], model.step(x[t, i], states[i]))
            assert stats == {"streams": 3, "capacity": 8, "pending": 0, "mux_connections": 1,
                             "mux_pending": 0}
            assert code == 1001
            out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and err == "" and out == "", (proc.returncode, out, err)


@pytest.mark.parametrize("compression", [None, "deflate"])
def test_permessage_deflate_is_off_unless_asked_for(served, rng, compression):
    """A client offering permessage-deflate (websockets' default) gets it only from a server
    made with compression="deflate"; either way every reply is exact."""
    model = stream_server.random_model(5, I, H)
    srv = served(model, capacity=16, compression=compression)

    async def main():
        async with connect(srv.url + "/mux", open_timeout=TIMEOUT) as ws:   # offers deflate
            client = Client(ws, model, rng)
            for keys in ([1, 2, 3], [3, 1], [2, 1, 3, 4]):
                await client.send(keys)
            await client.check_all()
            return client, ws.response.headers.get("Sec-WebSocket-Extensions")

    with hang_guard(30):
        client, extensions = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert client.answered == 3
    if compression is None:
        assert extensions is None
    else:
        assert "permessage-deflate" in extensions
    assert streams_left(srv.server) == 0
