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
    at end[g] (inf: still open at the end), nframes[g] frames.
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

    @property
    def sessions(self):
        return len(self.start)

    def measured(self):
        return (self.t >= self.warmup) & (self.t < self.total)


def make_schedule(streams, warmup, duration, session_mean, seed=0, period=PERIOD, jitter=JITTER):
    rng = np.random.default_rng(seed)
    total = warmup + duration
    # Session boundaries per stream: cumulative exponential lengths, enough to pass the end.
    k = int(math.ceil(total / session_mean)) * 3 + 4
    lengths = rng.exponential(session_mean, (streams, k))
    bounds = np.concatenate([np.zeros((streams, 1)), np.cumsum(lengths, axis=1)], axis=1)
    while bounds[:, -1].min() < total:
        more = np.cumsum(rng.exponential(session_mean, (streams, k)), axis=1) + bounds[:, -1:]
        bounds = np.concatenate([bounds, more], axis=1)
    live = bounds[:, :-1] < total
    start = bounds[:, :-1][live]
    end = bounds[:, 1:][live]
    initial_mask = np.zeros_like(live)
    initial_mask[:, 0] = True
    initial_mask = initial_mask[live]
    S = len(start)
    # Frames of a session: start + phase + j * period for as long as it lasts (and the run).
    phase = rng.uniform(0, period, S)
    last = np.minimum(end, total)
    nframes = np.maximum(0, np.ceil((last - start - phase) / period)).astype(np.int64)
    F = int(nframes.sum())
    sess = np.repeat(np.arange(S), nframes)
    first = np.cumsum(nframes) - nframes
    seq = np.arange(F) - np.repeat(first, nframes)
    nominal = start[sess] + phase[sess] + seq * period
    # Jitter < period / 2 keeps a stream's frames in order; clipping keeps them inside the session.
    t = np.clip(nominal + rng.uniform(-jitter, jitter, F), start[sess], last[sess] - 1e-7)
    order = np.argsort(t, kind="stable")
    t, sess, seq = t[order], sess[order], seq[order]
    end = np.where(end < total, end, np.inf)
    opens = np.flatnonzero(~initial_mask)
    opens = opens[np.argsort(start[opens], kind="stable")]
    closes = np.flatnonzero(np.isfinite(end))
    closes = closes[np.argsort(end[closes], kind="stable")]
    by_sess = np.lexsort((seq, sess))
    return Schedule(t, sess, seq, start, end, nframes, np.flatnonzero(initial_mask), opens, closes,
                    streams, warmup, total, period, jitter, by_sess)


def make_table(rows=TABLE_ROWS, seed=7):
    return np.random.default_rng(seed).standard_normal((rows, I)).astype(np.float32)
