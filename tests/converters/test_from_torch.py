"""fastcell.from_torch (fastcell.convert): every torch.nn recurrent layer and cell, and
fastcell.torch's peephole LSTM, subclasses and trained modules, give a fastcell model with the
same configuration and a copy of the weights, whose outputs match the module's within docs/SPEC.md's
tolerance; other module types and dtypes are refused; importing fastcell imports no torch.
fastcell.torch itself: parity/test_fastcell_torch.py."""

import re

import numpy as np
import pytest

import fastcell
from fastcell import from_torch
from conftest import TOL, torch_or_skip
from helpers import CELL_TYPES, LAYER_TYPES, tensor_max_diff

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections:UserWarning",
                                        "ignore:enable_nested_tensor:UserWarning")


# ======================= from_torch =======================

def _torch_layers():
    torch = torch_or_skip()
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
    torch = torch_or_skip()
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
    assert tensor_max_diff(layer(x.numpy()), want) <= TOL[dtype]


def _torch_cells():
    torch = torch_or_skip()
    import fastcell.torch as fct
    nn = torch.nn
    return [("rnn", lambda: nn.RNNCell(3, 5)), ("rnn", lambda: nn.RNNCell(3, 5, nonlinearity="relu", bias=False)),
            ("gru", lambda: nn.GRUCell(3, 5)), ("gru", lambda: nn.GRUCell(3, 5).double()),
            ("lstm", lambda: nn.LSTMCell(3, 5)), ("lstm", lambda: nn.LSTMCell(3, 5, bias=False)),
            ("peephole_lstm", lambda: fct.PeepholeLSTMCell(3, 5)),
            ("peephole_lstm", lambda: fct.PeepholeLSTMCell(3, 5, bias=False, dtype=torch.float64))]


@pytest.mark.parametrize("case", range(8))
def test_from_torch_cells(case):
    torch = torch_or_skip()
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
    assert tensor_max_diff(got, want) <= TOL[cell.dtype.type]


def test_from_torch_copies_weights():
    torch = torch_or_skip()
    m = torch.nn.GRU(3, 4)
    layer = from_torch(m)
    before = layer.state_dict()["weight_hh_l0"].copy()
    with torch.no_grad():
        m.weight_hh_l0.add_(1.0)
    np.testing.assert_array_equal(layer.state_dict()["weight_hh_l0"], before)


def test_from_torch_subclass_and_trained_module():
    torch = torch_or_skip()

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
    torch = torch_or_skip()
    obj = make(torch)
    with pytest.raises(TypeError, match=r"unsupported module type .*" + re.escape(type(obj).__qualname__)):
        from_torch(obj)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_from_torch_refuses_other_dtypes(dtype):
    torch = torch_or_skip()
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


def test_import_fastcell_does_not_import_torch():
    import subprocess
    import sys
    code = ("import sys, fastcell, fastcell.convert.torch_modules, fastcell.convert.state_dict, "
            "fastcell.demo; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
