"""The peephole LSTM in PyTorch ops, straight from SPEC.md's equations: PyTorch ships no module for
it, so this is what a PyTorch user would write (and the PyTorch column of the peephole rows).

Parameter names as fastcell's cell: weight_ih (4H, I), weight_hh (4H, H), weight_ph (3, H) with
rows p_i, p_f, p_o, bias_ih, bias_hh (4H,). Gate blocks i, f, g, o as nn.LSTM.
"""

import torch
from torch import nn


class PeepholeLSTMCell(nn.Module):
    """Called like nn.LSTMCell: (x (B, I), (h, c)) -> (h', c')."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        H = hidden_size
        self.input_size, self.hidden_size = input_size, H
        self.weight_ih = nn.Parameter(torch.empty(4 * H, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * H, H))
        self.weight_ph = nn.Parameter(torch.empty(3, H))
        self.bias_ih = nn.Parameter(torch.empty(4 * H))
        self.bias_hh = nn.Parameter(torch.empty(4 * H))

    def gates_step(self, gates, c):
        """gates = W_ih x + b_ih + W_hh h + b_hh (B, 4H); returns (h', c')."""
        gi, gf, gg, go = gates.chunk(4, dim=-1)
        p_i, p_f, p_o = self.weight_ph
        i = torch.sigmoid(gi + p_i * c)
        f = torch.sigmoid(gf + p_f * c)
        c_t = f * c + i * torch.tanh(gg)
        o = torch.sigmoid(go + p_o * c_t)
        return o * torch.tanh(c_t), c_t

    def forward(self, x, hx):
        h, c = hx
        gates = torch.addmm(self.bias_ih + self.bias_hh, x, self.weight_ih.t())
        gates = torch.addmm(gates, h, self.weight_hh.t())
        return self.gates_step(gates, c)


class PeepholeLSTM(PeepholeLSTMCell):
    """Called like a one-layer nn.LSTM: (x (T, B, I), (h0, c0) (1, B, H)) -> (y, (h_n, c_n)).

    The input projection of the whole sequence is one matmul (as nn.LSTM does); the time loop is
    Python, which is the best eager PyTorch offers for a cell it does not ship.
    """

    def forward(self, x, hx):
        h, c = hx[0][0], hx[1][0]
        G = torch.addmm(self.bias_ih + self.bias_hh, x.reshape(-1, x.shape[-1]),
                        self.weight_ih.t()).view(x.shape[0], x.shape[1], -1)
        w_hh_t = self.weight_hh.t()
        ys = []
        for t in range(x.shape[0]):
            h, c = self.gates_step(torch.addmm(G[t], h, w_hh_t), c)
            ys.append(h)
        return torch.stack(ys), (h[None], c[None])
