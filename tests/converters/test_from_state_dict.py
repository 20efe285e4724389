"""fastcell.from_state_dict (fastcell.convert): a PyTorch-style state dict, NumPy arrays or torch
tensors, gives the layer or cell it describes (its kind, sizes, layer count, directions, projection
and bias inferred; the options a state dict cannot hold given as overrides), with the same
weights; inconsistent or unknown state dicts and overrides that do not apply are refused, naming
the entry or the option."""

import itertools

import numpy as np
import pytest

import fastcell
from fastcell import from_state_dict
from helpers import CELL_TYPES, LAYER_TYPES, tensor_max_diff

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections:UserWarning",
                                        "ignore:enable_nested_tensor:UserWarning")

DTYPES = [np.float32, np.float64]


def random_layer(kind, num_layers=1, bidirectional=False, proj_size=0, bias=True, dtype=np.float32,
                 input_size=3, hidden_size=5):
    kw = {"proj_size": proj_size} if proj_size else {}
    return LAYER_TYPES[kind](input_size, hidden_size, num_layers=num_layers, bias=bias,
                             bidirectional=bidirectional, dtype=dtype, **kw)


def random_cell_weights(rng, kind, bias=True, dtype=np.float32, input_size=3, hidden_size=5):
    gates = {"rnn": 1, "gru": 3, "lstm": 4, "peephole_lstm": 4}[kind]
    k = 1 / np.sqrt(hidden_size)
    u = lambda *s: rng.uniform(-k, k, s).astype(dtype)  # noqa: E731
    w = {"weight_ih": u(gates * hidden_size, input_size), "weight_hh": u(gates * hidden_size, hidden_size)}
    if bias:
        w["bias_ih"], w["bias_hh"] = u(gates * hidden_size), u(gates * hidden_size)
    if kind == "peephole_lstm":
        w["weight_ph"] = u(3, hidden_size)
    return w


def assert_same_weights(a, b):
    assert sorted(a) == sorted(b)
    for n in a:
        assert a[n].dtype == b[n].dtype, n
        np.testing.assert_array_equal(a[n], b[n], err_msg=n)


# ======================= from_state_dict: inference (NumPy only) =======================

LAYER_CASES = [
    (kind, L, bi, proj, bias, dt)
    for kind in LAYER_TYPES for L in (1, 2, 3) for bi in (False, True)
    for proj in ((0, 2) if kind == "lstm" else (0,)) for bias in (True, False) for dt in DTYPES
]


@pytest.mark.parametrize("kind,num_layers,bidirectional,proj_size,bias,dtype", LAYER_CASES)
def test_from_state_dict_infers_layer(kind, num_layers, bidirectional, proj_size, bias, dtype):
    layer = random_layer(kind, num_layers, bidirectional, proj_size, bias, dtype)
    got = from_state_dict(layer.state_dict())
    assert type(got) is type(layer)
    assert got.config() == layer.config()
    assert_same_weights(got.state_dict(), layer.state_dict())
    x = np.random.default_rng(0).standard_normal((6, 2, 3))
    assert tensor_max_diff(got(x), layer(x)) == 0


@pytest.mark.parametrize("kind,bias,dtype", list(itertools.product(CELL_TYPES, (True, False), DTYPES)))
def test_from_state_dict_infers_cell(kind, bias, dtype, rng):
    w = random_cell_weights(rng, kind, bias, dtype)
    cell = from_state_dict(w)
    assert type(cell) is CELL_TYPES[kind]
    assert cell.dtype == dtype and cell.input_size == 3 and cell.hidden_size == 5
    assert cell.config()["bias"] is bias
    assert_same_weights(cell.state_dict(), w)


def test_from_state_dict_hidden_size_not_confused_by_input_size():
    # input_size a multiple of hidden_size, hidden_size a multiple of the gate count.
    for kind, I, H in (("gru", 12, 4), ("lstm", 8, 4), ("rnn", 4, 4), ("gru", 1, 3), ("lstm", 16, 1)):
        layer = random_layer(kind, 2, True, input_size=I, hidden_size=H)
        got = from_state_dict(layer.state_dict())
        assert got.config() == layer.config(), kind


def test_from_state_dict_projection_sizes():
    layer = random_layer("lstm", 2, True, proj_size=3, hidden_size=4, input_size=6)
    got = from_state_dict(layer.state_dict())
    assert (got.input_size, got.hidden_size, got.proj_size) == (6, 4, 3)


def test_from_state_dict_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    m = torch.nn.LSTM(3, 6, num_layers=2, bidirectional=True, proj_size=2).double()
    got = from_state_dict(m.state_dict())  # tensors that do not require grad
    assert got.config()["proj_size"] == 2 and got.dtype == np.float64
    got = from_state_dict(dict(m.named_parameters()))  # tensors that require grad
    assert got.config()["num_layers"] == 2


def test_from_state_dict_accepts_any_mapping_order(rng):
    layer = random_layer("gru", 3, True)
    items = list(layer.state_dict().items())
    rng.shuffle(items)
    assert from_state_dict(dict(items)).config() == layer.config()


# ---- overrides ----

def test_override_nonlinearity():
    layer = from_state_dict(random_layer("rnn", 2).state_dict(), nonlinearity="relu")
    assert layer.nonlinearity == "relu"
    cell = from_state_dict(random_cell_weights(np.random.default_rng(0), "rnn"), nonlinearity="relu")
    assert cell.nonlinearity == "relu"


def test_override_reset_after():
    assert from_state_dict(random_layer("gru").state_dict(), reset_after=False).reset_after is False
    assert from_state_dict(random_layer("gru").state_dict()).reset_after is True
    cell = from_state_dict(random_cell_weights(np.random.default_rng(0), "gru"), reset_after=False)
    assert cell.reset_after is False


def test_override_batch_first():
    assert from_state_dict(random_layer("lstm").state_dict(), batch_first=True).batch_first is True
    assert from_state_dict(random_layer("lstm").state_dict()).batch_first is False


def test_overrides_none_means_not_given():
    layer = from_state_dict(random_layer("lstm").state_dict(), nonlinearity=None, reset_after=None,
                            batch_first=None)
    assert layer.config() == fastcell.LSTM(3, 5).config()


def test_overrides_at_their_default_are_accepted_where_they_do_not_apply():
    # A command line passes every option at its default.
    layer = from_state_dict(random_layer("lstm").state_dict(), nonlinearity="tanh", reset_after=True,
                            batch_first=False)
    assert isinstance(layer, fastcell.LSTM)
    cell = from_state_dict(random_cell_weights(np.random.default_rng(0), "gru"), batch_first=False)
    assert isinstance(cell, fastcell.GRUCell)


@pytest.mark.parametrize("kind,override,pattern", [
    ("lstm", {"nonlinearity": "relu"}, r"nonlinearity='relu' applies to rnn models, but the state_dict holds a lstm layer"),
    ("rnn", {"reset_after": False}, r"reset_after=False applies to gru models, but the state_dict holds a rnn layer"),
    ("peephole_lstm", {"reset_after": False}, r"holds a peephole_lstm layer"),
])
def test_override_that_does_not_apply_is_refused(kind, override, pattern):
    with pytest.raises(ValueError, match=pattern):
        from_state_dict(random_layer(kind).state_dict(), **override)


def test_batch_first_for_a_cell_is_refused():
    with pytest.raises(ValueError, match="batch_first=True applies to layers, but the state_dict holds a lstm cell"):
        from_state_dict(random_cell_weights(np.random.default_rng(0), "lstm"), batch_first=True)


def test_unknown_override_keyword():
    with pytest.raises(TypeError, match="unexpected keyword argument.*proj_size"):
        from_state_dict(random_layer("lstm").state_dict(), proj_size=2)


@pytest.mark.parametrize("override,exc", [({"nonlinearity": "sigmoid"}, ValueError),
                                          ({"reset_after": "yes"}, TypeError),
                                          ({"batch_first": 1}, TypeError)])
def test_bad_override_values(override, exc):
    with pytest.raises(exc, match=next(iter(override))):
        from_state_dict(random_layer("rnn").state_dict(), **override)


# ---- inconsistent or unknown state_dicts ----

def _sd(kind="lstm", **kw):
    return dict(random_layer(kind, **kw).state_dict())


def _without(d, *names):
    return {k: v for k, v in d.items() if k not in names}


@pytest.mark.parametrize("make,pattern", [
    (lambda: {}, "the state_dict is empty"),
    (lambda: _without(_sd(num_layers=2), "weight_hh_l1"), r"missing weight_hh_l1"),
    (lambda: _without(_sd(num_layers=2, bidirectional=True), "weight_ih_l1_reverse"),
     r"missing weight_ih_l1_reverse"),
    (lambda: {k: v for k, v in _sd(num_layers=3).items() if "_l1" not in k},
     r"found layers up to _l2, but nothing for _l1"),
    (lambda: {k: v for k, v in _sd(num_layers=2, bidirectional=True).items() if not k.endswith("_l1_reverse")},
     r"with _reverse \(bidirectional\), but nothing for _l1_reverse"),
    (lambda: _without(_sd(num_layers=2), "bias_ih_l1", "bias_hh_l1"),
     r"bias_ih / bias_hh given for some layers or directions but not all: present .*; missing bias_ih_l1, bias_hh_l1"),
    (lambda: _without(_sd(), "bias_hh_l0"), r"bias_ih / bias_hh given for some .* missing bias_hh_l0"),
    (lambda: _without(_sd(num_layers=2, proj_size=2), "weight_hr_l1"),
     r"weight_hr given for some layers or directions but not all: present weight_hr_l0; missing weight_hr_l1"),
    (lambda: _without(_sd("peephole_lstm", bidirectional=True), "weight_ph_l0_reverse"),
     r"weight_ph given for some .* missing weight_ph_l0_reverse"),
    (lambda: dict(_sd(num_layers=2), weight_ih_l1=np.zeros((20, 4), np.float32)),
     r"inferred a lstm layer: input_size 3 \(weight_ih_l0\), hidden_size 5 \(weight_hh_l0\), num_layers 2; "
     r"inconsistent: weight_ih_l1 has shape \(20, 4\), expected \(20, 5\)"),
    (lambda: dict(_sd(), bias_ih_l0=np.zeros(21, np.float32)),
     r"inconsistent: bias_ih_l0 has shape \(21,\), expected \(20,\)"),
    (lambda: dict(_sd("gru"), weight_hh_l0=np.zeros((10, 5), np.float32)),
     r"weight_hh_l0 \(10, 5\): rows / hidden size = 10/5 is not 1 \(RNN\), 3 \(GRU\) or 4 \(LSTM\) gates"),
    (lambda: _without(_sd(proj_size=2), "weight_hr_l0"),
     r"rows / hidden size = 20/2 is not 1 .* \(a projected LSTM also needs its weight_hr_l\{k\}\)"),
    (lambda: dict(_sd("gru"), weight_ph_l0=np.zeros((3, 5), np.float32)),
     r"weight_ph \(peepholes\) needs an LSTM's 4 gates, but weight_hh_l0 \(15, 5\) has 3"),
    (lambda: dict(_sd("gru"), weight_hr_l0=np.zeros((2, 5), np.float32)),
     r"weight_hr \(a projection\) needs an LSTM's 4 gates"),
    (lambda: dict(_sd("peephole_lstm"), weight_hr_l0=np.zeros((2, 5), np.float32)),
     r"weight_ph \(peepholes\) together with weight_hr \(projection\)"),
    (lambda: dict(_sd(), weight_hr_l0=np.zeros((5, 5), np.float32)),
     r"weight_hr_l0 \(5, 5\): proj_size 5 must be less than hidden_size 5"),
    (lambda: dict(_sd(), weight_ih_l0=np.zeros((20, 3, 1), np.float32)), r"weight_ih_l0 should be 2-D, got shape \(20, 3, 1\)"),
    (lambda: dict(_sd(), weight_ih=np.zeros((20, 3), np.float32)),
     r"cell names \(weight_ih\) mixed with layer names \(bias_hh_l0, bias_ih_l0, weight_hh_l0, weight_ih_l0\)"),
    (lambda: dict(_sd(), weight_ih_l0=np.zeros((20, 3), np.float64)),
     r"the arrays mix dtypes \(float32: bias_hh_l0, bias_ih_l0, weight_hh_l0; float64: weight_ih_l0\)"),
    (lambda: dict(_sd(), foo=np.zeros(3, np.float32), **{"weight_ih_l0.orig": np.zeros(1, np.float32)}),
     r"unknown names foo, weight_ih_l0.orig; expected PyTorch's recurrent names"),
    (lambda: {"lstm." + k: v for k, v in _sd().items()},
     r"unknown names lstm.bias_hh_l0, .*; every name starts with 'lstm.' .*k.removeprefix\('lstm.'\)"),
    (lambda: {1: np.zeros(3, np.float32)}, r"names must be strings, got 1"),
])
def test_inconsistent_layer_state_dict(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        from_state_dict(make())


@pytest.mark.parametrize("make,pattern", [
    (lambda w: _without(w, "weight_hh"), r"a cell state_dict needs weight_hh"),
    (lambda w: _without(w, "bias_hh"), r"bias_ih and bias_hh come together; got only bias_ih"),
    (lambda w: dict(w, weight_hr=np.zeros((2, 5), np.float32)), r"weight_hr \(a projection\) in a cell state_dict"),
    (lambda w: dict(w, weight_ih=np.zeros((15, 3), np.float32)),
     r"weight_ih has 15 rows, weight_hh 20: the gate rows \(gates x hidden_size\) must match"),
    (lambda w: dict(w, bias_hh=np.zeros(19, np.float32)),
     r"inferred a lstm cell with hidden_size 5 from weight_hh \(20, 5\); bias_hh has shape \(19,\), expected \(20,\)"),
    (lambda w: dict(w, weight_ph=np.zeros((3, 4), np.float32)),
     r"inferred a peephole_lstm cell .* weight_ph has shape \(3, 4\), expected \(3, 5\)"),
    (lambda w: dict(w, weight_hh=np.zeros((20, 4), np.float32)), r"rows / hidden size = 20/4 is not 1"),
])
def test_inconsistent_cell_state_dict(make, pattern, rng):
    w = random_cell_weights(rng, "lstm")
    if "weight_ph" in pattern:
        w["weight_ph"] = np.zeros((3, 5), np.float32)
    with pytest.raises(ValueError, match=pattern):
        from_state_dict(make(w))


def test_unsupported_dtype_is_refused_naming_the_entry():
    sd = {k: v.astype(np.float16) for k, v in _sd().items()}
    with pytest.raises(TypeError, match=r"float32 or float64, got float16"):
        from_state_dict(sd)
    sd = dict(_sd(), weight_hh_l0=np.zeros((20, 5), np.int64))
    with pytest.raises(TypeError, match=r"weight_hh_l0: .*got int64"):
        from_state_dict(sd)


def test_unsupported_torch_dtype_is_refused_naming_the_entry():
    torch = pytest.importorskip("torch")
    sd = torch.nn.GRU(3, 4).to(torch.bfloat16).state_dict()
    with pytest.raises(TypeError, match=r"weight_ih_l0: fastcell computes in float32 or float64, got a bfloat16 tensor"):
        from_state_dict(sd)


def test_not_a_mapping():
    with pytest.raises(TypeError, match="expected a mapping"):
        from_state_dict([("weight_ih_l0", np.zeros((4, 3)))])
