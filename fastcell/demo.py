"""``fastcell demo``: four small trained models, one per cell type, on a long-range memory task.

The task (recalling a marked value after a lag, after Hochreiter & Schmidhuber 1997): a stream of
random values in [-1, 1], one of them marked on a second input channel; after the last step the
model must say the marked value. The lag is the number of steps from the marked value to the end;
a recall counts as right within ±0.1 of the value (a model that always answers 0 scores 10%). At a
short lag every cell learns it; at a long lag the vanilla RNN has mostly lost the value (vanishing
gradients: it cannot learn to keep it through the noise of the later inputs) while the gated
cells keep it.

The models were trained with PyTorch by ``examples/train_demo.py`` (with weight noise, so that
their accuracy survives rounded weights) and are bundled in ``fastcell/demo_models/``: each
recurrent layer is an ordinary fastcell weight file (NAME.safetensors, written by fastcell.save),
its linear readout and the task parameters plain arrays beside it (NAME.readout.npz). The demo runs
them with fastcell alone. It also runs each model with its weight matrices reduced to int8 and to
bf16 (``fastcell.quantize`` of the float32 model) and reports their accuracy beside float32's, how
far their outputs move from float32's, and the weight bytes each format keeps. With PyTorch
installed it also times PyTorch on the same models and reports the largest difference between the
two.
"""

import os
import sys
import textwrap
import time
from importlib import resources

import numpy as np

import fastcell

MODEL_NAMES = ("rnn", "gru", "lstm", "peephole_lstm")
TITLES = {"rnn": "RNN (tanh)", "gru": "GRU", "lstm": "LSTM", "peephole_lstm": "LSTM + peepholes"}

# The task, shared by the training script and the demo.
TASK = {
    "name": "marked_value_recall",
    "inputs": 2,          # channel 0: a value uniform in [-1, 1] per step; channel 1: the marker
    "short_lag": 5,
    "long_lag": 100,
    "seq_len": 105,       # every test stream has long_lag + 5 steps, whatever the lag
    "tolerance": 0.1,     # a recall is right within this of the marked value
}
TEST_SIZE, TEST_SEED = 500, 20240501  # the demo's test streams, per lag
REDUCED_FORMATS = ("int8", "bf16")  # the weight formats the demo runs beside float32
WIDTH = 100  # the printed lines fit this many columns


def make_task(n, lag_min, lag_max, seq_len, seed):
    """``n`` streams of ``seq_len`` random values in [-1, 1] (input channel 0), each with one
    value marked (channel 1 set to 1) ``lag`` steps before the last step, lag uniform in
    [lag_min, lag_max].

    Returns x (seq_len, n, 2) float32, time-major, and the marked values y (n,) float32.
    """
    if not 0 <= lag_min <= lag_max < seq_len:
        raise ValueError(f"expected 0 <= lag_min <= lag_max < seq_len, got {lag_min}, {lag_max}, {seq_len}")
    rng = np.random.default_rng(seed)
    x = np.zeros((seq_len, n, 2), np.float32)
    x[:, :, 0] = rng.uniform(-1, 1, (seq_len, n))
    pos = seq_len - 1 - rng.integers(lag_min, lag_max + 1, size=n)
    x[pos, np.arange(n), 1] = 1
    return x, x[pos, np.arange(n), 0].copy()


def test_set(lag, task=TASK):
    """The demo's fixed test streams at one lag (never seen in training)."""
    return make_task(TEST_SIZE, lag, lag, task["seq_len"], TEST_SEED + lag)


# ---- the bundle: one place to change its format ----
#
# A demo model is two files side by side:
#   NAME.safetensors   the recurrent layer, an ordinary fastcell weight file (fastcell.save): it
#                      opens with fastcell.load, `fastcell info` and `fastcell run`
#   NAME.readout.npz   plain arrays only (np.load(..., allow_pickle=False)): readout.weight (K, H)
#                      and readout.bias (K,) of the linear readout of the last h, and the task
#                      parameters, one 0-d number or string per "task.KEY" ("task.training.KEY"
#                      for the nested training summary)

WEIGHTS_SUFFIX, READOUT_SUFFIX = ".safetensors", ".readout.npz"


def readout_path(path):
    """The readout file that goes with the demo model's weight file ``path`` (NAME.safetensors ->
    NAME.readout.npz)."""
    path = os.fspath(path)
    if not path.endswith(WEIGHTS_SUFFIX):
        raise ValueError(f"a demo model's weight file ends in {WEIGHTS_SUFFIX}, got {path!r}")
    return path[: -len(WEIGHTS_SUFFIX)] + READOUT_SUFFIX


def save_demo_model(path, layer, readout, task):
    """Writes a demo model: the fastcell layer to ``path`` (NAME.safetensors, with fastcell.save),
    its linear readout (``{"weight": (K, H), "bias": (K,)}`` arrays, or anything with those
    attributes, e.g. an nn.Linear) and the task parameters (a dict of numbers, strings, booleans
    and dicts of those) to NAME.readout.npz beside it. Returns the two paths."""
    from fastcell.io.weights_file import save

    arrays = {}
    for name in ("weight", "bias"):
        v = readout[name] if isinstance(readout, dict) else getattr(readout, name)
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        arrays["readout." + name] = np.ascontiguousarray(v, dtype=layer.dtype)
    _check_readout(layer, arrays["readout.weight"], arrays["readout.bias"])
    arrays.update(_flatten_task(task, "task"))
    extra = readout_path(path)
    save(layer, path)
    with open(extra, "wb") as f:
        np.savez(f, **arrays)
    return os.fspath(path), extra


def load_demo_model(path, readout=None):
    """(layer, readout_weight, readout_bias, task) from the files save_demo_model wrote; ``path``
    is the NAME.safetensors file, read with fastcell.load, ``readout`` its NAME.readout.npz
    (by default the one beside it), read with np.load(allow_pickle=False)."""
    from fastcell.io.weights_file import load

    extra = os.fspath(readout) if readout is not None else readout_path(path)
    layer = load(path)
    with np.load(extra, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    readout_keys = ("readout.weight", "readout.bias")
    problems = [f"missing {k}" for k in readout_keys if k not in arrays]
    problems += [f"unexpected {k!r}" for k in arrays if k not in readout_keys and not k.startswith("task.")]
    if problems:
        raise ValueError(f"{extra}: " + "; ".join(problems))
    w, b = arrays.pop("readout.weight"), arrays.pop("readout.bias")
    try:
        _check_readout(layer, w, b)
    except ValueError as exc:
        raise ValueError(f"{extra}: {exc}") from None
    task = {}
    for key, v in arrays.items():
        if v.ndim != 0 or v.dtype.kind not in "biufU":
            raise ValueError(f"{extra}: {key} is a {v.dtype} array of shape {v.shape}, expected "
                             "a single number or string")
        *parents, leaf = key.split(".")[1:]
        node = task
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"{extra}: {key} under a task parameter that is not a group")
        node[leaf] = v.item()
    return layer, w, b, task


def _check_readout(layer, w, b):
    """ValueError unless w (K, H_out) and b (K,) read out the layer's h in its dtype."""
    H = layer.output_size
    if w.ndim != 2 or w.shape[1] != H or b.shape != (w.shape[0],):
        raise ValueError(f"the readout has weight {w.shape} and bias {b.shape}, expected (K, {H}) "
                         "and (K,) for the layer's hidden size")
    if w.dtype != layer.dtype or b.dtype != layer.dtype:
        raise ValueError(f"the readout is {w.dtype}/{b.dtype}, the layer {layer.dtype}")


def _flatten_task(task, prefix):
    """{"PREFIX.KEY": 0-d array} for a dict of numbers, strings, booleans and dicts of those."""
    out = {}
    for key, v in task.items():
        if not isinstance(key, str) or not key or "." in key:
            raise ValueError(f"task keys are non-empty strings without '.', got {key!r}")
        name = f"{prefix}.{key}"
        if isinstance(v, dict):
            out.update(_flatten_task(v, name))
        elif isinstance(v, (bool, int, float, str)):
            out[name] = np.array(v)
        else:
            raise TypeError(f"task[{key!r}]: expected a number, string, boolean or dict, got "
                            f"{type(v).__name__}")
    return out


def bundled_model(name):
    """A bundled demo model by cell type name (see MODEL_NAMES), read as package data."""
    if name not in MODEL_NAMES:
        raise ValueError(f"expected one of {', '.join(MODEL_NAMES)}, got {name!r}")
    models = resources.files("fastcell").joinpath("demo_models")
    with resources.as_file(models.joinpath(name + WEIGHTS_SUFFIX)) as weights, \
            resources.as_file(models.joinpath(name + READOUT_SUFFIX)) as extra:
        return load_demo_model(weights, extra)


# ---- measuring ----

def final_hidden(state):
    """The last layer's h_n from a layer's returned state (h_n, or (h_n, c_n) for the LSTMs)."""
    h = state[0] if isinstance(state, tuple) else state
    return h[-1]


def recall(h, w, b):
    """The model's answers: the linear readout of the last h, one value per stream."""
    return (h @ w.T + b)[:, 0]


def accuracy(layer, w, b, x, y, tolerance=TASK["tolerance"]):
    """The share of streams x (T, B, 2) whose marked values y are recalled within ``tolerance``."""
    _, state = layer(x)
    return _hits(recall(final_hidden(state), w, b), y, tolerance)


def _hits(pred, y, tolerance):
    return float(np.mean(np.abs(pred - y) < tolerance))


def parameter_count(layer, w, b):
    return sum(v.size for v in layer.state_dict().values()) + w.size + b.size


def _best_per_step(step, xs, repeats):
    """Microseconds per call of step(x) over xs, best of `repeats` passes (the machine is shared)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x in xs:
            step(x)
        best = min(best, (time.perf_counter() - t0) / len(xs))
    return best * 1e6


def fastcell_step_latency(layer, xs, repeats=5):
    """Per-step latency of the streaming use: batch 1, one step at a time, state kept between calls.

    Uses the layer's streaming state (``new_state``/``step``) where the layer has one, else its
    cell, called step by step with the state threaded through."""
    if hasattr(layer, "new_state"):
        state = layer.new_state(1)
        out = np.empty(layer.output_size, layer.dtype)
        return _best_per_step(lambda x: layer.step(x, state, out), xs, repeats)
    cell = _cell_of(layer)
    holder = [None]

    def step(x):
        holder[0] = cell(x, holder[0])
    return _best_per_step(step, xs, repeats)


def _cell_of(layer):
    """The fastcell cell with a one-layer, one-direction layer's weights."""
    from fastcell.convert.state_dict import from_state_dict

    cfg = layer.config()
    weights = {n[: -len("_l0")]: v for n, v in layer.state_dict().items()}
    return from_state_dict(weights, nonlinearity=cfg.get("nonlinearity"), reset_after=cfg.get("reset_after"))


def _torch_twins(name, layer):
    """PyTorch's layer and cell with the fastcell layer's weights."""
    import torch

    cfg = layer.config()
    sd = {n: torch.from_numpy(np.array(v)) for n, v in layer.state_dict().items()}
    I, H = cfg["input_size"], cfg["hidden_size"]
    if name == "peephole_lstm":
        from fastcell.torch import PeepholeLSTM, PeepholeLSTMCell
        module, cell = PeepholeLSTM(I, H), PeepholeLSTMCell(I, H)
    else:
        kw = {"nonlinearity": cfg["nonlinearity"]} if name == "rnn" else {}
        module = {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[name](I, H, **kw)
        cell = {"rnn": torch.nn.RNNCell, "gru": torch.nn.GRUCell, "lstm": torch.nn.LSTMCell}[name](I, H, **kw)
    module.load_state_dict(sd)
    cell.load_state_dict({n[: -len("_l0")]: v for n, v in sd.items()})
    return module.eval(), cell.eval()


def torch_compare(name, layer, inputs, outputs, xs, repeats=5):
    """PyTorch on the same model: {"torch_us": its per-step latency in µs, "max_diff": the largest
    |fastcell - PyTorch| over the outputs, "torch_f32_error": the largest |PyTorch float32 -
    float64| over the same outputs, the rounding noise a float32 model carries anyway}.

    ``outputs`` are fastcell's outputs (T, B, H) for ``inputs``; ``xs`` the single steps to time.
    """
    import torch

    from fastcell.convert.state_dict import from_state_dict

    module, cell = _torch_twins(name, layer)
    cfg = layer.config()
    exact = from_state_dict({n: v.astype(np.float64) for n, v in layer.state_dict().items()},
                            nonlinearity=cfg.get("nonlinearity"), reset_after=cfg.get("reset_after"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # single-threaded on both sides, as a low-latency service runs
    try:
        with torch.inference_mode():
            diff = noise = 0.0
            for x, ours in zip(inputs, outputs):
                theirs = module(torch.from_numpy(x))[0]
                diff = max(diff, _max_diff(ours, theirs))
                noise = max(noise, _max_diff(exact(x)[0], theirs))
            txs = [torch.from_numpy(x).unsqueeze(0) for x in xs]
            holder = [None]

            def step(x):
                holder[0] = cell(x, holder[0])
            us = _best_per_step(step, txs, repeats)
    finally:
        torch.set_num_threads(threads)
    return {"torch_us": us, "max_diff": diff, "torch_f32_error": noise}


def _max_diff(a, b):
    if isinstance(a, (tuple, list)):
        return max(_max_diff(u, v) for u, v in zip(a, b))
    b = b.numpy() if hasattr(b, "numpy") else b
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _torch_available():
    if "torch" in sys.modules:
        return sys.modules["torch"] is not None
    from importlib.util import find_spec
    return find_spec("torch") is not None


def run_demo(with_torch=None, steps=1000, repeats=5):
    """Evaluates the four bundled models; returns one dict per model (what main() prints).

    Each dict's "weights" lists the model's float32 weights and then each of REDUCED_FORMATS
    (fastcell.quantize of the float32 model): {"format", "weight_bytes", "acc_short", "acc_long",
    "max_diff"}, max_diff being the largest |outputs - float32's outputs| over every step of every
    test stream (0 for float32 itself)."""
    if with_torch is None:
        with_torch = _torch_available()
    rows = []
    for name in MODEL_NAMES:
        layer, w, b, task = bundled_model(name)
        lags = (task["short_lag"], task["long_lag"])
        sets = [test_set(lag, task) for lag in lags]
        runs = [layer(x) for x, _ in sets]
        weights = [_weights_row(layer, sets, runs, w, b, task["tolerance"], runs)]
        for fmt in REDUCED_FORMATS:
            reduced = fastcell.quantize(layer, fmt)
            weights.append(_weights_row(reduced, sets, [reduced(x) for x, _ in sets], w, b,
                                        task["tolerance"], runs))
        stream = list(make_task(1, lags[0], lags[0], steps, TEST_SEED)[0][:, 0])
        row = {"name": name, "title": TITLES[name], "params": parameter_count(layer, w, b),
               "hidden_size": layer.hidden_size, "short_lag": lags[0], "long_lag": lags[1],
               "acc_short": weights[0]["acc_short"], "acc_long": weights[0]["acc_long"],
               "weights": weights, "fastcell_us": fastcell_step_latency(layer, stream, repeats)}
        if with_torch:
            row.update(torch_compare(name, layer, [x for x, _ in sets], [out for out, _ in runs],
                                     stream, repeats))
        rows.append(row)
    return rows


def _weights_row(model, sets, runs, w, b, tolerance, float_runs):
    """One weight format's results: ``runs`` are the model's (output, state) on the test ``sets``,
    ``float_runs`` the float32 model's."""
    acc = [_hits(recall(final_hidden(state), w, b), y, tolerance)
           for (_, y), (_, state) in zip(sets, runs)]
    # in float32: outputs within a factor of 2 subtract exactly, the rest round far below the
    # digits printed (and it is quicker than widening to float64)
    diff = max(float(np.max(np.abs(out - ref))) for (out, _), (ref, _) in zip(runs, float_runs))
    return {"format": model.weight_format, "weight_bytes": model.weight_bytes,
            "acc_short": acc[0], "acc_long": acc[1], "max_diff": diff}


def _table(head, lines, left=1):
    """Columns under their heads, the first ``left`` left-aligned (text), the others
    right-aligned (numbers); an empty first column (the same model as the line above) stays
    empty."""
    widths = [max(len(c) for c in col) for col in zip(head, *lines)]
    fmt = lambda cols: "  ".join(c.ljust(w) if i < left else c.rjust(w)  # noqa: E731
                                 for i, (c, w) in enumerate(zip(cols, widths))).rstrip()
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines])


def format_accuracy_table(rows):
    """The task accuracy of each model with each weight format, one line per format."""
    first = rows[0]
    head = ["cell", "weights", "weight bytes", f"acc lag {first['short_lag']}",
            f"acc lag {first['long_lag']}", "max |diff| from float32"]
    lines = []
    for r in rows:
        for i, f in enumerate(r["weights"]):
            lines.append([r["title"] if i == 0 else "", f["format"], f"{f['weight_bytes']:,}",
                          f"{100 * f['acc_short']:.1f}%", f"{100 * f['acc_long']:.1f}%",
                          f"{f['max_diff']:.1e}" if f["format"] != "float32" else ""])
    return _table(head, lines, left=2)


def format_speed_table(rows):
    """Per-step latency of each float32 model (and PyTorch's, when measured)."""
    with_torch = "torch_us" in rows[0]
    head = ["cell", "params", "fastcell us/step"]
    if with_torch:
        head += ["PyTorch us/step", "speed-up", "max |diff|", "PyTorch f32 error"]
    lines = []
    for r in rows:
        cols = [r["title"], f"{r['params']:,}", f"{r['fastcell_us']:.1f}"]
        if with_torch:
            cols += [f"{r['torch_us']:.1f}", f"{r['torch_us'] / r['fastcell_us']:.1f}x",
                     f"{r['max_diff']:.1e}", f"{r['torch_f32_error']:.1e}"]
        lines.append(cols)
    return _table(head, lines)


def format_table(rows):
    """Both tables, the accuracy one first, a blank line between."""
    return format_accuracy_table(rows) + "\n\n" + format_speed_table(rows)


def main(argv=None):
    """Prints the demo tables. Returns 0."""
    t0 = time.perf_counter()
    with_torch = _torch_available()
    rows = run_demo(with_torch)
    t = TASK
    say = lambda text: print(textwrap.fill(text, WIDTH, break_on_hyphens=False))  # noqa: E731
    say("fastcell demo: recall a marked value after a lag (Hochreiter & Schmidhuber 1997). "
        f"Streams of {t['seq_len']} random values in [-1, 1], one of them marked; after the last "
        "step each model says the marked value. Each model: one recurrent layer of hidden size "
        f"{rows[0]['hidden_size']} and a linear readout.")
    print()
    print(format_accuracy_table(rows))
    print()
    say(f"acc: share of {TEST_SIZE} test streams recalled within ±{t['tolerance']} (answering 0 "
        f"every time scores {100 * t['tolerance']:.0f}%).")
    say("weights: float32 as trained; int8 (one scale per row) and bf16 are "
        "fastcell.quantize(model, \"int8\" or \"bf16\") of it. weight bytes: model.weight_bytes, "
        "the weights kept in memory (as given and as packed for the kernels).")
    say("max |diff| from float32: largest |output - float32's output| (every step of every test "
        "stream).")
    print()
    print(format_speed_table(rows))
    print()
    say("us/step: the float32 models, one step of one stream (batch 1), state kept between calls, "
        "single-threaded.")
    if with_torch:
        say("PyTorch: torch.nn.*Cell (fastcell.torch.PeepholeLSTMCell for the peephole LSTM), "
            "torch.inference_mode.")
        say("max |diff|: largest |fastcell - PyTorch| over the float32 outputs (every step of "
            "every test stream).")
        say("PyTorch f32 error: largest |PyTorch float32 - float64| over the same outputs: "
            "float32's own rounding.")
    else:
        say("PyTorch is not installed: fastcell alone (install torch to compare).")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
