"""The two cells PyTorch does not ship, written with torch ops straight from SPEC.md's equations,
to test fastcell against PyTorch arithmetic where nn has no module."""

import torch


def peephole_lstm_cell(x, h, c, weight_ih, weight_hh, weight_ph, bias_ih=None, bias_hh=None):
    gates = x @ weight_ih.T + h @ weight_hh.T
    if bias_ih is not None:
        gates = gates + bias_ih + bias_hh
    gi, gf, gg, go = gates.chunk(4, dim=-1)
    p_i, p_f, p_o = weight_ph
    i = torch.sigmoid(gi + p_i * c)
    f = torch.sigmoid(gf + p_f * c)
    c_t = f * c + i * torch.tanh(gg)
    o = torch.sigmoid(go + p_o * c_t)
    return o * torch.tanh(c_t), c_t


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
