"""Every cell, step and sequence, against PyTorch and against fastcell.reference (docs/SPEC.md)."""

import numpy as np
import pytest

import fastcell
from fastcell import reference as ref
from fastcell.models.recurrence import LSTMRecurrence
from conftest import TOL, VARIANTS, init_weights, make_cell, max_abs, max_diff, torch_or_skip

DTYPES = [np.float32, np.float64]


def reference_step(variant, x, state, w):
    if variant.startswith("rnn"):
        return ref.rnn_cell(x, state, **w, **VARIANTS[variant][1])
    if variant.startswith("gru"):
        return ref.gru_cell(x, state, **w, **VARIANTS[variant][1])
    return ref.lstm_cell(x, *state, **w)


def random_state(rng, variant, batch_shape, hidden, dtype, zero=False):
    def s():
        a = rng.standard_normal(batch_shape + (hidden,)).astype(dtype)
        return a * 0 if zero else a
    return (s(), s()) if "lstm" in variant else s()


def close(got, want, dtype):
    """docs/SPEC.md's tolerance, as an absolute error for outputs of unit scale; relative beyond that
    (a relu RNN can integrate to magnitude 50, where one float32 ulp is 4e-6)."""
    scale = max(1.0, max_abs(want))
    return max_diff(got, want) <= TOL[dtype] * scale


# ---- against PyTorch ----

def torch_sequence(variant, weights, xs, state):
    """The same sequence through PyTorch: nn.RNN/GRU/LSTM, or the torch-op reference cells."""
    torch = torch_or_skip()
    import torch_reference as tref

    t = {k: torch.from_numpy(v) for k, v in weights.items()}
    x = torch.from_numpy(xs)
    st = tuple(torch.from_numpy(s) for s in state) if isinstance(state, tuple) else torch.from_numpy(state)
    with torch.no_grad():
        if variant in ("peephole_lstm", "gru_reset_before"):
            outs = []
            for xt in x:
                if variant == "peephole_lstm":
                    st = tref.peephole_lstm_cell(xt, *st, **t)
                    outs.append(st[0])
                else:
                    st = tref.gru_reset_before_cell(xt, st, **t)
                    outs.append(st)
            final = tuple(s.numpy() for s in st) if isinstance(st, tuple) else st.numpy()
            return torch.stack(outs).numpy(), final
        I, H = weights["weight_ih"].shape[1], weights["weight_hh"].shape[1]
        dtype = torch.float64 if xs.dtype == np.float64 else torch.float32
        proj = weights["weight_hr"].shape[0] if "weight_hr" in weights else 0
        if variant.startswith("rnn"):
            m = torch.nn.RNN(I, H, nonlinearity=VARIANTS[variant][1]["nonlinearity"], dtype=dtype)
        elif variant == "gru":
            m = torch.nn.GRU(I, H, dtype=dtype)
        else:
            m = torch.nn.LSTM(I, weights["weight_ih"].shape[0] // 4, proj_size=proj, dtype=dtype)
        m.load_state_dict({f"{k}_l0": v for k, v in t.items()})
        if isinstance(st, tuple):
            y, (h, c) = m(x, tuple(s[None] for s in st))
            return y.numpy(), (h[0].numpy(), c[0].numpy())
        y, h = m(x, st[None])
        return y.numpy(), h[0].numpy()


SEQ_T = [1, 7, 200, 1000]
SEQ_H = [1, 3, 17, 64, 257]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("H", SEQ_H)
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("T", SEQ_T)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sequence_matches_torch(variant, T, B, H, dtype, rng):
    gates = VARIANTS[variant][0]
    I = H + 2  # never equal to H
    w = init_weights(rng, gates, I, H, dtype, peephole=variant == "peephole_lstm")
    cell = make_cell(variant, w)
    xs = rng.standard_normal((T, B, I)).astype(dtype)
    state = random_state(rng, variant, (B,), H, dtype)
    want_y, want_state = torch_sequence(variant, w, xs, state)
    y, final = cell.run(xs, state)
    assert y.shape == (T, B, H) and y.dtype == dtype
    assert close(y, want_y, dtype)
    assert close(final, want_state, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("H,P", [(17, 5), (64, 63), (3, 1)])
def test_projected_lstm_sequence_matches_torch(H, P, dtype, rng):
    I, T, B = 11, 50, 3
    w = init_weights(rng, 4, I, H, dtype, proj_size=P)
    xs = rng.standard_normal((T, B, I)).astype(dtype)
    state = (rng.standard_normal((B, P)).astype(dtype), rng.standard_normal((B, H)).astype(dtype))
    want_y, (want_h, want_c) = torch_sequence("lstm", w, xs, state)
    rec = LSTMRecurrence(**w)
    h, c = state[0].copy(), state[1].copy()
    out = np.empty((T, B, P), dtype)
    rec.run(xs, h, c, out)
    assert close(out, want_y, dtype)
    assert close((h, c), (want_h, want_c), dtype)


TORCH_CELLS = {"rnn_tanh": "RNNCell", "rnn_relu": "RNNCell", "gru": "GRUCell", "lstm": "LSTMCell"}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("H", SEQ_H)
@pytest.mark.parametrize("batch", [(), (1,), (3,)], ids=["unbatched", "B1", "B3"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_step_matches_torch(variant, batch, H, dtype, rng):
    torch = torch_or_skip()
    import torch_reference as tref

    I = 2 * H + 1
    w = init_weights(rng, VARIANTS[variant][0], I, H, dtype, peephole=variant == "peephole_lstm")
    cell = make_cell(variant, w)
    x = rng.standard_normal(batch + (I,)).astype(dtype)
    state = random_state(rng, variant, batch, H, dtype)
    t = {k: torch.from_numpy(v) for k, v in w.items()}
    tx = torch.from_numpy(x)
    tstate = tuple(map(torch.from_numpy, state)) if isinstance(state, tuple) else torch.from_numpy(state)
    with torch.no_grad():
        if variant in TORCH_CELLS:
            kwargs = {"nonlinearity": VARIANTS[variant][1]["nonlinearity"]} if variant.startswith("rnn") else {}
            m = getattr(torch.nn, TORCH_CELLS[variant])(I, H, dtype=tx.dtype, **kwargs)
            m.load_state_dict(t)
            want = m(tx, tstate)
        elif variant == "peephole_lstm":
            want = tref.peephole_lstm_cell(tx, *tstate, **t)
        else:
            want = tref.gru_reset_before_cell(tx, tstate, **t)
    want = tuple(s.numpy() for s in want) if isinstance(want, tuple) else want.numpy()
    got = cell(x, state)
    assert type(got) is type(want)
    assert np.shape(got[0] if isinstance(got, tuple) else got) == batch + (H,)
    assert close(got, want, dtype)


# ---- against fastcell.reference ----

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("H", SEQ_H)
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sequence_matches_reference(variant, B, H, dtype, rng):
    T, I = 200, max(1, H - 1)
    w = init_weights(rng, VARIANTS[variant][0], I, H, dtype, peephole=variant == "peephole_lstm")
    cell = make_cell(variant, w)
    xs = rng.standard_normal((T, B, I)).astype(dtype)
    state = random_state(rng, variant, (B,), H, dtype)
    want_y, want_state = [], state
    for x in xs:
        want_state = reference_step(variant, x, want_state, w)
        want_y.append(want_state[0] if isinstance(want_state, tuple) else want_state)
    y, final = cell.run(xs, state)
    assert close(y, np.stack(want_y), dtype)
    assert close(final, want_state, dtype)
    # A step at a time follows the sequence kernel (to rounding: GEMV and GEMM sum differently).
    s = state
    for t in range(3):
        s = cell(xs[t], s)
        assert close(s[0] if isinstance(s, tuple) else s, y[t], dtype)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_no_bias_means_zero_bias(variant, rng):
    w = init_weights(rng, VARIANTS[variant][0], 4, 6, np.float64, peephole=variant == "peephole_lstm")
    no_bias = {k: v for k, v in w.items() if not k.startswith("bias")}
    zero_bias = dict(no_bias, bias_ih=np.zeros_like(w["bias_ih"]), bias_hh=np.zeros_like(w["bias_hh"]))
    xs = rng.standard_normal((9, 2, 4))
    a = make_cell(variant, no_bias).run(xs)
    b = make_cell(variant, zero_bias).run(xs)
    assert max_diff(a[0], b[0]) == 0
    assert max_diff(a[0], np.stack([y for y in _ref_outputs(variant, xs, no_bias)])) <= 1e-12


def _ref_outputs(variant, xs, w):
    H = w["weight_hh"].shape[1]
    z = np.zeros((xs.shape[1], H))
    s = (z, z) if "lstm" in variant else z
    for x in xs:
        s = reference_step(variant, x, s, w)
        yield s[0] if isinstance(s, tuple) else s


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_signed_zeros_match_torch(variant, dtype, rng):
    """Zero weights and signed zero inputs: every output zero has PyTorch's sign (tanh(+-0) is
    +-0)."""
    H, I, T, B = 17, 5, 3, 4
    w = {k: np.zeros_like(v) for k, v in init_weights(rng, VARIANTS[variant][0], I, H, dtype,
                                                      peephole=variant == "peephole_lstm").items()}
    xs = np.zeros((T, B, I), dtype)
    xs[:, 1::2] = -0.0
    zeros = np.zeros((B, H), dtype)
    zeros[::2] = -0.0                                  # rows 0, 2 start from -0, rows 1, 3 from +0
    state = (zeros, zeros.copy()) if "lstm" in variant else zeros
    want_y, _ = torch_sequence(variant, w, xs, state)
    y, _ = make_cell(variant, w).run(xs, state)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(np.signbit(y), np.signbit(want_y))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saturating_and_special_inputs_match_torch(variant, dtype, rng):
    """Large pre-activations exercise the activations' range reduction and saturation; +-inf and
    NaN propagate as in PyTorch."""
    H, I, T, B = 17, 5, 20, 3
    w = init_weights(rng, VARIANTS[variant][0], I, H, dtype, peephole=variant == "peephole_lstm")
    xs = (rng.standard_normal((T, B, I)) * 60).astype(dtype)
    xs[3, 1, 2] = np.inf
    xs[5, 2, 0] = np.nan
    xs[7, 0, 1] = -np.inf
    state = random_state(rng, variant, (B,), H, dtype)
    want_y, want_state = torch_sequence(variant, w, xs, state)
    y, final = make_cell(variant, w).run(xs, state)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(want_y))
    finite = np.isfinite(want_y)
    np.testing.assert_array_equal(np.isfinite(y), finite)
    assert np.max(np.abs(y[finite] - want_y[finite]), initial=0) <= 1e-5 * max(1, np.abs(want_y[finite]).max())
