"""Shared by the Keras converter tests: Keras on PyTorch's backend (never TensorFlow), Keras layers
with random weights, padded inputs, and Keras' outputs as NumPy arrays.

Importing this module imports keras, or skips the importing test module where keras is missing.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")   # before keras is imported anywhere

import numpy as np  # noqa: E402
import pytest  # noqa: E402

keras = pytest.importorskip("keras")
pytest.importorskip("h5py")
layers = keras.layers

def randomize(layer, rng, scale=0.5):
    """Uniform(-scale, scale) for every variable of a built layer, biases too (Keras makes them
    zero, which would hide a bias put in the wrong place)."""
    layer.set_weights([rng.uniform(-scale, scale, w.shape).astype(w.dtype) for w in layer.get_weights()])


def padded(rng, B, T, I, lengths, dtype="float32"):
    """(B, T, I) inputs whose steps past each length are 0.0 (what Masking(0.0) masks)."""
    x = rng.standard_normal((B, T, I)).astype(dtype)
    if lengths is not None:
        x[np.arange(T)[None, :] >= np.asarray(lengths)[:, None]] = 0.0
    return x


def arrays(out):
    """Keras' outputs (a tensor, or a list or tuple of them, nested) as a flat list of arrays."""
    if isinstance(out, (list, tuple)):
        return [a for o in out for a in arrays(o)]
    return [np.asarray(keras.ops.convert_to_numpy(out))]


def max_diff(a, b):
    a, b = arrays(a), arrays(b)
    assert len(a) == len(b), (len(a), len(b))
    for u, v in zip(a, b):
        assert u.shape == v.shape, (u.shape, v.shape)
    return max(float(np.max(np.abs(u.astype(np.float64) - v.astype(np.float64)), initial=0))
               for u, v in zip(a, b))


def model_of(layer, I, T=None, masked=False, initial_state=False, dtype="float32"):
    """A Functional model: Input (B, T, I) [-> Masking(0.0)] -> layer, with Keras tensors for the
    layer's initial states as extra inputs when asked. Returns (model, number of state inputs).

    Keras hands a layer its input's mask only when the input is its one tensor argument, so a
    masked layer with initial states gets the mask explicitly, computed as Masking does."""
    inp = keras.Input((T, I), dtype=dtype)
    h = layers.Masking(0.0, dtype=dtype)(inp) if masked else inp
    if not initial_state:
        return keras.Model(inp, layer(h)), 0
    n = _state_count(layer)
    units = _units(layer)
    states = [keras.Input((units,), dtype=dtype) for _ in range(n)]
    kw = {"mask": keras.ops.any(keras.ops.not_equal(inp, 0.0), axis=-1)} if masked else {}
    return keras.Model([inp, *states], layer(h, initial_state=states, **kw)), n


def _units(layer):
    inner = getattr(layer, "forward_layer", layer)
    cell = getattr(inner, "cell", None)
    cells = getattr(cell, "cells", None)
    return (cells[0] if cells else cell).units


def _state_count(layer):
    inner = getattr(layer, "forward_layer", None)
    per = 2 if "LSTM" in type(getattr(inner or layer, "cell", None)).__name__ else 1
    return per * (2 if inner is not None else 1)
