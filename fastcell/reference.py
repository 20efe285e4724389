"""The equations of SPEC.md in plain NumPy: the executable spec every compiled path is tested against.

Written to be read, not to be fast. Every function takes PyTorch-layout weights (gate blocks as row
blocks in SPEC.md's order), a batch of inputs ``x`` of shape (B, I) and states of shape (B, H), and
computes in the dtype of its arguments. ``None`` biases mean zero.
"""

import numpy as np


def sigmoid(a):
    # 1 / (1 + exp(-a)) without overflow warnings for large |a|.
    e = np.exp(-np.abs(a))
    return np.where(a >= 0, 1 / (1 + e), e / (1 + e))


def _affine(x, weight, bias):
    y = x @ weight.T
    return y if bias is None else y + bias


def _blocks(a, n):
    return np.split(a, n, axis=-1)


def rnn_cell(x, h, weight_ih, weight_hh, bias_ih=None, bias_hh=None, nonlinearity="tanh"):
    """h_t = phi(W_ih x + b_ih + W_hh h + b_hh)."""
    a = _affine(x, weight_ih, bias_ih) + _affine(h, weight_hh, bias_hh)
    if nonlinearity == "tanh":
        return np.tanh(a)
    if nonlinearity == "relu":
        return np.maximum(a, 0) + a * 0  # a * 0 keeps NaN, as torch.relu does
    raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")


def gru_cell(x, h, weight_ih, weight_hh, bias_ih=None, bias_hh=None, reset_after=True):
    """Gate blocks r, z, n. reset_after: n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),
    else n = tanh(W_in x + b_in + W_hn (r * h) + b_hn). h_t = (1 - z) * n + z * h."""
    xr, xz, xn = _blocks(_affine(x, weight_ih, bias_ih), 3)
    w_hr, w_hz, w_hn = _blocks(weight_hh.T, 3)
    b_hr, b_hz, b_hn = (0, 0, 0) if bias_hh is None else _blocks(bias_hh, 3)
    r = sigmoid(xr + h @ w_hr + b_hr)
    z = sigmoid(xz + h @ w_hz + b_hz)
    if reset_after:
        n = np.tanh(xn + r * (h @ w_hn + b_hn))
    else:
        n = np.tanh(xn + (r * h) @ w_hn + b_hn)
    return (1 - z) * n + z * h


def lstm_cell(x, h, c, weight_ih, weight_hh, bias_ih=None, bias_hh=None, weight_hr=None,
              weight_ph=None):
    """Gate blocks i, f, g, o. Returns (h_t, c_t).

    weight_hr (P, H): PyTorch's projection, h_t = W_hr (o * tanh(c_t)).
    weight_ph (3, H): diagonal peepholes p_i, p_f, p_o; i and f see c_{t-1}, o sees c_t.
    """
    gi, gf, gg, go = _blocks(_affine(x, weight_ih, bias_ih) + _affine(h, weight_hh, bias_hh), 4)
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
        h_t = h_t @ weight_hr.T
    return h_t, c_t


def run(cell, xs, state, **weights):
    """Applies a cell function step by step over xs (T, B, I); returns (outputs (T, B, H_out), final state).

    ``state`` is h, or (h, c) for lstm_cell.
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
