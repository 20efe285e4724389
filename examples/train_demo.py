"""Trains the four models that `fastcell demo` runs, one per cell type, with PyTorch.

The task (fastcell.demo.TASK; after Hochreiter & Schmidhuber 1997): a stream of random values in
[-1, 1], one of them marked on a second input channel; after the last step, say the marked value
(right when within ±0.1). The lag is the number of steps from the marked value to the end. Each
model is one recurrent layer (hidden size 64) and a linear readout of its last h, trained on the
squared error: torch.nn.RNN (tanh), nn.GRU, nn.LSTM and fastcell.torch.PeepholeLSTM.

Every model gets the same budget and the same curriculum over the lag: training streams start with
lags of 5 and the longest lag grows each time the model gets 90% of a moving window right, up to
100; 7/8 of every training batch mixes all lags from 5 to that longest one (the moving window
counts these), and 1/8 is at the long lag, 100, from the start. Training streams are as long as
the test streams (105 steps). Every 100 steps the model is validated at the short and the long
lag; the best checkpoint is kept, and training stops early if both reach 100%. The vanilla RNN
learns the short lag but not the long one (it stalls in the curriculum); the gated cells learn
both.

Robust to rounded weights: `fastcell demo` also runs each model with its weight matrices rounded
to int8 (a step of about max |w_row| / 127) and to bf16 (8 significant bits), and its accuracy
must stay within a point of float32's. Models trained without care are fragile to such small
changes (earlier demo models, trained without the two measures below, lost up to 5 points with
int8 weights). So:

- weight noise: at every training step the loss and its gradient are taken with Gaussian noise
  added to W_ih and W_hh, of standard deviation WEIGHT_NOISE = 1% of each row's max |w| (about 4
  times int8's rounding error, and more than bf16's); the exact weights are put back before the
  optimizer step. The validation uses the exact weights.
- the streams at the long lag (AT_LONG_LAG): without them nothing trains what a model answers
  once the marked value is out of its reach, and the vanilla RNN's answer there moved by a few
  hundredths with int8 weights, enough to change the long-lag accuracy by a point or more.

Deterministic (fixed seeds, one torch thread per model): a rerun on the same machine and torch
version writes the same files (another CPU or torch version may round differently and train
slightly different models). The models train in two processes, one per core: 6 to 10 minutes
on 2 cores. Usage:

    python examples/train_demo.py [--out fastcell/demo_models] [--jobs 2] [--only lstm,gru]
"""

import argparse
import copy
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import torch
from torch import nn

import fastcell.torch
from fastcell import from_torch
from fastcell.demo import MODEL_NAMES, TASK, make_task, save_demo_model

HIDDEN = 64
BATCH = 256
LR = 3e-3
MAX_STEPS = 3000
VALIDATE_EVERY = 100
VALIDATION_SIZE = 500
PROMOTE_AT = 0.9      # moving training accuracy at which the curriculum's longest lag grows
DONE_AT = 1.0         # validation accuracy at both lags that ends training early
CLIP = 1.0
AT_LONG_LAG = 1 / 8   # share of each batch at the long lag, whatever the curriculum's longest lag
WEIGHT_NOISE = 0.01   # std of the noise added to W_ih and W_hh at each step, times max |w_row|
SEEDS = {"rnn": 1, "gru": 2, "lstm": 3, "peephole_lstm": 4}

LAYERS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM, "peephole_lstm": fastcell.torch.PeepholeLSTM}


class Model(nn.Module):
    """One recurrent layer and a linear readout of its final h."""

    def __init__(self, kind):
        super().__init__()
        self.rnn = LAYERS[kind](TASK["inputs"], HIDDEN)
        self.readout = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        _, state = self.rnn(x)
        h_n = state[0] if isinstance(state, tuple) else state
        return self.readout(h_n[-1])[:, 0]


def hits(pred, y):
    """The share of recalls within the task's tolerance."""
    return (np.abs(pred.detach().numpy() - y) < TASK["tolerance"]).mean().item()


def accuracy(model, x, y):
    with torch.no_grad():
        return hits(model(torch.from_numpy(x)), y)


def perturb(params, scale, gen):
    """Adds Gaussian noise to each weight matrix, of standard deviation ``scale`` times max |w| of
    each row; returns the weights as they were, for restore()."""
    clean = []
    with torch.no_grad():
        for p in params:
            clean.append(p.detach().clone())
            row_max = p.abs().amax(dim=1, keepdim=True)
            p.add_(torch.randn(p.shape, generator=gen) * (scale * row_max))
    return clean


def restore(params, clean):
    with torch.no_grad():
        for p, c in zip(params, clean):
            p.copy_(c)


def train(kind):
    """Trains one model; returns (its state_dict, a summary of the run)."""
    torch.set_num_threads(1)
    torch.manual_seed(SEEDS[kind])
    model = Model(kind)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    short, long_, T = TASK["short_lag"], TASK["long_lag"], TASK["seq_len"]
    val = {lag: make_task(VALIDATION_SIZE, lag, lag, T, seed=1000 + lag) for lag in (short, long_)}
    data_rng = np.random.default_rng(SEEDS[kind])
    noise_gen = torch.Generator().manual_seed(SEEDS[kind])
    noisy = [p for n, p in model.rnn.named_parameters() if n.startswith(("weight_ih", "weight_hh"))]
    n_long = round(BATCH * AT_LONG_LAG)
    n_curriculum = BATCH - n_long
    top, moving, best = short, 0.0, None
    t0 = time.perf_counter()
    for step in range(1, MAX_STEPS + 1):
        # n_curriculum streams at the curriculum's lags (the first of a full batch's), then n_long
        # at the long lag
        x, y = make_task(BATCH, short, top, T, seed=int(data_rng.integers(2**63)))
        x_long, y_long = make_task(n_long, long_, long_, T, seed=int(data_rng.integers(2**63)))
        x = np.concatenate([x[:, :n_curriculum], x_long], axis=1)
        y = np.concatenate([y[:n_curriculum], y_long])
        clean = perturb(noisy, WEIGHT_NOISE, noise_gen)
        pred = model(torch.from_numpy(x))
        loss = nn.functional.mse_loss(pred, torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        restore(noisy, clean)
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        moving = 0.9 * moving + 0.1 * hits(pred[:n_curriculum], y[:n_curriculum])
        if moving > PROMOTE_AT and top < long_:
            top, moving = min(long_, top + max(5, top // 5)), 0.0
        if step % VALIDATE_EVERY == 0:
            acc = {lag: accuracy(model, *val[lag]) for lag in val}
            score = (acc[short] + acc[long_]) / 2
            print(f"  {kind:>13} step {step:4d}  lags {short}..{top:<3d}  loss {loss.item():.4f}  "
                  f"val lag {short}: {acc[short]:.3f}  lag {long_}: {acc[long_]:.3f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if best is None or score > best[0]:
                best = (score, step, acc, copy.deepcopy(model.state_dict()))
            if top == long_ and min(acc.values()) >= DONE_AT:
                break
    score, best_step, acc, state = best
    summary = {"steps": step, "best_step": best_step, "seconds": round(time.perf_counter() - t0, 1),
               "val_short": acc[short], "val_long": acc[long_], "curriculum_top": top}
    return state, summary


def export(kind, state, summary, out_dir):
    model = Model(kind)
    model.load_state_dict(state)
    layer = from_torch(model.rnn)
    # Everything but the wall time, so that a rerun writes the same content.
    run = {k: v for k, v in summary.items() if k != "seconds"}
    task = dict(TASK, training={"hidden_size": HIDDEN, "batch": BATCH, "lr": LR, "seed": SEEDS[kind],
                                "at_long_lag": AT_LONG_LAG, "weight_noise": WEIGHT_NOISE, **run})
    # The layer as a fastcell weight file (KIND.safetensors), the readout and task beside it.
    return save_demo_model(os.path.join(out_dir, f"{kind}.safetensors"), layer, model.readout, task)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "fastcell", "demo_models"))
    p.add_argument("--jobs", type=int, default=2, help="models trained at once (one process each)")
    p.add_argument("--only", default=",".join(MODEL_NAMES), help="comma-separated cell types")
    args = p.parse_args(argv)
    kinds = [k for k in args.only.split(",") if k]
    unknown = set(kinds) - set(MODEL_NAMES)
    if unknown:
        p.error(f"unknown cell types {sorted(unknown)}; expected some of {MODEL_NAMES}")
    os.makedirs(args.out, exist_ok=True)
    # The slowest (the peephole LSTM, a Python time loop) first, so the two workers finish together.
    order = sorted(kinds, key=lambda k: k != "peephole_lstm")
    t0 = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            results = dict(zip(order, pool.map(train, order)))
    else:
        results = {k: train(k) for k in order}
    print()
    for kind in kinds:
        state, summary = results[kind]
        paths = export(kind, state, summary, args.out)
        print(f"{kind:>13}: {json.dumps(summary)} -> " + ", ".join(
            f"{os.path.normpath(p)} ({os.path.getsize(p) / 1024:.0f} KB)" for p in paths))
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
