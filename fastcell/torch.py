"""The PyTorch twin of fastcell's peephole LSTM, to train peephole models and export them.

PyTorch ships no peephole LSTM, so fastcell ships this one: ``fastcell.torch.PeepholeLSTM`` (a
layer with ``torch.nn.LSTM``'s constructor, call and shapes) and ``fastcell.torch.PeepholeLSTMCell``
(``torch.nn.LSTMCell``'s). The parameter names are PyTorch's plus ``weight_ph_l{k}`` (3, H), the
diagonal peepholes p_i, p_f, p_o, so ``fastcell.from_torch(module)`` and
``fastcell.PeepholeLSTM.load_state_dict(module.state_dict())`` take them as they are.

The equations are docs/SPEC.md's: the input and forget gates see c_{t-1}, the output gate sees c_t.
This module is a readable training reference, not an engine: it loops over time in Python and
autograd differentiates through it. Importing it imports torch; ``import fastcell`` does not.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fastcell import spec
from fastcell.checks import as_int

__all__ = ["PeepholeLSTM", "PeepholeLSTMCell", "peephole_lstm_cell"]


def peephole_lstm_cell(gates_x, h, c, weight_hh, weight_ph, bias_hh=None):
    """One step. ``gates_x`` is W_ih x + b_ih (B, 4H), already computed; returns (h_t, c_t).

    Gate blocks i, f, g, o (docs/SPEC.md):
        i = σ(W_ii x + b_ii + W_hi h + b_hi + p_i ⊙ c_{t-1})
        f = σ(W_if x + b_if + W_hf h + b_hf + p_f ⊙ c_{t-1})
        g = tanh(W_ig x + b_ig + W_hg h + b_hg)
        c_t = f ⊙ c_{t-1} + i ⊙ g
        o = σ(W_io x + b_io + W_ho h + b_ho + p_o ⊙ c_t)
        h_t = o ⊙ tanh(c_t)
    """
    gi, gf, gg, go = (gates_x + F.linear(h, weight_hh, bias_hh)).chunk(4, dim=-1)
    p_i, p_f, p_o = weight_ph.unbind(0)
    i = torch.sigmoid(gi + p_i * c)
    f = torch.sigmoid(gf + p_f * c)
    c_t = f * c + i * torch.tanh(gg)
    o = torch.sigmoid(go + p_o * c_t)
    return o * torch.tanh(c_t), c_t


class PeepholeLSTMCell(nn.Module):
    """An LSTM cell with diagonal peepholes, called like ``torch.nn.LSTMCell``.

    Parameters: weight_ih (4H, I), weight_hh (4H, H), bias_ih (4H,), bias_hh (4H,) (gate blocks
    i, f, g, o) and weight_ph (3, H) (rows p_i, p_f, p_o), all initialised U(-1/√H, 1/√H).
    ``cell(input, hx=None) -> (h', c')``: input (B, I) or unbatched (I,); hx an (h, c) pair of
    (B, H) or (H,) tensors, None meaning zeros.
    """

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None):
        super().__init__()
        input_size = as_int(input_size, "input_size")
        hidden_size = as_int(hidden_size, "hidden_size")
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bool(bias)
        kw = {"device": device, "dtype": dtype}
        G, H = 4 * hidden_size, hidden_size
        self.weight_ih = nn.Parameter(torch.empty(G, input_size, **kw))
        self.weight_hh = nn.Parameter(torch.empty(G, H, **kw))
        if self.bias:
            self.bias_ih = nn.Parameter(torch.empty(G, **kw))
            self.bias_hh = nn.Parameter(torch.empty(G, **kw))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.weight_ph = nn.Parameter(torch.empty(3, H, **kw))
        self.reset_parameters()

    def reset_parameters(self):
        k = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -k, k)

    def extra_repr(self):
        return f"{self.input_size}, {self.hidden_size}" + ("" if self.bias else ", bias=False")

    def forward(self, input, hx=None):
        if input.dim() not in (1, 2) or input.shape[-1] != self.input_size:
            raise ValueError(f"PeepholeLSTMCell: expected input of shape (B, {self.input_size}) or "
                             f"({self.input_size},), got {tuple(input.shape)}")
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input
        if hx is None:
            zeros = x.new_zeros(x.shape[0], self.hidden_size)
            h, c = zeros, zeros
        else:
            h, c = hx
            want = (self.hidden_size,) if unbatched else (x.shape[0], self.hidden_size)
            for name, s in (("hx[0] (h)", h), ("hx[1] (c)", c)):
                if tuple(s.shape) != want:
                    raise ValueError(f"PeepholeLSTMCell: {name}: expected shape {want}, got {tuple(s.shape)}")
            if unbatched:
                h, c = h.unsqueeze(0), c.unsqueeze(0)
        h, c = peephole_lstm_cell(F.linear(x, self.weight_ih, self.bias_ih), h, c,
                                  self.weight_hh, self.weight_ph, self.bias_hh)
        return (h.squeeze(0), c.squeeze(0)) if unbatched else (h, c)


class PeepholeLSTM(nn.Module):
    """A peephole LSTM layer with ``torch.nn.LSTM``'s constructor, call and shapes.

    Parameters, for layer k and direction (suffix ``_reverse`` for the backward one):
    weight_ih_l{k} (4H, I or D·H), weight_hh_l{k} (4H, H), bias_ih_l{k} and bias_hh_l{k} (4H,),
    weight_ph_l{k} (3, H), all initialised U(-1/√H, 1/√H) as PyTorch does.

    ``output, (h_n, c_n) = lstm(input, hx=None)``: input (T, B, I), (B, T, I) with batch_first,
    unbatched (T, I), or a ``PackedSequence`` (the output is then a PackedSequence too, with the
    input's batch order; states past a sequence's length stay frozen and the backward direction
    starts at each sequence's last element, as nn.LSTM does). h_n and c_n are (D·L, B, H), index
    layer·D + direction; hx is an (h_0, c_0) pair of that shape, None meaning zeros.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 bidirectional=False, dtype=None, device=None):
        super().__init__()
        input_size = as_int(input_size, "input_size")
        hidden_size = as_int(hidden_size, "hidden_size")
        num_layers = as_int(num_layers, "num_layers")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.bidirectional = bool(bias), bool(batch_first), bool(bidirectional)
        kw = {"device": device, "dtype": dtype}
        D, G, H = self.num_directions, 4 * hidden_size, hidden_size
        for k in range(num_layers):
            layer_in = input_size if k == 0 else D * H
            for d in range(D):
                s = self._suffix(k, d)
                setattr(self, "weight_ih" + s, nn.Parameter(torch.empty(G, layer_in, **kw)))
                setattr(self, "weight_hh" + s, nn.Parameter(torch.empty(G, H, **kw)))
                if self.bias:
                    setattr(self, "bias_ih" + s, nn.Parameter(torch.empty(G, **kw)))
                    setattr(self, "bias_hh" + s, nn.Parameter(torch.empty(G, **kw)))
                setattr(self, "weight_ph" + s, nn.Parameter(torch.empty(3, H, **kw)))
        self.reset_parameters()

    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    @staticmethod
    def _suffix(k, d):
        return spec.suffix(k, d)

    def reset_parameters(self):
        k = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -k, k)

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        for name in ("bias", "batch_first", "bidirectional"):
            default = name == "bias"
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return s

    def _weights(self, k, d):
        s = self._suffix(k, d)
        get = lambda n: getattr(self, n + s, None)  # noqa: E731
        return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"), get("weight_ph")

    # -- the call --

    def forward(self, input, hx=None):
        packed = isinstance(input, PackedSequence)
        if packed:
            x, lengths = pad_packed_sequence(input)  # (T, B, I) in the caller's batch order
            unbatched = False
        else:
            x, lengths = input, None
            if x.dim() not in (2, 3):
                raise ValueError(f"PeepholeLSTM: expected a 2-D (unbatched) or 3-D input, got "
                                 f"shape {tuple(x.shape)}")
            unbatched = x.dim() == 2
            if unbatched:
                x = x.unsqueeze(1)
            elif self.batch_first:
                x = x.transpose(0, 1)
        if x.shape[-1] != self.input_size:
            raise ValueError(f"PeepholeLSTM: expected input.size(-1) == {self.input_size}, got "
                             f"{x.shape[-1]}")
        T, B = x.shape[:2]
        h0, c0 = self._initial_states(hx, x, B, unbatched)
        mask = None
        if lengths is not None:  # (T, B, 1): True where step t is inside sequence b
            steps = torch.arange(T, device=x.device)[:, None]
            mask = (steps < lengths.to(x.device)[None, :]).unsqueeze(-1)
        D = self.num_directions
        layer_input, h_n, c_n = x, [], []
        for k in range(self.num_layers):
            outs = []
            for d in range(D):
                i = k * D + d
                out, h, c = self._direction(layer_input, h0[i], c0[i], self._weights(k, d),
                                            reverse=d == 1, mask=mask)
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            layer_input = outs[0] if D == 1 else torch.cat(outs, dim=-1)
        output, h_n, c_n = layer_input, torch.stack(h_n), torch.stack(c_n)
        if packed:
            return self._repack(output, lengths, input), (h_n, c_n)
        if unbatched:
            return output.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)

    def _initial_states(self, hx, x, B, unbatched):
        n = self.num_layers * self.num_directions
        if hx is None:
            zeros = x.new_zeros(n, B, self.hidden_size)
            return zeros, zeros
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(f"PeepholeLSTM: hx: expected an (h_0, c_0) pair, got {type(hx).__name__}")
        want = (n, self.hidden_size) if unbatched else (n, B, self.hidden_size)
        states = []
        for name, s in zip(("h_0", "c_0"), hx):
            if tuple(s.shape) != want:
                raise ValueError(f"PeepholeLSTM: {name}: expected shape {want}, got {tuple(s.shape)}")
            states.append(s.unsqueeze(1) if unbatched else s)
        return states

    @staticmethod
    def _direction(x, h, c, weights, reverse, mask):
        """One layer, one direction over x (T, B, I): returns (output (T, B, H), h_T, c_T).

        With a mask, a sequence's state is frozen past its length and its outputs there are zero;
        the backward direction therefore starts, from h_0, at each sequence's last element."""
        w_ih, w_hh, b_ih, b_hh, w_ph = weights
        # The input projection of the whole sequence at once, split into steps once: indexing it
        # per step would make autograd build a zero-filled (T, B, 4H) gradient for every step.
        gates_x = F.linear(x, w_ih, b_ih).unbind(0)
        T = x.shape[0]
        outputs = [None] * T
        for t in (range(T - 1, -1, -1) if reverse else range(T)):
            h_t, c_t = peephole_lstm_cell(gates_x[t], h, c, w_hh, w_ph, b_hh)
            if mask is None:
                h, c = h_t, c_t
                outputs[t] = h_t
            else:
                m = mask[t]
                h, c = torch.where(m, h_t, h), torch.where(m, c_t, c)
                outputs[t] = torch.where(m, h_t, torch.zeros_like(h_t))
        return torch.stack(outputs), h, c

    @staticmethod
    def _repack(output, lengths, like):
        """output (T, B, ·) in the caller's batch order -> a PackedSequence laid out as ``like``."""
        if like.sorted_indices is not None:
            output = output.index_select(1, like.sorted_indices)
            lengths = lengths.index_select(0, like.sorted_indices.to(lengths.device))
        data = pack_padded_sequence(output, lengths, enforce_sorted=True).data
        return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)
