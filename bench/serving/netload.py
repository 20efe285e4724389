"""The clients of the serving benchmark's network engines (bench/serving/network.py): a process
that plays its share of a schedule against examples/stream_server.py over real sockets on
127.0.0.1 and records when each frame's reply came, and what it said.

It speaks RFC 6455 itself over blocking sockets (the handshake, masked client frames, pongs to
the server's pings, the close handshake) rather than through the websockets package: a client
process shares the machine's two cores with the server it measures, and a native gateway's client
costs little more than the kernel's copies. So does this one: a request is one sendmsg of its
header and its payload, masked with a fresh random key by one NumPy XOR; a reply one recv_into a
buffer of its size. The tests (tests/serving/) use the websockets client.

Threads: one sender per /mux connection (it builds its next request while it waits for its
time), or one sender for all of a process's one-stream connections, which a connector thread
opens and closes at their sessions' times; and one receiver over every socket (a selector).
"""

import base64
import hashlib
import os
import selectors
import socket
import struct
import sys
import threading
import time
from collections import deque

import numpy as np

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"   # RFC 6455, 1.3
BINARY, TEXT, CLOSE, PING, PONG = 0x2, 0x1, 0x8, 0x9, 0xA


def clock():
    return time.perf_counter()      # CLOCK_MONOTONIC: one clock for every process of the machine


def sleep_until(t):
    d = t - clock()
    if d > 0:
        time.sleep(d)


class Connection:
    """One WebSocket client connection over a blocking socket. send() may be called from any
    thread (the receiver sends pongs): the socket's writes are serialized by a lock."""

    def __init__(self, host, port, path, timeout=30.0):
        sock = socket.create_connection((host, port), timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                     f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"{path}: the server closed the handshake: {data!r}")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        if not head.startswith(b"HTTP/1.1 101") or accept not in head:
            raise ConnectionError(f"{path}: not a WebSocket handshake: {head[:200]!r}")
        sock.settimeout(None)
        self.sock, self.leftover = sock, rest      # rest: frames right after the handshake
        self._lock = threading.Lock()
        self.closing = False

    def send(self, payload, opcode=BINARY):
        """One frame: the payload (bytes-like) masked with a fresh key."""
        n = memoryview(payload).nbytes
        mask = os.urandom(4)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        if n % 4 == 0:
            words = np.frombuffer(payload, np.uint32)
            body = np.bitwise_xor(words, np.frombuffer(mask, np.uint32)[0]).data
        else:
            body = bytes(b ^ mask[i & 3] for i, b in enumerate(bytes(payload)))
        with self._lock:
            sent = self.sock.sendmsg([head + mask, body])
            total = len(head) + 4 + n
            if sent < total:            # a signal cut it short: the rest as one buffer
                self.sock.sendall((head + mask + bytes(body))[sent:])

    def close(self):
        """Starts the close handshake (1000); the receiver closes the socket at the server's
        answer."""
        if not self.closing:
            self.closing = True
            try:
                self.send(struct.pack("!H", 1000), CLOSE)
            except OSError:
                pass


class Incoming:
    """The frames arriving on one connection, read without waiting: read() returns the complete
    messages (opcode, payload) that came, answering pings itself. A large payload is read
    straight into a buffer of its size."""

    def __init__(self, conn):
        self.conn = conn
        self.buf = bytearray(conn.leftover)
        self.payload = None         # (opcode, bytearray, bytes read) of a large frame under way
        self.eof = False

    def read(self):
        out = []
        sock = self.conn.sock
        if self.payload is not None:
            op, data, got = self.payload
            try:
                got += sock.recv_into(memoryview(data)[got:], 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            if got < len(data):
                self.payload = (op, data, got)
                return out
            self.payload = None
            self._message(op, bytes(data), out)
        else:
            try:
                chunk = sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            if not chunk:
                self.eof = True
                return out
            self.buf += chunk
        self._parse(out)
        return out

    def _parse(self, out):
        buf = self.buf
        while len(buf) >= 2:
            op, n = buf[0] & 0x0F, buf[1] & 0x7F
            if buf[1] & 0x80 or not buf[0] & 0x80:
                raise ConnectionError(f"a masked or fragmented server frame: {bytes(buf[:2])!r}")
            h = 2
            if n == 126:
                if len(buf) < 4:
                    break
                n, h = struct.unpack_from("!H", buf, 2)[0], 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n, h = struct.unpack_from("!Q", buf, 2)[0], 10
            if len(buf) >= h + n:
                self._message(op, bytes(buf[h:h + n]), out)
                del buf[:h + n]
                continue
            if n > (1 << 16):           # the rest of it straight into its own buffer
                data = bytearray(n)
                have = len(buf) - h
                data[:have] = buf[h:]
                del buf[:]
                self.payload = (op, data, have)
            break

    def _message(self, op, data, out):
        if op == PING:
            try:
                self.conn.send(data, PONG)
            except OSError:
                pass
        elif op == CLOSE:
            self.eof = True
            out.append((op, data))
        elif op != PONG:
            out.append((op, data))


class Receiver(threading.Thread):
    """Reads every connection of the process; hands each complete message to on_message(key, op,
    payload, time). New connections come through add() (taken in at its next turn)."""

    def __init__(self, on_message):
        super().__init__(name="receiver", daemon=True)
        self.on_message = on_message
        self.sel = selectors.DefaultSelector()
        self.new = deque()
        self.open = {}              # key -> Incoming
        self.stop = False
        self.error = None
        self._call = None           # a function to run on this thread between messages
        self._called = threading.Event()

    def call(self, fn, timeout=10.0):
        """Runs fn() on the receiver's thread between two messages (at once if the receiver is
        not running) and returns when it has run: fn sees no message half recorded."""
        self._call = fn
        while self.is_alive() and not self._called.wait(0.05):
            pass
        if not self._called.is_set() and self._call is not None:
            self._call = None
            fn()

    def add(self, key, conn):
        self.new.append((key, conn))

    def run(self):
        try:
            while not self.stop or self.open:
                while self.new:
                    key, conn = self.new.popleft()     # its socket stays blocking for sends
                    inc = self.open[key] = Incoming(conn)
                    self.sel.register(conn.sock, selectors.EVENT_READ, (key, inc))
                    early = []          # frames that came with the handshake's answer
                    inc._parse(early)
                    for op, data in early:
                        self.on_message(key, op, data, clock())
                for sk, _ in self.sel.select(0.005):
                    key, inc = sk.data
                    for op, data in inc.read():
                        now = clock()
                        if op != CLOSE:
                            self.on_message(key, op, data, now)
                    if inc.eof:
                        self.sel.unregister(inc.conn.sock)
                        inc.conn.sock.close()
                        del self.open[key]
                        self.on_message(key, CLOSE, b"", clock())
                if self._call is not None:
                    fn, self._call = self._call, None
                    fn()
                    self._called.set()
                if self.stop and not self.open:
                    break
        except BaseException as e:      # noqa: B036 - reported to the parent
            self.error = e


# ---- a process's share of a trial ----

class Recorder:
    """What happened to the process's frames (indices into its job's frame arrays)."""

    def __init__(self, job):
        F = len(job["frames"])
        self.done = np.full(F, np.nan)
        self.hits = np.zeros(F, np.int32)
        self.order = np.full(F, -1, np.int64)
        self.outs = np.full((F, job["H"]), np.nan, np.float32) if job["record"] else None
        self.count = 0
        self.errors = []
        self.lag = []               # how late each send left (s): the client's own delay
        self.opened, self.closed = [], []   # counts, appended by several threads
        self.aborted = ""
        self.final = False          # the results are reported: later replies are not recorded
        self.stopping = False       # the trial is over: senders and the connector stop

    def served(self, idx, now, t0, y=None):
        if self.final:
            return
        self.done[idx] = now - t0
        self.hits[idx] += 1
        self.order[idx] = self.count
        self.count += 1
        if y is not None and self.outs is not None:
            self.outs[idx] = y


def run_mux(job, pipe):
    """/mux: each connection's requests and closes at their times, one sender thread each."""
    host, port = job["host"], job["port"]
    table, mask = job["table"], len(job["table"]) - 1
    I = table.shape[1]
    conns = [Connection(host, port, "/mux") for _ in job["connections"]]
    rec = Recorder(job)
    inflight = [deque() for _ in conns]        # per connection: (frame indices, keys) sent
    first = job["first"]

    def on_message(c, op, data, now):
        if op == CLOSE:
            return
        if not inflight[c]:
            rec.errors.append(f"connection {c}: a reply to no request: {data[:80]!r}")
            return
        idx, keys = inflight[c].popleft()
        n = len(keys)
        if op != BINARY or len(data) != 4 + n * (8 + 4 * job["H"]) \
                or int.from_bytes(data[:4], "little") != n \
                or data[4:4 + 8 * n] != keys.tobytes():
            rec.errors.append(f"connection {c}: not the reply to its request of {n} keys: "
                              f"{data[:120]!r}")
            return
        y = np.frombuffer(data, "<f4", offset=4 + 8 * n).reshape(n, -1) if job["record"] else None
        rec.served(idx, now, t0, y)

    recv = Receiver(on_message)
    for c, conn in enumerate(conns):
        recv.add(c, conn)
    recv.start()
    pipe.send("ready")
    t0 = pipe.recv()
    stop_t = t0 + job["total"] + job["drain"]

    def sender(c):
        conn = conns[c]
        # (time, kind, a, b): a request of the frames a:b, or a close of close_keys[a:b]
        frames_t, keys_all, rows, close_keys = job["t"], job["keys"], job["rows"], job["close_keys"]
        for due, kind, a, b in job["connections"][c]:
            if kind == "request":
                idx = np.arange(a, b)
                keys = keys_all[a:b]
                n = b - a
                payload = bytearray(4 + n * (8 + 4 * I))
                payload[:4] = n.to_bytes(4, "little")
                payload[4:4 + 8 * n] = keys.tobytes()
                np.take(table, rows[a:b] & mask, axis=0,
                        out=np.frombuffer(payload, np.float32, n * I, 4 + 8 * n).reshape(n, I))
                pending = (idx, keys, payload)
            else:
                pending = (None, None, ("close " + " ".join(map(str, close_keys[a:b].tolist()))))
            sleep_until(t0 + due)
            if rec.aborted or rec.stopping:
                return
            try:
                oldest = frames_t[inflight[c][0][0][0]]
            except IndexError:          # nothing in flight (the receiver may have just taken it)
                oldest = np.inf
            if clock() - (t0 + oldest) > job["abort_lag"]:
                rec.aborted = f"more than {job['abort_lag']:g} s behind"
                return
            rec.lag.append(clock() - (t0 + due))
            idx, keys, payload = pending
            try:
                if idx is None:
                    conn.send(payload.encode(), TEXT)
                    rec.closed.append(b - a)
                else:
                    inflight[c].append((idx, keys))
                    rec.opened.append(int(first[a:b].sum()))
                    conn.send(payload)
            except OSError as e:
                rec.errors.append(f"connection {c}: {e!r}")
                return

    senders = [threading.Thread(target=sender, args=(c,), daemon=True) for c in range(len(conns))]
    for s in senders:
        s.start()
    _finish(job, pipe, rec, t0, stop_t, senders, lambda: all(not q for q in inflight), recv,
            lambda: conns)


def run_streams(job, pipe):
    """One stream per connection: each session connects at its start (the first ones before the
    clock), sends its frames at their times and closes at its end once its replies are in."""
    host, port = job["host"], job["port"]
    table, mask = job["table"], len(job["table"]) - 1
    S = len(job["start"])
    conns = [None] * S
    ready = [threading.Event() for _ in range(S)]
    inflight = [deque() for _ in range(S)]
    remaining = job["nframes"].copy()          # replies still to come, per session
    want_close = np.zeros(S, bool)
    rec = Recorder(job)
    frames_bytes = np.ascontiguousarray(table, "<f4")

    def close(g):
        conns[g].close()
        rec.closed.append(1)

    def on_message(g, op, data, now):
        if op == CLOSE:
            return
        if not inflight[g] or op != BINARY or len(data) != 4 * job["H"]:
            rec.errors.append(f"session {g}: unexpected message {data[:80]!r}")
            return
        i = inflight[g].popleft()
        rec.served(i, now, t0, np.frombuffer(data, "<f4") if job["record"] else None)
        remaining[g] -= 1
        if remaining[g] == 0 and want_close[g] and not rec.final:   # after the report: left open
            close(g)

    recv = Receiver(on_message)

    def connect(g):
        try:
            conns[g] = Connection(host, port, "/")
        except OSError as e:
            rec.errors.append(f"session {g}: {e!r}")
            return
        rec.opened.append(1)
        recv.add(g, conns[g])
        ready[g].set()

    for g in job["initial"].tolist():
        connect(g)
    recv.start()
    pipe.send("ready")
    t0 = pipe.recv()
    stop_t = t0 + job["total"] + job["drain"]

    def connector():
        events = sorted([(job["start"][g], 0, g) for g in range(S) if not ready[g].is_set()]
                        + [(job["end"][g], 1, g) for g in range(S) if np.isfinite(job["end"][g])])
        for due, kind, g in events:
            sleep_until(t0 + due)
            if rec.aborted or rec.stopping:
                return
            if kind == 0:
                connect(g)
            elif ready[g].is_set():
                want_close[g] = True
                if remaining[g] == 0:       # else the receiver closes it at its last reply
                    close(g)

    def sender():
        t, sess, rows = job["t"], job["sess"], job["rows"]
        for i in range(len(t)):
            g = sess[i]
            sleep_until(t0 + t[i])
            if rec.aborted or rec.stopping:
                return
            if not ready[g].wait(max(0.0, stop_t - clock())) or rec.stopping:
                return
            now = clock()
            if now - (t0 + t[i]) > job["abort_lag"]:
                rec.aborted = f"more than {job['abort_lag']:g} s behind"
                return
            rec.lag.append(now - (t0 + t[i]))
            inflight[g].append(i)
            try:
                conns[g].send(frames_bytes[rows[i] & mask])
            except OSError as e:
                rec.errors.append(f"session {g}: {e!r}")
                return

    threads = [threading.Thread(target=f, daemon=True) for f in (connector, sender)]
    for th in threads:
        th.start()
    _finish(job, pipe, rec, t0, stop_t, threads,
            lambda: not remaining[[g for g in range(S) if ready[g].is_set()]].any(), recv,
            lambda: [c for c in conns if c is not None])


def _finish(job, pipe, rec, t0, stop_t, threads, all_answered, recv, open_conns):
    """Waits out the trial (the CPU window), reports, then closes the connections when the parent
    says so, and reports again."""
    sleep_until(t0 + job["warmup"])
    c0, w0 = time.process_time(), clock()
    sleep_until(t0 + job["total"])
    c1, w1 = time.process_time(), clock()
    for th in threads:
        th.join(max(0.0, stop_t - clock()))
    # What is still to send or connect is past the drain: stopped here, and waited for, so the
    # streams reported opened are all the server saw opened.
    rec.stopping = True
    for th in threads:
        th.join(60.0)
    while clock() < stop_t and not rec.aborted and not all_answered():
        time.sleep(0.001)
    lag = np.array(rec.lag)
    books = {}

    def close_books():      # on the receiver's thread: no reply is half recorded
        rec.final = True
        books.update(done=rec.done.copy(), hits=rec.hits.copy(), order=rec.order.copy(),
                     outs=None if rec.outs is None else rec.outs.copy())

    recv.call(close_books)
    pipe.send(dict(books,
                   opened=sum(rec.opened), closed=sum(rec.closed), errors=rec.errors + (
                       [repr(recv.error)] if recv.error else []), aborted=rec.aborted,
                   cpu=(c1 - c0) / (w1 - w0) if w1 > w0 else float("nan"),
                   lag_p99=float(np.percentile(lag, 99)) if len(lag) else float("nan"),
                   lag_max=float(lag.max(initial=0.0))))
    pipe.recv()                       # "disconnect"
    for conn in open_conns():
        conn.close()
    recv.stop = True
    recv.join(10.0)
    pipe.send("closed")


def main(pipe, job):
    """A client process: job is what network.client_jobs() made for it."""
    sys.setswitchinterval(0.0005)     # its threads hand the GIL on quickly: sends on time
    try:
        (run_mux if job["kind"] == "mux" else run_streams)(job, pipe)
    except BaseException as e:          # noqa: B036 - the parent raises it
        import traceback
        pipe.send({"fatal": "".join(traceback.format_exception(e))})
