"""examples/stream_server.py: a WebSocket service, one connection = one stream of a StreamPool.

Real clients over TCP (websockets): each client's replies must equal, bit for bit, its frames
stepped through a StreamState of its own, while other clients disconnect mid-stream or send bad
messages. The server runs in this process, on an event loop of its own thread (so the test sees
its pool), and as the command-line program in a subprocess (port 0, SIGINT / SIGTERM).
"""

import asyncio
import json
import logging
import signal
import subprocess
import sys
import threading
import urllib.request

import numpy as np
import pytest

import fastcell
from conftest import ENV, hang_guard

websockets = pytest.importorskip("websockets", minversion="12")
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402
from served import (H, I, SCRIPT, TIMEOUT, eventually, keep_pinging, pool_len_is,  # noqa: E402
                    reference, servers, stream_server, streams_left, told_and_closed)


@pytest.fixture
def served():
    yield from servers()


async def good_client(url, frames, rng):
    """Sends the frames in bursts of 1-4 (pipelined), reading each burst's replies after it."""
    replies = []
    async with connect(url, compression=None, open_timeout=TIMEOUT) as ws:
        t = 0
        while t < len(frames):
            burst = frames[t:t + int(rng.integers(1, 5))]
            for x in burst:
                await ws.send(x.tobytes())
            for _ in burst:
                replies.append(np.frombuffer(await ws.recv(), "<f4"))
            t += len(burst)
    return np.array(replies)


async def leaving_client(url, frames, abort):
    """Reads a few replies, then leaves with frames in flight: a close, or a dropped TCP link."""
    async with connect(url, compression=None, open_timeout=TIMEOUT) as ws:
        for x in frames[:3]:
            await ws.send(x.tobytes())
        for _ in range(2):
            await ws.recv()
        # Fewer unread replies than the client's queue holds (16), or its close handshake would
        # wait for close_timeout: the client stops reading its socket when that queue is full.
        for x in frames[3:10]:
            await ws.send(x.tobytes())
        if abort:
            ws.transport.abort()
            return
    # the context manager closed it (1000) without reading the replies still coming


async def bad_client(url, frames, message):
    """Two good frames, then a bad message: two exact replies, the error, and the close."""
    async with connect(url, compression=None, open_timeout=TIMEOUT) as ws:
        for x in frames[:2]:
            await ws.send(x.tobytes())
        await ws.send(message)
        replies = [np.frombuffer(await ws.recv(), "<f4") for _ in range(2)]
        error = await ws.recv()
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    return np.array(replies), error, closed.value.rcvd.code


def test_200_clients_get_their_own_stream_exactly(served, rng, caplog):
    model = stream_server.random_model(3, I, H)
    srv = served(model, capacity=256)
    n_good, n_leave, n_bad = 200, 30, 20
    frames = [rng.standard_normal((int(rng.integers(10, 21)), I)).astype(np.float32)
              for _ in range(n_good + n_leave + n_bad)]
    bad_messages = [np.zeros(I + 1, np.float32).tobytes(), b"\0" * 3, "hello", b""]

    async def main():
        jobs = [good_client(srv.url, frames[k], np.random.default_rng(k)) for k in range(n_good)]
        jobs += [leaving_client(srv.url, frames[n_good + k], abort=k % 2 == 1) for k in range(n_leave)]
        jobs += [bad_client(srv.url, frames[n_good + n_leave + k], bad_messages[k % 4])
                 for k in range(n_bad)]
        return await asyncio.wait_for(asyncio.gather(*jobs), TIMEOUT)

    with caplog.at_level(logging.WARNING), hang_guard(60):
        got = asyncio.run(main())
        for k in range(n_good):
            assert np.array_equal(got[k], reference(model, frames[k])), k
        for k in range(n_bad):
            replies, error, code = got[n_good + n_leave + k]
            message = bad_messages[k % 4]
            assert np.array_equal(replies, reference(model, frames[n_good + n_leave + k][:2]))
            want = f"error: expected a binary frame of {I} little-endian float32 values ({4 * I} bytes), got "
            if isinstance(message, str):
                assert error == want + "a text message" and code == 1003
            else:
                assert error == want + f"{len(message)} bytes" and code == 1008
        assert streams_left(srv.server) == 0
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []   # nothing escaped


def test_a_full_pool_refuses_with_a_message(served, rng):
    model = stream_server.random_model(4, I, H)
    srv = served(model, capacity=3, max_delay=0)
    x = rng.standard_normal((2, I)).astype(np.float32)

    async def main():
        async with connect(srv.url, open_timeout=TIMEOUT) as first:
            others = [await connect(srv.url, open_timeout=TIMEOUT) for _ in range(2)]
            async with connect(srv.url, open_timeout=TIMEOUT) as refused:
                assert await refused.recv() == ("error: server full: all 3 streams are in use; "
                                                 "try again later")
                with pytest.raises(ConnectionClosed) as closed:
                    await refused.recv()
                assert closed.value.rcvd.code == 1013
            await first.send(x[0].tobytes())   # the streams that are open still work
            assert np.array_equal(np.frombuffer(await first.recv(), "<f4"), reference(model, x[:1])[0])
            stats = json.loads(await asyncio.to_thread(
                lambda: urllib.request.urlopen(srv.url.replace("ws:", "http:") + "/stats",
                                               timeout=TIMEOUT).read()))
            assert stats == {"streams": 3, "capacity": 3, "pending": 0, "mux_connections": 0,
                             "mux_pending": 0}
            await others[0].close()
            for _ in range(200):   # its handler closes its stream: a new client gets it
                if len(srv.server.pool) < 3:
                    break
                await asyncio.sleep(0.01)
            async with connect(srv.url, open_timeout=TIMEOUT) as late:
                await late.send(x[1].tobytes())
                assert np.array_equal(np.frombuffer(await late.recv(), "<f4"),
                                      reference(model, x[1:])[0])
            await others[1].close()

    with hang_guard(30):
        asyncio.run(asyncio.wait_for(main(), TIMEOUT))
        assert streams_left(srv.server) == 0


@pytest.mark.parametrize("how", ["seed, SIGTERM", "model file, SIGINT"])
def test_the_command_line_program(how, tmp_path, rng):
    if how.startswith("seed"):
        model = stream_server.random_model(7, 4, 6)
        args, stop = ["--seed", "7", "--input-size", "4", "--hidden-size", "6"], signal.SIGTERM
    else:
        model = fastcell.GRU(4, 6, num_layers=2)
        fastcell.save(model, tmp_path / "gru.safetensors")
        args, stop = [tmp_path / "gru.safetensors"], signal.SIGINT
    proc = subprocess.Popen([sys.executable, SCRIPT, *map(str, args), "--port", "0", "--capacity", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        with hang_guard(30):
            line = proc.stdout.readline()
            assert line.startswith("listening on ws://127.0.0.1:"), (line, proc.stderr.read())
            url = line.split()[-1]
            frames = rng.standard_normal((3, 12, 4)).astype(np.float32)

            async def main():
                got = await asyncio.gather(
                    *(good_client(url, f, np.random.default_rng(k)) for k, f in enumerate(frames)))
                async with connect(url, open_timeout=TIMEOUT) as staying:
                    await staying.send(frames[0, 0].tobytes())
                    await staying.recv()
                    proc.send_signal(stop)       # a client still connected: told, not dropped
                    with pytest.raises(ConnectionClosed) as closed:
                        await staying.recv()
                return got, closed.value.rcvd.code

            got, code = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
            for f, g in zip(frames, got):
                assert np.array_equal(g, reference(model, f))
            assert code == 1001                  # going away
            out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and err == "" and out == "", (proc.returncode, out, err)


def test_a_bad_model_file_is_one_line(tmp_path):
    bad = tmp_path / "nope.safetensors"
    bad.write_bytes(b"not a model")
    r = subprocess.run([sys.executable, SCRIPT, bad, "--port", "0"], capture_output=True, text=True,
                       env=ENV, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("stream_server: error: ") and str(bad) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_idle_clients_are_disconnected_and_their_streams_closed(served, rng):
    """idle_timeout 0.5 s: a client that sends nothing, and one that only pings (the server
    answers: the link is alive, but pings are no frames), get the message, a 1001 close and
    their streams closed; a client that sends frames meanwhile keeps its stream and gets exact
    replies throughout."""
    model = stream_server.random_model(5, I, H)
    srv = served(model, capacity=4, idle_timeout=0.5)
    assert srv.server.idle_timeout == 0.5
    xs = rng.standard_normal((10_000, I)).astype(np.float32)

    async def silent():
        async with connect(srv.url, open_timeout=TIMEOUT) as ws:
            return await told_and_closed(ws)

    async def pinging():
        async with connect(srv.url, open_timeout=TIMEOUT) as ws:
            pinger = asyncio.create_task(keep_pinging(ws))
            try:
                return await told_and_closed(ws)
            finally:
                pinger.cancel()

    async def active(idle_ones):
        replies = []
        async with connect(srv.url, open_timeout=TIMEOUT) as ws:
            t = 0
            while not idle_ones.done() or t < 3:   # frames all along, a few after they left
                await ws.send(xs[t].tobytes())
                replies.append(np.frombuffer(await ws.recv(), "<f4"))
                t += 1
                await asyncio.sleep(0.01)
            # the idle ones are gone, their streams too; this one's stays
            open_now = await pool_len_is(srv.server, 1)
            await ws.send(xs[t].tobytes())
            replies.append(np.frombuffer(await ws.recv(), "<f4"))
        return np.array(replies), open_now

    async def main():
        idle_ones = asyncio.gather(silent(), pinging())
        got, open_now = await active(idle_ones)
        return await idle_ones, got, open_now

    with hang_guard(60):
        idle, got, open_now = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
        assert idle == [("error: idle for 0.5 s; the stream is closed", 1001)] * 2
        assert open_now == 1
        assert np.array_equal(got, reference(model, xs[:len(got)]))
        assert streams_left(srv.server) == 0


def test_a_full_batcher_refuses_the_frame_with_1013(served, rng):
    """The Batcher holds max_pending frames (4 x capacity) while its worker is held: the client
    whose frame finds it full gets "server busy" and a 1013 close; a client whose frame was
    already waiting gets its exact reply once the worker runs, and goes on."""
    model = stream_server.random_model(6, I, H)
    srv = served(model, capacity=3, max_delay=0)
    server, batcher = srv.server, srv.server.batcher
    assert batcher.max_pending == 12
    extra = server.pool.open()          # the test's own stream, through the same batcher
    x = rng.standard_normal((3, I)).astype(np.float32)
    held, release = threading.Event(), threading.Event()

    def hold(fut):   # a done-callback that keeps the worker thread: nothing steps meanwhile
        if threading.current_thread().name == "fastcell-batcher":
            held.set()
            release.wait(TIMEOUT)

    async def main():
        async with connect(srv.url, open_timeout=TIMEOUT) as a, \
                connect(srv.url, open_timeout=TIMEOUT) as b:
            while not held.is_set():     # a callback added after its frame was stepped runs here
                batcher.submit(extra, x[2]).add_done_callback(hold)
                await asyncio.to_thread(held.wait, 1)
            await a.send(x[0].tobytes())
            assert await eventually(lambda: batcher.pending == 1)   # a's frame waits
            filled = []
            for _ in range(100):
                try:
                    filled.append(batcher.submit(extra, x[2]))
                except fastcell.BatcherFullError:
                    break
            assert len(filled) == 11 and batcher.pending == 12
            await b.send(x[0].tobytes())
            assert await asyncio.wait_for(b.recv(), TIMEOUT) == (
                "error: server busy: 12 frames are waiting to be stepped (at most 12); "
                "try again later")
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(b.recv(), TIMEOUT)
            assert closed.value.rcvd.code == 1013
            release.set()
            first = np.frombuffer(await asyncio.wait_for(a.recv(), TIMEOUT), "<f4")
            await a.send(x[1].tobytes())
            second = np.frombuffer(await asyncio.wait_for(a.recv(), TIMEOUT), "<f4")
            assert np.array_equal(np.array([first, second]), reference(model, x[:2]))
            for f in filled:
                f.result(timeout=TIMEOUT)
            await batcher.close_stream_async(extra)

    try:
        with hang_guard(30):
            asyncio.run(asyncio.wait_for(main(), TIMEOUT))
            assert streams_left(server) == 0
    finally:
        release.set()


def test_the_idle_timeout_option(capsys):
    with pytest.raises(SystemExit) as done:
        stream_server.main(["--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())   # wrapped to the terminal's width
    assert "--idle-timeout SECONDS" in out and "0 or less: never" in out and "(default: 60)" in out
    assert stream_server.main(["--idle-timeout", "nan", "--port", "0"]) == 2
    assert capsys.readouterr().err == ("stream_server: error: idle_timeout: expected a number of "
                                       "seconds (0 or less, or None: no timeout), got nan\n")
    with pytest.raises(SystemExit) as done:
        stream_server.main(["--idle-timeout", "soon"])
    assert done.value.code == 2
    assert "argument --idle-timeout: invalid float value: 'soon'" in capsys.readouterr().err
    for bad in ("1", True, float("nan")):
        with pytest.raises(ValueError, match="^idle_timeout: "):
            stream_server.StreamServer(stream_server.random_model(0, 4, 4), 2, idle_timeout=bad)
