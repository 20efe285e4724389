"""fastcell.convert (from_torch, from_state_dict) and fastcell.torch (the PyTorch peephole LSTM)."""

import itertools
import re

import numpy as np
import pytest

import fastcell
from fastcell import from_state_dict, from_torch
from conftest import TOL

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections:UserWarning",
                                        "ignore:enable_nested_tensor:UserWarning")

DTYPES = [np.float32, np.float64]
LAYER_TYPES = {"rnn": fastcell.RNN, "gru": fastcell.GRU, "lstm": fastcell.LSTM,
               "peephole_lstm": fastcell.PeepholeLSTM}
CELL_TYPES = {"rnn": fastcell.RNNCell, "gru": fastcell.GRUCell, "lstm": fastcell.LSTMCell,
              "peephole_lstm": fastcell.PeepholeLSTMCell}


def max_diff(a, b):
    if isinstance(a, (tuple, list)):
        return max(max_diff(u, v) for u, v in zip(a, b))
    a, b = (v.detach().numpy() if hasattr(v, "detach") else v for v in (a, b))
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0))


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
    assert max_diff(got(x), layer(x)) == 0


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


# ======================= from_torch =======================

def _torch():
    return pytest.importorskip("torch")


def _torch_layers():
    torch = _torch()
    import fastcell.torch as fct
    nn = torch.nn
    return [
        ("rnn", lambda: nn.RNN(3, 5)),
        ("rnn", lambda: nn.RNN(3, 5, num_layers=2, nonlinearity="relu", bidirectional=True, batch_first=True)),
        ("rnn", lambda: nn.RNN(3, 5, bias=False).double()),
        ("gru", lambda: nn.GRU(3, 5, num_layers=3, bidirectional=True)),
        ("gru", lambda: nn.GRU(3, 5, batch_first=True, bias=False, dropout=0.0)),
        ("lstm", lambda: nn.LSTM(3, 5)),
        ("lstm", lambda: nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, batch_first=True)),
        ("lstm", lambda: nn.LSTM(3, 5, num_layers=3, proj_size=4, bias=False).double()),
        ("peephole_lstm", lambda: fct.PeepholeLSTM(3, 5)),
        ("peephole_lstm", lambda: fct.PeepholeLSTM(3, 5, num_layers=2, bidirectional=True, batch_first=True)),
        ("peephole_lstm", lambda: fct.PeepholeLSTM(3, 5, num_layers=3, bias=False, dtype=torch.float64)),
    ]


@pytest.mark.parametrize("case", range(11))
def test_from_torch_layers(case):
    torch = _torch()
    kind, make = _torch_layers()[case]
    torch.manual_seed(case)
    m = make()
    layer = from_torch(m)
    assert type(layer) is LAYER_TYPES[kind]
    dtype = np.float64 if next(m.parameters()).dtype == torch.float64 else np.float32
    assert layer.dtype == dtype
    for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "bidirectional"):
        assert getattr(layer, attr) == getattr(m, attr), attr
    assert layer.proj_size == getattr(m, "proj_size", 0)
    if kind == "rnn":
        assert layer.nonlinearity == m.nonlinearity
    x = torch.randn(4, 6, 3, dtype=next(m.parameters()).dtype)
    with torch.no_grad():
        want = m(x)
    assert max_diff(layer(x.numpy()), want) <= TOL[dtype]


def _torch_cells():
    torch = _torch()
    import fastcell.torch as fct
    nn = torch.nn
    return [("rnn", lambda: nn.RNNCell(3, 5)), ("rnn", lambda: nn.RNNCell(3, 5, nonlinearity="relu", bias=False)),
            ("gru", lambda: nn.GRUCell(3, 5)), ("gru", lambda: nn.GRUCell(3, 5).double()),
            ("lstm", lambda: nn.LSTMCell(3, 5)), ("lstm", lambda: nn.LSTMCell(3, 5, bias=False)),
            ("peephole_lstm", lambda: fct.PeepholeLSTMCell(3, 5)),
            ("peephole_lstm", lambda: fct.PeepholeLSTMCell(3, 5, bias=False, dtype=torch.float64))]


@pytest.mark.parametrize("case", range(8))
def test_from_torch_cells(case):
    torch = _torch()
    kind, make = _torch_cells()[case]
    torch.manual_seed(case)
    m = make()
    cell = from_torch(m)
    assert type(cell) is CELL_TYPES[kind]
    dtype = next(m.parameters()).dtype
    assert cell.dtype == (np.float64 if dtype == torch.float64 else np.float32)
    if kind == "rnn":
        assert cell.nonlinearity == m.nonlinearity
    x = torch.randn(4, 3, dtype=dtype)
    hx = torch.randn(4, 5, dtype=dtype)
    hx = (hx, torch.randn(4, 5, dtype=dtype)) if "lstm" in kind else hx
    with torch.no_grad():
        want = m(x, hx)
    got = cell(x.numpy(), tuple(h.numpy() for h in hx) if isinstance(hx, tuple) else hx.numpy())
    assert max_diff(got, want) <= TOL[cell.dtype.type]


def test_from_torch_copies_weights():
    torch = _torch()
    m = torch.nn.GRU(3, 4)
    layer = from_torch(m)
    before = layer.state_dict()["weight_hh_l0"].copy()
    with torch.no_grad():
        m.weight_hh_l0.add_(1.0)
    np.testing.assert_array_equal(layer.state_dict()["weight_hh_l0"], before)


def test_from_torch_subclass_and_trained_module():
    torch = _torch()

    class MyLSTM(torch.nn.LSTM):
        pass

    m = MyLSTM(3, 4)
    m(torch.randn(5, 2, 3))[0].sum().backward()  # grads present, requires_grad parameters
    assert isinstance(from_torch(m), fastcell.LSTM)


@pytest.mark.parametrize("make", [
    lambda torch: torch.nn.Linear(3, 4),
    lambda torch: torch.nn.Sequential(torch.nn.LSTM(3, 4)),
    lambda torch: torch.nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                                       dim_feedforward=8),
    lambda torch: torch.nn.RNNBase("LSTM", 3, 4),
    lambda torch: "an LSTM",
    lambda torch: None,
])
def test_from_torch_refuses_other_types(make):
    torch = _torch()
    obj = make(torch)
    with pytest.raises(TypeError, match=r"unsupported module type .*" + re.escape(type(obj).__qualname__)):
        from_torch(obj)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_from_torch_refuses_other_dtypes(dtype):
    torch = _torch()
    m = torch.nn.LSTM(3, 4).to(getattr(torch, dtype))
    with pytest.raises(TypeError, match=f"parameters are {dtype}; convert first"):
        from_torch(m)


def test_from_torch_without_torch_imported_refuses_plain_objects():
    # No torch in sight: refused by type, torch not imported to find out.
    import subprocess
    import sys
    code = ("import sys; sys.modules['torch'] = None; from fastcell import from_torch\n"
            "try:\n    from_torch(object())\nexcept TypeError as e:\n    print('TypeError', e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("TypeError from_torch: unsupported module type builtins.object")


# ======================= fastcell.torch =======================

def _fct():
    _torch()
    import fastcell.torch as fct
    return fct


def test_peephole_parameters_names_shapes_and_init():
    torch = _torch()
    fct = _fct()
    m = fct.PeepholeLSTM(3, 16, num_layers=2, bidirectional=True)
    names = dict(m.named_parameters())
    expected = fastcell.PeepholeLSTM(3, 16, num_layers=2, bidirectional=True).expected_shapes()
    assert {n: tuple(p.shape) for n, p in names.items()} == expected
    assert list(m.state_dict()) == list(names)
    k = 1 / 4
    for n, p in names.items():
        assert p.dtype == torch.float32 and p.requires_grad
        assert float(p.detach().abs().max()) <= k, n
        assert float(p.detach().abs().max()) > k / 2, n  # spread over the range, not zeros
    assert "weight_ph_l1_reverse" in names
    nb = fct.PeepholeLSTM(3, 4, bias=False)
    assert sorted(dict(nb.named_parameters())) == ["weight_hh_l0", "weight_ih_l0", "weight_ph_l0"]
    cell = fct.PeepholeLSTMCell(3, 4)
    assert {n: tuple(p.shape) for n, p in cell.named_parameters()} == {
        "weight_ih": (16, 3), "weight_hh": (16, 4), "bias_ih": (16,), "bias_hh": (16,), "weight_ph": (3, 4)}
    assert fct.PeepholeLSTM(3, 4, dtype=torch.float64).weight_ph_l0.dtype == torch.float64
    assert "num_layers=2" in repr(m) and "bidirectional=True" in repr(m)


@pytest.mark.parametrize("L,bi,bf", list(itertools.product((1, 2), (False, True), (False, True))))
def test_peephole_shapes(L, bi, bf):
    torch = _torch()
    fct = _fct()
    D, T, B, I, H = 2 if bi else 1, 7, 3, 4, 5
    m = fct.PeepholeLSTM(I, H, num_layers=L, bidirectional=bi, batch_first=bf)
    x = torch.randn(B, T, I) if bf else torch.randn(T, B, I)
    out, (h, c) = m(x)
    assert out.shape == ((B, T, D * H) if bf else (T, B, D * H))
    assert h.shape == c.shape == (D * L, B, H)
    out, (h, c) = m(torch.randn(T, I))  # unbatched: (T, I) whatever batch_first
    assert out.shape == (T, D * H) and h.shape == c.shape == (D * L, H)
    out2, _ = m(torch.randn(T, I), (h, c))
    assert out2.shape == (T, D * H)
    ref = torch.nn.LSTM(I, H, num_layers=L, bidirectional=bi, batch_first=bf)
    assert [t.shape for t in m(x)[1]] == [t.shape for t in ref(x)[1]]
    assert m(x)[0].shape == ref(x)[0].shape


def test_peephole_bad_arguments():
    torch = _torch()
    fct = _fct()
    m = fct.PeepholeLSTM(4, 5, num_layers=2)
    with pytest.raises(ValueError, match="input.size"):
        m(torch.randn(3, 2, 3))
    with pytest.raises(ValueError, match="2-D .* or 3-D"):
        m(torch.randn(4))
    with pytest.raises(ValueError, match=r"h_0: expected shape \(2, 2, 5\), got \(1, 2, 5\)"):
        m(torch.randn(3, 2, 4), (torch.zeros(1, 2, 5), torch.zeros(2, 2, 5)))
    with pytest.raises(TypeError, match="an \\(h_0, c_0\\) pair"):
        m(torch.randn(3, 2, 4), torch.zeros(2, 2, 5))
    with pytest.raises(ValueError, match="hidden_size"):
        fct.PeepholeLSTM(4, 0)
    with pytest.raises(ValueError, match=r"hx\[1\] \(c\)"):
        fct.PeepholeLSTMCell(4, 5)(torch.randn(2, 4), (torch.zeros(2, 5), torch.zeros(5)))


def test_peephole_cell_matches_layer_step():
    torch = _torch()
    fct = _fct()
    torch.manual_seed(0)
    layer, cell = fct.PeepholeLSTM(3, 4), fct.PeepholeLSTMCell(3, 4)
    cell.load_state_dict({n[:-3]: p for n, p in layer.state_dict().items()})
    x, h0, c0 = torch.randn(5, 2, 3), torch.randn(2, 4), torch.randn(2, 4)
    with torch.no_grad():
        out, (h, c) = layer(x, (h0[None], c0[None]))
        s = (h0, c0)
        for t in range(5):
            s = cell(x[t], s)
            # Both sides are PyTorch's matmuls, (T*B, I) against (B, I): PyTorch does not promise
            # the same bits for the two (its kernels block the sums differently on different
            # CPUs), so float32's tolerance, 1e-5.
            assert max_diff(s[0], out[t]) <= TOL[np.float32]
    assert max_diff(s[0], h[0]) <= TOL[np.float32] and max_diff(s[1], c[0]) <= TOL[np.float32]
    hu, cu = cell(x[0, 0])  # unbatched
    assert hu.shape == cu.shape == (4,)


def test_peephole_equations_against_reference():
    """The module computes docs/SPEC.md's equations (fastcell.reference.lstm_cell with weight_ph)."""
    torch = _torch()
    fct = _fct()
    from fastcell import reference as ref
    torch.manual_seed(1)
    cell = fct.PeepholeLSTMCell(3, 4, dtype=torch.float64)
    with torch.no_grad():
        cell.weight_ph.mul_(8)  # peepholes large enough to matter
    x, h, c = (torch.randn(2, n, dtype=torch.float64) for n in (3, 4, 4))
    with torch.no_grad():
        got = cell(x, (h, c))
    w = {n: p.detach().numpy() for n, p in cell.named_parameters()}
    want = ref.lstm_cell(x.numpy(), h.numpy(), c.numpy(), **w)
    assert max_diff(got, want) <= 1e-14


@pytest.mark.parametrize("bias", [True, False])
def test_peephole_training_decreases_loss(bias):
    torch = _torch()
    fct = _fct()
    torch.manual_seed(0)
    m = fct.PeepholeLSTM(3, 8, num_layers=2, bias=bias, batch_first=True)
    head = torch.nn.Linear(8, 1)
    params = list(m.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=0.02)
    x = torch.randn(16, 10, 3)
    y = x[:, :2, 0].sum(1, keepdim=True)  # remember the first two inputs of channel 0
    losses = []
    for _ in range(40):
        out, _ = m(x)
        loss = torch.nn.functional.mse_loss(head(out[:, -1]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_peephole_packed_sequence_round_trip():
    torch = _torch()
    fct = _fct()
    from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
    torch.manual_seed(0)
    m = fct.PeepholeLSTM(3, 4, bidirectional=True)
    x, lengths = torch.randn(6, 4, 3), torch.tensor([2, 6, 1, 4])
    for enforce_sorted in (False, True):
        lens = lengths if not enforce_sorted else lengths.sort(descending=True).values
        packed = pack_padded_sequence(x, lens, enforce_sorted=enforce_sorted)
        out, (h, c) = m(packed)
        assert isinstance(out, PackedSequence)
        assert torch.equal(out.batch_sizes, packed.batch_sizes)
        assert (out.sorted_indices is None) == enforce_sorted
        padded, out_lengths = pad_packed_sequence(out)
        assert torch.equal(out_lengths, lens)
        assert padded.shape == (6, 4, 8) and h.shape == (2, 4, 4)
        # each sequence alone gives the same numbers, within float32's tolerance (PyTorch
        # computes both, with matmuls of other shapes: no promise of the same bits)
        for b in range(4):
            n = int(lens[b])
            alone, (hb, cb) = m(x[:n, b])
            assert max_diff(padded[:n, b], alone) <= TOL[np.float32]
            assert torch.all(padded[n:, b] == 0)
            assert max_diff(h[:, b], hb) <= TOL[np.float32] and max_diff(c[:, b], cb) <= TOL[np.float32]


# ---- parity: fastcell.PeepholeLSTM against fastcell.torch.PeepholeLSTM ----

PARITY = list(itertools.product((1, 2, 3), (False, True), (False, True), ("full", "lengths", "unbatched"),
                                ("zeros", "given"), DTYPES))


@pytest.mark.parametrize("num_layers,bidirectional,batch_first,mode,hx,dtype", PARITY)
def test_peephole_layer_parity(num_layers, bidirectional, batch_first, mode, hx, dtype, rng):
    torch = _torch()
    fct = _fct()
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    torch.manual_seed(int(rng.integers(2**31)))
    I, H, T, B = 3, 6, 9, 5
    D = 2 if bidirectional else 1
    m = fct.PeepholeLSTM(I, H, num_layers=num_layers, bidirectional=bidirectional,
                         batch_first=batch_first, dtype=tdt)
    layer = fastcell.PeepholeLSTM(I, H, num_layers=num_layers, bidirectional=bidirectional,
                                  batch_first=batch_first, dtype=dtype)
    layer.load_state_dict(m.state_dict())
    assert from_torch(m).config() == layer.config()

    unbatched = mode == "unbatched"
    xshape = (T, I) if unbatched else ((B, T, I) if batch_first else (T, B, I))
    x = rng.standard_normal(xshape).astype(dtype)
    sshape = (D * num_layers, H) if unbatched else (D * num_layers, B, H)
    state = None
    if hx == "given":
        state = (rng.standard_normal(sshape).astype(dtype), rng.standard_normal(sshape).astype(dtype))
    tstate = None if state is None else tuple(torch.from_numpy(s) for s in state)

    with torch.no_grad():
        if mode == "lengths":
            lengths = rng.integers(1, T + 1, size=B)
            lengths[rng.choice(B, 2, replace=False)] = [1, T]  # unsorted, with 1 and the full length
            packed = pack_padded_sequence(torch.from_numpy(x), torch.from_numpy(lengths),
                                          batch_first=batch_first, enforce_sorted=False)
            out, (h, c) = m(packed, tstate)
            want_out, _ = pad_packed_sequence(out, batch_first=batch_first)
            got_out, (gh, gc) = layer(x, state, lengths=lengths)
        else:
            want_out, (h, c) = m(torch.from_numpy(x), tstate)
            got_out, (gh, gc) = layer(x, state)
    assert got_out.shape == tuple(want_out.shape)
    assert gh.shape == tuple(h.shape) and gc.shape == tuple(c.shape)
    assert max_diff((got_out, gh, gc), (want_out, h, c)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_peephole_parity_long_sequence(dtype, rng):
    """docs/SPEC.md's contract holds over T = 1000 with PyTorch's initialisation and unit inputs."""
    torch = _torch()
    fct = _fct()
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    torch.manual_seed(3)
    m = fct.PeepholeLSTM(4, 16, bidirectional=True, dtype=tdt)
    layer = from_torch(m)
    x = rng.standard_normal((1000, 2, 4)).astype(dtype)
    with torch.no_grad():
        want = m(torch.from_numpy(x))
    assert max_diff(layer(x), want) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_peephole_cell_parity(dtype, rng):
    torch = _torch()
    fct = _fct()
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    torch.manual_seed(4)
    m = fct.PeepholeLSTMCell(3, 7, dtype=tdt)
    cell = from_torch(m)
    assert isinstance(cell, fastcell.PeepholeLSTMCell)
    x = rng.standard_normal((20, 2, 3)).astype(dtype)
    s, ts = None, None
    with torch.no_grad():
        for t in range(20):
            s = cell(x[t], s)
            ts = m(torch.from_numpy(x[t]), ts)
    assert max_diff(s, ts) <= TOL[dtype]


def test_import_fastcell_does_not_import_torch():
    import subprocess
    import sys
    code = ("import sys, fastcell, fastcell.convert.torch_modules, fastcell.convert.state_dict, "
            "fastcell.demo; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
