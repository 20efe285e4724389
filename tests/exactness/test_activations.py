"""The kernels' sigmoid and tanh (fastcell_c/activations.h: polynomial, no libm call, so the gate
loops vectorize) are within a few units in the last place of the correctly rounded values, in
float32 and float64, from tiny to saturated arguments; NaN propagates, infinities saturate.

They are read through the cells: an RNN cell with W_ih = 1 and W_hh = 0 gives h = tanh(x); a
reset-after GRU cell whose only weight feeds the update gate z, from h_0 = 1, gives
h = n + z (h_0 - n) with n = tanh(0) = 0, that is sigmoid(x)."""

import numpy as np
import pytest

import fastcell

ULPS = 3   # measured: 2 in both precisions


def arguments(dtype):
    n = 100_000
    x = np.concatenate([np.linspace(-30, 30, n), np.geomspace(1e-30, 30, n),
                        -np.geomspace(1e-30, 30, n), [0.0, -0.0, 1e-300, -1e-300, 700.0, -700.0]])
    return x.astype(dtype)


def kernel_tanh(x):
    one, zero = np.ones((1, 1), x.dtype), np.zeros((1, 1), x.dtype)
    return fastcell.RNNCell(one, zero)(x[:, None])[:, 0]


def kernel_sigmoid(x):
    cell = fastcell.GRUCell(np.array([[0], [1], [0]], x.dtype), np.zeros((3, 1), x.dtype))
    return cell(x[:, None], np.ones((len(x), 1), x.dtype))[:, 0]


def ulps(got, exact, dtype):
    want = exact.astype(dtype)
    step = np.spacing(np.abs(want)).astype(np.longdouble)
    return np.abs(got.astype(np.longdouble) - want.astype(np.longdouble)) / step


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_within_a_few_ulps_of_the_rounded_value(dtype):
    x = arguments(dtype)
    exact = x.astype(np.longdouble)
    assert ulps(kernel_tanh(x), np.tanh(exact), dtype).max() <= ULPS
    assert ulps(kernel_sigmoid(x), 1 / (1 + np.exp(-exact)), dtype).max() <= ULPS


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_nan_and_infinities(dtype):
    # (only tanh sees an infinity here: in the GRU, 0 * inf in the other gates' products is NaN)
    t = kernel_tanh(np.array([np.nan, np.inf, -np.inf], dtype))
    assert np.isnan(t[0]) and t[1] == 1 and t[2] == -1
    assert np.isnan(kernel_sigmoid(np.array([np.nan], dtype))[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_odd_and_monotone(dtype):
    y = np.linspace(0, 12, 50_001).astype(dtype)
    x = np.concatenate([-y[::-1], y])
    t, s = kernel_tanh(x), kernel_sigmoid(x)
    assert np.array_equal(t, -t[::-1])                      # tanh(-x) = -tanh(x), exactly
    assert np.all(np.diff(t) >= 0) and np.all(np.diff(s) >= 0)
