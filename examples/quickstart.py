"""Run an LSTM cell with fastcell on random weights: one step, then a whole sequence."""

import numpy as np

import fastcell

rng = np.random.default_rng(0)
I, H, T = 8, 32, 100
k = 1 / np.sqrt(H)  # PyTorch's default initialisation
cell = fastcell.LSTMCell(
    weight_ih=rng.uniform(-k, k, (4 * H, I)).astype(np.float32),
    weight_hh=rng.uniform(-k, k, (4 * H, H)).astype(np.float32),
    bias_ih=rng.uniform(-k, k, 4 * H).astype(np.float32),
    bias_hh=rng.uniform(-k, k, 4 * H).astype(np.float32),
)
x = rng.standard_normal((T, I)).astype(np.float32)

h, c = cell(x[0])                      # one step from a zero state
outputs, (h_T, c_T) = cell.run(x)      # the whole sequence in one compiled call
print(cell)
print("first step  h[:4] =", np.round(h[:4], 4))
print("sequence    outputs", outputs.shape, "final h[:4] =", np.round(h_T[:4], 4))
assert np.allclose(outputs[0], h)
