"""Memory bounded by what a file holds: small hostile files, loaded in a fresh process whose
resident memory is measured before and after (Linux: /proc/self/status)."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastcell
from conftest import ENV

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

MEASURE = """
import gc, json, sys
import numpy as np
import fastcell

def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

fastcell.LSTM(3, 4)          # the kernels' modules loaded before the baseline
before = rss()
{load}
gc.collect()
print(json.dumps({{"grew": rss() - before, "bytes": model.weight_bytes}}))
"""


def measure(load, timeout=120):
    code = textwrap.dedent(MEASURE.format(load=textwrap.dedent(load).strip()))
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_weight_file_of_a_tiny_hidden_size_takes_about_its_size(tmp_path):
    # RNN(input_size=4M, hidden_size=1): padded to a vector per gate it kept 16-32x the file
    path = tmp_path / "wide.safetensors"
    model = fastcell.RNN(1 << 22, 1)
    fastcell.save(model, path)
    del model
    size = path.stat().st_size
    got = measure(f"model = fastcell.load({str(path)!r})")
    assert got["bytes"] <= 1.05 * size
    assert got["grew"] <= 2 * size + (32 << 20), got


def test_an_onnx_file_folded_into_a_large_weight_is_bounded(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    # 16 KiB of file: W is a Concat of one small initializer 4,096 times, hidden_size 1. The
    # fold may take its stated budget; the model built from it no more than about its weights
    # (532 MiB resident before).
    piece = np.full((1, 1, 1024), 0.01, np.float32)
    inits = [numpy_helper.from_array(piece, "piece"),
             numpy_helper.from_array(np.full((1, 1, 1), 0.5, np.float32), "R")]
    concat = helper.make_node("Concat", ["piece"] * 4096, ["W"], axis=2)
    rnn = helper.make_node("RNN", ["X", "W", "R"], ["Y"], hidden_size=1)
    graph = helper.make_graph([concat, rnn], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    path = tmp_path / "concat.onnx"
    path.write_bytes(m.SerializeToString())
    assert path.stat().st_size < 64 << 10
    got = measure(f"model = fastcell.from_onnx({str(path)!r})")
    weights = 4096 * 1024 * 4
    assert got["bytes"] <= 1.05 * weights + 4096
    assert got["grew"] <= 3 * weights + (32 << 20), got


def test_an_onnx_model_far_larger_than_its_file_is_refused_before_it_is_built():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from fastcell import FormatError

    # Each Concat doubles its input: within the fold's budget until the last doublings, which
    # the fold refuses (this model would need about 256 MiB from a few KiB).
    nodes, name = [], "w0"
    inits = [numpy_helper.from_array(np.full((1, 4, 1024), 0.01, np.float32), "w0"),
             numpy_helper.from_array(np.full((1, 4, 1), 0.5, np.float32), "R")]
    for k in range(14):
        nodes.append(helper.make_node("Concat", [name, name], [f"w{k + 1}"], axis=2))
        name = f"w{k + 1}"
    nodes.append(helper.make_node("RNN", ["X", name, "R"], ["Y"], hidden_size=4))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=inits)
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]).SerializeToString()
    with pytest.raises(FormatError, match="bytes"):
        fastcell.from_onnx(data)
