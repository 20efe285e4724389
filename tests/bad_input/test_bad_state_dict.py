"""Hostile weights given to a layer's load_state_dict: mis-shaped, missing, unexpected entries,
values that are not real arrays, another configuration's state dict: each refused naming the
entry (StateDictError, a ValueError), and a refused load leaves the layer as it was; entries of
other real dtypes are converted to the layer's dtype."""

import re

import numpy as np
import pytest

import fastcell
from helpers import (BAD_VALUES, LAYERS, B, H, I, P, T, assert_identical, bad_values, exp,
                     layer_kinds, make_layer, other_dtype, other_dtypes)


def wrong_shapes(shape):
    """Shapes a weight of `shape` must not have."""
    out = [tuple(d + 1 if i == k else d for i, d in enumerate(shape)) for k in range(len(shape))]
    out += [tuple(d - 1 if i == k else d for i, d in enumerate(shape)) for k in range(len(shape))]
    out += [shape[::-1], shape + (1,), (1,) + shape, (int(np.prod(shape)),) if len(shape) > 1 else (),
            (0,) + shape[1:]]
    return [s for s in dict.fromkeys(out) if s != shape]


@layer_kinds
@pytest.mark.parametrize("bias", [True, False])
def test_load_state_dict_mis_shaped_entry(kind, bias):
    layer = make_layer(kind, num_layers=2, bidirectional=True, bias=bias)
    x = np.random.default_rng(14).standard_normal((T, B, I))
    before = layer(x)
    good = layer.state_dict()
    tried = 0
    for name, shape in layer.expected_shapes().items():
        for bad in wrong_shapes(shape):
            sd = dict(good, **{name: np.zeros(bad)})
            msg = "mis-shaped: " + re.escape(f"{name} expected {shape}, got {bad}")
            with pytest.raises(fastcell.StateDictError, match=msg):
                layer.load_state_dict(sd)
            tried += 1
    assert tried > 20
    # Every refused load left the layer as it was.
    assert_identical(layer(x), before)
    assert issubclass(fastcell.StateDictError, ValueError)


@layer_kinds
def test_load_state_dict_missing_and_unexpected(kind):
    layer = make_layer(kind, num_layers=2)
    good = layer.state_dict()
    for name, shape in layer.expected_shapes().items():
        sd = {k: v for k, v in good.items() if k != name}
        with pytest.raises(fastcell.StateDictError, match="missing: " + re.escape(f"{name} {shape}")):
            layer.load_state_dict(sd)
    G = LAYERS[kind][0].gates * H
    extras = {"weight_ih_l2": np.zeros((G, H)), "weight_ih_l0_reverse": np.zeros((G, I)),
              "weight_hr_l0": np.zeros((P, H)), "weight_ph_l0": np.zeros((3, H)),
              "bias": np.zeros(G), "": np.zeros(1), "weight_ih": np.zeros((G, I))}
    for name, value in extras.items():
        if name in good:
            continue
        with pytest.raises(fastcell.StateDictError, match="unexpected: " + re.escape(name)):
            layer.load_state_dict(dict(good, **{name: value}))
    no_bias = make_layer(kind, bias=False)
    with pytest.raises(fastcell.StateDictError, match="unexpected: bias_ih_l0"):
        no_bias.load_state_dict(make_layer(kind).state_dict())


@layer_kinds
@bad_values
def test_load_state_dict_bad_values(kind, bad):
    layer = make_layer(kind)
    good = layer.state_dict()
    for name, v in good.items():
        with pytest.raises((TypeError, ValueError), match=exp(name) + "|mis-shaped: " + re.escape(name)):
            layer.load_state_dict(dict(good, **{name: BAD_VALUES[bad](v.shape)}))
    with pytest.raises(TypeError, match=exp("weight_ih_l0") + " expected an array, got None"):
        layer.load_state_dict(dict(good, weight_ih_l0=None))


@pytest.mark.parametrize("value", [None, "abc", 5, [np.zeros(3)], [("a", 1, 2)], np.zeros(3)],
                         ids=["None", "str", "int", "list", "triples", "array"])
def test_load_state_dict_not_a_mapping(value):
    with pytest.raises(TypeError, match=exp("state_dict") + " expected a mapping"):
        make_layer("gru").load_state_dict(value)


@pytest.mark.parametrize("src,dst", [
    (("gru", {}), ("lstm", {})),
    (("lstm", {}), ("rnn", {})),
    (("lstm", {}), ("peephole_lstm", {})),
    (("peephole_lstm", {}), ("lstm", {})),
    (("lstm_proj", {}), ("lstm", {})),
    (("lstm", {}), ("lstm_proj", {})),
    (("gru", {"num_layers": 1}), ("gru", {"num_layers": 2})),
    (("gru", {"num_layers": 2}), ("gru", {"num_layers": 1})),
    (("gru", {"bidirectional": True}), ("gru", {})),
    (("gru", {}), ("gru", {"bidirectional": True})),
    (("rnn", {"bias": False}), ("rnn", {})),
    (("lstm", {"num_layers": 2, "bidirectional": True}), ("lstm", {"num_layers": 2})),
])
def test_load_state_dict_of_another_config(src, dst):
    """A state dict that disagrees with the layer's config is refused as a whole."""
    source = make_layer(src[0], **src[1])
    target = make_layer(dst[0], **dst[1])
    x = np.random.default_rng(15).standard_normal((T, B, I))
    before = target(x)
    with pytest.raises(fastcell.StateDictError, match=type(target).__name__ + r".load_state_dict: "):
        target.load_state_dict(source.state_dict())
    assert_identical(target(x), before)


def test_load_state_dict_of_another_hidden_size():
    target = make_layer("lstm", num_layers=2, bidirectional=True)
    source = fastcell.LSTM(I, H + 1, num_layers=2, bidirectional=True)
    with pytest.raises(fastcell.StateDictError) as e:
        target.load_state_dict(source.state_dict())
    # every entry is listed, layer 1's input width (2 * H) included
    msg = str(e.value)
    for name in target.expected_shapes():
        assert f"mis-shaped: {name} " in msg
    assert f"weight_ih_l1 expected ({4 * H}, {2 * H}), got ({4 * H + 4}, {2 * H + 2})" in msg


@layer_kinds
@other_dtypes
def test_load_state_dict_converts_other_real_dtypes(kind, src):
    """Documented: entries are converted to the layer's dtype, as np.asarray(v, dtype) does."""
    layer = make_layer(kind, np.float32, num_layers=2)
    rng = np.random.default_rng(16)
    given = {n: other_dtype(src, np.float32, s, rng)[0] for n, s in layer.expected_shapes().items()}
    layer.load_state_dict(given)
    for n, v in layer.state_dict().items():
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, np.asarray(given[n], np.float32))
