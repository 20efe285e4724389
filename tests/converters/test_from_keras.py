"""fastcell.from_keras, keras_layers and keras_outputs against Keras itself (KERAS_BACKEND=torch).

Every layer (SimpleRNN tanh and relu, GRU reset_after True and False, LSTM, RNN of each cell,
Bidirectional of each with every merge mode, stacked cells and stacked layers) under every option
(use_bias, go_backwards, return_sequences, return_state, initial states, masks, zero_output_for_mask,
unroll, stateful streaming, float32 and float64), sizes 1, 3 and 17, B = 1 and 4, random non-zero
biases: the converted layer's outputs in Keras' layout (keras_outputs) are Keras' own within 1e-5
(float32) and 1e-12 (float64), from the live model and from its .keras file, whose conversion gives
the same weights bit for bit.
"""

import itertools
import subprocess
import sys

import numpy as np
import pytest

from keras_cases import keras, layers, max_diff, model_of, padded, randomize

import fastcell  # noqa: E402
from fastcell import FormatError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

T = 6
CELL_OPTIONS = ("use_bias", "dtype")   # what an RNN layer's cell takes rather than the layer


def _split(kw):
    cell = {k: v for k, v in kw.items() if k in CELL_OPTIONS}
    layer = {k: v for k, v in kw.items() if k not in CELL_OPTIONS or k == "dtype"}
    return cell, layer


KINDS = {
    "SimpleRNN-tanh": lambda u, **kw: layers.SimpleRNN(u, **kw),
    "SimpleRNN-relu": lambda u, **kw: layers.SimpleRNN(u, activation="relu", **kw),
    "GRU": lambda u, **kw: layers.GRU(u, **kw),
    "GRU-reset_before": lambda u, **kw: layers.GRU(u, reset_after=False, **kw),
    "LSTM": lambda u, **kw: layers.LSTM(u, **kw),
    "RNN(SimpleRNNCell)": lambda u, **kw: layers.RNN(layers.SimpleRNNCell(u, **_split(kw)[0]),
                                                     **_split(kw)[1]),
    "RNN(GRUCell-reset_before)": lambda u, **kw: layers.RNN(
        layers.GRUCell(u, reset_after=False, **_split(kw)[0]), **_split(kw)[1]),
    "RNN(LSTMCell)": lambda u, **kw: layers.RNN(layers.LSTMCell(u, **_split(kw)[0]), **_split(kw)[1]),
}

# Each scenario sets several options at once; every kind runs every scenario.
SCENARIOS = {
    "sequences": dict(kw=dict(return_sequences=True)),
    "last_with_states": dict(kw=dict(return_state=True), initial_state=True),
    "backwards_masked": dict(kw=dict(go_backwards=True, return_sequences=True, return_state=True),
                             masked=True),
    "no_bias_masked": dict(kw=dict(use_bias=False, return_sequences=True, return_state=True),
                           masked=True, initial_state=True),
    "zero_output_masked": dict(kw=dict(return_sequences=True, zero_output_for_mask=True), masked=True),
    "unrolled_backwards": dict(kw=dict(unroll=True, go_backwards=True, return_state=True),
                               initial_state=True, fixed_T=True),
    "float64_masked": dict(kw=dict(dtype="float64", return_sequences=True, return_state=True),
                           masked=True, initial_state=True),
    "float64_states": dict(kw=dict(dtype="float64", return_sequences=True, return_state=True),
                           initial_state=True),
    "float64_backwards_last": dict(kw=dict(dtype="float64", go_backwards=True, use_bias=False),
                                   masked=True),
}

SIZES = ((1, 3), (3, 17), (17, 1), (3, 3), (17, 17), (1, 1))   # (units, input_size)


def _cases():
    out = []
    for i, (kind, scenario) in enumerate(itertools.product(KINDS, SCENARIOS)):
        units, I = SIZES[i % len(SIZES)]
        out.append(pytest.param(kind, scenario, units, I, (1, 4)[i % 2],
                                id=f"{kind}-{scenario}-H{units}-I{I}-B{(1, 4)[i % 2]}"))
    return out


def _lengths(B, masked):
    """Right-padded lengths: full, shorter, and an empty sequence (Keras keeps its initial state)."""
    if not masked:
        return None
    return np.array([T, 2, 0, 5][:B] if B > 1 else [3])


def _tolerance(dtype, kind, masked):
    """1e-5 in float32; in float64, 1e-12 where Keras computes in float64. Keras' torch backend
    runs an unmasked LSTM or GRU(reset_after) layer through torch's float64 kernels, but every
    other layer through its cells, whose ops.matmul rounds float64 products to float32 (Keras'
    JAX-style type promotion): those agree to float32's precision."""
    if dtype == "float32" or masked or kind not in ("LSTM", "GRU"):
        return 1e-5
    return 1e-12


def _check(mdl, layer_index, x, states, lengths, dtype, tmp_path, tol=1e-5, **expect):
    """Keras' outputs against keras_outputs of the converted layer, from the model and from its
    .keras file; returns the converted layer."""
    want = mdl([x, *states]) if states else mdl(x)
    info = fastcell.keras_layers(mdl)[layer_index]
    for k, v in expect.items():
        assert getattr(info, k) == v, (k, getattr(info, k), v)
    model = fastcell.from_keras(mdl, layer=layer_index)
    assert model.batch_first and model.dtype == np.dtype(dtype)
    got = fastcell.keras_outputs(model, x, lengths=lengths, initial_state=states or None,
                                 **info.output_options)
    assert max_diff(got, want) <= tol

    path = tmp_path / "model.keras"
    mdl.save(path)
    from_file = fastcell.from_keras(path, layer=layer_index)
    assert from_file.config() == model.config()
    sd, fsd = model.state_dict(), from_file.state_dict()
    assert sd.keys() == fsd.keys() and all(np.array_equal(sd[n], fsd[n]) for n in sd)
    assert fastcell.keras_layers(path) == fastcell.keras_layers(mdl)
    return model


@pytest.mark.parametrize("kind,scenario,units,I,B", _cases())
def test_parity(kind, scenario, units, I, B, rng, tmp_path):
    sc = SCENARIOS[scenario]
    dtype = sc["kw"].get("dtype", "float32")
    layer = KINDS[kind](units, **sc["kw"])
    mdl, n = model_of(layer, I, T if sc.get("fixed_T") else None, sc.get("masked", False),
                      sc.get("initial_state", False), dtype)
    randomize(layer, rng)
    lengths = _lengths(B, sc.get("masked"))
    x = padded(rng, B, T, I, lengths, dtype)
    states = [rng.uniform(-0.5, 0.5, (B, units)).astype(dtype) for _ in range(n)]
    direction = "backward" if sc["kw"].get("go_backwards") else "forward"
    model = _check(mdl, 0, x, states, lengths, dtype, tmp_path,
                   _tolerance(dtype, kind, sc.get("masked")), units=units, input_size=I,
                   direction=direction, problem=None)
    assert model.reverse == (direction == "backward")
    assert model.bias == sc["kw"].get("use_bias", True)
    info = fastcell.keras_layers(mdl)[0]
    assert (info.mask is not None) == bool(sc.get("masked"))
    if sc.get("masked"):
        assert info.mask.startswith("Masking") and "mask_value=0.0" in info.mask


def _bidirectional_cases():
    out = []
    kinds = ("SimpleRNN-tanh", "SimpleRNN-relu", "GRU", "GRU-reset_before", "LSTM", "RNN(LSTMCell)")
    for i, (kind, merge) in enumerate(itertools.product(kinds, ("concat", "sum", "mul", "ave", None))):
        units, I = SIZES[i % len(SIZES)]
        out.append(pytest.param(kind, merge, units, I, (1, 4)[i % 2], i % 3,
                                id=f"{kind}-{merge}-H{units}-I{I}-B{(1, 4)[i % 2]}-v{i % 3}"))
    return out


@pytest.mark.parametrize("kind,merge,units,I,B,variant", _bidirectional_cases())
def test_bidirectional_parity(kind, merge, units, I, B, variant, rng, tmp_path):
    """Every merge mode; sequences or the last outputs, states, masks, initial states, no bias, float64."""
    dtype = "float64" if variant == 2 else "float32"
    kw = dict(return_sequences=variant != 1, return_state=variant != 0, dtype=dtype)
    if variant == 1:
        kw["use_bias"] = False
    layer = layers.Bidirectional(KINDS[kind](units, **kw), merge_mode=merge, dtype=dtype)
    mdl, n = model_of(layer, I, None, masked=variant != 2, initial_state=variant != 1, dtype=dtype)
    randomize(layer, rng)
    lengths = _lengths(B, variant != 2)
    x = padded(rng, B, T, I, lengths, dtype)
    states = [rng.uniform(-0.5, 0.5, (B, units)).astype(dtype) for _ in range(n)]
    model = _check(mdl, 0, x, states, lengths, dtype, tmp_path,
                   _tolerance(dtype, kind, variant != 2), direction="bidirectional", units=units,
                   input_size=I)
    assert model.bidirectional and fastcell.keras_layers(mdl)[0].options["merge_mode"] == merge


def test_layouts_without_the_helper(rng):
    """The documented relations between fastcell's output and Keras': a forward sequence and a
    concat Bidirectional's are the same; go_backwards' is fastcell's reversed in time; with a mask
    and zero_output_for_mask, fastcell's zeros past each length; the states are h_n[0], c_n[0]."""
    x = rng.standard_normal((3, T, 4)).astype("float32")
    lstm = layers.LSTM(5, return_sequences=True, return_state=True)
    lstm(x)
    randomize(lstm, rng)
    y, h, c = (np.asarray(a.detach()) for a in lstm(x))
    out, (h_n, c_n) = fastcell.from_keras(lstm)(x)
    assert max_diff(out, y) <= 1e-5 and max_diff(h_n[0], h) <= 1e-5 and max_diff(c_n[0], c) <= 1e-5

    back = layers.GRU(5, return_sequences=True, go_backwards=True, reset_after=False)
    back(x)
    randomize(back, rng)
    out, h_n = fastcell.from_keras(back)(x)
    assert max_diff(out[:, ::-1], back(x)) <= 1e-5

    bi = layers.Bidirectional(layers.SimpleRNN(5, return_sequences=True))
    bi(x)
    randomize(bi, rng)
    assert max_diff(fastcell.from_keras(bi)(x)[0], bi(x)) <= 1e-5

    lengths = np.array([6, 2, 4])
    xp = padded(rng, 3, T, 4, lengths)
    zero = layers.LSTM(5, return_sequences=True, zero_output_for_mask=True)
    mdl, _ = model_of(zero, 4, masked=True)
    randomize(zero, rng)
    assert max_diff(fastcell.from_keras(mdl)(xp, lengths=lengths)[0], mdl(xp)) <= 1e-5


@pytest.mark.parametrize("kind", ["LSTM", "GRU-reset_before", "SimpleRNN-relu"])
def test_stateful_streaming(kind, rng):
    """A stateful Keras layer called on successive chunks, and fastcell's step() on each step of
    them: the same outputs; reset_state() and state.reset() start both over."""
    B, units, I = 2, 17, 3
    layer = KINDS[kind](units, return_sequences=True, stateful=True)
    mdl = keras.Sequential([keras.Input((4, I), batch_size=B), layer])
    randomize(layer, rng)
    info = fastcell.keras_layers(mdl)[0]
    assert info.options["stateful"] is True
    model = fastcell.from_keras(mdl)
    state = model.new_state(batch=B)
    for chunk in range(3):
        if chunk == 2:
            layer.reset_state()
            state.reset()
        x = rng.standard_normal((B, 4, I)).astype("float32")
        want = np.asarray(mdl(x).detach())
        got = np.stack([model.step(x[:, t], state).copy() for t in range(4)], axis=1)
        assert max_diff(got, want) <= 1e-5


def test_stacked_cells_and_layers(rng, tmp_path):
    """RNN([cells]) becomes one multi-layer layer (states per cell); so does a chosen run of layers
    that feed each other (Sequential and Functional, Bidirectional concat), where Keras' outputs
    are the last layer's."""
    B, I, units = 3, 4, 3
    lengths = np.array([6, 1, 4])
    x = padded(rng, B, T, I, lengths)

    cells = layers.RNN([layers.GRUCell(units, reset_after=False), layers.GRUCell(units, reset_after=False),
                        layers.GRUCell(units, reset_after=False)], return_sequences=True, return_state=True)
    mdl, _ = model_of(cells, I, masked=True)
    randomize(cells, rng)
    model = _check(mdl, 0, x, [], lengths, "float32", tmp_path, num_layers=3,
                   type="RNN(3 x GRUCell)")
    assert model.num_layers == 3 and not model.reset_after
    init = [[rng.uniform(-1, 1, (B, units)).astype("float32")] for _ in range(3)]
    want = cells(padded(rng, B, T, I, None), initial_state=init)
    xx = padded(rng, B, T, I, None)
    want = cells(xx, initial_state=init)
    got = fastcell.keras_outputs(model, xx, initial_state=init, return_sequences=True, return_state=True)
    assert max_diff(got, want) <= 1e-5

    seq = keras.Sequential([keras.Input((None, I)), layers.Masking(0.0),
                            layers.LSTM(units, return_sequences=True, name="a"),
                            layers.LSTM(units, return_sequences=True, name="b"),
                            layers.LSTM(units, return_state=True, name="c")])
    for lay in seq.layers[1:]:
        randomize(lay, rng)
    stacked = fastcell.from_keras(seq, layer=["a", "b", 2])
    assert stacked.num_layers == 3
    want = seq(x)
    got = fastcell.keras_outputs(stacked, x, lengths=lengths, return_state=True)
    assert max_diff(got[0], want[0]) <= 1e-5 and max_diff(got[3], want[1:]) <= 1e-5
    seq.save(tmp_path / "seq.keras")
    assert fastcell.from_keras(tmp_path / "seq.keras", layer=[0, 1, 2]).config() == stacked.config()

    inp = keras.Input((None, I))
    h = layers.Bidirectional(layers.GRU(units, return_sequences=True), name="bi1")(inp)
    h = layers.Bidirectional(layers.GRU(units, return_sequences=True), name="bi2", merge_mode="ave")(h)
    fn = keras.Model(inp, h)
    for lay in fn.layers[1:]:
        randomize(lay, rng)
    both = fastcell.from_keras(fn, layer=("bi1", "bi2"))
    assert both.num_layers == 2 and both.bidirectional
    xx = padded(rng, B, T, I, None)
    assert max_diff(fastcell.keras_outputs(both, xx, return_sequences=True, merge_mode="ave"),
                    fn(xx)) <= 1e-5


def test_stacks_that_keras_does_not_compute_are_refused():
    I = 3
    inp = keras.Input((None, I))
    a = layers.LSTM(4, return_sequences=True, name="a")(inp)
    b = layers.LSTM(5, return_sequences=True, name="b")(a)
    c = layers.LSTM(5, return_sequences=True, name="c")(inp)
    d = layers.LSTM(5, name="d")(c)
    e = layers.LSTM(5, return_sequences=True, go_backwards=True, name="e")(inp)
    f = layers.LSTM(5, return_sequences=True, go_backwards=True, name="f")(e)
    g = layers.GRU(5, name="g")(f)
    mdl = keras.Model(inp, [b, d, g])
    with pytest.raises(ValueError, match="'b' has units 5, 'a' 4"):
        fastcell.from_keras(mdl, layer=["a", "b"])
    with pytest.raises(ValueError, match="'d' reads the output of 'c', not of 'b'"):
        fastcell.from_keras(mdl, layer=["b", "d"])
    with pytest.raises(ValueError, match="'d' has return_sequences=False"):
        fastcell.from_keras(mdl, layer=["d", "b"])
    with pytest.raises(ValueError, match="go_backwards layers return their sequence reversed"):
        fastcell.from_keras(mdl, layer=["e", "f"])
    with pytest.raises(ValueError, match="'g' has kind 'gru', 'f' 'lstm'|'g' has kind 'gru'"):
        fastcell.from_keras(mdl, layer=["f", "g"])
    with pytest.raises(ValueError, match="names a layer twice"):
        fastcell.from_keras(mdl, layer=["c", 2])
    assert fastcell.from_keras(mdl, layer=["c", "d"]).num_layers == 2


def test_embedding_mask_and_dropped_masks(rng):
    """Embedding(mask_zero=True) masks its token 0 (the layer's lengths), through a Dense; a Conv1D
    drops a mask, so the layer after it is not masked."""
    tokens = np.array([[3, 1, 4, 1, 5, 9], [2, 6, 0, 0, 0, 0], [5, 3, 5, 0, 0, 0]])
    lengths = (tokens != 0).sum(axis=1)
    inp = keras.Input((None,), dtype="int32")
    emb = layers.Embedding(10, 4, mask_zero=True, name="embedding")
    h = layers.Dense(4)(emb(inp))
    gru = layers.GRU(3, return_sequences=True, name="gru")
    mdl = keras.Model(inp, [gru(h), h])
    randomize(gru, rng)
    info = fastcell.keras_layers(mdl)[0]
    assert info.mask == "Embedding 'embedding' (mask_zero=True)"
    want, feats = mdl(tokens)
    model = fastcell.from_keras(mdl)
    got = fastcell.keras_outputs(model, np.asarray(feats.detach()), mask=tokens != 0,
                                 **info.output_options)
    assert max_diff(got, want) <= 1e-5
    got = fastcell.keras_outputs(model, np.asarray(feats.detach()), lengths=lengths,
                                 **info.output_options)
    assert max_diff(got, want) <= 1e-5

    inp = keras.Input((None, 2))
    with pytest.warns(UserWarning, match="destroy the mask"):
        h = layers.Conv1D(2, 1)(layers.Masking(0.0)(inp))
    mdl = keras.Model(inp, layers.LSTM(3)(h))
    assert fastcell.keras_layers(mdl)[0].mask is None


def test_a_call_with_initial_states_gets_no_mask(rng):
    """Keras hands a layer its input's mask only when the input is its one tensor argument: a
    layer called with initial_state tensors too runs every step, and keras_layers says so."""
    inp, h0 = keras.Input((None, 2)), keras.Input((3,))
    gru = layers.GRU(3, return_sequences=True)
    mdl = keras.Model([inp, h0], gru(layers.Masking(0.0)(inp), initial_state=[h0]))
    randomize(gru, rng)
    assert fastcell.keras_layers(mdl)[0].mask is None
    x, s = padded(rng, 2, T, 2, [6, 2]), rng.uniform(-1, 1, (2, 3)).astype("float32")
    got = fastcell.keras_outputs(fastcell.from_keras(mdl), x, initial_state=[s], return_sequences=True)
    assert max_diff(got, mdl([x, s])) <= 1e-5


def test_masks_fastcell_cannot_follow_are_refused():
    """A mask through a custom layer is followed where Keras recorded it (a traced mask) and
    refused where only run time can tell (a nested model's mask through a custom layer); a mask a
    layer computes from other ops is refused, naming them; the layer itself still converts."""
    class Passing(layers.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.supports_masking = True

        def call(self, x):
            return x * 2

    inp = keras.Input((None, 2))
    mdl = keras.Model(inp, layers.LSTM(3)(Passing()(layers.Masking(0.0)(inp))))
    assert fastcell.keras_layers(mdl)[0].mask.startswith("Masking 'masking")

    inner = keras.Sequential([keras.Input((None, 2)), layers.Masking(0.0)], name="inner")
    inp = keras.Input((None, 2))
    mdl = keras.Model(inp, layers.LSTM(3, name="lstm")(Passing(name="passing")(inner(inp))))
    info = fastcell.keras_layers(mdl)[0]
    assert "unknown mask: the mask of Masking 'masking" in info.problem
    assert "a custom layer 'passing' (Passing)" in info.problem
    with pytest.raises(ValueError, match="masked by an unknown mask.*'passing'"):
        fastcell.from_keras(mdl)
    assert fastcell.from_keras(mdl.get_layer("lstm")).hidden_size == 3

    # Keras records no mask for a nested model's output, but hands it on at run time: so does fastcell.
    inp = keras.Input((None, 2))
    lstm = layers.LSTM(3, return_sequences=True)
    dense = layers.Dense(2)
    mdl = keras.Model(inp, lstm(dense(inner(inp))))
    assert fastcell.keras_layers(mdl)[0].mask.startswith("Masking 'masking")
    rng = np.random.default_rng(5)
    randomize(lstm, rng)
    randomize(dense, rng)
    x = padded(rng, 2, T, 2, [6, 3])
    feats = np.asarray(dense(x).detach())
    got = fastcell.keras_outputs(fastcell.from_keras(mdl), feats, lengths=[6, 3], return_sequences=True)
    assert max_diff(got, mdl(x)) <= 1e-5

    # However many layers the mask goes through (followed in the config's order, not recursively).
    inp = keras.Input((None, 2))
    h = inner(inp)
    for _ in range(400):
        h = layers.Identity()(h)
    mdl = keras.Model(inp, layers.GRU(3)(h))
    assert fastcell.keras_layers(mdl)[0].mask.startswith("Masking 'masking")

    # A Lambda without a mask function drops the mask (supports_masking is False), as Keras warns.
    inp = keras.Input((None, 2))
    with pytest.warns(UserWarning, match="destroy the mask"):
        h = layers.Lambda(lambda v: v * 2)(layers.Masking(0.0)(inp))
    mdl = keras.Model(inp, layers.LSTM(3)(h))
    assert fastcell.keras_layers(mdl)[0].mask is None

    inp = keras.Input((None, 2))
    m = keras.ops.greater(keras.ops.sum(inp, axis=-1), 0.0)
    mdl = keras.Model(inp, layers.GRU(3)(inp, mask=m))
    with pytest.raises(ValueError, match="computed by Greater"):
        fastcell.from_keras(mdl)

    inp, mask_in = keras.Input((None, 2)), keras.Input((None,), dtype="bool", name="steps")
    mdl = keras.Model([inp, mask_in], layers.GRU(3)(inp, mask=mask_in))
    assert fastcell.keras_layers(mdl)[0].mask == "the model input 'steps'"


REFUSALS = [
    (lambda: layers.LSTM(3, activation="relu"), "activation is relu"),
    (lambda: layers.GRU(3, activation="sigmoid"), "activation is sigmoid"),
    (lambda: layers.GRU(3, recurrent_activation="hard_sigmoid"), "recurrent_activation is hard_sigmoid"),
    (lambda: layers.LSTM(3, recurrent_activation="tanh"), "recurrent_activation is tanh"),
    (lambda: layers.SimpleRNN(3, activation=None), "activation is linear"),
    (lambda: layers.SimpleRNN(3, activation="sigmoid"), "activation is sigmoid"),
    (lambda: layers.LSTM(3, dtype="mixed_float16"), "dtype is 'mixed_float16'"),
    (lambda: layers.GRU(3, dtype="float16", recurrent_initializer="zeros"), "dtype is 'float16'"),
    (lambda: layers.RNN(layers.LSTMCell(3, activation="relu")), "activation is relu"),
    (lambda: layers.Bidirectional(layers.LSTM(3), backward_layer=layers.LSTM(4, go_backwards=True)),
     "backward layer has units 4"),
    (lambda: layers.Bidirectional(layers.GRU(3), backward_layer=layers.GRU(3, go_backwards=True,
                                                                           reset_after=False)),
     "backward layer has reset_after False"),
    (lambda: layers.RNN([layers.LSTMCell(3), layers.LSTMCell(4)]), "stacked cell 1 has units 4"),
    (lambda: layers.RNN([layers.LSTMCell(3), layers.GRUCell(3)]), "stacked cell 1 has cell type 'gru'"),
    (lambda: layers.ConvLSTM1D(2, 3), "ConvLSTM1D: fastcell computes no convolutional"),
]


@pytest.mark.parametrize("make,message", REFUSALS, ids=[m for _, m in REFUSALS])
def test_refusals_name_the_attribute(make, message, tmp_path):
    layer = make()
    shape = (None, 5, 2) if "ConvLSTM" in type(layer).__name__ else (None, 2)
    mdl = keras.Model(inp := keras.Input(shape), layer(inp))
    info = fastcell.keras_layers(mdl)[0]
    assert message in info.problem
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        fastcell.from_keras(mdl)
    assert not isinstance(e.value, FormatError)
    mdl.save(tmp_path / "m.keras")
    with pytest.raises(FormatError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fastcell.from_keras(tmp_path / "m.keras")


def test_custom_classes_are_refused_and_never_run(tmp_path):
    """A custom cell or a subclass of a Keras layer is refused by name, from the object and from
    the file; a Lambda elsewhere in the model does not stop the conversion (nothing runs it)."""
    @keras.saving.register_keras_serializable(package="Test")
    class MyCell(layers.LSTMCell):
        pass

    @keras.saving.register_keras_serializable(package="Test")
    class MyLSTM(layers.LSTM):
        pass

    for layer, name in ((layers.RNN(MyCell(3)), "MyCell"), (MyLSTM(3), "MyLSTM")):
        mdl = keras.Model(inp := keras.Input((None, 2)), layer(inp))
        with pytest.raises(ValueError, match=f"custom class \\('{name}', registered as 'Test>{name}'\\)"):
            fastcell.from_keras(mdl)
        mdl.save(tmp_path / "c.keras")
        with pytest.raises(FormatError, match=f"custom class \\('{name}'"):
            fastcell.from_keras(tmp_path / "c.keras")

    inp = keras.Input((None, 2))
    out = layers.Lambda(lambda v: v + 1.0)(layers.LSTM(3, return_sequences=True)(inp))
    mdl = keras.Model(inp, out)
    mdl.save(tmp_path / "lambda.keras")
    assert fastcell.from_keras(tmp_path / "lambda.keras").hidden_size == 3


def test_threads(rng, tmp_path):
    """threads= as every loader takes it: the same bytes on 2 threads as on 1."""
    layer = layers.GRU(17, return_sequences=True)
    mdl, _ = model_of(layer, 3)
    randomize(layer, rng)
    mdl.save(tmp_path / "m.keras")
    x = rng.standard_normal((4, T, 3)).astype("float32")
    one = fastcell.from_keras(tmp_path / "m.keras")
    two = fastcell.from_keras(tmp_path / "m.keras", threads=2)
    assert one.threads == 1 and two.threads == 2
    assert one(x)[0].tobytes() == two(x)[0].tobytes()
    with pytest.raises(ValueError, match="threads"):
        fastcell.from_keras(mdl, threads=0)


def test_inference_only_options_are_accepted(rng):
    """dropout, recurrent_dropout and unit_forget_bias act in training only (Keras' call at
    inference ignores them): the layer converts with the weights as they are."""
    for layer in (layers.LSTM(4, dropout=0.5, recurrent_dropout=0.3, unit_forget_bias=False,
                              return_sequences=True),
                  layers.GRU(4, dropout=0.2, reset_after=False, return_sequences=True)):
        x = rng.standard_normal((2, T, 3)).astype("float32")
        layer(x)
        randomize(layer, rng)
        assert max_diff(fastcell.from_keras(layer)(x)[0], layer(x)) <= 1e-5


def test_listing_and_choosing(tmp_path):
    inner = keras.Sequential([keras.Input((None, 3)), layers.GRU(4, return_sequences=True, name="enc")],
                             name="inner")
    inp = keras.Input((None, 3))
    h = inner(inp)
    h = layers.Dense(4)(h)
    h = layers.Bidirectional(layers.LSTM(2, return_sequences=True), merge_mode="sum", name="bi")(h)
    out = layers.SimpleRNN(5, activation="relu", go_backwards=True, name="enc_2")(h)
    mdl = keras.Model(inp, out)
    mdl.save(tmp_path / "m.keras")
    for source in (mdl, tmp_path / "m.keras"):
        listed = fastcell.keras_layers(source)
        assert [(k.index, k.name, k.path, k.type, k.cell, k.input_size, k.units, k.direction)
                for k in listed] == [
            (0, "enc", "inner/enc", "GRU", "gru", 3, 4, "forward"),
            (1, "bi", "bi", "Bidirectional(LSTM)", "lstm", 4, 2, "bidirectional"),
            (2, "enc_2", "enc_2", "SimpleRNN", "rnn", 2, 5, "backward")]
        assert listed[1].options["merge_mode"] == "sum" and listed[1].changed_options == {
            "merge_mode": "sum", "return_sequences": True}
        assert listed[1].output_options == {"return_sequences": True, "return_state": False,
                                            "merge_mode": "sum"}
        assert listed[2].options["activation"] == "relu"
        assert "#2 SimpleRNN 'enc_2': backward, input_size 2, units 5" in listed[2].describe()
        assert fastcell.from_keras(source, layer="inner/enc").hidden_size == 4
        assert fastcell.from_keras(source, layer="enc").hidden_size == 4
        assert fastcell.from_keras(source, layer=2).nonlinearity == "relu"
        with pytest.raises(ValueError, match="the model has 3 recurrent layers, name one.*#1 "
                                             "Bidirectional\\(LSTM\\) 'bi'"):
            fastcell.from_keras(source)
        with pytest.raises(ValueError, match="no recurrent layer named 'dense'"):
            fastcell.from_keras(source, layer="dense")
        with pytest.raises(ValueError, match="index 3 is out of range: the model has 3"):
            fastcell.from_keras(source, layer=3)
        with pytest.raises(TypeError, match="layer: expected a layer name, an index"):
            fastcell.from_keras(source, layer=1.5)

    dense = keras.Sequential([keras.Input((3,)), layers.Dense(2)])
    with pytest.raises(ValueError, match="no recurrent layer in the model"):
        fastcell.from_keras(dense)
    assert fastcell.keras_layers(dense) == []
    with pytest.raises(ValueError, match="obj is a Keras Dense layer"):
        fastcell.from_keras(layers.Dense(2))
    with pytest.raises(ValueError, match="not built: call it on an input first"):
        fastcell.from_keras(layers.LSTM(3))
    with pytest.raises(TypeError, match="obj: expected a Keras layer or model, or the path"):
        fastcell.from_keras(object())


def test_keras_outputs_arguments(rng):
    layer = layers.LSTM(3, return_sequences=True)
    layer(np.zeros((2, T, 2), "float32"))
    model = fastcell.from_keras(layer)
    x = rng.standard_normal((2, T, 2)).astype("float32")
    bad = np.ones((2, T), bool)
    bad[1, 2] = False
    with pytest.raises(ValueError, match="mask: sequence 1 is not right-padded \\(step 2 is masked before a kept"):
        fastcell.keras_outputs(model, x, mask=bad)
    with pytest.raises(ValueError, match="lengths, mask: give one of them"):
        fastcell.keras_outputs(model, x, mask=bad, lengths=[1, 2])
    with pytest.raises(ValueError, match="lengths: expected values in \\[0, 6\\]"):
        fastcell.keras_outputs(model, x, lengths=[7, 2])
    with pytest.raises(ValueError, match="merge_mode: only for a bidirectional layer"):
        fastcell.keras_outputs(model, x, merge_mode="sum")
    with pytest.raises(ValueError, match="initial_state: expected \\[h, c\\], got 1 arrays"):
        fastcell.keras_outputs(model, x, initial_state=[np.zeros((2, 3))])
    with pytest.raises(ValueError, match="initial_state: c expected shape \\(2, 3\\), got \\(3,\\)"):
        fastcell.keras_outputs(model, x, initial_state=[np.zeros((2, 3)), np.zeros(3)])
    with pytest.raises(ValueError, match="x: expected Keras' \\(batch, timesteps, features\\)"):
        fastcell.keras_outputs(model, x[0])
    with pytest.raises(TypeError, match="model: expected a fastcell layer"):
        fastcell.keras_outputs(layer, x)
    bi = layers.Bidirectional(layers.GRU(3, return_sequences=True))
    bi(x)
    with pytest.raises(ValueError, match="zero_output_for_mask: Keras' Bidirectional sets it"):
        fastcell.keras_outputs(fastcell.from_keras(bi), x, return_sequences=True,
                               zero_output_for_mask=False)


CHILD = """
import sys
sys.modules["keras"] = None            # importing keras (or tensorflow, or torch) now fails
sys.modules["tensorflow"] = None
sys.modules["torch"] = None
import numpy as np
import fastcell
path, x_path, out_path = sys.argv[1:]
info = fastcell.keras_layers(path)[0]
model = fastcell.from_keras(path)
x = np.load(x_path)
np.save(out_path, fastcell.keras_outputs(model, x, lengths=[6, 3], **info.output_options))
fastcell.save(model, out_path + ".safetensors")
assert sys.modules["keras"] is None and "h5py" in sys.modules
"""


def test_a_file_converts_where_keras_cannot_be_imported(rng, tmp_path):
    from conftest import ENV

    layer = layers.Bidirectional(layers.GRU(17, reset_after=False, return_sequences=True),
                                 merge_mode="mul")
    mdl, _ = model_of(layer, 3, masked=True)
    randomize(layer, rng)
    mdl.save(tmp_path / "m.keras")
    x = padded(rng, 2, T, 3, [6, 3])
    np.save(tmp_path / "x.npy", x)
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "m.keras"),
                        str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    assert max_diff(np.load(tmp_path / "y.npy"), mdl(x)) <= 1e-5
    served = fastcell.load(str(tmp_path / "y.npy") + ".safetensors")
    assert served.bidirectional and served.batch_first and not served.reset_after


def test_import_fastcell_imports_neither_keras_nor_h5py():
    from conftest import ENV

    code = ("import sys, fastcell; fastcell.from_keras; fastcell.keras_layers; fastcell.keras_outputs; "
            "bad = [m for m in ('keras', 'h5py', 'tensorflow') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                       timeout=120)
    assert r.returncode == 0, r.stderr
