"""Every SIMD level the kernels are compiled for (cpu.h), run on this machine through
FASTCELL_ISA, against the CPU's best: AVX2 + FMA and AVX-512 give the same bits (the same sums in
the same order, each step fused-multiply-added); the baseline level, for CPUs without FMA, rounds
every product on its own, so it may differ in the last bits, and only there. The same holds for
the reduced weight formats: bf16 (float sums of the bf16 values) and int8, whose integer sums are
exact on every path (AMX tiles, AVX-512 VNNI: "v4,noamx", AVX-VNNI, AVX2 without VNNI: "v4,novnni",
plain C), with its
inputs x at 16 bits or at 8 ("int8x8"), also for an input of more than 512 values (which the AVX2
path multiplies as bytes at 16 bits, as words at 8)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from fastcell_c.platform import simd_level
from conftest import ROOT

LEVELS = {"base": 1, "v3": 3, "v4": 4, "v4,novnni": 4, "v4,noamx": 4}

# Runs in a fresh process (the level is read once per process): every cell kind, both dtypes,
# sizes off the vector width, a sequence, a batch, a fused streaming step and a packed-length run.
SCRIPT = r"""
import sys
import numpy as np
import fastcell
from fastcell_c.kernel import split_rule
from fastcell_c.platform import simd_level

out = {"level": np.array(simd_level())}
rng = np.random.default_rng(7)
for dtype in (np.float32, np.float64, "wide"):
    I = 531 if dtype == "wide" else 19
    for name, make in (("rnn", lambda: fastcell.RNN(I, 17, num_layers=2)),
                       ("gru", lambda: fastcell.GRU(I, 17)),
                       ("lstm", lambda: fastcell.LSTM(I, 33, proj_size=5)),
                       ("peephole", lambda: fastcell.PeepholeLSTM(I, 17))):
        if dtype == "wide" and name not in ("gru", "lstm"):
            continue
        m = make()
        m.load_state_dict({k: rng.uniform(-0.4, 0.4, v.shape).astype(np.float32 if dtype == "wide" else dtype)
                           for k, v in m.state_dict().items()})
        key = f"{name}-{'wide' if dtype == 'wide' else np.dtype(dtype).name}"
        x = rng.standard_normal((70, 3, I)).astype(np.float64 if dtype == np.float64 else np.float32)
        models = {} if dtype == "wide" else {key: m}
        if dtype != np.float64:
            models.update({f"{key}-{fmt}": fastcell.quantize(m, fmt) for fmt in ("int8", "bf16")})
            models[f"{key}-int8x8"] = fastcell.quantize(m, "int8", input_bits=8)
        for key, m in models.items():
            out[key + "-seq"] = m(x)[0]
            out[key + "-lengths"] = m(x, lengths=[70, 9, 41])[0]
            state = m.new_state(batch=3)
            for t in range(5):
                out[key + f"-step{t}"] = m.step(x[t], state).copy()
            # 3 threads, every call split (units at B = 1, rows at B = 3): compared below with
            # one thread's bits at the same level
            previous = split_rule(1, 0)
            m3 = m.with_threads(3)
            out[key + "-3t-seq1"], out[key + "-1t-seq1"] = m3(x[:, :1])[0], m(x[:, :1])[0]
            out[key + "-3t-lengths"] = m3(x, lengths=[70, 9, 41])[0]
            state = m3.new_state(batch=1)
            out[key + "-3t-step"] = np.stack([m3.step(x[t, :1], state).copy() for t in range(5)])
            state = m.new_state(batch=1)
            out[key + "-1t-step"] = np.stack([m.step(x[t, :1], state).copy() for t in range(5)])
            split_rule(*previous)
np.savez(sys.argv[1], **out)
"""


def run_at(level, path):
    env = dict(os.environ, FASTCELL_ISA=level, PYTHONPATH=str(ROOT), FASTCELL_MAX_THREADS="8")
    subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, check=True, timeout=120)
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    best = LEVELS[simd_level()]
    tmp = tmp_path_factory.mktemp("levels")
    return {lv: run_at(lv, tmp / f"{lv}.npz") for lv, n in LEVELS.items() if n <= best}


def test_each_level_runs_as_asked(results):
    for level, r in results.items():
        assert str(r["level"]) == level.split(",")[0]


def test_fma_levels_give_the_same_bits(results):
    if "v3" not in results or "v4" not in results:
        pytest.skip("this CPU has no AVX-512: only one FMA level to run")
    v4 = results["v4"]
    for other in ("v3", "v4,novnni", "v4,noamx"):
        for key in v4:
            if key != "level":
                np.testing.assert_array_equal(results[other][key], v4[key], err_msg=f"{other}: {key}")


def test_baseline_differs_only_in_rounding(results):
    best = results[max(results, key=LEVELS.get)]
    for key, a in results["base"].items():
        if key == "level":
            continue
        tol = 1e-5 if a.dtype == np.float32 else 1e-12
        if "int8" in key:
            # A last-bit difference in h can move one of its values across a rounding boundary
            # of its 8-bit quantization: one step of h's scale in one product, int8's own error.
            tol = 1e-2
        b = best[key]
        assert np.max(np.abs(a.astype(np.float64) - b)) <= tol * max(1.0, np.max(np.abs(b))), key


def test_threads_give_one_threads_bits_at_every_level(results):
    for level, r in results.items():
        for key in r:
            if "-3t-" in key:
                one = key.replace("-3t-", "-1t-") if key.replace("-3t-", "-1t-") in r else \
                    key.replace("-3t-", "-")
                np.testing.assert_array_equal(r[key], r[one], err_msg=f"{level}: {key}")


# The int8 products' activation rounding, bit for bit against fastcell.reference at every level,
# on hostile rows: values at amax (x * (lim / amax) rounds to lim itself, with no clamp in the
# kernels' whole vectors), on the 8- and 16-bit grids and halfway between (ties), amax a random
# float from 1e-30 to 3.4e38, just above and below the 1e-30 zero threshold, denormals alone and
# under a tiny amax, zeros and -0, infinities from overflow, NaN; rows of 1 to 600 values (whole
# vectors and a row's tail at every width). The product x @ [I; -I] of a ReLU cell with no h and no
# bias gives each quantized value times its scales, as reference.matmul computes them.
HOSTILE = r"""
import sys
import numpy as np
import fastcell
from fastcell import reference

f32 = np.float32
rng = np.random.default_rng(11)

def rows(k):
    out = []
    for mag in (1e-30, 1.0000001e-30, 9.99e-31, 1e-20, 1e-3, 1.0, 3.0, 1e20, 1.7e38, 3.4028235e38):
        out.append(np.clip(rng.standard_normal(k) * mag, -mag, mag).astype(f32))
        r = np.full(k, mag, f32); r[::2] *= -1; out.append(r)
        for lim in (127, 32767):
            g = rng.integers(-lim, lim + 1, k).astype(np.float64)
            with np.errstate(over="ignore"):
                r = (g / lim * mag).astype(f32); r[0] = mag; out.append(r)
                r = ((g + 0.5) / lim * mag).astype(f32); r[0] = mag; out.append(r)   # inf past FLT_MAX
            r = (np.nextafter(f32(mag), f32(0)) * (g / lim)).astype(f32); r[-1] = -f32(mag); out.append(r)
    for _ in range(40):
        a = f32(np.exp(rng.uniform(-69, 88)))
        r = (a * rng.uniform(-1, 1, k)).astype(f32); r[rng.integers(k)] = a
        r[rng.integers(k)] = -np.nextafter(a, f32(0)); out.append(r)
    r = np.full(k, f32(1e-45)); r[0] = f32(3e-39); out.append(r)
    r = rng.uniform(-1e-38, 1e-38, k).astype(f32); r[0] = f32(2e-30); out.append(r)
    r = rng.standard_normal(k).astype(f32); r[rng.integers(k)] = np.nan; out.append(r)
    out += [np.zeros(k, f32), -np.zeros(k, f32)]
    return np.stack(out)

res = {}
for k in (1, 3, 16, 37, 64, 128, 600):
    x = rows(k)
    eye = np.eye(k, dtype=f32)
    cell = fastcell.RNNCell(weight_ih=np.concatenate([eye, -eye]), weight_hh=np.zeros((2 * k, 2 * k), f32),
                            bias_ih=np.zeros(2 * k, f32), bias_hh=np.zeros(2 * k, f32), nonlinearity="relu")
    for bits in (8, 16):
        q = fastcell.quantize(cell, "int8", input_bits=bits)
        w = q._stored_state_dict()["weight_ih"]
        with np.errstate(all="ignore"):
            res[f"{k}-{bits}-got"] = q(x)
            res[f"{k}-{bits}-want"] = np.maximum(reference.matmul(x, w, bits), 0).astype(f32)
np.savez(sys.argv[1], **res)
"""


@pytest.mark.parametrize("level", [lv for lv, n in LEVELS.items() if n <= LEVELS[simd_level()]])
def test_int8_activation_rounding_is_the_references_on_hostile_rows(level, tmp_path):
    env = dict(os.environ, FASTCELL_ISA=level, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", HOSTILE, str(tmp_path / "h.npz")], env=env, check=True, timeout=120)
    with np.load(tmp_path / "h.npz") as f:
        r = {k: f[k] for k in f.files}
    for key in r:
        if key.endswith("-got"):
            want = r[key[:-4] + "-want"]
            assert r[key].tobytes() == want.tobytes(), f"{level}: {key}"
    for k in (16, 600):   # 8 and 16 bits round these rows differently (the check can tell them apart)
        assert r[f"{k}-8-want"].tobytes() != r[f"{k}-16-want"].tobytes()


# AMX tiles (blocks of 16 rows of 8-bit activations and 16 quads, the quads past them in C, the
# rows past them by AVX-512 VNNI) against AVX-512 VNNI alone ("v4,noamx"): batches and sequences
# whose products take every part (rows and quads on and off 16, panels of 16 to 64 columns, both
# segments, 16-bit x beside them), lengths, both directions, stacks, a projection, streaming steps
# of 1,024 Silero-sized streams and two threads.
AMX = r"""
import sys
import numpy as np
import fastcell
from fastcell_c.platform import int8_path

rng = np.random.default_rng(5)
out = {"path": np.array(int8_path())}

def make(cls, I, H, **kw):
    m = cls(I, H, **kw)
    k = 1 / np.sqrt(H)
    m.load_state_dict({n: rng.uniform(-k, k, v.shape).astype(np.float32) for n, v in m.state_dict().items()})
    return m

for name, m, T, B in (("lstm256", make(fastcell.LSTM, 256, 256), 20, 16),
                      ("silero", make(fastcell.LSTM, 128, 128), 2, 1024),
                      ("gru531", make(fastcell.GRU, 531, 72, num_layers=2), 9, 37),
                      ("lstm64p", make(fastcell.LSTM, 70, 64, proj_size=20), 11, 23),
                      ("rnn48", make(fastcell.RNN, 48, 48, bidirectional=True), 7, 33)):
    for bits in (8, 16):
        q = fastcell.quantize(m, "int8", input_bits=bits)
        x = rng.standard_normal((T, B, m.input_size)).astype(np.float32)
        out[f"{name}-{bits}-seq"] = q(x)[0]
        out[f"{name}-{bits}-len"] = q(x, lengths=np.sort(rng.integers(1, T + 1, B))[::-1].copy())[0]
        if not q.bidirectional:
            state = q.new_state(batch=B)
            for t in range(2):
                out[f"{name}-{bits}-step{t}"] = q.step(x[t], state).copy()
            out[f"{name}-{bits}-2t"] = q.with_threads(2)(x)[0]
np.savez(sys.argv[1], **out)
"""


def test_amx_tiles_give_the_vnni_bits(tmp_path):
    if LEVELS[simd_level()] < 4:
        pytest.skip("no AVX-512 on this CPU")
    got = {}
    for level in ("v4", "v4,noamx"):
        env = dict(os.environ, FASTCELL_ISA=level, PYTHONPATH=str(ROOT))
        path = tmp_path / f"{level}.npz"
        subprocess.run([sys.executable, "-c", AMX, str(path)], env=env, check=True, timeout=300)
        with np.load(path) as f:
            got[level] = {k: f[k] for k in f.files}
    assert str(got["v4,noamx"]["path"]) == "vnni512"
    if str(got["v4"]["path"]) != "amx":
        pytest.skip(f"no AMX tiles here (int8 path {got['v4']['path']})")
    for key, want in got["v4,noamx"].items():
        if key != "path":
            np.testing.assert_array_equal(got["v4"][key], want, err_msg=key)
    for key in got["v4"]:
        if key.endswith("-2t"):
            np.testing.assert_array_equal(got["v4"][key], got["v4"][key[:-3] + "-seq"], err_msg=key)
