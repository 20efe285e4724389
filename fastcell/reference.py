"""The equations of docs/SPEC.md in plain NumPy: the executable spec every compiled path is tested against.

Written to be read, not to be fast. Every function takes PyTorch-layout weights (gate blocks as row
blocks in docs/SPEC.md's order), a batch of inputs ``x`` of shape (B, I) and states of shape (B, H), and
computes in the dtype of its arguments. ``None`` biases mean zero.

The weight matrices may also be ``fastcell.formats.reduced.Reduced`` (int8, bf16): the reference then
computes what the kernels compute with them (``matmul``): bf16 weights are their float values;
int8 products quantize each row of their activations as the kernels do (fastcell_c/products_int8.h),
``input_bits`` for a layer's input x (16, the default, or 8: a model quantized with that
``input_bits``) and 8 bits for h, r * h and the projection's input, and sum exactly.
"""

import numpy as np

from fastcell.formats.reduced import Reduced

INPUT_BITS = 16   # int8 products: activation bits of x (a layer's input), by default
HIDDEN_BITS = 8   # ... of h, r * h (reset-before GRU) and o * tanh(c) (LSTM projection)


def sigmoid(a):
    # 1 / (1 + exp(-a)) without overflow warnings for large |a|.
    e = np.exp(-np.abs(a))
    return np.where(a >= 0, 1 / (1 + e), e / (1 + e))


def quantize_rows(a, bits):
    """The kernels' quantization of a (B, k) block of activations, row by row, in float32 as they
    do it: amax over the finite values, lim = 2^(bits-1) - 1, q = rint(clip(a * (lim / amax)))
    with non-finite values 0, s = amax / lim; a row with amax < 1e-30 is all zeros (s = 0).
    Returns q (float64, exact integers) and s (float32) per row."""
    a = np.asarray(a, dtype=np.float32)
    lim = np.float32(2 ** (bits - 1) - 1)
    finite = np.isfinite(a)
    amax = np.where(finite, np.abs(a), np.float32(0)).max(axis=-1)
    zero = amax < np.float32(1e-30)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.where(zero, np.float32(0), lim / np.where(zero, np.float32(1), amax))
        scale = np.where(zero, np.float32(0), amax / lim).astype(np.float32)
        v = np.where(finite, a * inv[..., None].astype(np.float32), np.float32(0))
    q = np.rint(np.clip(v, -lim, lim))
    return q.astype(np.float64), scale


def matmul(a, weight, bits):
    """a @ weight.T for a float weight, or as the kernels compute it for a Reduced one: bf16 by its
    float values; int8 as exact integer sums of quantize_rows(a, bits) and the int8 weights, times
    (weight scale * activation scale), and each non-finite a_j adding a_j times its dequantized
    column (NaN and infinities spread as in float)."""
    if not isinstance(weight, Reduced):
        return a @ weight.T
    if weight.format == "bf16":
        return (a.astype(np.float64) @ weight.dequantize().astype(np.float64).T).astype(np.float32)
    q, s = quantize_rows(a, bits)
    t = (q @ weight.data.astype(np.float64).T).astype(np.float32)
    y = t * (weight.scale * s[..., None])
    bad = ~np.isfinite(np.asarray(a, dtype=np.float32))
    if bad.any():
        w = weight.dequantize()
        for *i, j in zip(*np.nonzero(bad)):
            y[tuple(i)] = y[tuple(i)] + np.float32(a[(*i, j)]) * w[:, j]
    return y


def _affine(x, weight, bias, bits=HIDDEN_BITS):
    y = matmul(x, weight, bits)
    return y if bias is None else y + bias


def _rows(weight, start, stop):
    """Rows [start, stop) of a weight matrix, float or Reduced."""
    if isinstance(weight, Reduced):
        scale = None if weight.scale is None else weight.scale[start:stop]
        return Reduced(weight.format, weight.data[start:stop], scale)
    return weight[start:stop]


def _blocks(a, n):
    return np.split(a, n, axis=-1)


def rnn_cell(x, h, weight_ih, weight_hh, bias_ih=None, bias_hh=None, nonlinearity="tanh",
             input_bits=INPUT_BITS):
    """h_t = phi(W_ih x + b_ih + W_hh h + b_hh)."""
    a = _affine(x, weight_ih, bias_ih, input_bits) + _affine(h, weight_hh, bias_hh)
    if nonlinearity == "tanh":
        return np.tanh(a)
    if nonlinearity == "relu":
        return np.maximum(a, 0) + a * 0  # a * 0 keeps NaN, as torch.relu does
    raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")


def gru_cell(x, h, weight_ih, weight_hh, bias_ih=None, bias_hh=None, reset_after=True,
             input_bits=INPUT_BITS):
    """Gate blocks r, z, n. reset_after: n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),
    else n = tanh(W_in x + b_in + W_hn (r * h) + b_hn). h_t = (1 - z) * n + z * h."""
    xr, xz, xn = _blocks(_affine(x, weight_ih, bias_ih, input_bits), 3)
    H = h.shape[-1]
    b_rz, b_hn = (None, None) if bias_hh is None else (bias_hh[:2 * H], bias_hh[2 * H:])
    if reset_after:
        hr, hz, hn = _blocks(_affine(h, weight_hh, bias_hh), 3)
    else:  # n's product is over r * h: W_hh's r, z rows and its n rows are multiplied apart
        hr, hz = _blocks(_affine(h, _rows(weight_hh, 0, 2 * H), b_rz), 2)
    r = sigmoid(xr + hr)
    z = sigmoid(xz + hz)
    if reset_after:
        n = np.tanh(xn + r * hn)
    else:
        n = np.tanh(xn + _affine(r * h, _rows(weight_hh, 2 * H, 3 * H), b_hn))
    return (1 - z) * n + z * h


def lstm_cell(x, h, c, weight_ih, weight_hh, bias_ih=None, bias_hh=None, weight_hr=None,
              weight_ph=None, input_bits=INPUT_BITS):
    """Gate blocks i, f, g, o. Returns (h_t, c_t).

    weight_hr (P, H): PyTorch's projection, h_t = W_hr (o * tanh(c_t)).
    weight_ph (3, H): diagonal peepholes p_i, p_f, p_o; i and f see c_{t-1}, o sees c_t.
    input_bits: an int8 W_ih's activation bits (a float or bf16 one ignores it).
    """
    gi, gf, gg, go = _blocks(_affine(x, weight_ih, bias_ih, input_bits)
                             + _affine(h, weight_hh, bias_hh), 4)
    if weight_ph is not None:
        p_i, p_f, p_o = weight_ph
        gi = gi + p_i * c
        gf = gf + p_f * c
    i, f, g = sigmoid(gi), sigmoid(gf), np.tanh(gg)
    c_t = f * c + i * g
    if weight_ph is not None:
        go = go + p_o * c_t
    h_t = sigmoid(go) * np.tanh(c_t)
    if weight_hr is not None:
        h_t = matmul(h_t, weight_hr, HIDDEN_BITS)
    return h_t, c_t


def run(cell, xs, state, **weights):
    """Applies a cell function step by step over xs (T, B, I); returns (outputs (T, B, H_out), final state).

    ``state`` is h, or (h, c) for lstm_cell; ``weights`` may hold the cell's input_bits too.
    """
    outputs = []
    for x in xs:
        if cell is lstm_cell:
            state = cell(x, *state, **weights)
            outputs.append(state[0])
        else:
            state = cell(x, state, **weights)
            outputs.append(state)
    return np.stack(outputs), state
