"""Fuzzing the weight file, both versions through one harness (Hypothesis, derandomized, a fixed
budget of examples): a valid file (version "1": float layers and cells; version "2": int8 and bf16
ones), then one to three mutations: bytes anywhere (flipped, set, inserted, deleted, the length
field), bytes of the data (where the int8 scales are), or edits of the parsed header or config
(values replaced, deleted, added, nudged, renamed; dtypes, shapes, config keys set), re-serialised
with a correct length so that the loader's later checks are reached. fastcell.load either raises a
FormatError naming the path, in bounded time (no hang, no other exception), or returns a model that
holds what the file holds: the header's tensors are the model's, every int8 scale is finite and
> 0, and a float file reads the same through the reference safetensors reader."""

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastcell
from fastcell.formats.reduced import Reduced
from conftest import load_or_refuse
from helpers import ODD_P as P
from helpers import (build, expected_dtypes, header_of, join, layer_of, odd_cell, reduced_layer,
                     small_cell, split, stored_parts)

# The valid files each version's examples start from.
BASES = {
    "1": [build(*stored_parts(m)) for m in (
        layer_of("lstm", num_layers=2, bidirectional=True, proj_size=2, input_size=2, hidden_size=3),
        layer_of("peephole_lstm", np.float64, input_size=2, hidden_size=2),
        small_cell("gru_reset_before", np.float32, input_size=2, hidden_size=2),
        small_cell("rnn_relu", np.float64, bias=False, input_size=2, hidden_size=2))],
    "2": [build(*stored_parts(m)) for m in (
        reduced_layer("int8", "gru", num_layers=2, bidirectional=True),
        fastcell.quantize(odd_cell("peephole_lstm"), "int8"),
        reduced_layer("bf16", "lstm", proj_size=P))],
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=12) | st.sampled_from(["F32", "F64", "I8", "fastcell", "1", "layer", "cell",
                                              "lstm", "gru", "rnn", "peephole_lstm", "float32"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10)


def _leaves(node, path=()):
    """Paths to every scalar in a JSON structure."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else None
    if items is None:
        yield path
        return
    for k, v in items:
        yield from _leaves(v, path + (k,))


def _set(node, path, value):
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


def _get(node, path):
    for k in path:
        node = node[k]
    return node


BYTE_OPS = ["flip", "set", "truncate", "insert", "delete", "length", "data"]
HEADER_OPS = ["replace", "delete", "add", "nudge", "rename", "dtype", "shape"]
CONFIG_OPS = ["replace", "delete", "add", "nudge", "rename", "set"]
DTYPE_VALUES = ["F32", "F64", "F16", "I32", "I8", "U8", "BF16", "float64", "float32"]
CONFIG_KEYS = ["weight_format", "dtype", "hidden_size", "bias"]
CONFIG_VALUES = ["int8", "bf16", "float32", "float64", "int4", 17, 16, True, None]


@st.composite
def mutated(draw, version):
    """A valid file of the version, then one to three mutations: byte edits, or edits of the parsed
    header or config (re-serialised with a correct length, so the loader's later checks are
    reached)."""
    blob = bytearray(draw(st.sampled_from(BASES[version])))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(BYTE_OPS + ["header"] * 4 + ["config"] * 3))
        if kind in ("flip", "set") and blob:
            i = draw(st.integers(0, len(blob) - 1))
            blob[i] = (blob[i] ^ (1 << draw(st.integers(0, 7)))) if kind == "flip" else draw(st.integers(0, 255))
        elif kind == "truncate":
            del blob[draw(st.integers(0, len(blob))):]
        elif kind == "insert":
            i = draw(st.integers(0, len(blob)))
            blob[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete" and blob:
            i = draw(st.integers(0, len(blob) - 1))
            del blob[i:i + draw(st.integers(1, 16))]
        elif kind == "length" and len(blob) >= 8:
            blob[:8] = struct.pack("<Q", draw(st.sampled_from([0, 1, 2**63, 2**64 - 1]) | st.integers(0, 4096)))
        elif kind == "data":
            # A byte of the data, where the int8 scales are, set to a value that matters there.
            n = struct.unpack("<Q", bytes(blob[:8]))[0] if len(blob) >= 8 else 0
            if len(blob) > 8 + n:
                i = draw(st.integers(8 + n, len(blob) - 1))
                blob[i] = draw(st.sampled_from([0x00, 0x80, 0xFF, 0x7F, 0xC0]))
        elif kind in ("header", "config"):
            try:
                header, data = split(bytes(blob))
                root = json.loads(header["__metadata__"]["config"]) if kind == "config" else header
            except Exception:
                continue
            if not isinstance(header, dict) or not isinstance(root, dict) or not root:
                continue
            op = draw(st.sampled_from(HEADER_OPS if kind == "header" else CONFIG_OPS))
            leaves = sorted(_leaves(root), key=repr)
            if op == "nudge" and leaves:
                # A nearby or extreme number where there was one: sizes, shapes, offsets.
                path = draw(st.sampled_from(leaves))
                v = _get(root, path)
                if isinstance(v, int) and not isinstance(v, bool):
                    _set(root, path, draw(st.sampled_from([v - 1, v + 1, 0, 2 * v, -v, 2**31, 2**63, v + 4])))
                elif isinstance(v, bool):
                    _set(root, path, not v)
            elif op == "rename":
                # A tensor under another (often valid) name, or the config with another cell type.
                names = sorted(k for k in root if k != "__metadata__")
                if names:
                    old = draw(st.sampled_from(names))
                    new = draw(st.sampled_from(names + ["weight_ph_l0", "weight_hr_l0", "bias_ih",
                                                        "weight_ih_l1", "weight_ih_l0_reverse", "cell",
                                                        "module", "num_layers", "weight_ih_l0.scale"]))
                    root[new] = root.pop(old)
            elif op == "dtype":
                for path in leaves:
                    if path and path[-1] == "dtype":
                        _set(root, path, draw(st.sampled_from(DTYPE_VALUES)))
                        break
            elif op == "shape":
                # A tensor's shape reversed, extended, cut to its first dimension, or emptied.
                names = sorted(k for k, e in root.items()
                               if isinstance(e, dict) and isinstance(e.get("shape"), list))
                if names:
                    entry = root[draw(st.sampled_from(names))]
                    shape = entry["shape"]
                    entry["shape"] = draw(st.sampled_from([shape[::-1], shape + [1], shape[:1], [0]]))
            elif op == "set":
                # A config key the weight formats read, set to a plausible or a wrong value.
                root[draw(st.sampled_from(CONFIG_KEYS))] = draw(st.sampled_from(CONFIG_VALUES))
            else:
                # Descend into a random nested object, then replace, delete or add one key.
                target = root
                for _ in range(draw(st.integers(0, 2))):
                    subs = [k for k, v in target.items() if isinstance(v, dict)]
                    if not subs:
                        break
                    target = target[draw(st.sampled_from(sorted(subs)))]
                keys = sorted(target)
                if op == "add" or not keys:
                    target[draw(st.text(max_size=10))] = draw(json_values)
                elif op == "delete":
                    target.pop(draw(st.sampled_from(keys)))
                else:
                    target[draw(st.sampled_from(keys))] = draw(json_values)
            if kind == "config":
                header["__metadata__"]["config"] = json.dumps(root)
            blob = bytearray(join(header, data))
    return bytes(blob)
    return bytes(blob)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("version", ["1", "2"])
@settings(max_examples=600, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzz_mutated_files_raise_only_format_error(fuzz_dir, version, data):
    blob = data.draw(mutated(version), label="file")
    path = fuzz_dir / "fuzz.safetensors"
    path.write_bytes(blob)
    model = load_or_refuse(path)
    if model is None:
        return
    assert isinstance(model, (fastcell.RNN, fastcell.GRU, fastcell.LSTM, fastcell.PeepholeLSTM,
                              fastcell.RNNCell, fastcell.GRUCell, fastcell.LSTMCell,
                              fastcell.PeepholeLSTMCell))
    # What fastcell accepts holds what the file holds: the header's tensors are the model's, its
    # int8 scales are usable, and the reference safetensors reader reads a float file the same way.
    header, _, _ = header_of(path)
    assert set(header) - {"__metadata__"} == set(expected_dtypes(model))
    for v in model._stored_state_dict().values():
        if isinstance(v, Reduced) and v.scale is not None:
            assert np.all(np.isfinite(v.scale) & (v.scale > 0))
    if model.weight_format in ("float32", "float64"):
        from safetensors.numpy import load_file

        reference = load_file(str(path))
        sd = model.state_dict()
        assert set(reference) == set(sd)
        assert all(reference[n].tobytes() == sd[n].tobytes() for n in sd)
