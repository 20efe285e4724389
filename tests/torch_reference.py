"""The two cells PyTorch does not ship, in torch ops, to test fastcell against PyTorch arithmetic
where nn has no module: the peephole LSTM of fastcell.torch (which ships it to train with), and
the reset-before GRU, written here from docs/SPEC.md's equations (fastcell.torch has none)."""

import torch


def peephole_lstm_cell(x, h, c, weight_ih, weight_hh, weight_ph, bias_ih=None, bias_hh=None):
    """fastcell.torch's peephole step (the one copy of its equations in torch) on a raw x."""
    from fastcell.torch import peephole_lstm_cell as step

    gates_x = x @ weight_ih.T + (0 if bias_ih is None else bias_ih)
    return step(gates_x, h, c, weight_hh, weight_ph, bias_hh)


def gru_reset_before_cell(x, h, weight_ih, weight_hh, bias_ih=None, bias_hh=None):
    xr, xz, xn = (x @ weight_ih.T).chunk(3, dim=-1)
    w_hr, w_hz, w_hn = weight_hh.chunk(3, dim=0)
    b_ir = b_iz = b_in = b_hr = b_hz = b_hn = 0
    if bias_ih is not None:
        b_ir, b_iz, b_in = bias_ih.chunk(3)
        b_hr, b_hz, b_hn = bias_hh.chunk(3)
    r = torch.sigmoid(xr + b_ir + h @ w_hr.T + b_hr)
    z = torch.sigmoid(xz + b_iz + h @ w_hz.T + b_hz)
    n = torch.tanh(xn + b_in + (r * h) @ w_hn.T + b_hn)
    return (1 - z) * n + z * h
