"""What permessage-deflate costs on /mux (issue 20): examples/stream_server.py serving a
Silero-size LSTMCell(128, 128), one /mux connection from a websockets client on 127.0.0.1, one
request of n streams' frames (1,000 by default) and its reply, the round trip timed. Two
servers, one made with compression=None (the default) and one with compression="deflate" (the
client offers it to both), in interleaved rounds; medians. Also the bytes of one request and
one reply as deflate sends them, against their raw size: float32 frames and outputs are noise
to deflate, so it spends its CPU for a few percent.

    python -m bench.mux_deflate [--streams 1000] [--rounds 21]
"""

import argparse
import contextlib
import statistics
import time
import zlib

import numpy as np

from bench.pool_step import I, silero_cell
from bench.serving.network import stream_server


def request(keys, x):
    return (len(keys).to_bytes(4, "little") + keys.astype("<u8").tobytes()
            + np.ascontiguousarray(x, "<f4").tobytes())


def deflated(payload):
    """The size of payload as permessage-deflate sends it (raw deflate, a sync flush)."""
    c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    return len(c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH)) - 4


def measure(streams=1000, rounds=21, seed=0):
    from websockets.sync.client import connect

    module = stream_server()
    cell = silero_cell()
    rng = np.random.default_rng(seed)
    keys = np.arange(streams, dtype=np.uint64)
    servers = {c: module.ServerThread(cell, capacity=streams, idle_timeout=None, compression=c)
               for c in (None, "deflate")}
    times = {c: [] for c in servers}
    sizes = {}
    try:
        with contextlib.ExitStack() as stack:
            conns = {c: stack.enter_context(connect(s.url + "/mux", compression="deflate",
                                                    max_size=None))
                     for c, s in servers.items()}
            for c, ws in conns.items():
                ext = ws.response.headers.get("Sec-WebSocket-Extensions")
                assert (ext is not None) == (c is not None), (c, ext)
                ws.send(request(keys, rng.standard_normal((streams, I))))   # opens the streams
                ws.recv()
            for _ in range(rounds):
                msg = request(keys, rng.standard_normal((streams, I)).astype(np.float32))
                for c, ws in conns.items():
                    t0 = time.perf_counter()
                    ws.send(msg)
                    reply = ws.recv()
                    times[c].append(time.perf_counter() - t0)
            sizes = dict(request=(len(msg), deflated(msg)), reply=(len(reply), deflated(reply)))
    finally:
        for s in servers.values():
            s.stop()
    return {c: statistics.median(t) for c, t in times.items()}, sizes


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.mux_deflate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=21)
    args = p.parse_args(argv)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        med, sizes = measure(args.streams, args.rounds)
    print(f"/mux, one request of {args.streams:,} Silero-size frames and its reply, median of "
          f"{args.rounds} interleaved rounds:")
    print(f"  without permessage-deflate (the default): {med[None] * 1e3:7.2f} ms")
    print(f"  with permessage-deflate:                  {med['deflate'] * 1e3:7.2f} ms "
          f"({med['deflate'] / med[None]:.1f}x)")
    for what, (raw, small) in sizes.items():
        print(f"  a {what}: {raw:,} bytes, deflated {small:,} ({small / raw:.0%})")
    return med, sizes


if __name__ == "__main__":
    main()
