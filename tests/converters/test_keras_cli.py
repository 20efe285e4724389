"""`fastcell info MODEL.keras` and `fastcell export MODEL.keras OUT [--layer NAME ...] [--weights]`,
through the same path as .onnx files; and from_onnx's words for a recurrence exported as a Loop."""

import numpy as np
import pytest

from keras_cases import keras, layers, randomize

import fastcell  # noqa: E402
from fastcell import FormatError  # noqa: E402
from conftest import fails, ok  # noqa: E402
from helpers import cli_without  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A Functional model with three recurrent layers (one stackable pair), saved as m.keras."""
    rng = np.random.default_rng(1)
    inp = keras.Input((None, 3))
    h = layers.Masking(0.0, name="masking")(inp)
    h = layers.GRU(4, return_sequences=True, reset_after=False, name="enc")(h)
    h = layers.GRU(4, return_sequences=True, reset_after=False, name="enc2")(h)
    out = layers.Bidirectional(layers.LSTM(2), merge_mode="ave", name="0")(h)
    mdl = keras.Model(inp, out)
    for lay in mdl.layers[2:]:
        randomize(lay, rng)
    folder = tmp_path_factory.mktemp("cli")
    mdl.save(folder / "m.keras")
    return folder


def test_info_lists_the_recurrent_layers(saved, in_process):
    out = ok(in_process("info", "m.keras", cwd=saved))
    assert "a Keras model" in out and "3 recurrent layers" in out
    assert "--layer NAME" in out
    lines = out.splitlines()
    assert any(line.split()[:4] == ["0", "GRU", "enc", "forward"] and "reset_after=False" in line
               for line in lines), out
    assert any(line.split()[:4] == ["2", "Bidirectional(LSTM)", "0", "bidirectional"] and
               "merge_mode='ave'" in line for line in lines), out
    assert "#1 is masked by Masking 'masking' (mask_value=0.0): call the converted layer with lengths" in out

    relu = keras.Sequential([keras.Input((None, 2)), layers.LSTM(3, activation="relu", name="r")])
    relu.save(saved / "relu.keras")
    out = ok(in_process("info", "relu.keras", cwd=saved))
    assert "#0 cannot be converted: layer 'r': attribute activation is relu" in out
    fails(in_process("export", "relu.keras", "x.safetensors", cwd=saved),
          "relu.keras: layer 'r': attribute activation is relu: fastcell's LSTM computes 'tanh'")


def test_export(saved, in_process):
    ok(in_process("export", "m.keras", "enc.safetensors", "--layer", "enc", cwd=saved))
    want = fastcell.from_keras(saved / "m.keras", layer="enc").state_dict()
    got = fastcell.load(saved / "enc.safetensors")
    assert not got.reset_after and got.batch_first
    assert all(np.array_equal(got.state_dict()[n], want[n]) for n in want)
    # "0" names a layer here, so it is that layer, not the index 0
    ok(in_process("export", "m.keras", "bi.safetensors", "--layer", "0", cwd=saved))
    assert fastcell.load(saved / "bi.safetensors").bidirectional
    ok(in_process("export", "m.keras", "two.safetensors", "--layer", "enc", "--layer", "1",
                  "--weights", "int8", cwd=saved))
    two = fastcell.load(saved / "two.safetensors")
    assert two.num_layers == 2 and two.weight_format == "int8"


def test_export_errors(saved, in_process):
    fails(in_process("export", "m.keras", "x.safetensors", cwd=saved),
          "layer: the model has 3 recurrent layers, name one")
    fails(in_process("export", "m.keras", "x.safetensors", "--layer", "dec", cwd=saved),
          "no recurrent layer named 'dec'")
    fails(in_process("export", "m.keras", "x.safetensors", "--layer", "enc", "--layer", "0", cwd=saved),
          "layer: stacking 'enc' and '0': '0' has kind 'lstm', 'enc' 'gru'")
    fails(in_process("export", "m.keras", "x.safetensors", "--node", "enc", cwd=saved),
          "--node: only for ONNX models (SRC named *.onnx), got m.keras")
    fails(in_process("export", "m.onnx", "x.safetensors", "--layer", "enc", cwd=saved),
          "--layer: only for Keras models (SRC named *.keras), got m.onnx")
    fails(in_process("export", "m.keras", "x.safetensors", "--reset-before", cwd=saved),
          "--reset-after/--reset-before: only for PyTorch checkpoints; a Keras layer's config says this")
    fails(in_process("run", "m.keras", "-i", "x.npy", cwd=saved),
          "m.keras is a Keras model; convert it first: fastcell export m.keras OUT.safetensors [--layer NAME]")
    (saved / "bad.keras").write_bytes((saved / "m.keras").read_bytes()[:300])
    fails(in_process("info", "bad.keras", cwd=saved), "bad.keras: a corrupt or malformed .keras file")
    fails(in_process("info", "missing.keras", cwd=saved), "missing.keras", "No such file")


def test_without_h5py_says_so(saved):
    for command in (["info", "m.keras"], ["export", "m.keras", "x.safetensors"]):
        fails(cli_without("h5py", command, saved),
              "reading .keras files needs the h5py package: pip install 'fastcell[keras]'")


def test_onnx_loop_names_from_keras_and_from_torch():
    """tf2onnx writes Keras' SimpleRNN, reset-before GRU and masked layers as a Loop of plain ops:
    from_onnx finds no recurrent node and says where to go instead."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Tanh", ["h_in"], ["h_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 3])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trip", "cond", "h0"], ["h"], body=body)],
        "keras_simple_rnn",
        [helper.make_tensor_value_info("trip", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 3])])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    assert fastcell.onnx_nodes(data) == []
    with pytest.raises(FormatError, match="no RNN, GRU or LSTM node in the model \\(the recurrence "
                                          "was exported as a Loop of plain ops.*fastcell.from_keras"
                                          ".*fastcell.from_torch"):
        fastcell.from_onnx(data)
