"""The cells' public contract (README.md, docs/SPEC.md): argument errors, input conversions,
immutability of the model, the caller's arrays left alone, empty sequences and batches,
unbatched shapes, pickling, and an import that does not pull in torch."""

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
from conftest import VARIANTS, init_weights, make_cell

H, I = 5, 3
DTYPES = [np.float32, np.float64]
LSTMS = ["lstm", "peephole_lstm"]


# ---- helpers ----

def weights(variant, dtype=np.float64, bias=True, seed=0, hidden=H, inputs=I):
    rng = np.random.default_rng(seed)
    return init_weights(rng, VARIANTS[variant][0], inputs, hidden, dtype,
                        peephole=variant == "peephole_lstm", bias=bias)


def cell_of(variant, dtype=np.float64, **kw):
    return make_cell(variant, weights(variant, dtype, **kw))


def state_of(variant, batch, dtype=np.float64, seed=1):
    rng = np.random.default_rng(seed)

    def s():
        return rng.standard_normal(batch + (H,)).astype(dtype)

    return (s(), s()) if variant in LSTMS else s()


def inputs(shape, dtype=np.float64, seed=2):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def flat(result):
    """(output, state) / state / (h, c) as a flat list of arrays."""
    if isinstance(result, (tuple, list)):
        return [a for r in result for a in flat(r)]
    return [result]


def assert_identical(a, b):
    fa, fb = flat(a), flat(b)
    assert len(fa) == len(fb)
    for u, v in zip(fa, fb):
        assert u.dtype == v.dtype and u.shape == v.shape
        np.testing.assert_array_equal(u, v)


def hx_names(variant):
    """How the step state is named in errors: the h part (and the c part for the LSTMs)."""
    return ("hx[0] (h)", "hx[1] (c)") if variant in LSTMS else ("hx", None)


def exp(name):
    """A match pattern for an error message that starts with the argument's name."""
    return "^" + re.escape(name) + ":"


variants = pytest.mark.parametrize("variant", list(VARIANTS))


# ---- errors name the argument, the expected and the received ----

@variants
@pytest.mark.parametrize("shape", [(1, 2, I), (2, 1, 1, I)])
def test_step_input_wrong_rank(variant, shape):
    cell = cell_of(variant)
    msg = exp("x") + re.escape(f" expected shape (B, {I}) or ({I},), got {shape}")
    with pytest.raises(ValueError, match=msg):
        cell(np.zeros(shape))


@variants
@pytest.mark.parametrize("shape", [(I,), (1, 2, 1, I)])
def test_run_input_wrong_rank(variant, shape):
    cell = cell_of(variant)
    msg = exp("xs") + re.escape(f" expected shape (T, B, {I}) or (T, {I}), got {shape}")
    with pytest.raises(ValueError, match=msg):
        cell.run(np.zeros(shape))


@variants
@pytest.mark.parametrize("shape", [(I + 1,), (2, I - 1), (2, 1)])
def test_step_input_wrong_feature_size(variant, shape):
    with pytest.raises(ValueError, match=exp("x") + re.escape(f" expected shape (B, {I}) or ({I},), got {shape}")):
        cell_of(variant)(np.zeros(shape))


@variants
@pytest.mark.parametrize("shape", [(4, I + 1), (4, 2, I - 1), (0, 2, I + 2)])
def test_run_input_wrong_feature_size(variant, shape):
    with pytest.raises(ValueError, match=exp("xs") + re.escape(f" expected shape (T, B, {I}) or (T, {I}), got {shape}")):
        cell_of(variant).run(np.zeros(shape))


@pytest.mark.parametrize("input_size", [1, I])
def test_scalar_input_is_rejected_with_its_shape(input_size):
    cell = cell_of("rnn_tanh", inputs=input_size)
    with pytest.raises(ValueError, match=exp("x") + r".*got \(\)$"):
        cell(np.float64(0.5))


# (x shape, state shape) pairs that do not fit; "bad" says which part of an LSTM state is wrong.
STATE_MISMATCHES = {
    "batch": ((2, I), (3, H)),
    "size": ((2, I), (2, H + 1)),
    "unbatched_x_batched_state": ((I,), (1, H)),
    "batched_x_unbatched_state": ((1, I), (H,)),
    "rank": ((2, I), (2, H, 1)),
}


@variants
@pytest.mark.parametrize("case", list(STATE_MISMATCHES))
def test_step_state_wrong_shape(variant, case):
    x_shape, s_shape = STATE_MISMATCHES[case]
    cell = cell_of(variant)
    good_shape = (H,) if len(x_shape) == 1 else (x_shape[0], H)
    good, bad = np.zeros(good_shape), np.zeros(s_shape)
    msg = re.escape(f" expected shape {good_shape}, got {s_shape}")
    h_name, c_name = hx_names(variant)
    if variant in LSTMS:
        with pytest.raises(ValueError, match=exp(h_name) + msg):
            cell(np.zeros(x_shape), (bad, good))
        with pytest.raises(ValueError, match=exp(c_name) + msg):
            cell(np.zeros(x_shape), (good, bad))
    else:
        with pytest.raises(ValueError, match=exp(h_name) + msg):
            cell(np.zeros(x_shape), bad)


@variants
@pytest.mark.parametrize("case", ["batch", "size", "unbatched_x_batched_state"])
def test_run_state_wrong_shape(variant, case):
    x_shape, s_shape = STATE_MISMATCHES[case]
    xs = np.zeros((4,) + x_shape)
    cell = cell_of(variant)
    bad = np.zeros(s_shape)
    good_shape = (H,) if len(x_shape) == 1 else (x_shape[0], H)
    msg = re.escape(f" expected shape {good_shape}, got {s_shape}")
    if variant in LSTMS:
        with pytest.raises(ValueError, match=exp("state[0] (h)") + msg):
            cell.run(xs, (bad, np.zeros(good_shape)))
        with pytest.raises(ValueError, match=exp("state[1] (c)") + msg):
            cell.run(xs, (np.zeros(good_shape), bad))
    else:
        with pytest.raises(ValueError, match=exp("state") + msg):
            cell.run(xs, bad)


@pytest.mark.parametrize("variant", LSTMS)
@pytest.mark.parametrize("state", [
    pytest.param(lambda: np.zeros(H), id="array"),
    pytest.param(lambda: np.zeros((2, H)), id="stacked_array"),
    pytest.param(lambda: (np.zeros(H),), id="1-tuple"),
    pytest.param(lambda: (np.zeros(H),) * 3, id="3-tuple"),
    pytest.param(lambda: "hc", id="str"),
    pytest.param(lambda: {"h": np.zeros(H), "c": np.zeros(H)}, id="dict"),
])
def test_lstm_state_must_be_a_pair(variant, state):
    cell = cell_of(variant)
    with pytest.raises(TypeError, match=exp("hx") + r" expected an \(h, c\) pair, got "):
        cell(np.zeros(I), state())
    with pytest.raises(TypeError, match=exp("state") + r" expected an \(h, c\) pair, got "):
        cell.run(np.zeros((2, I)), state())


@pytest.mark.parametrize("variant", LSTMS)
def test_lstm_state_as_list_pair_is_accepted(variant):
    cell = cell_of(variant)
    s = state_of(variant, ())
    assert_identical(cell(np.ones(I), list(s)), cell(np.ones(I), s))


WEIGHT_NAMES = {v: list(weights(v)) for v in VARIANTS}


@variants
@pytest.mark.parametrize("bad_dtype", [np.int64, np.int32, np.float16, np.bool_])
def test_weight_of_unsupported_dtype(variant, bad_dtype):
    for name in WEIGHT_NAMES[variant]:
        w = weights(variant, np.float32)
        w[name] = w[name].astype(bad_dtype)
        msg = exp(name) + rf" expected float32 or float64 weights, got {np.dtype(bad_dtype)}; convert explicitly"
        with pytest.raises(TypeError, match=msg):
            make_cell(variant, w)


@pytest.mark.parametrize("where", ["weight", "input"])
def test_bfloat16_tensor_error_names_argument(where):
    torch = pytest.importorskip("torch")
    w = weights("rnn_tanh", np.float32)
    if where == "weight":
        w["weight_ih"] = torch.from_numpy(w["weight_ih"]).to(torch.bfloat16)
        with pytest.raises(TypeError, match=exp("weight_ih")):
            make_cell("rnn_tanh", w)
    else:
        with pytest.raises(TypeError, match=exp("x")):
            make_cell("rnn_tanh", w)(torch.zeros(I, dtype=torch.bfloat16))


@variants
@pytest.mark.parametrize("first", DTYPES, ids=lambda d: d.__name__)
def test_mismatched_weight_dtypes(variant, first):
    other = np.float64 if first is np.float32 else np.float32
    for name in WEIGHT_NAMES[variant][1:]:
        w = weights(variant, first)
        w[name] = w[name].astype(other)
        msg = exp(name) + rf" expected dtype {np.dtype(first)} like weight_ih, got {np.dtype(other)}"
        with pytest.raises(TypeError, match=msg):
            make_cell(variant, w)


@variants
def test_weight_hh_wrong_shape(variant):
    g = VARIANTS[variant][0]
    for bad in [(g * H, H + 1), (g * H + 1, H), (g * H, H - 1)] + ([(H, g * H)] if g > 1 else []):
        w = weights(variant)
        w["weight_hh"] = np.zeros(bad)
        with pytest.raises(ValueError, match=exp("weight_hh") + re.escape(f" expected shape ({g * H}, {H}), got {bad}")):
            make_cell(variant, w)


@variants
@pytest.mark.parametrize("name", ["bias_ih", "bias_hh"])
@pytest.mark.parametrize("delta", [-1, 1])
def test_bias_wrong_length(variant, name, delta):
    g = VARIANTS[variant][0]
    w = weights(variant)
    w[name] = np.zeros(g * H + delta)
    with pytest.raises(ValueError, match=exp(name) + re.escape(f" expected shape ({g * H},), got ({g * H + delta},)")):
        make_cell(variant, w)


@variants
@pytest.mark.parametrize("name", ["bias_ih", "bias_hh"])
def test_bias_of_wrong_rank(variant, name):
    w = weights(variant)
    w[name] = w[name][None]
    with pytest.raises(ValueError, match=exp(name) + r" expected a 1-D array, got shape \(1, \d+\)"):
        make_cell(variant, w)


@variants
@pytest.mark.parametrize("given", ["bias_ih", "bias_hh"])
def test_only_one_bias(variant, given):
    w = weights(variant)
    del w["bias_hh" if given == "bias_ih" else "bias_ih"]
    with pytest.raises(ValueError, match=r"bias_ih, bias_hh: give both or neither"):
        make_cell(variant, w)


@pytest.mark.parametrize("bad", [(4, H), (2, H), (3, H + 1), (H, 3), (3 * H,), (1, 3, H)])
def test_weight_ph_wrong_shape(bad):
    w = weights("peephole_lstm")
    w["weight_ph"] = np.zeros(bad)
    if len(bad) == 2:
        msg = re.escape(f" expected shape (3, {H}), got {bad}")
    else:
        msg = re.escape(f" expected a 2-D array, got shape {bad}")
    with pytest.raises(ValueError, match=exp("weight_ph") + msg):
        make_cell("peephole_lstm", w)


def test_weight_ph_missing():
    w = weights("peephole_lstm")
    w["weight_ph"] = None
    with pytest.raises(TypeError, match=exp("weight_ph") + r" expected an array of shape \(3, hidden_size\), got None"):
        make_cell("peephole_lstm", w)


@variants
def test_weight_ih_rows_not_a_multiple_of_gates(variant):
    g = VARIANTS[variant][0]
    bad_shapes = [(0, I), (g * H, 0)] + ([(g * H + 1, I), (g * H - 1, I)] if g > 1 else [])
    for bad in bad_shapes:
        w = weights(variant)
        w["weight_ih"] = np.zeros(bad)
        msg = exp("weight_ih") + re.escape(f" expected shape ({g}*hidden_size, input_size) with both >= 1, got {bad}")
        with pytest.raises(ValueError, match=msg):
            make_cell(variant, w)


@variants
@pytest.mark.parametrize("name", ["weight_ih", "weight_hh"])
@pytest.mark.parametrize("rank", [1, 3])
def test_weight_of_wrong_rank(variant, name, rank):
    w = weights(variant)
    w[name] = w[name].reshape(-1) if rank == 1 else w[name][None]
    with pytest.raises(ValueError, match=exp(name) + r" expected a 2-D array, got shape "):
        make_cell(variant, w)


@pytest.mark.parametrize("nonlinearity", ["sigmoid", "TANH", "", None, "tanh "])
def test_bad_nonlinearity(nonlinearity):
    with pytest.raises(ValueError, match=exp("nonlinearity") + r" expected 'tanh' or 'relu', got "):
        fastcell.RNNCell(**weights("rnn_tanh"), nonlinearity=nonlinearity)


BAD_VALUES = {
    "complex": lambda shape: np.zeros(shape, np.complex128),
    "string": lambda shape: np.full(shape, "a"),
    "str": lambda shape: "abc",
    "object": lambda shape: np.empty(shape, object),
    "ragged": lambda shape: [[0.0] * 2, [0.0]],
    "none": lambda shape: None,
}


@variants
@pytest.mark.parametrize("kind", list(BAD_VALUES))
def test_bad_input_values_name_the_argument(variant, kind):
    cell = cell_of(variant)
    bad = BAD_VALUES[kind]
    if kind != "none":  # None means "zeros" for states only
        with pytest.raises((TypeError, ValueError), match=exp("x")):
            cell(bad((2, I)))
        with pytest.raises((TypeError, ValueError), match=exp("xs")):
            cell.run(bad((4, 2, I)))
    else:
        with pytest.raises(TypeError, match=exp("x") + " expected an array, got None"):
            cell(None)
        with pytest.raises(TypeError, match=exp("xs") + " expected an array, got None"):
            cell.run(None)
        return
    h_name, c_name = hx_names(variant)
    good = np.zeros((2, H))
    if variant in LSTMS:
        with pytest.raises((TypeError, ValueError), match=exp(h_name)):
            cell(np.zeros((2, I)), (bad((2, H)), good))
        with pytest.raises((TypeError, ValueError), match=exp(c_name)):
            cell(np.zeros((2, I)), (good, bad((2, H))))
        with pytest.raises((TypeError, ValueError), match=exp("state[1] (c)")):
            cell.run(np.zeros((4, 2, I)), (good, bad((2, H))))
    else:
        with pytest.raises((TypeError, ValueError), match=exp(h_name)):
            cell(np.zeros((2, I)), bad((2, H)))
        with pytest.raises((TypeError, ValueError), match=exp("state")):
            cell.run(np.zeros((4, 2, I)), bad((2, H)))


@variants
@pytest.mark.parametrize("kind", list(BAD_VALUES))
def test_bad_weight_values_name_the_argument(variant, kind):
    for name in WEIGHT_NAMES[variant]:
        w = weights(variant)
        w[name] = BAD_VALUES[kind](w[name].shape)
        msg = exp(name)
        if kind == "none" and name.startswith("bias"):
            msg = "^bias_ih, bias_hh: give both or neither"
        with pytest.raises((TypeError, ValueError), match=msg):
            make_cell(variant, w)


# ---- conversions give the right numbers ----

def step_and_run(cell, x, xs, state_step, state_run):
    return cell(x, state_step), cell.run(xs, state_run)


@variants
def test_float64_input_to_float32_model(variant):
    cell = cell_of(variant, np.float32)
    xs = inputs((6, 2, I))
    s = state_of(variant, (2,))
    got = cell.run(xs, s)
    s32 = tuple(a.astype(np.float32) for a in s) if isinstance(s, tuple) else s.astype(np.float32)
    want = cell.run(xs.astype(np.float32), s32)
    assert all(a.dtype == np.float32 for a in flat(got))
    assert_identical(got, want)
    assert_identical(cell(xs[0], s), cell(xs[0].astype(np.float32), s32))


@variants
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_int_and_bool_inputs(variant, dtype):
    cell = cell_of(variant, dtype)
    xi = np.random.default_rng(3).integers(-3, 4, (6, 2, I))
    assert_identical(cell.run(xi), cell.run(xi.astype(dtype)))
    assert_identical(cell(xi[0]), cell(xi[0].astype(dtype)))
    xb = xi > 0
    assert_identical(cell.run(xb), cell.run(xb.astype(dtype)))
    si = np.random.default_rng(4).integers(-2, 3, (2, H)).astype(np.int32)
    state = (si, si) if variant in LSTMS else si
    state_f = (si.astype(dtype),) * 2 if variant in LSTMS else si.astype(dtype)
    assert_identical(cell.run(xi, state), cell.run(xi.astype(dtype), state_f))


@variants
def test_nested_lists(variant):
    w = weights(variant)
    cell = make_cell(variant, w)
    from_lists = make_cell(variant, {k: v.tolist() for k, v in w.items()})
    assert from_lists.dtype == np.float64  # Python floats are float64: "as given"
    xs = inputs((5, 2, I))
    s = state_of(variant, (2,))
    s_list = tuple(a.tolist() for a in s) if isinstance(s, tuple) else s.tolist()
    want = cell.run(xs, s)
    assert_identical(from_lists.run(xs, s), want)
    assert_identical(cell.run(xs.tolist(), s_list), want)
    assert_identical(cell(xs[0].tolist(), s_list), cell(xs[0], s))
    assert_identical(cell(xs[0, 0].tolist()), cell(xs[0, 0]))


@variants
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_torch_tensors_as_weights_and_inputs(variant, dtype):
    torch = pytest.importorskip("torch")
    w = weights(variant, dtype)
    cell = make_cell(variant, w)
    tw = {k: torch.from_numpy(v.copy()).requires_grad_(k == "weight_ih") for k, v in w.items()}
    tcell = make_cell(variant, tw)
    assert tcell.dtype == dtype
    for k, v in tcell.state_dict().items():
        assert isinstance(v, np.ndarray) and not v.flags.writeable
        np.testing.assert_array_equal(v, w[k])
    xs = inputs((5, 2, I), dtype)
    s = state_of(variant, (2,), dtype)
    ts = tuple(map(torch.from_numpy, s)) if isinstance(s, tuple) else torch.from_numpy(s)
    want = cell.run(xs, s)
    assert_identical(tcell.run(xs, s), want)
    tx = torch.from_numpy(xs).requires_grad_(True)
    got = cell.run(tx, ts)
    assert all(isinstance(a, np.ndarray) for a in flat(got))
    assert_identical(got, want)
    assert_identical(cell(tx[0], ts), cell(xs[0], s))
    # A non-contiguous (transposed) tensor.
    txt = torch.from_numpy(np.ascontiguousarray(xs.transpose(1, 0, 2))).transpose(0, 1)
    assert not txt.is_contiguous()
    assert_identical(cell.run(txt, s), want)


def layouts(a):
    """The same values as a, laid out every awkward way: strided, Fortran, reversed, read-only."""
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    big[..., ::2] = a
    strided = big[..., ::2]
    fortran = np.asfortranarray(a)
    rev = np.flip(np.flip(a, -1).copy(), -1)  # negative last-axis stride, same values
    rev_all = np.flip(np.flip(a).copy())  # every stride negative
    ro = a.copy()
    ro.flags.writeable = False
    out = {"strided": strided, "fortran": fortran, "negative_stride": rev, "negative_all": rev_all,
           "readonly": ro}
    for name, v in out.items():
        np.testing.assert_array_equal(v, a)
    assert not strided.flags.c_contiguous and rev.strides[-1] < 0 and max(rev_all.strides) < 0
    assert fortran.ndim < 2 or not fortran.flags.c_contiguous
    return out


@variants
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("layout", ["strided", "fortran", "negative_stride", "negative_all", "readonly"])
def test_awkward_layouts_give_identical_results(variant, dtype, layout):
    cell = cell_of(variant, dtype)
    xs = inputs((6, 3, I), dtype)
    s = state_of(variant, (3,), dtype)
    want_run = cell.run(xs, s)
    want_step = cell(xs[0], s)
    x_l = layouts(xs)[layout]
    s_l = tuple(layouts(a)[layout] for a in s) if isinstance(s, tuple) else layouts(s)[layout]
    assert_identical(cell.run(x_l, s), want_run)
    assert_identical(cell.run(xs, s_l), want_run)
    assert_identical(cell(layouts(xs[0])[layout], s_l), want_step)
    # Unbatched, too.
    assert_identical(cell.run(layouts(xs[:, 0])[layout]), cell.run(np.ascontiguousarray(xs[:, 0])))


@variants
@pytest.mark.parametrize("layout", ["strided", "fortran", "negative_stride", "readonly"])
def test_awkward_weight_layouts_give_identical_results(variant, layout):
    w = weights(variant)
    cell = make_cell(variant, w)
    odd = make_cell(variant, {k: layouts(v)[layout] for k, v in w.items()})
    xs = inputs((6, 2, I))
    assert_identical(odd.run(xs), cell.run(xs))
    for v in odd.state_dict().values():
        assert v.flags.c_contiguous


# ---- the model is immutable ----

@variants
def test_weights_are_read_only_attributes(variant):
    w = weights(variant)
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


@variants
def test_sizes_are_read_only(variant):
    cell = cell_of(variant)
    for attr in ("input_size", "hidden_size", "dtype"):
        with pytest.raises(AttributeError):
            setattr(cell, attr, 7)
    assert (cell.input_size, cell.hidden_size, cell.dtype) == (I, H, np.float64)


@variants
def test_changing_given_arrays_after_construction_changes_nothing(variant):
    w = weights(variant)
    xs = inputs((5, 2, I))
    want = make_cell(variant, {k: v.copy() for k, v in w.items()}).run(xs)
    cell = make_cell(variant, w)
    for v in w.values():
        v[...] = 7.0
    assert_identical(cell.run(xs), want)
    for v in cell.state_dict().values():
        assert not np.any(v == 7.0)


@variants
def test_changing_given_tensors_after_construction_changes_nothing(variant):
    torch = pytest.importorskip("torch")
    w = weights(variant)
    xs = inputs((5, 2, I))
    want = make_cell(variant, w).run(xs)
    tw = {k: torch.from_numpy(v.copy()) for k, v in w.items()}
    cell = make_cell(variant, tw)
    with torch.no_grad():
        for t in tw.values():
            t.fill_(7.0)
    assert_identical(cell.run(xs), want)


@variants
def test_state_dict_has_pytorch_names(variant):
    names = {"weight_ih", "weight_hh", "bias_ih", "bias_hh"}
    if variant == "peephole_lstm":
        names.add("weight_ph")
    for bias in (True, False):
        w = weights(variant, bias=bias)
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

@variants
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


@variants
def test_results_are_independent_buffers(variant):
    cell = cell_of(variant)
    xs = inputs((4, 2, I))
    y, final = cell.run(xs)
    h = final[0] if isinstance(final, tuple) else final
    y_copy = y.copy()
    h[...] = 99
    np.testing.assert_array_equal(y, y_copy)


# ---- empty sequences and batches ----

@variants
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


@variants
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

@variants
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_unbatched_shapes(variant, dtype):
    cell = cell_of(variant, dtype)
    lstm = variant in LSTMS
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


@variants
def test_batched_shapes(variant):
    cell = cell_of(variant)
    s = cell(inputs((4, I)))
    assert [a.shape for a in flat(s)] == [(4, H)] * (2 if variant in LSTMS else 1)
    assert isinstance(s, tuple) == (variant in LSTMS)
    y, final = cell.run(inputs((7, 4, I)))
    assert y.shape == (7, 4, H)
    assert [a.shape for a in flat(final)] == [(4, H)] * (2 if variant in LSTMS else 1)


@variants
def test_missing_state_means_zeros(variant):
    cell = cell_of(variant)
    xs = inputs((5, 2, I))
    zero = (np.zeros((2, H)),) * 2 if variant in LSTMS else np.zeros((2, H))
    assert_identical(cell.run(xs), cell.run(xs, zero))
    assert_identical(cell(xs[0]), cell(xs[0], zero))


# ---- pickling ----

@variants
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
