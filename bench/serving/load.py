"""The load of the serving benchmark: N streams of a Silero-VAD-sized model, each sending a frame
every PERIOD seconds (random phase, +-JITTER, a stream's frames in order) through sessions of
exponential length, each replaced by a new stream (new id, zero state) when it closes. Every
frame's arrival time is drawn in advance (Schedule): the load is open-loop.
"""

import math
from dataclasses import dataclass, field

import numpy as np

I = H = 128                 # Silero VAD's LSTMCell: a frame is I floats, an output H
PERIOD = 0.032              # a frame every 32 ms per stream
JITTER = 0.001
TABLE_ROWS = 4096           # 2 MB of frames, more than L2: the data is not all cache-hot


@dataclass
class Schedule:
    """Every frame of a trial, sorted by scheduled arrival time (seconds from the start).

    Frame i: arrival t[i], session sess[i], its seq[i]-th frame; its data is table row i % M.
    Session g: open at start[g] (before the clock for the first session of each stream), close
    at end[g] (inf: still open at the end), nframes[g] frames. A schedule for /mux
    (make_mux_schedule) also gives each session's connection, conn[g], of `connections`: the
    frames of one connection due at one time are one request.
    """
    t: np.ndarray
    sess: np.ndarray
    seq: np.ndarray
    start: np.ndarray
    end: np.ndarray
    nframes: np.ndarray
    initial: np.ndarray          # sessions open before the clock starts
    opens: np.ndarray            # the other sessions, by start time
    closes: np.ndarray           # sessions that close before the end, by end time
    streams: int
    warmup: float
    total: float
    period: float
    jitter: float
    by_sess: np.ndarray = field(default=None)   # frame indices sorted by (session, seq)
    conn: np.ndarray = field(default=None)      # /mux: each session's connection
    connections: int = 0

    @property
    def sessions(self):
        return len(self.start)

    def measured(self):
        return (self.t >= self.warmup) & (self.t < self.total)


def _sessions(rng, streams, total, session_mean):
    """Each stream's sessions: cumulative exponential lengths, enough to pass the end. Returns
    start, end (maybe past the end), the stream of each session and whether it is a stream's
    first (open before the clock)."""
    k = int(math.ceil(total / session_mean)) * 3 + 4
    lengths = rng.exponential(session_mean, (streams, k))
    bounds = np.concatenate([np.zeros((streams, 1)), np.cumsum(lengths, axis=1)], axis=1)
    while bounds[:, -1].min() < total:
        more = np.cumsum(rng.exponential(session_mean, (streams, k)), axis=1) + bounds[:, -1:]
        bounds = np.concatenate([bounds, more], axis=1)
    live = bounds[:, :-1] < total
    first = np.zeros_like(live)
    first[:, 0] = True
    stream = np.broadcast_to(np.arange(streams)[:, None], live.shape)[live]
    return bounds[:, :-1][live], bounds[:, 1:][live], stream, first[live]


def _frames_of(first_time, step_times, nframes):
    """Frame f of a session whose frames are nframes[g] consecutive entries of step_times from
    first_time[g]: (session of each frame, its seq, its time)."""
    F = int(nframes.sum())
    sess = np.repeat(np.arange(len(nframes)), nframes)
    seq = np.arange(F) - np.repeat(np.cumsum(nframes) - nframes, nframes)
    return sess, seq, step_times(sess, seq, first_time)


def _schedule(t, sess, seq, start, end, nframes, initial_mask, streams, warmup, total, period,
              jitter, conn=None, connections=0):
    order = np.argsort(t, kind="stable")
    t, sess, seq = t[order], sess[order], seq[order]
    end = np.where(end < total, end, np.inf)
    opens = np.flatnonzero(~initial_mask)
    opens = opens[np.argsort(start[opens], kind="stable")]
    closes = np.flatnonzero(np.isfinite(end))
    closes = closes[np.argsort(end[closes], kind="stable")]
    by_sess = np.lexsort((seq, sess))
    return Schedule(t, sess, seq, start, end, nframes, np.flatnonzero(initial_mask), opens, closes,
                    streams, warmup, total, period, jitter, by_sess, conn, connections)


def make_schedule(streams, warmup, duration, session_mean, seed=0, period=PERIOD, jitter=JITTER):
    rng = np.random.default_rng(seed)
    total = warmup + duration
    start, end, _, initial_mask = _sessions(rng, streams, total, session_mean)
    S = len(start)
    # Frames of a session: start + phase + j * period for as long as it lasts (and the run).
    phase = rng.uniform(0, period, S)
    last = np.minimum(end, total)
    nframes = np.maximum(0, np.ceil((last - start - phase) / period)).astype(np.int64)
    F = int(nframes.sum())

    def times(sess, seq, _):
        # Jitter < period / 2 keeps a stream's frames in order; clipping keeps them inside the
        # session.
        nominal = start[sess] + phase[sess] + seq * period
        return np.clip(nominal + rng.uniform(-jitter, jitter, F), start[sess], last[sess] - 1e-7)

    sess, seq, t = _frames_of(None, times, nframes)
    return _schedule(t, sess, seq, start, end, nframes, initial_mask, streams, warmup, total,
                     period, jitter)


def make_mux_schedule(streams, connections, warmup, duration, session_mean, seed=0,
                      period=PERIOD, jitter=JITTER):
    """The load of /mux: the same streams and sessions, stream k carried by connection
    k % connections, and each connection sending ONE request every period (its own random phase,
    +-jitter) holding a frame of every session of its streams live at that time. A session's
    frames are its connection's requests from its start to its end; a session that would have
    none is left out (nothing would open it)."""
    rng = np.random.default_rng(seed)
    total = warmup + duration
    start, end, stream, initial_mask = _sessions(rng, streams, total, session_mean)
    conn = stream % connections
    # Each connection's request times, one array (row c: connection c's), in order.
    count = int(math.ceil(total / period)) + 1
    sends = (rng.uniform(0, period, (connections, 1)) + np.arange(count) * period
             + rng.uniform(-jitter, jitter, (connections, count)))
    sends = np.where(sends < total, sends, np.inf)
    lo = _searchsorted_rows(sends, conn, start)
    hi = _searchsorted_rows(sends, conn, np.minimum(end, total))
    keep = hi > lo
    start, end, conn, initial_mask, lo, hi = (a[keep] for a in (start, end, conn, initial_mask,
                                                                 lo, hi))
    nframes = (hi - lo).astype(np.int64)
    sess, seq, t = _frames_of(lo, lambda sess, seq, lo: sends[conn[sess], lo[sess] + seq], nframes)
    return _schedule(t, sess, seq, start, end, nframes, initial_mask, streams, warmup, total,
                     period, jitter, conn, connections)


def _searchsorted_rows(rows, which, values):
    """np.searchsorted(rows[which[g]], values[g]) for every g, vectorized: each row's values
    offset past the previous rows' (rows hold times in [0, total) or inf)."""
    span = np.max(rows[np.isfinite(rows)], initial=0.0) + 1.0
    flat = np.where(np.isfinite(rows), rows, span - 0.5) + span * np.arange(len(rows))[:, None]
    pos = np.searchsorted(flat.ravel(), values + span * which)
    return pos - which * rows.shape[1]


def make_table(rows=TABLE_ROWS, seed=7):
    return np.random.default_rng(seed).standard_normal((rows, I)).astype(np.float32)
