"""Property tests: every cell variant against fastcell.reference (docs/SPEC.md) over random sizes,
dtypes, batch layouts, initial states and bias/no-bias, plus step-by-step versus whole-sequence.

Weights are drawn with NumPy from a Hypothesis-drawn seed (PyTorch's default initialisation,
conftest.init_weights); Hypothesis runs derandomized with a fixed example budget, so CI sees the
same examples every run.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastcell
from fastcell import reference as ref
from conftest import TOL, VARIANTS, init_weights, make_cell, max_abs, max_diff

SETTINGS = settings(
    max_examples=75,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def reference_run(variant, w, xs, state):
    """fastcell.reference in float64 on the (possibly float32) weights: the exact answer to within
    float64 rounding. xs (T, B, I), state (B, H) or a pair of them."""
    w64 = {k: v.astype(np.float64) for k, v in w.items()}
    xs = xs.astype(np.float64)
    if "lstm" in variant:
        state = tuple(s.astype(np.float64) for s in state)
        cell = ref.lstm_cell
    else:
        state = state.astype(np.float64)
        if variant.startswith("rnn"):
            cell, w64 = ref.rnn_cell, dict(w64, **VARIANTS[variant][1])
        else:
            cell, w64 = ref.gru_cell, dict(w64, **VARIANTS[variant][1])
    if len(xs) == 0:
        H = w["weight_hh"].shape[1]
        return np.zeros((0, xs.shape[1], H)), state
    return ref.run(cell, xs, state, **w64)


def assert_close(got, want, dtype, what):
    """docs/SPEC.md's tolerance, scaled by max(1, max|want|) as parity/test_cells.py's close()."""
    tol = TOL[dtype] * max(1.0, max_abs(want))
    diff = max_diff(got, want)
    assert diff <= tol, f"{what}: max abs diff {diff:.3g} > {tol:.3g}"


def squeeze_batch(state):
    return tuple(s[0] for s in state) if isinstance(state, tuple) else state[0]


def shapes(state):
    return tuple(s.shape for s in state) if isinstance(state, tuple) else state.shape


@st.composite
def cases(draw):
    """One random problem: sizes, dtype, layout, initial state, bias, and a NumPy seed."""
    return {
        "H": draw(st.integers(1, 40)),
        "I": draw(st.integers(1, 40)),
        # None: unbatched input (T, I) and states (H,).
        "B": draw(st.sampled_from([None, 1, 2, 3, 4])),
        "T": draw(st.integers(0, 60)),
        "dtype": draw(st.sampled_from([np.float32, np.float64])),
        "zero_state": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def build(variant, case):
    """The cell, its weights, inputs (T, B, I) and initial state (B, H) for one case."""
    H, I, T, dtype = case["H"], case["I"], case["T"], case["dtype"]
    B = case["B"] or 1
    rng = np.random.default_rng(case["seed"])
    w = init_weights(rng, VARIANTS[variant][0], I, H, dtype, peephole=variant == "peephole_lstm",
                     bias=case["bias"])
    xs = rng.standard_normal((T, B, I)).astype(dtype)

    def s():
        return np.zeros((B, H), dtype) if case["zero_state"] else rng.standard_normal((B, H)).astype(dtype)

    state = (s(), s()) if "lstm" in variant else s()
    return make_cell(variant, w), w, xs, state


@pytest.mark.parametrize("variant", list(VARIANTS))
@SETTINGS
@given(case=cases())
def test_run_matches_reference(variant, case):
    cell, w, xs, state = build(variant, case)
    dtype, H = case["dtype"], case["H"]
    want_y, want_state = reference_run(variant, w, xs, state)
    if case["B"] is None:  # unbatched: (T, I) in, (T, H) and (H,) states out
        y, final = cell.run(xs[:, 0], squeeze_batch(state))
        want_y, want_state = want_y[:, 0], squeeze_batch(want_state)
    else:
        y, final = cell.run(xs, state)
    assert y.dtype == dtype and y.shape == want_y.shape
    assert shapes(final) == shapes(want_state)
    assert all(s.dtype == dtype for s in (final if isinstance(final, tuple) else (final,)))
    assert_close(y, want_y, dtype, "outputs")
    assert_close(final, want_state, dtype, "final state")
    if case["T"] == 0:
        # No step taken: the initial state comes back exactly.
        assert max_diff(final, want_state) == 0
    else:
        h_final = final[0] if isinstance(final, tuple) else final
        np.testing.assert_array_equal(y[-1], h_final)


@pytest.mark.parametrize("variant", list(VARIANTS))
@SETTINGS
@given(case=cases())
def test_steps_match_run(variant, case):
    """cell(x_t, state) applied T times gives what cell.run(xs, state) gives, and the reference."""
    cell, w, xs, state = build(variant, case)
    dtype = case["dtype"]
    unbatched = case["B"] is None
    if unbatched:
        xs_in, s = xs[:, 0], squeeze_batch(state)
    else:
        xs_in, s = xs, state
    y, final = cell.run(xs_in, s)
    want_y, want_state = reference_run(variant, w, xs, state)
    if unbatched:
        want_y, want_state = want_y[:, 0], squeeze_batch(want_state)
    steps = []
    for x_t in xs_in:
        s = cell(x_t, s)
        assert shapes(s) == shapes(want_state)
        steps.append(s[0] if isinstance(s, tuple) else s)
    steps = np.stack(steps) if steps else np.zeros_like(y)
    # Step and sequence kernels may round differently (GEMV vs GEMM): compare with tolerance, each
    # against the other and the step path against the reference.
    assert_close(steps, y, dtype, "steps vs run outputs")
    assert_close(s, final, dtype, "steps vs run final state")
    assert_close(steps, want_y, dtype, "steps vs reference outputs")
    assert_close(s, want_state, dtype, "steps vs reference final state")


@pytest.mark.parametrize("variant", list(VARIANTS))
@settings(max_examples=15, deadline=None, derandomize=True, database=None)
@given(case=cases(), split=st.floats(0, 1))
def test_run_resumes_from_its_final_state(variant, case, split):
    """Running xs[:k] then xs[k:] from the returned state is running xs in one call."""
    cell, w, xs, state = build(variant, case)
    dtype = case["dtype"]
    k = int(round(split * case["T"]))
    y, final = cell.run(xs, state)
    y1, mid = cell.run(xs[:k], state)
    y2, final2 = cell.run(xs[k:], mid)
    assert_close(np.concatenate([y1, y2]), y, dtype, "outputs")
    assert_close(final2, final, dtype, "final state")


@pytest.mark.parametrize("variant", list(VARIANTS))
@settings(max_examples=15, deadline=None, derandomize=True, database=None)
@given(case=cases())
def test_unbatched_is_batch_of_one(variant, case):
    """(T, I) with (H,) states is exactly (T, 1, I) with (1, H) states, squeezed."""
    cell, w, xs, state = build(variant, dict(case, B=1))
    y1, final1 = cell.run(xs, state)
    y0, final0 = cell.run(xs[:, 0], squeeze_batch(state))
    np.testing.assert_array_equal(y0, y1[:, 0])
    assert max_diff(final0, squeeze_batch(final1)) == 0
    if case["T"]:
        s0 = cell(xs[0, 0], squeeze_batch(state))
        s1 = cell(xs[0], state)
        assert max_diff(s0, squeeze_batch(s1)) == 0
