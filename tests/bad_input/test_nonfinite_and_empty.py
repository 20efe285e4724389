"""NaN and Inf in inputs and states propagate as in PyTorch (layers with and without lengths,
cells, the streaming step); a sequence of length 0 is refused as PyTorch refuses it; a batch of 0
gives PyTorch's shapes."""

import numpy as np
import pytest

from conftest import TOL
from helpers import (LAYERS, B, H, I, P, T, cell_of, cell_state, cell_variants, dtypes, exp, flat,
                     layer_hx)


def torch_module():
    return pytest.importorskip("torch")


def hostile_values(x, dtype):
    """NaN, +-Inf and a huge finite value scattered over x (T, B, I)."""
    x = x.copy()
    x[2, 0, 1] = np.nan
    x[3, 1, 0] = np.inf
    x[4, 2, :] = -np.inf
    x[0, 3, 2], x[0, 3, 0] = np.inf, -np.inf  # +Inf and -Inf in one row: NaN gates
    x[5, 4, 0] = 1e30 if dtype == np.float32 else 1e300
    return x


def assert_same_nonfinite(got, want, dtype):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    fin = np.isfinite(want)
    tol = TOL[dtype] * np.maximum(1.0, np.abs(want[fin]))
    assert np.all(np.abs(got[fin] - want[fin]) <= tol)


TORCH_LAYERS = {"rnn": ("RNN", {}), "rnn_relu": ("RNN", {"nonlinearity": "relu"}), "gru": ("GRU", {}),
                "lstm": ("LSTM", {}), "lstm_proj": ("LSTM", {"proj_size": P})}


def torch_pair(kind, dtype, **kw):
    torch = torch_module()
    name, extra = TORCH_LAYERS[kind]
    torch.manual_seed(0)
    tdt = torch.float32 if dtype == np.float32 else torch.float64
    tm = getattr(torch.nn, name)(I, H, dtype=tdt, **extra, **kw)
    fm = LAYERS[kind][0](I, H, dtype=dtype, **extra, **kw)
    fm.load_state_dict(tm.state_dict())
    return tm, fm


@pytest.mark.parametrize("kind", list(TORCH_LAYERS))
@dtypes
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_nan_inf_propagate_like_torch_layers(kind, dtype, bidirectional, with_state):
    torch = torch_module()
    tm, fm = torch_pair(kind, dtype, num_layers=2, bidirectional=bidirectional)
    rng = np.random.default_rng(11)
    x = hostile_values(rng.standard_normal((7, 5, I)).astype(dtype), dtype)
    hx = None
    if with_state:
        hx = layer_hx(fm, 5, rng)
        h = hx[0] if isinstance(hx, tuple) else hx
        h[0, 0, 0], h[-1, 1, 1], h[0, 2, 0] = np.inf, np.nan, -np.inf
        if isinstance(hx, tuple):
            hx[1][0, 3, 1], hx[1][-1, 4, 2] = np.nan, np.inf
    thx = None if hx is None else (tuple(map(torch.from_numpy, hx)) if isinstance(hx, tuple)
                                   else torch.from_numpy(hx))
    with torch.no_grad():
        ty, th = tm(torch.from_numpy(x), thx)
    fy, fh = fm(x, hx)
    assert np.isnan(ty.numpy()).any()
    assert_same_nonfinite(fy, ty.numpy(), dtype)
    for a, b in zip(flat(fh), flat(th)):
        assert_same_nonfinite(a, b.numpy(), dtype)
    if not bidirectional:
        # The streaming path: step by step gives the same NaN/Inf pattern.
        state = fm.new_state(5)
        if hx is not None:
            state.h[...] = flat(hx)[0]
            if state.c is not None:
                state.c[...] = hx[1]
        steps = np.stack([fm.step(x_t, state) for x_t in x])
        assert_same_nonfinite(steps, ty.numpy(), dtype)


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
@dtypes
def test_nan_inf_with_lengths_like_torch(kind, dtype):
    torch = torch_module()
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    tm, fm = torch_pair(kind, dtype, bidirectional=True)
    x = hostile_values(np.random.default_rng(12).standard_normal((7, 5, I)).astype(dtype), dtype)
    lengths = np.array([7, 3, 5, 1, 6])
    with torch.no_grad():
        packed = pack_padded_sequence(torch.from_numpy(x), torch.from_numpy(lengths), enforce_sorted=False)
        ty, th = tm(packed)
        ty, _ = pad_packed_sequence(ty)
    fy, fh = fm(x, None, lengths)
    assert_same_nonfinite(fy, ty.numpy(), dtype)
    for a, b in zip(flat(fh), flat(th)):
        assert_same_nonfinite(a, b.numpy(), dtype)


def torch_cell_step(variant, w, dtype):
    """One step of the PyTorch cell (nn.*Cell, or tests/torch_reference.py for the two cells nn
    lacks) on the cell's weights."""
    torch = torch_module()
    from torch_reference import gru_reset_before_cell, peephole_lstm_cell

    tw = {k: torch.from_numpy(np.array(v)) for k, v in w.items()}
    if variant == "peephole_lstm":
        return lambda x, s: peephole_lstm_cell(x, *s, **tw)
    if variant == "gru_reset_before":
        return lambda x, s: gru_reset_before_cell(x, s, **tw)
    cls = {"rnn_tanh": torch.nn.RNNCell, "rnn_relu": torch.nn.RNNCell, "gru": torch.nn.GRUCell,
           "lstm": torch.nn.LSTMCell}[variant]
    kw = {"nonlinearity": "relu"} if variant == "rnn_relu" else {}
    m = cls(I, H, dtype=torch.float32 if dtype == np.float32 else torch.float64, **kw)
    m.load_state_dict(tw)
    return lambda x, s: m(x, s)


@cell_variants
@dtypes
def test_nan_inf_propagate_like_torch_cells(variant, dtype):
    torch = torch_module()
    cell = cell_of(variant, dtype)
    rng = np.random.default_rng(13)
    xs = hostile_values(rng.standard_normal((7, 5, I)).astype(dtype), dtype)
    s = cell_state(variant, 5, rng, dtype)
    h0 = s[0] if isinstance(s, tuple) else s
    h0[1, 0], h0[2, 1] = np.inf, np.nan
    step = torch_cell_step(variant, cell.state_dict(), dtype)
    ts = tuple(map(torch.from_numpy, s)) if isinstance(s, tuple) else torch.from_numpy(s)
    want = []
    with torch.no_grad():
        for x in xs:
            ts = step(torch.from_numpy(x), ts)
            want.append((ts[0] if isinstance(ts, tuple) else ts).numpy())
    want = np.stack(want)
    assert np.isnan(want).any()
    y, final = cell.run(xs, s)
    assert_same_nonfinite(y, want, dtype)
    for a, b in zip(flat(final), flat(ts)):
        assert_same_nonfinite(a, b.numpy(), dtype)
    # cell(x, hx) step by step, and the streaming state
    state, stream = s, cell.new_state(5)
    stream.h[0] = h0
    if stream.c is not None:
        stream.c[0] = s[1]
    for x, w in zip(xs, want):
        state = cell(x, state)
        assert_same_nonfinite(flat(state)[0], w, dtype)
        assert_same_nonfinite(cell.step(x, stream), w, dtype)


# =========================== T = 0 and B = 0 ===========================

@pytest.mark.parametrize("kind", list(TORCH_LAYERS))
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_empty_sequence_like_torch_layers(kind, bidirectional, batch_first):
    """T = 0: torch.nn raises ("Expected sequence length to be larger than 0"), so do we, with a
    ValueError naming x."""
    torch = torch_module()
    tm, fm = torch_pair(kind, np.float64, bidirectional=bidirectional, batch_first=batch_first)
    for shape in ((0, B, I), (0, I)):
        if batch_first and len(shape) == 3:
            shape = (B, 0, I)
        with pytest.raises(RuntimeError, match="larger than 0"):
            tm(torch.zeros(shape, dtype=torch.float64))
        with pytest.raises(ValueError, match=exp("x") + " expected a sequence length larger than 0"):
            fm(np.zeros(shape))
    with pytest.raises(ValueError, match=exp("x")):
        fm(np.zeros((B, 0, I) if batch_first else (0, B, I)), None, np.ones(B, int))


@pytest.mark.parametrize("kind", list(TORCH_LAYERS))
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_empty_batch_like_torch_layers(kind, bidirectional, batch_first, with_state):
    torch = torch_module()
    tm, fm = torch_pair(kind, np.float64, num_layers=2, bidirectional=bidirectional,
                        batch_first=batch_first)
    x = np.zeros((0, T, I) if batch_first else (T, 0, I))
    hx = layer_hx(fm, 0, np.random.default_rng(0)) if with_state else None
    thx = None if hx is None else (tuple(map(torch.from_numpy, hx)) if isinstance(hx, tuple)
                                   else torch.from_numpy(hx))
    with torch.no_grad():
        ty, th = tm(torch.from_numpy(x), thx)
    fy, fh = fm(x, hx)
    assert fy.shape == tuple(ty.shape) and fy.dtype == np.float64
    assert [a.shape for a in flat(fh)] == [tuple(b.shape) for b in flat(th)]
    # With lengths (torch: "Cannot pack empty tensors"): a result of the same shapes, or an
    # error naming lengths; never a crash.
    try:
        gy, gh = fm(x, hx, np.zeros(0, np.int64))
    except ValueError as e:
        assert str(e).startswith("lengths:")
    else:
        assert gy.shape == fy.shape and [a.shape for a in flat(gh)] == [a.shape for a in flat(fh)]


@cell_variants
def test_empty_batch_like_torch_cells(variant):
    torch = torch_module()
    cell = cell_of(variant)
    step = torch_cell_step(variant, cell.state_dict(), np.float64)
    s = cell_state(variant, 0, np.random.default_rng(0))
    ts = tuple(map(torch.from_numpy, s)) if isinstance(s, tuple) else torch.from_numpy(s)
    with torch.no_grad():
        want = step(torch.zeros((0, I), dtype=torch.float64), ts)
    got = cell(np.zeros((0, I)), s)
    assert [a.shape for a in flat(got)] == [tuple(b.shape) for b in flat(want)]
    y, final = cell.run(np.zeros((T, 0, I)), s)
    assert y.shape == (T, 0, H) and [a.shape for a in flat(final)] == [(0, H)] * len(flat(s))
    # A stream state holds at least one stream.
    with pytest.raises(ValueError, match=exp("batch")):
        cell.new_state(0)
