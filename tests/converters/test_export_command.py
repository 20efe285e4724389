"""``fastcell export``: PyTorch checkpoints (state dicts, with overrides and prefixes) and ONNX
models (``fastcell info`` on them, choosing a node) to fastcell weight files, float or reduced
(``--weights int8 / bf16``), with the numbers of PyTorch, from_state_dict and from_onnx; a whole
pickled module refused with what to do; malicious pickles whose payloads must not run; one line on
stderr, status 2 and no traceback for every error. Variants of a command already run through a
subprocess go through ``cli.main`` in this process (the console script's code), to keep the suite
quick."""

import importlib.util
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import fastcell
from fastcell.io.weights_file import load
from conftest import ENV, fails, fastcell_cmd, ok, torch_or_skip
from helpers import FORMATS, ODD_I as I, ODD_H as H, ODD_P as P
from helpers import assert_same_stored, cli_without, header_of


# ---- export ----
# torch takes seconds to import, so the export variants run through cli.main in this process
# (the same code the console script runs); the subprocess tests cover the command itself, a
# refused whole module and the malicious pickles.

def bridge_or_skip():
    if importlib.util.find_spec("fastcell.convert.state_dict") is None:
        pytest.skip("fastcell.convert.state_dict is not there yet")


def torch_module(torch, kind):
    torch.manual_seed(0)
    return {"lstm": lambda: torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3),
            "gru": lambda: torch.nn.GRU(4, 5, batch_first=True),
            "rnn": lambda: torch.nn.RNN(4, 5, nonlinearity="relu"),
            "lstmcell": lambda: torch.nn.LSTMCell(4, 5)}[kind]()


def check_against_torch(torch, module, model, kind):
    x = torch.randn(2, 7, 4) if kind == "gru" else torch.randn(7, 2, 4)
    with torch.no_grad():
        if kind == "lstmcell":
            want, got = module(x[0])[0].numpy(), model(x[0].numpy())[0]
        else:
            want, got = module(x)[0].numpy(), model(x.numpy())[0]
    assert np.max(np.abs(got - want)) <= 1e-5


def test_export_command(tmp_path):
    torch = torch_or_skip()
    bridge_or_skip()
    module = torch_module(torch, "lstm")
    torch.save(module.state_dict(), tmp_path / "sd.pt")
    out = ok(fastcell_cmd("export", "sd.pt", "m.safetensors", cwd=tmp_path))
    assert "wrote m.safetensors" in out
    check_against_torch(torch, module, load(tmp_path / "m.safetensors"), "lstm")


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn", "lstmcell"])
def test_export_state_dict_matches_pytorch(tmp_path, in_process, kind):
    torch = torch_or_skip()
    bridge_or_skip()
    module = torch_module(torch, kind)
    torch.save(module.state_dict(), tmp_path / "sd.pt")
    extra = {"gru": ["--batch-first"], "rnn": ["--nonlinearity", "relu"]}.get(kind, [])
    ok(in_process("export", "sd.pt", "m.safetensors", *extra, cwd=tmp_path))
    check_against_torch(torch, module, load(tmp_path / "m.safetensors"), kind)


def test_export_overrides_and_prefixes(tmp_path, in_process):
    torch = torch_or_skip()
    bridge_or_skip()
    net = torch.nn.Sequential()
    net.add_module("rnn", torch.nn.GRU(3, 4))
    net.add_module("head", torch.nn.Linear(4, 2))
    torch.save(net.state_dict(), tmp_path / "net.pt")
    fails(in_process("export", "net.pt", "m.safetensors", cwd=tmp_path), "several modules", "--prefix rnn.")
    ok(in_process("export", "net.pt", "m.safetensors", "--prefix", "rnn.", "--reset-before", cwd=tmp_path))
    assert load(tmp_path / "m.safetensors").config()["reset_after"] is False
    fails(in_process("export", "net.pt", "m.safetensors", "--prefix", "lstm.", cwd=tmp_path),
          "--prefix 'lstm.': no entry starts with it")
    # One wrapped module (e.g. DataParallel's "module.") and a training checkpoint dict.
    torch.save({"module." + k: v for k, v in torch.nn.LSTM(3, 4).state_dict().items()}, tmp_path / "dp.pt")
    ok(in_process("export", "dp.pt", "m.safetensors", cwd=tmp_path))
    assert isinstance(load(tmp_path / "m.safetensors"), fastcell.LSTM)
    torch.save({"epoch": 3, "state_dict": torch.nn.RNN(3, 4).state_dict()}, tmp_path / "ck.pt")
    ok(in_process("export", "ck.pt", "m.safetensors", cwd=tmp_path))
    assert isinstance(load(tmp_path / "m.safetensors"), fastcell.RNN)
    # An override the model does not have.
    torch.save(torch.nn.LSTMCell(3, 4).state_dict(), tmp_path / "cell.pt")
    fails(in_process("export", "cell.pt", "m.safetensors", "--batch-first", cwd=tmp_path), "batch_first")
    with pytest.raises(SystemExit) as exc:
        in_process("export", "cell.pt", "m.safetensors", "--reset-after", "--reset-before", cwd=tmp_path)
    assert exc.value.code == 2


def test_export_refuses_a_whole_module_and_says_what_to_do(tmp_path):
    torch = torch_or_skip()
    torch.save(torch.nn.LSTM(3, 4), tmp_path / "whole.pt")
    line = fails(fastcell_cmd("export", "whole.pt", "m.safetensors", cwd=tmp_path),
                 "weights_only=True", "torch.nn.modules.rnn.LSTM", "model.state_dict()")
    assert not (tmp_path / "m.safetensors").exists(), line


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _OpenPayload:
    """Unpickling this creates a file through builtins.open, no shell."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_export_does_not_run_a_malicious_pickle(tmp_path):
    torch = torch_or_skip()
    markers = {}
    for writer in ("torch.save", "pickle.dump"):
        for payload in (_Payload, _OpenPayload):
            name = f"{writer.split('.')[0]}_{payload.__name__.strip('_')}"
            markers[name] = tmp_path / f"RAN_{name}"
            evil = {"weight_ih_l0": torch.zeros(4, 3), "weight_hh_l0": payload(markers[name])}
            if writer == "torch.save":
                torch.save(evil, tmp_path / f"{name}.pt")
            else:
                with open(tmp_path / f"{name}.pt", "wb") as f:
                    pickle.dump(evil, f, protocol=2)

    # Through the command: each file refused, no payload run, nothing written.
    for name in ("torch_Payload", "pickle_Payload"):
        fails(fastcell_cmd("export", f"{name}.pt", "m.safetensors", cwd=tmp_path), f"{name}.pt", "weights_only=True")
    from fastcell import cli

    for name in markers:
        assert cli.main(["export", str(tmp_path / f"{name}.pt"), str(tmp_path / "m.safetensors")]) == 2
    assert not any(m.exists() for m in markers.values()), "fastcell export ran a payload"
    assert not (tmp_path / "m.safetensors").exists()

    # Control: the payloads are real. Unrestricted unpickling, in a throwaway process, runs them.
    code = ("import sys, torch\n"
            "for path in sys.argv[1:]:\n"
            "    try:\n        torch.load(path, weights_only=False)\n"
            "    except Exception as e:\n        print(e, file=sys.stderr)\n")
    subprocess.run([sys.executable, "-c", code, *(str(tmp_path / f"{n}.pt") for n in markers)],
                   cwd=tmp_path, env=ENV, capture_output=True, timeout=120)
    assert all(m.exists() for m in markers.values()), "the control should have run every payload"


def test_export_errors(tmp_path, in_process):
    torch = torch_or_skip()
    (tmp_path / "junk.pt").write_bytes(np.random.default_rng(0).bytes(2000))
    (tmp_path / "empty.pt").write_bytes(b"")
    fails(in_process("export", "missing.pt", "m.safetensors", cwd=tmp_path), "missing.pt", "No such file")
    fails(in_process("export", "junk.pt", "m.safetensors", cwd=tmp_path), "junk.pt")
    fails(in_process("export", "empty.pt", "m.safetensors", cwd=tmp_path), "empty.pt")
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    fails(in_process("export", "list.pt", "m.safetensors", cwd=tmp_path), "expected a state_dict", "got list")
    torch.save({"weight_ih_l0": torch.zeros(4, 3), "lr": 0.1}, tmp_path / "mixed.pt")
    fails(in_process("export", "mixed.pt", "m.safetensors", cwd=tmp_path), "non-tensor entries: lr (float)")
    torch.save({}, tmp_path / "emptydict.pt")
    fails(in_process("export", "emptydict.pt", "m.safetensors", cwd=tmp_path), "empty dict")
    bridge_or_skip()
    torch.save(torch.nn.GRU(3, 4).state_dict(), tmp_path / "sd.pt")
    fails(in_process("export", "sd.pt", "no/such/dir.safetensors", cwd=tmp_path), "No such file")
    torch.save({"weight_ih_l0": torch.zeros(5, 3), "weight_hh_l0": torch.zeros(5, 4)}, tmp_path / "odd.pt")
    fails(in_process("export", "odd.pt", "m.safetensors", cwd=tmp_path), "from_state_dict")
    assert not (tmp_path / "m.safetensors").exists()


def test_export_without_torch_says_so(tmp_path):
    (tmp_path / "sd.pt").write_bytes(b"whatever")
    code = ("import sys; sys.modules['torch'] = None\n"
            "from fastcell.cli import main\n"
            "sys.exit(main(['export', 'sd.pt', 'm.safetensors']))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env=ENV, timeout=120)
    fails(r, "export needs PyTorch")


# ---- ONNX models ----

def _onnx_file(path, names=("enc",)):
    """An ONNX model with one bidirectional reset-after GRU node per name (X (5, 2, 4), H = 3)."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    nodes, inits = [], []
    for name in names:
        for w, shape in (("W", (2, 9, 4)), ("R", (2, 9, 3)), ("B", (2, 18))):
            inits.append(numpy_helper.from_array(rng.uniform(-0.5, 0.5, shape).astype(np.float32), name + w))
        nodes.append(helper.make_node("GRU", ["X", name + "W", name + "R", name + "B"], [name + "Y"], name=name,
                                      hidden_size=3, direction="bidirectional", linear_before_reset=1))
    graph = helper.make_graph(nodes, "main", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [5, 2, 4])],
                              [helper.make_tensor_value_info(n + "Y", TensorProto.FLOAT, None) for n in names],
                              initializer=inits)
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]).SerializeToString())
    return path


def test_onnx_info_and_export(tmp_path, in_process):
    _onnx_file(tmp_path / "m.onnx")
    out = ok(fastcell_cmd("info", "m.onnx", cwd=tmp_path))
    assert "an ONNX model" in out and "1 recurrent node" in out
    assert "0  GRU  enc   main   bidirectional  4           3            0" in out, out
    out = ok(in_process("export", "m.onnx", "m.safetensors", cwd=tmp_path))
    assert "wrote m.safetensors" in out
    model, direct = load(tmp_path / "m.safetensors"), fastcell.from_onnx(tmp_path / "m.onnx")
    assert model.config() == direct.config() and model.bidirectional and model.reset_after
    x = np.random.default_rng(0).standard_normal((5, 2, 4)).astype(np.float32)
    np.testing.assert_array_equal(model(x)[0], direct(x)[0])
    ok(in_process("export", "m.onnx", "q.safetensors", "--weights", "int8", cwd=tmp_path))
    assert load(tmp_path / "q.safetensors").weight_format == "int8"
    ok(in_process("export", "m.onnx", "q8.safetensors", "--weights", "int8", "--input-bits", "8",
                  cwd=tmp_path))
    q8 = load(tmp_path / "q8.safetensors")
    assert (q8.weight_format, q8.input_bits) == ("int8", 8)
    np.testing.assert_array_equal(q8(x)[0], fastcell.quantize(direct, "int8", input_bits=8)(x)[0])


def test_onnx_export_chooses_a_node_and_errors(tmp_path, in_process):
    _onnx_file(tmp_path / "two.onnx", ("enc", "dec"))
    out = ok(in_process("info", "two.onnx", cwd=tmp_path))
    assert "2 recurrent nodes" in out and "dec" in out
    fails(in_process("export", "two.onnx", "m.safetensors", cwd=tmp_path), "2 recurrent nodes, name one",
          "#1 GRU 'dec'")
    ok(in_process("export", "two.onnx", "m.safetensors", "--node", "dec", cwd=tmp_path))
    dec = fastcell.from_onnx(tmp_path / "two.onnx", node="dec").state_dict()
    assert all(np.array_equal(v, dec[n]) for n, v in load(tmp_path / "m.safetensors").state_dict().items())
    ok(in_process("export", "two.onnx", "m.safetensors", "--node", "0", cwd=tmp_path))  # an index
    enc = fastcell.from_onnx(tmp_path / "two.onnx", node="enc").state_dict()
    assert all(np.array_equal(v, enc[n]) for n, v in load(tmp_path / "m.safetensors").state_dict().items())
    fails(in_process("export", "two.onnx", "m.safetensors", "--node", "7", cwd=tmp_path), "index 7 is out of range")
    fails(in_process("export", "two.onnx", "m.safetensors", "--node", "x", cwd=tmp_path), "no RNN, GRU or LSTM node named 'x'")
    fails(in_process("export", "two.onnx", "m.safetensors", "--batch-first", cwd=tmp_path),
          "--batch-first: only for PyTorch checkpoints")
    fails(in_process("export", "sd.pt", "m.safetensors", "--node", "enc", cwd=tmp_path), "--node: only for ONNX")
    fails(in_process("run", "two.onnx", "-i", "x.npy", cwd=tmp_path), "ONNX model; convert it first")
    (tmp_path / "bad.onnx").write_bytes((tmp_path / "two.onnx").read_bytes()[:200])
    fails(in_process("info", "bad.onnx", cwd=tmp_path), "bad.onnx:")
    fails(in_process("export", "bad.onnx", "m.safetensors", cwd=tmp_path), "bad.onnx:")
    fails(in_process("info", "missing.onnx", cwd=tmp_path), "missing.onnx", "No such file")


def test_onnx_without_the_onnx_package_says_so(tmp_path):
    _onnx_file(tmp_path / "m.onnx")
    for command in (["info", "m.onnx"], ["export", "m.onnx", "m.safetensors"]):
        fails(cli_without("onnx", command, tmp_path), "needs the onnx package: pip install 'fastcell[onnx]'")


# ---- reduced weights: --weights int8 / bf16 ----

def torch_state_dict(tmp_path, module_name, **kwargs):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = getattr(torch.nn, module_name)(I, H, **kwargs)
    torch.save(module.state_dict(), tmp_path / "sd.pt")
    return module


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("module_name,kwargs,extra", [
    ("LSTM", {"num_layers": 2, "proj_size": P, "bidirectional": True}, []),
    ("GRU", {"batch_first": True}, ["--batch-first", "--reset-after"]),
    ("RNN", {"nonlinearity": "relu"}, ["--nonlinearity", "relu"]),
    ("LSTMCell", {}, []),
])
def test_export_with_weights(tmp_path, in_process, fmt, module_name, kwargs, extra):
    module = torch_state_dict(tmp_path, module_name, **kwargs)
    from fastcell.convert.state_dict import from_state_dict

    out = ok(in_process("export", "sd.pt", "m.safetensors", "--weights", fmt, *extra, cwd=tmp_path))
    assert "wrote m.safetensors" in out and f"weight_format='{fmt}'" in out
    back = load(tmp_path / "m.safetensors")
    overrides = {"nonlinearity": "relu"} if module_name == "RNN" else {"batch_first": True} if module_name == "GRU" else {}
    want = fastcell.quantize(from_state_dict(module.state_dict(), **overrides), fmt)
    assert back.weight_format == fmt
    assert_same_stored(want, back)


def test_export_with_input_bits(tmp_path, in_process):
    module = torch_state_dict(tmp_path, "GRU", num_layers=2)
    from fastcell.convert.state_dict import from_state_dict

    out = ok(in_process("export", "sd.pt", "m.safetensors", "--weights", "int8", "--input-bits", "8",
                        cwd=tmp_path))
    assert "weight_format='int8', input_bits=8" in out
    back = load(tmp_path / "m.safetensors")
    want = fastcell.quantize(from_state_dict(module.state_dict()), "int8", input_bits=8)
    assert back.input_bits == 8
    assert_same_stored(want, back)
    x = np.random.default_rng(1).standard_normal((6, 2, I)).astype(np.float32)
    np.testing.assert_array_equal(back(x)[0], want(x)[0])
    ok(in_process("export", "sd.pt", "m16.safetensors", "--weights", "int8", "--input-bits", "16",
                  cwd=tmp_path))
    assert load(tmp_path / "m16.safetensors").input_bits == 16
    # --input-bits is for int8 alone; a value other than 16 or 8 is refused by the parser
    for extra in ([], ["--weights", "bf16"]):
        fails(in_process("export", "sd.pt", "o.safetensors", "--input-bits", "8", *extra, cwd=tmp_path),
              "--input-bits: only with --weights int8",
              "got --weights bf16" if extra else "got no --weights")
    with pytest.raises(SystemExit) as exc:
        in_process("export", "sd.pt", "o.safetensors", "--weights", "int8", "--input-bits", "4",
                   cwd=tmp_path)
    assert exc.value.code == 2
    assert not (tmp_path / "o.safetensors").exists()


def test_export_without_weights_keeps_float(tmp_path, in_process):
    torch_state_dict(tmp_path, "GRU")
    ok(in_process("export", "sd.pt", "m.safetensors", cwd=tmp_path))
    assert load(tmp_path / "m.safetensors").weight_format == "float32"
    assert header_of(tmp_path / "m.safetensors")[0]["__metadata__"]["version"] == "1"


def test_export_weights_command_and_errors(tmp_path, in_process):
    torch_state_dict(tmp_path, "LSTM", proj_size=P)
    out = ok(fastcell_cmd("export", "sd.pt", "m.safetensors", "--weights", "bf16", cwd=tmp_path))
    assert "weight_format='bf16'" in out and load(tmp_path / "m.safetensors").weight_format == "bf16"
    with pytest.raises(SystemExit) as exc:
        in_process("export", "sd.pt", "o.safetensors", "--weights", "int16", cwd=tmp_path)
    assert exc.value.code == 2
    # The usual errors stay one line, and nothing is written.
    fails(in_process("export", "missing.pt", "o.safetensors", "--weights", "int8", cwd=tmp_path),
          "missing.pt", "No such file")
    assert not (tmp_path / "o.safetensors").exists()
