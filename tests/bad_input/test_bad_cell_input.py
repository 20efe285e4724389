"""Hostile and awkward input to the cells (fastcell.RNNCell, GRUCell, LSTMCell, PeepholeLSTMCell;
README.md, docs/SPEC.md): errors name the argument, the expected and the received (inputs, states,
weights, options); inputs of other real dtypes, nested lists, torch tensors and every awkward
layout (strided, Fortran, negative-stride, read-only, memory-mapped, misaligned, byte-swapped,
masked) give exactly the numbers of a clean C-contiguous array; weights of another cell type are
refused naming the weight; NaN weights build and propagate."""

import re

import numpy as np
import pytest

import fastcell
from conftest import VARIANTS, init_weights, make_cell
from helpers import (DTYPES, LSTM_CELLS, B, H, I, P, T, assert_identical, cell_of, cell_state,
                     cell_variants, cell_weights, dtypes, exp, flat, inputs, laid_out, other_dtype,
                     state_of)


def hx_names(variant):
    """How the step state is named in errors: the h part (and the c part for the LSTMs)."""
    return ("hx[0] (h)", "hx[1] (c)") if variant in LSTM_CELLS else ("hx", None)


# ---- errors name the argument, the expected and the received ----

@cell_variants
@pytest.mark.parametrize("shape", [(1, 2, I), (2, 1, 1, I)])
def test_step_input_wrong_rank(variant, shape):
    cell = cell_of(variant)
    msg = exp("x") + re.escape(f" expected shape (B, {I}) or ({I},), got {shape}")
    with pytest.raises(ValueError, match=msg):
        cell(np.zeros(shape))


@cell_variants
@pytest.mark.parametrize("shape", [(I,), (1, 2, 1, I)])
def test_run_input_wrong_rank(variant, shape):
    cell = cell_of(variant)
    msg = exp("xs") + re.escape(f" expected shape (T, B, {I}) or (T, {I}), got {shape}")
    with pytest.raises(ValueError, match=msg):
        cell.run(np.zeros(shape))


@cell_variants
@pytest.mark.parametrize("shape", [(I + 1,), (2, I - 1), (2, 1)])
def test_step_input_wrong_feature_size(variant, shape):
    with pytest.raises(ValueError, match=exp("x") + re.escape(f" expected shape (B, {I}) or ({I},), got {shape}")):
        cell_of(variant)(np.zeros(shape))


@cell_variants
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


@cell_variants
@pytest.mark.parametrize("case", list(STATE_MISMATCHES))
def test_step_state_wrong_shape(variant, case):
    x_shape, s_shape = STATE_MISMATCHES[case]
    cell = cell_of(variant)
    good_shape = (H,) if len(x_shape) == 1 else (x_shape[0], H)
    good, bad = np.zeros(good_shape), np.zeros(s_shape)
    msg = re.escape(f" expected shape {good_shape}, got {s_shape}")
    h_name, c_name = hx_names(variant)
    if variant in LSTM_CELLS:
        with pytest.raises(ValueError, match=exp(h_name) + msg):
            cell(np.zeros(x_shape), (bad, good))
        with pytest.raises(ValueError, match=exp(c_name) + msg):
            cell(np.zeros(x_shape), (good, bad))
    else:
        with pytest.raises(ValueError, match=exp(h_name) + msg):
            cell(np.zeros(x_shape), bad)


@cell_variants
@pytest.mark.parametrize("case", ["batch", "size", "unbatched_x_batched_state"])
def test_run_state_wrong_shape(variant, case):
    x_shape, s_shape = STATE_MISMATCHES[case]
    xs = np.zeros((4,) + x_shape)
    cell = cell_of(variant)
    bad = np.zeros(s_shape)
    good_shape = (H,) if len(x_shape) == 1 else (x_shape[0], H)
    msg = re.escape(f" expected shape {good_shape}, got {s_shape}")
    if variant in LSTM_CELLS:
        with pytest.raises(ValueError, match=exp("state[0] (h)") + msg):
            cell.run(xs, (bad, np.zeros(good_shape)))
        with pytest.raises(ValueError, match=exp("state[1] (c)") + msg):
            cell.run(xs, (np.zeros(good_shape), bad))
    else:
        with pytest.raises(ValueError, match=exp("state") + msg):
            cell.run(xs, bad)


@pytest.mark.parametrize("variant", LSTM_CELLS)
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


@pytest.mark.parametrize("variant", LSTM_CELLS)
def test_lstm_state_as_list_pair_is_accepted(variant):
    cell = cell_of(variant)
    s = state_of(variant, ())
    assert_identical(cell(np.ones(I), list(s)), cell(np.ones(I), s))


WEIGHT_NAMES = {v: list(cell_weights(v)) for v in VARIANTS}


@cell_variants
@pytest.mark.parametrize("bad_dtype", [np.int64, np.int32, np.float16, np.bool_])
def test_weight_of_unsupported_dtype(variant, bad_dtype):
    for name in WEIGHT_NAMES[variant]:
        w = cell_weights(variant, np.float32)
        w[name] = w[name].astype(bad_dtype)
        msg = exp(name) + rf" expected float32 or float64 weights, got {np.dtype(bad_dtype)}; convert explicitly"
        with pytest.raises(TypeError, match=msg):
            make_cell(variant, w)


@pytest.mark.parametrize("where", ["weight", "input"])
def test_bfloat16_tensor_error_names_argument(where):
    torch = pytest.importorskip("torch")
    w = cell_weights("rnn_tanh", np.float32)
    if where == "weight":
        w["weight_ih"] = torch.from_numpy(w["weight_ih"]).to(torch.bfloat16)
        with pytest.raises(TypeError, match=exp("weight_ih")):
            make_cell("rnn_tanh", w)
    else:
        with pytest.raises(TypeError, match=exp("x")):
            make_cell("rnn_tanh", w)(torch.zeros(I, dtype=torch.bfloat16))


@cell_variants
@pytest.mark.parametrize("first", DTYPES, ids=lambda d: d.__name__)
def test_mismatched_weight_dtypes(variant, first):
    other = np.float64 if first is np.float32 else np.float32
    for name in WEIGHT_NAMES[variant][1:]:
        w = cell_weights(variant, first)
        w[name] = w[name].astype(other)
        msg = exp(name) + rf" expected dtype {np.dtype(first)} like weight_ih, got {np.dtype(other)}"
        with pytest.raises(TypeError, match=msg):
            make_cell(variant, w)


@cell_variants
def test_weight_hh_wrong_shape(variant):
    g = VARIANTS[variant][0]
    for bad in [(g * H, H + 1), (g * H + 1, H), (g * H, H - 1)] + ([(H, g * H)] if g > 1 else []):
        w = cell_weights(variant)
        w["weight_hh"] = np.zeros(bad)
        with pytest.raises(ValueError, match=exp("weight_hh") + re.escape(f" expected shape ({g * H}, {H}), got {bad}")):
            make_cell(variant, w)


@cell_variants
@pytest.mark.parametrize("name", ["bias_ih", "bias_hh"])
@pytest.mark.parametrize("delta", [-1, 1])
def test_bias_wrong_length(variant, name, delta):
    g = VARIANTS[variant][0]
    w = cell_weights(variant)
    w[name] = np.zeros(g * H + delta)
    with pytest.raises(ValueError, match=exp(name) + re.escape(f" expected shape ({g * H},), got ({g * H + delta},)")):
        make_cell(variant, w)


@cell_variants
@pytest.mark.parametrize("name", ["bias_ih", "bias_hh"])
def test_bias_of_wrong_rank(variant, name):
    w = cell_weights(variant)
    w[name] = w[name][None]
    with pytest.raises(ValueError, match=exp(name) + r" expected a 1-D array, got shape \(1, \d+\)"):
        make_cell(variant, w)


@cell_variants
@pytest.mark.parametrize("given", ["bias_ih", "bias_hh"])
def test_only_one_bias(variant, given):
    w = cell_weights(variant)
    del w["bias_hh" if given == "bias_ih" else "bias_ih"]
    with pytest.raises(ValueError, match=r"bias_ih, bias_hh: give both or neither"):
        make_cell(variant, w)


@pytest.mark.parametrize("bad", [(4, H), (2, H), (3, H + 1), (H, 3), (3 * H,), (1, 3, H)])
def test_weight_ph_wrong_shape(bad):
    w = cell_weights("peephole_lstm")
    w["weight_ph"] = np.zeros(bad)
    if len(bad) == 2:
        msg = re.escape(f" expected shape (3, {H}), got {bad}")
    else:
        msg = re.escape(f" expected a 2-D array, got shape {bad}")
    with pytest.raises(ValueError, match=exp("weight_ph") + msg):
        make_cell("peephole_lstm", w)


def test_weight_ph_missing():
    w = cell_weights("peephole_lstm")
    w["weight_ph"] = None
    with pytest.raises(TypeError, match=exp("weight_ph") + r" expected an array of shape \(3, hidden_size\), got None"):
        make_cell("peephole_lstm", w)


@cell_variants
def test_weight_ih_rows_not_a_multiple_of_gates(variant):
    g = VARIANTS[variant][0]
    bad_shapes = [(0, I), (g * H, 0)] + ([(g * H + 1, I), (g * H - 1, I)] if g > 1 else [])
    for bad in bad_shapes:
        w = cell_weights(variant)
        w["weight_ih"] = np.zeros(bad)
        msg = exp("weight_ih") + re.escape(f" expected shape ({g}*hidden_size, input_size) with both >= 1, got {bad}")
        with pytest.raises(ValueError, match=msg):
            make_cell(variant, w)


@cell_variants
@pytest.mark.parametrize("name", ["weight_ih", "weight_hh"])
@pytest.mark.parametrize("rank", [1, 3])
def test_weight_of_wrong_rank(variant, name, rank):
    w = cell_weights(variant)
    w[name] = w[name].reshape(-1) if rank == 1 else w[name][None]
    with pytest.raises(ValueError, match=exp(name) + r" expected a 2-D array, got shape "):
        make_cell(variant, w)


@pytest.mark.parametrize("nonlinearity", ["sigmoid", "TANH", "", None, "tanh "])
def test_bad_nonlinearity(nonlinearity):
    with pytest.raises(ValueError, match=exp("nonlinearity") + r" expected 'tanh' or 'relu', got "):
        fastcell.RNNCell(**cell_weights("rnn_tanh"), nonlinearity=nonlinearity)


# Values that are not real arrays (helpers.BAD_VALUES has more, for the layers and steps).
CELL_BAD_VALUES = {
    "complex": lambda shape: np.zeros(shape, np.complex128),
    "string": lambda shape: np.full(shape, "a"),
    "str": lambda shape: "abc",
    "object": lambda shape: np.empty(shape, object),
    "ragged": lambda shape: [[0.0] * 2, [0.0]],
    "none": lambda shape: None,
}


@cell_variants
@pytest.mark.parametrize("kind", list(CELL_BAD_VALUES))
def test_bad_input_values_name_the_argument(variant, kind):
    cell = cell_of(variant)
    bad = CELL_BAD_VALUES[kind]
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
    if variant in LSTM_CELLS:
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


@cell_variants
@pytest.mark.parametrize("kind", list(CELL_BAD_VALUES))
def test_bad_weight_values_name_the_argument(variant, kind):
    for name in WEIGHT_NAMES[variant]:
        w = cell_weights(variant)
        w[name] = CELL_BAD_VALUES[kind](w[name].shape)
        msg = exp(name)
        if kind == "none" and name.startswith("bias"):
            msg = "^bias_ih, bias_hh: give both or neither"
        with pytest.raises((TypeError, ValueError), match=msg):
            make_cell(variant, w)


# ---- conversions give the right numbers ----

@cell_variants
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


@cell_variants
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_int_and_bool_inputs(variant, dtype):
    cell = cell_of(variant, dtype)
    xi = np.random.default_rng(3).integers(-3, 4, (6, 2, I))
    assert_identical(cell.run(xi), cell.run(xi.astype(dtype)))
    assert_identical(cell(xi[0]), cell(xi[0].astype(dtype)))
    xb = xi > 0
    assert_identical(cell.run(xb), cell.run(xb.astype(dtype)))
    si = np.random.default_rng(4).integers(-2, 3, (2, H)).astype(np.int32)
    state = (si, si) if variant in LSTM_CELLS else si
    state_f = (si.astype(dtype),) * 2 if variant in LSTM_CELLS else si.astype(dtype)
    assert_identical(cell.run(xi, state), cell.run(xi.astype(dtype), state_f))


@cell_variants
def test_nested_lists(variant):
    w = cell_weights(variant)
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


@cell_variants
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_torch_tensors_as_weights_and_inputs(variant, dtype):
    torch = pytest.importorskip("torch")
    w = cell_weights(variant, dtype)
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


@cell_variants
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


@cell_variants
@pytest.mark.parametrize("layout", ["strided", "fortran", "negative_stride", "readonly"])
def test_awkward_weight_layouts_give_identical_results(variant, layout):
    w = cell_weights(variant)
    cell = make_cell(variant, w)
    odd = make_cell(variant, {k: layouts(v)[layout] for k, v in w.items()})
    xs = inputs((6, 2, I))
    assert_identical(odd.run(xs), cell.run(xs))
    for v in odd.state_dict().values():
        assert v.flags.c_contiguous


@cell_variants
@dtypes
@pytest.mark.parametrize("layout", ["memmap_readonly", "memmap_readwrite", "memmap_copy_on_write",
                                    "memmap_misaligned", "byteswapped", "masked_array",
                                    "strided_first"])
def test_cell_memmapped_and_byteswapped_inputs(variant, dtype, layout, tmp_path):
    # (strided, Fortran, negative-stride, read-only and nested lists: the tests above)
    cell = cell_of(variant, dtype)
    rng = np.random.default_rng(6)
    xs = rng.standard_normal((T, B, I)).astype(dtype)
    s = cell_state(variant, B, rng, dtype)
    want_run, want_call = cell.run(xs, s), cell(xs[0], s)
    assert_identical(cell.run(laid_out(xs, layout, tmp_path), laid_out(s, layout, tmp_path)), want_run)
    assert_identical(cell(laid_out(np.ascontiguousarray(xs[0]), layout, tmp_path),
                          laid_out(s, layout, tmp_path)), want_call)


@cell_variants
@dtypes
@pytest.mark.parametrize("src", ["float16", "other_float", "int8", "uint8", "longdouble"])
def test_cell_other_real_dtypes(variant, dtype, src):
    # (int64 and bool, and float64 into a float32 model: the tests above)
    cell = cell_of(variant, dtype)
    rng = np.random.default_rng(7)
    xs, xs_conv = other_dtype(src, dtype, (T, B, I), rng)
    if variant in LSTM_CELLS:
        (h, hc), (c, cc) = (other_dtype(src, dtype, (B, H), rng) for _ in range(2))
        s, s_conv = (h, c), (hc, cc)
    else:
        s, s_conv = other_dtype(src, dtype, (B, H), rng)
    got = cell.run(xs, s)
    assert all(a.dtype == dtype for a in flat(got))
    assert_identical(got, cell.run(xs_conv, s_conv))
    assert_identical(cell(xs[0], s), cell(xs_conv[0], s_conv))


# ---- weights of another cell ----

CROSS = [("lstm", "gru"), ("lstm", "rnn_tanh"), ("gru", "lstm"), ("gru", "rnn_tanh"),
         ("rnn_tanh", "gru"), ("rnn_tanh", "lstm"), ("peephole_lstm", "gru"), ("gru", "peephole_lstm")]


@pytest.mark.parametrize("hidden", [4, 6, 12])
@pytest.mark.parametrize("src,dst", CROSS)
def test_cell_given_another_cells_weights(src, dst, hidden):
    """The gate count is inferred from weight_ih's rows: another cell type's weights disagree with
    each other (weight_hh, weight_ph) and are refused, naming the weight."""
    w = init_weights(np.random.default_rng(0), VARIANTS[src][0], I, hidden, np.float64,
                     peephole=src == "peephole_lstm")
    w.pop("weight_ph", None)
    if dst == "peephole_lstm":
        w["weight_ph"] = np.zeros((3, hidden))
    cls = {"rnn_tanh": fastcell.RNNCell, "gru": fastcell.GRUCell, "lstm": fastcell.LSTMCell,
           "peephole_lstm": fastcell.PeepholeLSTMCell}[dst]
    with pytest.raises(ValueError, match=r"^(weight_ih|weight_hh|weight_ph|bias_ih|bias_hh): expected "):
        cls(**w)


def test_cell_given_a_projected_lstms_weights():
    w = init_weights(np.random.default_rng(0), 4, I, H, np.float64, proj_size=P)
    w.pop("weight_hr")
    msg = exp("weight_hh") + re.escape(f" expected shape ({4 * H}, {H}), got ({4 * H}, {P})")
    with pytest.raises(ValueError, match=msg):
        fastcell.LSTMCell(**w)


@cell_variants
def test_cell_weights_with_nan_build_and_propagate(variant):
    """Weights are not checked for finiteness (PyTorch does not either): NaN weights give NaN."""
    w = init_weights(np.random.default_rng(0), VARIANTS[variant][0], I, H, np.float64,
                     peephole=variant == "peephole_lstm")
    w["weight_ih"][0, 0] = np.nan
    y, _ = make_cell(variant, w).run(np.ones((T, B, I)))
    assert np.isnan(y).any()
