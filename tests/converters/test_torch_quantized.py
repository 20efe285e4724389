"""fastcell.from_torch on PyTorch's dynamic quantized (qint8) recurrent modules, the LSTM, GRU,
LSTMCell, GRUCell and RNNCell that torch.ao.quantization.quantize_dynamic makes.

The fastcell model keeps the torch module's int8 weights and scales exactly; its products quantize
the activations differently (per row, 8 bits for h, 16 for x, where torch quantizes each product's
input per tensor to 7 bits, asymmetric), so its outputs are compared with a tolerance.
"""

import numpy as np
import pytest

import fastcell
from fastcell.formats.reduced import Reduced
from conftest import TOL

torch = pytest.importorskip("torch")
nn = torch.nn
nnqd = pytest.importorskip("torch.ao.nn.quantized.dynamic")
tq = pytest.importorskip("torch.ao.quantization")

pytestmark = pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning",
                                        "ignore:torch.quantize_per_tensor, torch.quantize_per_channel:UserWarning",
                                        "ignore:LSTM with projections:UserWarning")

QCONFIGS = {"per_tensor": tq.default_dynamic_qconfig, "per_channel": tq.per_channel_dynamic_qconfig}
QSCHEMES = {"per_tensor": torch.per_tensor_affine, "per_channel": torch.per_channel_affine}
T = 50

# Over T = 50 steps with randn inputs, randn initial states and PyTorch's initialisation, the torch
# int8 modules' max abs error against their fp32 originals is 2e-3 to 3e-2 (larger with H = 64
# and batch 4); fastcell's output differed from the torch int8 module's by at most 3.2e-2 over 30
# seeds of every case below. 5e-2 catches what matters (a wrong scale, bias or gate order is off
# by 0.1 to 1) without tripping on the two kernels' different activation rounding.
CLOSE_TO_TORCH_INT8 = 5e-2


def flat(a):
    if isinstance(a, (tuple, list)):
        return np.concatenate([flat(v) for v in a])
    a = a.detach().numpy() if hasattr(a, "detach") else a
    return np.asarray(a, np.float64).ravel()


def max_diff(a, b):
    return float(np.max(np.abs(flat(a) - flat(b)), initial=0))


def rms_diff(a, b):
    return float(np.sqrt(np.mean((flat(a) - flat(b)) ** 2)))


def quantized(module, qconfig="per_tensor"):
    """quantize_dynamic's qint8 version of one float module (wrapped: quantize_dynamic swaps the
    children of what it is given, not the module itself)."""
    q = tq.quantize_dynamic(nn.Sequential(module), {type(module): QCONFIGS[qconfig]}, dtype=torch.qint8)[0]
    assert type(q).__module__ == "torch.ao.nn.quantized.dynamic.modules.rnn"
    return q


def as_numpy(state):
    return tuple(s.numpy() for s in state) if isinstance(state, tuple) else state.numpy()


def assert_int8_exact(model, qmodule, fmodule, qconfig):
    """model holds qmodule's int8 weights and scales exactly (read here through torch's own
    _weight_bias(), not the linear_unpack the bridge uses), and fmodule's float32 biases."""
    assert model.weight_format == "int8"
    stored, sd = model._stored_state_dict(), model.state_dict()
    qweights = qmodule._weight_bias()["weight"]
    assert sorted(qweights) == sorted(n for n in stored if n.startswith("weight_"))
    saw_minus_128 = False
    for name, qw in qweights.items():
        r = stored[name]
        assert isinstance(r, Reduced) and r.format == "int8", name
        assert qw.qscheme() == QSCHEMES[qconfig], name
        np.testing.assert_array_equal(r.data, qw.int_repr().numpy(), err_msg=name)
        if qconfig == "per_tensor":
            assert qw.q_zero_point() == 0
            scales = np.full(qw.shape[0], qw.q_scale())
        else:
            assert qw.q_per_channel_axis() == 0 and not qw.q_per_channel_zero_points().any()
            scales = qw.q_per_channel_scales().numpy()
            assert len(np.unique(scales)) > 1, name  # really one scale per row
        # Exactly: torch's scales are float32 values (its int8 kernels keep float32 scales).
        np.testing.assert_array_equal(r.scale.astype(np.float64), scales, err_msg=name)
        # The dequantized state_dict: int_repr * scale, which is also torch's dequantize().
        np.testing.assert_array_equal(sd[name], r.data.astype(np.float32) * r.scale[:, None], err_msg=name)
        np.testing.assert_array_equal(sd[name], qw.dequantize().numpy(), err_msg=name)
        saw_minus_128 |= bool((r.data == -128).any())
    if qconfig == "per_channel":
        # Symmetric qint8 observers map -max|w| to -127.5 -> -128: kept, not clipped to -127.
        assert saw_minus_128
    for name, b in fmodule.state_dict().items():
        if name.startswith("bias_"):
            assert sd[name].dtype == np.float32
            np.testing.assert_array_equal(sd[name], b.numpy(), err_msg=name)


def assert_errors(got, want_int8, want_fp32):
    """fastcell's error against the fp32 module is no larger than torch int8's, and fastcell is
    close to torch int8.

    The comparison: root mean square over every output value (h at each step, and the final
    states). Both models hold the same int8 weights, so both errors share the weights' own error;
    fastcell adds less to it (finer activation quantization): over 30 seeds of every case its RMS
    error was 1.1 to 5 times smaller. The max abs error, an extreme over ~10^3 values that mostly
    measures the weights' error, tells less: fastcell's was smaller in ~95% of the seeds and at
    worst 1.8 times torch's, so it is held to twice torch's.
    """
    e_fast, e_torch = rms_diff(got, want_fp32), rms_diff(want_int8, want_fp32)
    assert e_fast <= e_torch, f"RMS error vs fp32: fastcell {e_fast:.3e}, torch int8 {e_torch:.3e}"
    m_fast, m_torch = max_diff(got, want_fp32), max_diff(want_int8, want_fp32)
    assert m_fast <= 2 * m_torch, f"max abs error vs fp32: fastcell {m_fast:.3e}, torch int8 {m_torch:.3e}"
    d = max_diff(got, want_int8)
    assert d <= CLOSE_TO_TORCH_INT8, f"fastcell vs torch int8: {d:.3e}"


# ======================= layers =======================

# (type, input_size, hidden_size, num_layers, bidirectional, batch_first, batch)
LAYER_CASES = [("LSTM", 3, 17, 1, False, False, 1), ("LSTM", 17, 64, 2, True, False, 4),
               ("LSTM", 3, 64, 1, True, True, 4), ("GRU", 3, 17, 1, False, False, 4),
               ("GRU", 17, 64, 2, True, True, 4), ("GRU", 3, 64, 2, False, False, 1)]


@pytest.mark.parametrize("qconfig", list(QCONFIGS))
@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: "-".join(map(str, c)))
def test_dynamic_quantized_layer(case, qconfig, rng):
    kind, I, H, L, bi, bf, B = case
    torch.manual_seed(int(rng.integers(2**31)))
    f = getattr(nn, kind)(I, H, num_layers=L, bidirectional=bi, batch_first=bf)
    q = quantized(f, qconfig)
    model = fastcell.from_torch(q)
    assert type(model) is getattr(fastcell, kind)
    assert (model.input_size, model.hidden_size, model.num_layers) == (I, H, L)
    assert (model.bidirectional, model.batch_first, model.bias) == (bi, bf, True)
    assert model.dtype == np.float32
    assert_int8_exact(model, q, f, qconfig)

    D = 2 if bi else 1
    x = torch.randn((B, T, I) if bf else (T, B, I))
    h0 = torch.randn(D * L, B, H)
    hx = (h0, torch.randn(D * L, B, H)) if kind == "LSTM" else h0
    with torch.no_grad():
        want_fp32, want_int8 = f(x, hx), q(x, hx)
    got = model(x.numpy(), as_numpy(hx))
    assert got[0].shape == tuple(want_int8[0].shape)
    assert_errors(got, want_int8, want_fp32)


# ======================= cells =======================

# (type, input_size, hidden_size, batch)
CELL_CASES = [(kind, I, H, B) for kind in ("LSTMCell", "GRUCell", "RNNCell-tanh", "RNNCell-relu")
              for I, H, B in ((3, 17, 1), (17, 64, 4))]


def make_cell(kind, I, H):
    if kind.startswith("RNNCell"):
        return nn.RNNCell(I, H, nonlinearity=kind.split("-")[1])
    return getattr(nn, kind)(I, H)


@pytest.mark.parametrize("qconfig", list(QCONFIGS))
@pytest.mark.parametrize("case", CELL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_dynamic_quantized_cell(case, qconfig, rng):
    kind, I, H, B = case
    torch.manual_seed(int(rng.integers(2**31)))
    f = make_cell(kind, I, H)
    q = quantized(f, qconfig)
    model = fastcell.from_torch(q)
    assert type(model) is getattr(fastcell, kind.split("-")[0])
    assert (model.input_size, model.hidden_size, model.dtype) == (I, H, np.float32)
    if kind.startswith("RNNCell"):
        assert model.nonlinearity == f.nonlinearity
    # The dynamic cell's bias_ih attribute is not its bias (the packed one is): fastcell has f's.
    assert not torch.equal(q.bias_ih, f.bias_ih)
    assert_int8_exact(model, q, f, qconfig)

    x = torch.randn(T, B, I)
    h0, c0 = torch.randn(B, H), torch.randn(B, H)
    s_fp32 = s_int8 = (h0, c0) if kind == "LSTMCell" else h0
    s_fast = as_numpy(s_fp32)
    want_fp32, want_int8, got = [], [], []
    with torch.no_grad():
        for t in range(T):
            s_fp32, s_int8 = f(x[t], s_fp32), q(x[t], s_int8)
            s_fast = model(x[t].numpy(), s_fast)
            want_fp32.append(s_fp32)
            want_int8.append(s_int8)
            got.append(s_fast)
    assert_errors(got, want_int8, want_fp32)
    # The whole sequence in one call computes what the steps compute.
    s0 = as_numpy((h0, c0)) if kind == "LSTMCell" else h0.numpy()
    out, final = model.run(x.numpy(), s0)
    steps_h = np.stack([s[0] if kind == "LSTMCell" else s for s in got])
    assert max_diff(out, steps_h) <= TOL[np.float32] and max_diff(final, got[-1]) <= TOL[np.float32]


def test_cell_without_bias():
    # quantize_dynamic refuses bias=False; a dynamic cell built with set_weight_bias can have none.
    torch.manual_seed(0)
    f = nn.GRUCell(3, 8, bias=False)
    q = nnqd.GRUCell(3, 8, bias=False)
    qw = {n: torch.quantize_per_tensor(w, float(w.abs().max()) / 127, 0, torch.qint8)
          for n, w in (("weight_ih", f.weight_ih.detach()), ("weight_hh", f.weight_hh.detach()))}
    q.set_weight_bias({"weight": qw, "bias": {"bias_ih": None, "bias_hh": None}})
    model = fastcell.from_torch(q)
    assert model.config()["bias"] is False and model.bias_ih is None
    for n, w in qw.items():
        np.testing.assert_array_equal(model._stored_state_dict()[n].data, w.int_repr().numpy())
    x, h = torch.randn(4, 3), torch.randn(4, 8)
    with torch.no_grad():
        want = q(x, h)
    assert max_diff(model(x.numpy(), h.numpy()), want) <= 1e-2


# ======================= zero points =======================

def test_non_zero_zero_points_converted_exactly_when_they_fit():
    torch.manual_seed(1)
    f = nn.GRUCell(3, 5)
    w_ih, w_hh = f.weight_ih.detach(), f.weight_hh.detach()
    # Scales with room: every q - zero_point stays in int8.
    q_ih = torch.quantize_per_channel(w_ih, w_ih.abs().amax(1).double() / 100, torch.arange(15) - 7, 0,
                                      torch.qint8)
    q_hh = torch.quantize_per_tensor(w_hh, float(w_hh.abs().max()) / 100, 3, torch.qint8)
    q = nnqd.GRUCell(3, 5)
    q.set_weight_bias({"weight": {"weight_ih": q_ih, "weight_hh": q_hh},
                       "bias": {"bias_ih": f.bias_ih.detach(), "bias_hh": f.bias_hh.detach()}})
    model = fastcell.from_torch(q)
    stored, sd = model._stored_state_dict(), model.state_dict()
    zero_ih = q_ih.q_per_channel_zero_points().numpy()[:, None]
    np.testing.assert_array_equal(stored["weight_ih"].data, q_ih.int_repr().numpy() - zero_ih)
    np.testing.assert_array_equal(stored["weight_hh"].data, q_hh.int_repr().numpy() - 3)
    # The module keeps these scales as float32 (the double ones given are rounded when packed):
    # its own weights dequantize to exactly fastcell's.
    packed = q._weight_bias()["weight"]
    np.testing.assert_array_equal(sd["weight_ih"], packed["weight_ih"].dequantize().numpy())
    np.testing.assert_array_equal(sd["weight_hh"], packed["weight_hh"].dequantize().numpy())
    x, h = torch.randn(4, 3), torch.randn(4, 5)
    with torch.no_grad():
        want = q(x, h)
    assert max_diff(model(x.numpy(), h.numpy()), want) <= 1e-2


@pytest.mark.parametrize("per_channel", [False, True])
def test_affine_zero_points_outside_int8_are_refused_naming_the_tensor(per_channel):
    # An asymmetric (affine) qint8 observer spreads [min, max] over [-128, 127]: q - zero_point
    # then spans more than int8 holds.
    Observer = tq.PerChannelMinMaxObserver if per_channel else tq.MinMaxObserver
    qscheme = torch.per_channel_affine if per_channel else torch.per_tensor_affine
    qconfig = tq.QConfig(activation=tq.default_dynamic_qconfig.activation,
                         weight=Observer.with_args(dtype=torch.qint8, qscheme=qscheme))
    torch.manual_seed(2)
    q = tq.quantize_dynamic(nn.Sequential(nn.LSTM(3, 5)), {nn.LSTM: qconfig}, dtype=torch.qint8)[0]
    with pytest.raises(ValueError, match=r"dynamic\.modules\.rnn\.LSTM weight_ih_l0 has non-zero zero "
                                         r"points .* outside int8: .* symmetric qconfig"):
        fastcell.from_torch(q)


# ======================= refused =======================

@pytest.mark.parametrize("cls", ["LSTM", "GRU", "LSTMCell", "GRUCell", "RNNCell"])
def test_float16_dynamic_quantization_is_refused(cls):
    f = getattr(nn, cls)(3, 5)
    q = tq.quantize_dynamic(nn.Sequential(f), {type(f)}, dtype=torch.float16)[0]
    assert type(q) is getattr(nnqd, cls)
    with pytest.raises(TypeError, match=rf"from_torch: torch\.ao\.nn\.quantized\.dynamic\.modules\.rnn\.{cls} "
                                        r"holds float16 dynamic quantization; fastcell reads qint8"):
        fastcell.from_torch(q)


def test_projected_lstm_is_refused():
    # quantize_dynamic keeps weight_hh (4H, P) but drops weight_hr: torch cannot run the result.
    q = quantized(nn.LSTM(3, 5, proj_size=2))
    with pytest.raises(RuntimeError):
        q(torch.randn(4, 1, 3))
    with pytest.raises(ValueError, match=r"weight_hh_l0 has shape \(20, 2\), expected \(20, 5\): an LSTM "
                                         r"with proj_size=2 loses its projection"):
        fastcell.from_torch(q)


def test_layer_without_bias_is_refused():
    with pytest.raises(ValueError, match=r"dynamic\.modules\.rnn\.GRU with bias=False"):
        fastcell.from_torch(nnqd.GRU(3, 5, bias=False))


def test_other_quantized_modules_are_refused():
    with pytest.raises(TypeError, match=r"unsupported module type torch\.ao\.nn\.quantized\.dynamic\."
                                        r"modules\.linear\.Linear; .*qint8 dynamic quantized versions"):
        fastcell.from_torch(nnqd.Linear(3, 5))


# ======================= quantize_dynamic on a bare module =======================

def test_quantize_dynamic_on_a_bare_lstm():
    """quantize_dynamic(lstm, {nn.LSTM}) swaps the children of what it is given: on a bare nn.LSTM
    (torch 2.13) it returns a float copy. from_torch gives what that module computes either way."""
    torch.manual_seed(3)
    f = nn.LSTM(3, 17, num_layers=2)
    q = tq.quantize_dynamic(f, {nn.LSTM}, dtype=torch.qint8)
    model = fastcell.from_torch(q)
    x, h0, c0 = torch.randn(T, 4, 3), torch.randn(2, 4, 17), torch.randn(2, 4, 17)
    with torch.no_grad():
        want = q(x, (h0, c0))
    got = model(x.numpy(), (h0.numpy(), c0.numpy()))
    if isinstance(q, nnqd.LSTM):
        assert model.weight_format == "int8"
        assert_int8_exact(model, q, f, "per_tensor")
        assert max_diff(got, want) <= CLOSE_TO_TORCH_INT8
    else:
        assert type(q) is nn.LSTM
        assert model.weight_format == "float32"
        assert max_diff(got, want) <= TOL[np.float32]


@pytest.mark.parametrize("make", [lambda: nn.GRU(6, 10, num_layers=2, bidirectional=True),
                                  lambda: nn.LSTMCell(6, 10)], ids=["GRU", "LSTMCell"])
def test_input_bits(make, rng):
    # from_torch(..., input_bits=8): the same int8 weights, x quantized to 8 bits as
    # fastcell.quantize(..., input_bits=8) does; 16 (the default) otherwise.
    torch.manual_seed(3)
    fmodule = make()
    qmodule = quantized(fmodule)
    m16, m8 = fastcell.from_torch(qmodule), fastcell.from_torch(qmodule, input_bits=8, threads=2)
    assert (m16.input_bits, m8.input_bits, m8.threads) == (16, 8, 2)
    for name, w in m16._stored_state_dict().items():
        other = m8._stored_state_dict()[name]
        np.testing.assert_array_equal(w.data if isinstance(w, Reduced) else w,
                                      other.data if isinstance(w, Reduced) else other)
    x = rng.standard_normal((T, 3, 6)).astype(np.float32)
    run = (lambda m: m.run(x)[0]) if isinstance(m8, fastcell.LSTMCell) else (lambda m: m(x)[0])
    want = (fastcell.LSTMCell(**m8._stored_state_dict(), input_bits=8) if isinstance(m8, fastcell.LSTMCell)
            else fastcell.GRU(**m8.constructor_args(), weights=m8._stored_state_dict()))
    assert want.input_bits == 8
    np.testing.assert_array_equal(run(m8), run(want))
    assert not np.array_equal(run(m8), run(m16))
    with torch.no_grad():
        xt, ref, state = torch.from_numpy(x), [], None
        if isinstance(m8, fastcell.LSTMCell):
            for t in range(T):
                state = fmodule(xt[t], state)
                ref.append(state[0])
            ref = torch.stack(ref)
        else:
            ref = fmodule(xt)[0]
    assert max_diff(run(m8), ref) < CLOSE_TO_TORCH_INT8   # the float module: the same model
    for bad, exc in ((7, ValueError), ("8", TypeError)):
        with pytest.raises(exc, match="input_bits: expected 16 or 8"):
            fastcell.from_torch(qmodule, input_bits=bad)
    with pytest.raises(ValueError, match=r"input_bits: only for PyTorch's dynamic quantized \(int8\) "
                                         r"modules, got input_bits=8 for a float GRU; quantize its "
                                         r"fastcell model instead"):
        fastcell.from_torch(nn.GRU(3, 4), input_bits=8)
