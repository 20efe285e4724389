"""Saves (or compares) a broad set of fastcell outputs, to check that a change keeps every bit.

    python tools/golden_outputs.py save before.npz      # on the tree before the change
    python tools/golden_outputs.py compare before.npz   # after it: every array byte for byte
    python tools/golden_outputs.py save --input8 before8.npz   # adds int8 with 8-bit inputs

Every cell type and variant, float32, float64, int8 and bf16 weights, sizes off the vector width
(1, 3, 17) and on it (64), and every call: a layer on a sequence (several layers, bidirectional,
batch_first, projection, lengths, initial states), a cell step and a cell run, StreamState steps,
and StreamPool steps. Run it under each FASTCELL_ISA level the CPU has: the outputs of a level
are compared with the same level's. Weights and inputs come from a fixed seed, so the set is the
same on every run; only the public API is used, so it runs on any tree.
"""

import sys

import numpy as np

import fastcell

SIZES = (1, 3, 17, 64)
T, B = 9, 3


def _layers():
    for H in SIZES:
        I = max(1, H // 2 + 2)
        yield f"rnn_tanh-{H}", lambda I=I, H=H: fastcell.RNN(I, H, num_layers=2)
        yield f"rnn_relu-{H}", lambda I=I, H=H: fastcell.RNN(I, H, nonlinearity="relu",
                                                             bidirectional=True)
        yield f"gru-{H}", lambda I=I, H=H: fastcell.GRU(I, H, num_layers=2, batch_first=True)
        yield f"gru_rb-{H}", lambda I=I, H=H: fastcell.GRU(I, H, reset_after=False,
                                                           bidirectional=True)
        yield f"lstm-{H}", lambda I=I, H=H: fastcell.LSTM(I, H, num_layers=2)
        if H > 1:
            yield f"lstmp-{H}", lambda I=I, H=H: fastcell.LSTM(I, H, proj_size=max(1, H // 3),
                                                               bidirectional=True)
        yield f"peephole-{H}", lambda I=I, H=H: fastcell.PeepholeLSTM(I, H, bias=False)


def _cells():
    for H in SIZES:
        I = max(1, H // 2 + 2)
        yield f"cell_rnn-{H}", "rnn", I, H
        yield f"cell_gru-{H}", "gru", I, H
        yield f"cell_gru_rb-{H}", "gru_rb", I, H
        yield f"cell_lstm-{H}", "lstm", I, H
        yield f"cell_peephole-{H}", "peephole", I, H


def _fill(model, rng, dtype):
    model.load_state_dict({k: rng.uniform(-0.6, 0.6, v.shape).astype(dtype)
                           for k, v in model.state_dict().items()})
    return model


def _make_cell(kind, I, H, rng, dtype):
    G = {"rnn": 1, "gru": 3, "gru_rb": 3, "lstm": 4, "peephole": 4}[kind]
    w = {"weight_ih": rng.uniform(-0.6, 0.6, (G * H, I)).astype(dtype),
         "weight_hh": rng.uniform(-0.6, 0.6, (G * H, H)).astype(dtype),
         "bias_ih": rng.uniform(-0.6, 0.6, G * H).astype(dtype),
         "bias_hh": rng.uniform(-0.6, 0.6, G * H).astype(dtype)}
    if kind == "rnn":
        return fastcell.RNNCell(**w)
    if kind in ("gru", "gru_rb"):
        return fastcell.GRUCell(**w, reset_after=kind == "gru")
    if kind == "lstm":
        return fastcell.LSTMCell(**w)
    return fastcell.PeepholeLSTMCell(**w, weight_ph=rng.uniform(-0.6, 0.6, (3, H)).astype(dtype))


INPUT8 = False   # --input8: also int8 with 8-bit inputs (trees with quantize(..., input_bits=8))


def _variants(model):
    yield "", model
    if model.dtype == np.float32:
        for fmt in ("int8", "bf16"):
            yield f"-{fmt}", fastcell.quantize(model, fmt)
        if INPUT8:
            yield "-int8x8", fastcell.quantize(model, "int8", input_bits=8)


def _states(layer, rng, batch):
    n = layer.num_directions * layer.num_layers
    h = (rng.standard_normal((n, batch, layer.output_size)) * 0.5).astype(layer.dtype)
    if layer.has_cell_state:
        return h, (rng.standard_normal((n, batch, layer.hidden_size)) * 0.5).astype(layer.dtype)
    return h


def _level():
    try:
        return fastcell.simd_level()
    except AttributeError:            # trees from before fastcell.simd_level
        from fastcell_c.kernel import simd_level
        return simd_level()


def collect():
    rng = np.random.default_rng(20261204)
    out = {}
    for dtype in (np.float32, np.float64):
        dn = np.dtype(dtype).name
        for name, make in _layers():
            base = _fill(make(), rng, dtype)
            x = rng.standard_normal((B, T, base.input_size) if base.batch_first
                                    else (T, B, base.input_size)).astype(dtype)
            hx = _states(base, rng, B)
            for suffix, m in _variants(base):
                key = f"{name}-{dn}{suffix}"
                y, s = m(x)
                out[key + "-seq"] = y
                out[key + "-seq-hn"] = s[0] if isinstance(s, tuple) else s
                y, s = m(x, hx, lengths=[T, 2, T - 3])
                out[key + "-len"] = y
                out[key + "-len-hn"] = s[0] if isinstance(s, tuple) else s
                if isinstance(s, tuple):
                    out[key + "-len-cn"] = s[1]
                if not m.bidirectional:
                    st = m.new_state(batch=B)
                    xs = x.transpose(1, 0, 2) if m.batch_first else x
                    for t in range(4):
                        out[key + f"-step{t}"] = m.step(xs[t], st).copy()
                    pool = fastcell.StreamPool(m, capacity=8)
                    ids = np.array([pool.open() for _ in range(5)], np.int64)
                    for t in range(3):
                        sel = ids[[4, 0, 2]] if t % 2 else ids
                        xt = rng.standard_normal((len(sel), m.input_size)).astype(m.dtype)
                        out[key + f"-pool{t}"] = pool.step(sel, xt)
        for name, kind, I, H in _cells():
            base = _make_cell(kind, I, H, rng, dtype)
            xs = rng.standard_normal((T, B, I)).astype(dtype)
            for suffix, c in _variants(base):
                key = f"{name}-{dn}{suffix}"
                state = c(xs[0])
                out[key + "-call"] = state[0] if isinstance(state, tuple) else state
                ys, fin = c.run(xs)
                out[key + "-run"] = ys
                ys, fin = c.run(xs[:, :1], tuple(s[:1] for s in state) if isinstance(state, tuple)
                                else state[:1])
                out[key + "-run1"] = ys
    return out


def main(argv):
    global INPUT8
    if "--input8" in argv:
        INPUT8 = True
        argv = [a for a in argv if a != "--input8"]
    if len(argv) != 3 or argv[1] not in ("save", "compare"):
        print(__doc__, file=sys.stderr)
        return 2
    got = collect()
    got["level"] = np.array(_level())
    if argv[1] == "save":
        np.savez_compressed(argv[2], **got)
        print(f"saved {len(got)} arrays to {argv[2]}")
        return 0
    with np.load(argv[2]) as f:
        want = {k: f[k] for k in f.files}
    if str(want["level"]) != str(got["level"]):
        print(f"level: saved at {want['level']}, now {got['level']}", file=sys.stderr)
        return 1
    bad = [k for k in want if k not in got]
    bad += [k for k in got if k not in want]
    bad += [k for k in want if k in got and (want[k].dtype != got[k].dtype or
                                              want[k].shape != got[k].shape or
                                              want[k].tobytes() != got[k].tobytes())]
    if bad:
        print(f"{len(bad)} of {len(want)} arrays differ: {', '.join(bad[:20])}", file=sys.stderr)
        return 1
    print(f"all {len(want)} arrays are bit-identical")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
