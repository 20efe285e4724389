"""Long runs (issue 5, "Long runs"): a million streaming steps keep the resident memory flat and
leave the reference counts of the input, the output buffer and the state where they were; the
same for cell calls, layer calls, sequence calls, state creation and refused calls.

Memory is the process's resident set (/proc/self/statm), measured after a warm-up: growth must
stay under 1 MB. Each test prints its figures (pytest -s shows them).
"""

import gc
import os
import sys

import numpy as np
import pytest

import fastcell
from conftest import init_weights

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")

MB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss():
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def refcounts(*objs):
    return [sys.getrefcount(o) for o in objs]


def _under_asan():
    with open("/proc/self/maps") as f:
        return "libasan" in f.read()


# AddressSanitizer (tools/checked_build.sh) holds freed memory in a quarantine of up to 256 MB:
# there the resident set says nothing about leaks, so only the reference counts are checked.
UNDER_ASAN = _under_asan()


def check_flat(label, before, after):
    growth = after - before
    print(f"\n{label}: RSS {before / MB:.2f} MB -> {after / MB:.2f} MB, growth {growth / 1024:+.0f} kB")
    if not UNDER_ASAN:
        assert growth < MB, f"{label}: resident memory grew by {growth / 1024:.0f} kB"


def run_flat(label, fn, calls, warmup):
    """fn() `warmup` times, then `calls` times; the RSS must not grow by a MB in between."""
    for _ in range(warmup):
        fn()
    before = rss()
    for _ in range(calls):
        fn()
    check_flat(label, before, rss())


def test_a_million_steps_with_out():
    model = fastcell.GRU(4, 8)
    state = model.new_state()
    x = np.random.default_rng(0).standard_normal(4).astype(np.float32)
    out = np.empty(8, np.float32)
    h = state.h
    step = model.step
    for _ in range(10_000):
        step(x, state, out)
    counts = refcounts(x, out, state, h, model)
    h_id = id(state.h)
    before = rss()
    for _ in range(1_000_000):
        step(x, state, out)
    after = rss()
    assert refcounts(x, out, state, h, model) == counts  # names only: no temporaries held
    assert id(state.h) == h_id and state.h is h
    assert np.isfinite(out).all() and np.array_equal(out, state.h[-1, 0])
    check_flat("1,000,000 GRU(4, 8).step(x, state, out)", before, after)


@pytest.mark.parametrize("kind", ["rnn", "lstm_proj", "peephole_lstm"])
def test_steps_of_other_models(kind):
    """Without out (a new array per call), a batch of streams (the BLAS path), two layers."""
    model = {"rnn": lambda: fastcell.RNN(4, 8, nonlinearity="relu", dtype=np.float64),
             "lstm_proj": lambda: fastcell.LSTM(4, 16, num_layers=2, proj_size=4),
             "peephole_lstm": lambda: fastcell.PeepholeLSTM(4, 8, num_layers=2)}[kind]()
    state1, state4 = model.new_state(), model.new_state(4)
    x1 = np.ones(4, model.dtype) * 0.1
    x4 = np.ones((4, 4), model.dtype) * 0.1
    out4 = np.empty((4, model.output_size), model.dtype)
    counts = refcounts(x1, x4, out4, state1, state4, state1.h, state4.h)

    def calls():
        model.step(x1, state1)
        model.step(x4, state4, out4)

    run_flat(f"{kind}: 100,000 x (step without out, step of 4 streams into out)", calls, 100_000, 5_000)
    # Not inside the assert: pytest's assertion rewriting keeps temporaries (state1.h) alive.
    after = refcounts(x1, x4, out4, state1, state4, state1.h, state4.h)
    assert after == counts


@pytest.mark.parametrize("variant", ["rnn", "gru", "lstm", "peephole_lstm"])
def test_cell_calls(variant):
    rng = np.random.default_rng(1)
    gates = {"rnn": 1, "gru": 3, "lstm": 4, "peephole_lstm": 4}[variant]
    w = init_weights(rng, gates, 4, 8, np.float32, peephole=variant == "peephole_lstm")
    cell = {"rnn": fastcell.RNNCell, "gru": fastcell.GRUCell, "lstm": fastcell.LSTMCell,
            "peephole_lstm": fastcell.PeepholeLSTMCell}[variant](**w)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    xs = rng.standard_normal((5, 2, 4)).astype(np.float32)
    h = rng.standard_normal((2, 8)).astype(np.float32)
    c = rng.standard_normal((2, 8)).astype(np.float32)
    hx = (h, c) if "lstm" in variant else h
    counts = refcounts(x, xs, h, c, hx, cell)

    def calls():
        cell(x, hx)
        cell.run(xs, hx)

    run_flat(f"{variant} cell: 20,000 x (cell(x, hx), cell.run(xs, hx))", calls, 20_000, 2_000)
    after = refcounts(x, xs, h, c, hx, cell)
    assert after == counts


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_layer_calls(kind):
    cls = {"gru": fastcell.GRU, "lstm": fastcell.LSTM}[kind]
    layer = cls(4, 8, num_layers=2, bidirectional=True)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 3, 4)).astype(np.float32)
    h0 = rng.standard_normal((4, 3, 8)).astype(np.float32)
    c0 = rng.standard_normal((4, 3, 8)).astype(np.float32)
    hx = (h0, c0) if kind == "lstm" else h0
    lengths = np.array([6, 2, 4])
    counts = refcounts(x, h0, c0, hx, lengths, layer)

    def calls():
        layer(x)
        layer(x, hx, lengths)

    run_flat(f"{kind} layer: 20,000 x (layer(x), layer(x, hx, lengths))", calls, 20_000, 2_000)
    after = refcounts(x, h0, c0, hx, lengths, layer)
    assert after == counts


def test_new_states_are_freed():
    model = fastcell.LSTM(4, 64, num_layers=2)

    def calls():
        s = model.new_state(8)
        model.step(np.zeros((8, 4), np.float32), s)
        s.copy()

    run_flat("50,000 x (new_state(8), step, copy) of LSTM(4, 64, num_layers=2)", calls, 50_000, 2_000)


def test_refused_calls_leak_nothing():
    """Error paths: every refused call releases what it took."""
    layer = fastcell.GRU(4, 8)
    cell = fastcell.LSTMCell(*(init_weights(np.random.default_rng(3), 4, 4, 8, np.float64)[k]
                               for k in ("weight_ih", "weight_hh")))
    state = layer.new_state(2)
    bad_x = np.zeros((3, 4), np.float32)
    good_x = np.zeros((2, 4), np.float32)
    bad_out = np.zeros((2, 9), np.float32)
    bad_lengths = np.array([0, 5])
    xs = np.zeros((5, 2, 4))
    bad_hx = (np.zeros((2, 8)),)
    counts = refcounts(state, bad_x, good_x, bad_out, bad_lengths, xs, bad_hx)

    def calls():
        for fn in (lambda: layer.step(bad_x, state), lambda: layer.step(good_x, state, bad_out),
                   lambda: layer(xs, None, bad_lengths), lambda: cell.run(xs, bad_hx),
                   lambda: layer.new_state(0), lambda: layer.step(["a"], state)):
            try:
                fn()
            except (TypeError, ValueError):
                pass
            else:
                raise AssertionError("call was not refused")

    run_flat("20,000 x 6 refused calls", calls, 20_000, 2_000)
    after = refcounts(state, bad_x, good_x, bad_out, bad_lengths, xs, bad_hx)
    assert after == counts
