"""One model, many threads; models pickled into worker processes (issue 5, "Threads").

Each thread runs its own script of random calls (steps of its own stream states, with and without
`out`, resets, sequence calls of layers with and without lengths and initial states, cell calls)
against models shared by all threads. The scripts are first run one after the other to get the
serial answers; then all threads run them at once and every result must equal its serial answer
bit for bit. The same scripts run on models pickled into spawned worker processes.

Sizes are small (H 8..32, T <= 6, B <= 4) so that the call count stays high on a busy machine.
"""

import multiprocessing
import sys
import threading
from concurrent.futures import ProcessPoolExecutor

import numpy as np

import fastcell
from conftest import init_weights

I = 8
THREADS = 8
CALLS_PER_THREAD = 10_000
PROCESS_SCRIPTS = 4          # scripts run in worker processes ...
CALLS_PER_PROCESS_SCRIPT = 100   # ... of this many calls each


def build_models():
    """Several cell types and dtypes; layers with 1-2 layers, projection, bidirectional."""
    rng = np.random.default_rng(2024)

    def cell_weights(gates, hidden, dtype, **kw):
        return init_weights(rng, gates, I, hidden, dtype, **kw)

    models = {
        "gru2": fastcell.GRU(I, 16, num_layers=2),
        "lstm_proj": fastcell.LSTM(I, 24, proj_size=8, dtype=np.float64),
        "rnn_relu": fastcell.RNN(I, 12, nonlinearity="relu", dtype=np.float64),
        "bi_lstm": fastcell.LSTM(I, 12, bidirectional=True, batch_first=True),
        "bi_gru_rb": fastcell.GRU(I, 8, num_layers=2, bidirectional=True, reset_after=False,
                                  dtype=np.float64),
        "peephole": fastcell.PeepholeLSTM(I, 32),
        "cell_rnn": fastcell.RNNCell(**cell_weights(1, 16, np.float64), nonlinearity="tanh"),
        "cell_gru": fastcell.GRUCell(**cell_weights(3, 32, np.float32)),
        "cell_lstm": fastcell.LSTMCell(**cell_weights(4, 8, np.float64)),
        "cell_peephole": fastcell.PeepholeLSTMCell(**cell_weights(4, 16, np.float32, peephole=True)),
    }
    return models


LAYERS = ["gru2", "lstm_proj", "rnn_relu", "bi_lstm", "bi_gru_rb", "peephole"]
STEPPERS = ["gru2", "lstm_proj", "rnn_relu", "peephole", "cell_rnn", "cell_gru", "cell_lstm",
            "cell_peephole"]
CELLS = ["cell_rnn", "cell_gru", "cell_lstm", "cell_peephole"]
OPS = ["step", "step_out", "step", "layer", "layer_lengths", "cell_call", "cell_run", "reset"]
OP_P = [0.25, 0.2, 0.1, 0.12, 0.12, 0.1, 0.08, 0.03]


def flat(result):
    if isinstance(result, (tuple, list)):
        return [a for r in result for a in flat(r)]
    return [result]


def layer_state(model, batch, rng):
    n = model.num_layers * model.num_directions
    h = rng.standard_normal((n, batch, model.output_size)).astype(model.dtype)
    if model.kind.endswith("lstm"):
        return h, rng.standard_normal((n, batch, model.hidden_size)).astype(model.dtype)
    return h


def run_script(models, seed, calls, sink):
    """Runs one script: `calls` random calls drawn from a generator seeded with `seed`. Every
    result goes to sink(index, list of arrays). States for step() are made here, so each script
    (thread) has its own."""
    rng = np.random.default_rng(seed)
    states, outs = {}, {}
    for i in range(calls):
        op = OPS[rng.choice(len(OPS), p=OP_P)]
        if op in ("step", "step_out", "reset"):
            name = STEPPERS[rng.integers(len(STEPPERS))]
            batch = int(rng.choice([1, 1, 2, 4]))
            m = models[name]
            key = (name, batch)
            if key not in states:
                states[key] = m.new_state(batch)
            state = states[key]
            if op == "reset":
                state.reset()
                sink(i, [state.h.copy()])
                continue
            x = rng.standard_normal((I,) if batch == 1 and rng.random() < 0.5 else (batch, I))
            x = x.astype(m.dtype)
            if op == "step":
                y = m.step(x, state)
            else:
                shape = (state.h.shape[-1],) if x.ndim == 1 else (batch, state.h.shape[-1])
                out = outs.setdefault((key, x.ndim), np.empty(shape, m.dtype))
                y = m.step(x, state, out)
                assert y is out
                y = y.copy()
            sink(i, [y])
        elif op in ("layer", "layer_lengths"):
            name = LAYERS[rng.integers(len(LAYERS))]
            m = models[name]
            T, B = int(rng.integers(1, 7)), int(rng.integers(1, 5))
            x = rng.standard_normal((B, T, I) if m.batch_first else (T, B, I))
            hx = layer_state(m, B, rng) if rng.random() < 0.5 else None
            lengths = rng.integers(1, T + 1, B) if op == "layer_lengths" else None
            sink(i, flat(m(x, hx, lengths)))
        else:
            name = CELLS[rng.integers(len(CELLS))]
            m = models[name]
            B = int(rng.integers(0, 5))
            lstm = "lstm" in name or "peephole" in name
            s = None
            if rng.random() < 0.5:
                s = tuple(rng.standard_normal((2, B, m.hidden_size))) if lstm else \
                    rng.standard_normal((B, m.hidden_size))
            if op == "cell_call":
                sink(i, flat(m(rng.standard_normal((B, I)), s)))
            else:
                T = int(rng.integers(0, 7))
                sink(i, flat(m.run(rng.standard_normal((T, B, I)), s)))


def serial_answers(models, seeds, calls):
    answers = []
    for seed in seeds:
        results = [None] * calls
        run_script(models, seed, calls, lambda i, r: results.__setitem__(i, r))
        answers.append(results)
    return answers


def same(a, b):
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y, equal_nan=True)
        for x, y in zip(a, b))


def test_threads_share_one_model():
    models = build_models()
    seeds = [[7, k] for k in range(THREADS)]
    want = serial_answers(models, seeds, CALLS_PER_THREAD)
    mismatches = [[] for _ in range(THREADS)]
    done = [0] * THREADS
    errors = []
    barrier = threading.Barrier(THREADS)

    def worker(k):
        def check(i, got):
            done[k] += 1
            if not same(got, want[k][i]):
                mismatches[k].append(i)

        try:
            barrier.wait()
            run_script(models, seeds[k], CALLS_PER_THREAD, check)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append((k, repr(e)))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: more interleavings of the Python parts
    try:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    assert done == [CALLS_PER_THREAD] * THREADS
    assert all(not m for m in mismatches), [(k, m[:10]) for k, m in enumerate(mismatches) if m]


def test_threads_step_one_batch_of_streams_each():
    """Many threads stepping their own states of one shared cell, B = 1 and B > 1 (the GEMV and
    the BLAS paths), interleaved with sequence calls on the same model."""
    models = build_models()
    m = models["lstm_proj"]
    xs = np.random.default_rng(3).standard_normal((THREADS, 400, 3, I))
    want = []
    for k in range(THREADS):
        s1, s3 = m.new_state(1), m.new_state(3)
        want.append([(m.step(x[0], s1).copy(), m.step(x, s3).copy()) for x in xs[k]])
    want_seq = m(xs[0, :6].reshape(6 * 3, 1, I))
    bad = []

    def worker(k):
        s1, s3 = m.new_state(1), m.new_state(3)
        out1, out3 = np.empty(8), np.empty((3, 8))
        for j, x in enumerate(xs[k]):
            m.step(x[0], s1, out1)
            m.step(x, s3, out3)
            if not (np.array_equal(out1, want[k][j][0]) and np.array_equal(out3, want[k][j][1])):
                bad.append((k, j))
            if j % 50 == 0 and not same(flat(m(xs[0, :6].reshape(6 * 3, 1, I))), flat(want_seq)):
                bad.append((k, j, "seq"))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad, bad[:10]


# ---- worker processes ----

_worker_models = None


def _init_worker(models):
    global _worker_models
    _worker_models = models


def _run_in_worker(seed):
    results = []
    run_script(_worker_models, seed, CALLS_PER_PROCESS_SCRIPT, lambda i, r: results.append(r))
    return results


def test_models_pickled_into_worker_processes():
    models = build_models()
    seeds = [[11, k] for k in range(PROCESS_SCRIPTS)]
    want = serial_answers(models, seeds, CALLS_PER_PROCESS_SCRIPT)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx, initializer=_init_worker,
                             initargs=(models,)) as pool:
        got = list(pool.map(_run_in_worker, seeds))
    assert len(got) == PROCESS_SCRIPTS
    for k in range(PROCESS_SCRIPTS):
        assert len(got[k]) == CALLS_PER_PROCESS_SCRIPT
        bad = [i for i in range(CALLS_PER_PROCESS_SCRIPT) if not same(got[k][i], want[k][i])]
        assert not bad, (k, bad[:10])
