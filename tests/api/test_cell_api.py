"""The cells' public contract (README.md, docs/SPEC.md): immutability of the model, the caller's
arrays left alone, empty sequences and batches, unbatched shapes, a missing state meaning zeros,
pickling, and an import that pulls in neither torch nor scipy.linalg. The cells' argument errors
and input conversions: bad_input/test_bad_cell_input.py."""

import copy
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastcell
from conftest import VARIANTS, make_cell
from helpers import (DTYPES, LSTM_CELLS, H, I, assert_identical, cell_of, cell_variants,
                     cell_weights, flat, inputs, state_of)


# ---- the model is immutable ----

@cell_variants
def test_weights_are_read_only_attributes(variant):
    w = cell_weights(variant)
    cell = make_cell(variant, w)
    sd = cell.state_dict()
    assert set(sd) == set(w)
    for name in w:
        a = getattr(cell, name)
        assert isinstance(a, np.ndarray) and not a.flags.writeable
        np.testing.assert_array_equal(a, w[name])
        np.testing.assert_array_equal(a, sd[name])
        with pytest.raises(ValueError, match="read-only"):
            a[...] = 0
        with pytest.raises(ValueError, match="read-only"):
            sd[name][...] = 0


def test_weights_cannot_be_made_writeable_again():
    for variant in VARIANTS:
        cell = cell_of(variant)
        xs = inputs((4, 2, I))
        before = cell.run(xs)
        for name, a in cell.state_dict().items():
            try:
                a.flags.writeable = True
            except ValueError:
                continue
            a[...] = 0
        assert_identical(cell.run(xs), before)


def test_weight_attribute_cannot_be_rebound():
    for variant in VARIANTS:
        cell = cell_of(variant)
        original = cell.weight_ih
        try:
            cell.weight_ih = np.zeros_like(original)
        except AttributeError:
            pass
        np.testing.assert_array_equal(cell.weight_ih, cell.state_dict()["weight_ih"])


@cell_variants
def test_sizes_are_read_only(variant):
    cell = cell_of(variant)
    for attr in ("input_size", "hidden_size", "dtype"):
        with pytest.raises(AttributeError):
            setattr(cell, attr, 7)
    assert (cell.input_size, cell.hidden_size, cell.dtype) == (I, H, np.float64)


@cell_variants
def test_changing_given_arrays_after_construction_changes_nothing(variant):
    w = cell_weights(variant)
    xs = inputs((5, 2, I))
    want = make_cell(variant, {k: v.copy() for k, v in w.items()}).run(xs)
    cell = make_cell(variant, w)
    for v in w.values():
        v[...] = 7.0
    assert_identical(cell.run(xs), want)
    for v in cell.state_dict().values():
        assert not np.any(v == 7.0)


@cell_variants
def test_changing_given_tensors_after_construction_changes_nothing(variant):
    torch = pytest.importorskip("torch")
    w = cell_weights(variant)
    xs = inputs((5, 2, I))
    want = make_cell(variant, w).run(xs)
    tw = {k: torch.from_numpy(v.copy()) for k, v in w.items()}
    cell = make_cell(variant, tw)
    with torch.no_grad():
        for t in tw.values():
            t.fill_(7.0)
    assert_identical(cell.run(xs), want)


@cell_variants
def test_state_dict_has_pytorch_names(variant):
    names = {"weight_ih", "weight_hh", "bias_ih", "bias_hh"}
    if variant == "peephole_lstm":
        names.add("weight_ph")
    for bias in (True, False):
        w = cell_weights(variant, bias=bias)
        cell = make_cell(variant, w)
        sd = cell.state_dict()
        assert set(sd) == (names if bias else names - {"bias_ih", "bias_hh"})
        for k, v in sd.items():
            assert v.dtype == np.float64 and v.shape == w[k].shape
            np.testing.assert_array_equal(v, w[k])
        # A fresh dict each time: editing it does not touch the model.
        sd.clear()
        assert set(cell.state_dict()) == set(w)
        # The state dict builds the same model.
        xs = inputs((4, 2, I))
        assert_identical(make_cell(variant, cell.state_dict()).run(xs), cell.run(xs))


@pytest.mark.parametrize("variant", ["rnn_tanh", "gru", "lstm"])
def test_state_dict_loads_into_torch(variant):
    torch = pytest.importorskip("torch")
    cls = {"rnn_tanh": torch.nn.RNNCell, "gru": torch.nn.GRUCell, "lstm": torch.nn.LSTMCell}[variant]
    cell = cell_of(variant)
    m = cls(I, H, dtype=torch.float64)
    m.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in cell.state_dict().items()})


# ---- the caller's arrays are left alone ----

@cell_variants
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("batch", [(), (3,)], ids=["unbatched", "B3"])
def test_caller_arrays_not_modified(variant, dtype, batch):
    cell = cell_of(variant, dtype)
    # The state already in the model's dtype and C-contiguous: the case with no conversion copy.
    s = state_of(variant, batch, dtype)
    s_copy = copy.deepcopy(s)
    xs = inputs((6,) + batch + (I,), dtype)
    xs_copy = xs.copy()
    out1 = cell(xs[0], s)
    assert_identical(s, s_copy)
    out2 = cell.run(xs, s)
    assert_identical(s, s_copy)
    assert_identical(xs, xs_copy)
    # Results are fresh arrays, not the caller's.
    for a in flat(out1) + flat(out2):
        for b in flat(s) + [xs]:
            assert not np.shares_memory(a, b)
    # ...and differ from the initial state (the call did something).
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(flat(out1), flat(s))) > 0


@cell_variants
def test_results_are_independent_buffers(variant):
    cell = cell_of(variant)
    xs = inputs((4, 2, I))
    y, final = cell.run(xs)
    h = final[0] if isinstance(final, tuple) else final
    y_copy = y.copy()
    h[...] = 99
    np.testing.assert_array_equal(y, y_copy)


# ---- empty sequences and batches ----

@cell_variants
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("B", [1, 3])
def test_empty_sequence(variant, dtype, B):
    cell = cell_of(variant, dtype)
    s = state_of(variant, (B,), dtype)
    y, final = cell.run(np.zeros((0, B, I), dtype), s)
    assert y.shape == (0, B, H) and y.dtype == dtype
    assert_identical(final, s)
    for a, b in zip(flat(final), flat(s)):
        assert not np.shares_memory(a, b)
    # Without a state: zeros.
    y, final = cell.run(np.zeros((0, B, I), dtype))
    assert y.shape == (0, B, H)
    assert_identical(final, tuple(np.zeros((B, H), dtype) for _ in flat(s)) if isinstance(s, tuple)
                     else np.zeros((B, H), dtype))
    # Unbatched.
    s1 = state_of(variant, (), dtype)
    y, final = cell.run(np.zeros((0, I), dtype), s1)
    assert y.shape == (0, H)
    assert_identical(final, s1)


@cell_variants
@pytest.mark.parametrize("T", [0, 1, 5])
def test_empty_batch(variant, T):
    cell = cell_of(variant)
    y, final = cell.run(np.zeros((T, 0, I)))
    assert y.shape == (T, 0, H)
    assert all(a.shape == (0, H) for a in flat(final))
    y, final = cell.run(np.zeros((T, 0, I)), state_of(variant, (0,)))
    assert y.shape == (T, 0, H)
    assert all(a.shape == (0, H) for a in flat(final))
    step = cell(np.zeros((0, I)), state_of(variant, (0,)))
    assert all(a.shape == (0, H) for a in flat(step))
    step = cell(np.zeros((0, I)))
    assert all(a.shape == (0, H) for a in flat(step))


# ---- unbatched in, unbatched out ----

@cell_variants
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_unbatched_shapes(variant, dtype):
    cell = cell_of(variant, dtype)
    lstm = variant in LSTM_CELLS
    x = inputs((I,), dtype)
    s = cell(x)
    if lstm:
        assert isinstance(s, tuple) and len(s) == 2 and all(a.shape == (H,) for a in s)
    else:
        assert isinstance(s, np.ndarray) and s.shape == (H,)
    s2 = cell(x, s)
    assert [a.shape for a in flat(s2)] == [(H,)] * len(flat(s))
    y, final = cell.run(inputs((7, I), dtype), s)
    assert y.shape == (7, H) and y.dtype == dtype
    assert [a.shape for a in flat(final)] == [(H,)] * len(flat(s))
    # The same numbers as a batch of one.
    yb, finalb = cell.run(inputs((7, I), dtype)[:, None], tuple(a[None] for a in s) if lstm else s[None])
    np.testing.assert_array_equal(y, yb[:, 0])
    assert_identical(final, tuple(a[0] for a in finalb) if lstm else finalb[0])


@cell_variants
def test_batched_shapes(variant):
    cell = cell_of(variant)
    s = cell(inputs((4, I)))
    assert [a.shape for a in flat(s)] == [(4, H)] * (2 if variant in LSTM_CELLS else 1)
    assert isinstance(s, tuple) == (variant in LSTM_CELLS)
    y, final = cell.run(inputs((7, 4, I)))
    assert y.shape == (7, 4, H)
    assert [a.shape for a in flat(final)] == [(4, H)] * (2 if variant in LSTM_CELLS else 1)


@cell_variants
def test_missing_state_means_zeros(variant):
    cell = cell_of(variant)
    xs = inputs((5, 2, I))
    zero = (np.zeros((2, H)),) * 2 if variant in LSTM_CELLS else np.zeros((2, H))
    assert_identical(cell.run(xs), cell.run(xs, zero))
    assert_identical(cell(xs[0]), cell(xs[0], zero))


# ---- pickling ----

@cell_variants
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("bias", [True, False])
def test_pickle_round_trip(variant, dtype, bias):
    cell = cell_of(variant, dtype, bias=bias)
    xs = inputs((6, 2, I), dtype)
    s = state_of(variant, (2,), dtype)
    want = (cell.run(xs, s), cell(xs[0], s))
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        clone = pickle.loads(pickle.dumps(cell, protocol=protocol))
        assert type(clone) is type(cell) and repr(clone) == repr(cell)
        assert (clone.input_size, clone.hidden_size, clone.dtype) == (I, H, dtype)
        if variant.startswith("rnn"):
            assert clone.nonlinearity == cell.nonlinearity
        if variant.startswith("gru"):
            assert clone.reset_after == cell.reset_after
        assert_identical((clone.run(xs, s), clone(xs[0], s)), want)
        sd = clone.state_dict()
        assert set(sd) == set(cell.state_dict())
        for k, v in sd.items():
            np.testing.assert_array_equal(v, cell.state_dict()[k])
            assert not v.flags.writeable and not getattr(clone, k).flags.writeable
            with pytest.raises(ValueError, match="read-only"):
                v[...] = 0
    assert_identical((copy.deepcopy(cell).run(xs, s), copy.copy(cell)(xs[0], s)), want)


# ---- the package ----

def test_import_does_not_import_torch():
    root = Path(fastcell.__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    code = "import fastcell, sys; assert 'torch' not in sys.modules, 'torch imported'; print(fastcell.__file__)"
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve() == Path(fastcell.__file__).resolve()


def test_scipy_linalg_imported_later_is_whole():
    """fastcell loads scipy's cython_blas without the scipy.linalg package (cold start); a later
    `import scipy.linalg` still has it as an attribute, and works."""
    root = Path(fastcell.__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    code = ("import sys, numpy as np, fastcell\n"
            "assert 'scipy.linalg' not in sys.modules, 'scipy.linalg imported by fastcell'\n"
            "fastcell.LSTM(3, 4)(np.zeros((2, 1, 3), np.float32))\n"
            "import scipy.linalg\n"
            "assert scipy.linalg.cython_blas is sys.modules['scipy.linalg.cython_blas']\n"
            "assert np.allclose(scipy.linalg.inv(np.eye(3) * 2), np.eye(3) / 2)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


def test_version():
    assert isinstance(fastcell.__version__, str)
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?([.-]?\w+)*", fastcell.__version__)
    assert set(fastcell.__all__) >= {"__version__", "RNNCell", "GRUCell", "LSTMCell", "PeepholeLSTMCell"}


def test_options_and_missing_biases_behave_like_pytorch():
    w_ih, w_hh = np.zeros((6, 2), np.float32), np.zeros((6, 2), np.float32)
    with pytest.raises(TypeError, match="reset_after: expected True or False"):
        fastcell.GRUCell(w_ih, w_hh, reset_after="no")
    cell = fastcell.GRUCell(w_ih, w_hh)
    assert cell.bias_ih is None and cell.bias_hh is None
    lstm = fastcell.LSTMCell(np.zeros((8, 2)), np.zeros((8, 2)))
    with pytest.raises(TypeError, match="hx: expected an \\(h, c\\) pair of arrays"):
        lstm(np.zeros(2), (np.zeros(2), None))
