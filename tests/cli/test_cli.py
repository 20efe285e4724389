"""The ``fastcell`` command, every subcommand through a subprocess: info, run, export, demo, and
their error exits (one line on stderr, status 2, no traceback). The export tests include malicious
pickles whose payloads must not run. Variants of a command already run through a subprocess go
through ``cli.main`` in this process (the console script's code), to keep the suite quick."""

import importlib.util
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import fastcell
from fastcell.io.weights_file import load, save
from conftest import ENV, fails, fastcell_cmd, ok



@pytest.fixture
def files(tmp_path):
    """A few saved models and inputs."""
    rng = np.random.default_rng(0)
    lstm = fastcell.LSTM(4, 6, num_layers=2, proj_size=3)
    gru = fastcell.GRU(4, 5, bidirectional=True, batch_first=True, reset_after=False, dtype=np.float64)
    k = 1 / np.sqrt(3)
    cell = fastcell.PeepholeLSTMCell(rng.uniform(-k, k, (12, 4)).astype(np.float32),
                                     rng.uniform(-k, k, (12, 3)).astype(np.float32),
                                     rng.uniform(-k, k, (3, 3)).astype(np.float32))
    save(lstm, tmp_path / "lstm.safetensors")
    save(gru, tmp_path / "gru.safetensors")
    save(cell, tmp_path / "cell.safetensors")
    np.save(tmp_path / "x.npy", rng.standard_normal((300, 2, 4)).astype(np.float32))
    np.save(tmp_path / "xb.npy", rng.standard_normal((3, 20, 4)))
    np.save(tmp_path / "lengths.npy", np.array([20, 7, 1]))
    return tmp_path


# ---- info ----

def test_info_layer(files):
    out = ok(fastcell_cmd("info", "lstm.safetensors", cwd=files))
    for line in ("cell         lstm", "module       layer (LSTM)", "input_size   4", "hidden_size  6",
                 "proj_size    3", "num_layers   2", "directions   1", "batch_first  False",
                 "dtype        float32"):
        assert line in out, out
    n = sum(v.size for v in load(files / "lstm.safetensors").state_dict().values())
    assert f"parameters   {n:,}" in out
    assert f"{os.path.getsize(files / 'lstm.safetensors'):,} bytes" in out


def test_info_bidirectional_gru_and_cell(files):
    out = ok(fastcell_cmd("info", "gru.safetensors", cwd=files))
    assert "2 (bidirectional)" in out and "reset_after  False" in out and "float64" in out
    out = ok(fastcell_cmd("info", "cell.safetensors", cwd=files))
    assert "peephole_lstm" in out and "cell (PeepholeLSTMCell)" in out and "num_layers" not in out


def test_info_and_run_work_without_torch(files):
    code = ("import sys; sys.modules['torch'] = None\n"
            "from fastcell.cli import main\n"
            "assert main(['info', 'lstm.safetensors']) == 0\n"
            "assert main(['run', 'lstm.safetensors', '--input', 'x.npy', '-o', 'y.npy']) == 0\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=files, capture_output=True, text=True,
                       env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr


def test_the_cli_module_runs_directly(files):
    assert "lstm" in ok(fastcell_cmd("info", "lstm.safetensors", cwd=files, module="fastcell.cli"))


# ---- run ----

def test_run_saves_the_output_and_state(files):
    out = ok(fastcell_cmd("run", "lstm.safetensors", "--input", "x.npy", "--output", "y.npy",
                          "--state-output", "s.npz", cwd=files))
    assert "output (300, 2, 3)" in out and "wrote y.npy" in out
    model = load(files / "lstm.safetensors")
    y, (h, c) = model(np.load(files / "x.npy"))
    assert np.load(files / "y.npy").tobytes() == y.tobytes()
    with np.load(files / "s.npz") as s:
        assert s["h_n"].tobytes() == h.tobytes() and s["c_n"].tobytes() == c.tobytes()


def test_run_without_output_prints_shapes_and_values(files):
    out = ok(fastcell_cmd("run", "cell.safetensors", "-i", "x.npy", cwd=files))
    assert "output (300, 2, 3)" in out and "h_n (2, 3), c_n (2, 3)" in out
    assert "output first values: [" in out


def test_run_with_lengths(files):
    ok(fastcell_cmd("run", "gru.safetensors", "-i", "xb.npy", "--lengths", "lengths.npy",
                    "-o", "y.npy", cwd=files))
    model = load(files / "gru.safetensors")
    y, _ = model(np.load(files / "xb.npy"), lengths=np.load(files / "lengths.npy"))
    assert np.load(files / "y.npy").tobytes() == y.tobytes()


@pytest.mark.parametrize("name,batch_first", [("lstm", False), ("rnn_bf", True), ("cell", False)])
def test_progress_runs_in_chunks_with_the_same_result(files, name, batch_first):
    if name == "rnn_bf":
        save(fastcell.RNN(4, 5, num_layers=3, batch_first=True), files / "rnn_bf.safetensors")
        np.save(files / "xin.npy", np.random.default_rng(1).standard_normal((2, 1000, 4)))
    else:
        np.save(files / "xin.npy", np.random.default_rng(1).standard_normal((1000, 2, 4)).astype(np.float32))
    r = fastcell_cmd("run", f"{name}.safetensors", "-i", "xin.npy", "-o", "y.npy",
                     "--state-output", "s.npz", "--progress", cwd=files)
    ok(r)
    assert "100.0% 1000/1000 steps" in r.stderr
    model = load(files / f"{name}.safetensors")
    x = np.load(files / "xin.npy")
    y, state = model(x) if name != "cell" else model.run(x)
    # Chunks carry the state across: the same numbers as one call.
    np.testing.assert_array_equal(np.load(files / "y.npy"), y)
    h = state[0] if isinstance(state, tuple) else state
    with np.load(files / "s.npz") as s:
        np.testing.assert_array_equal(s["h_n"], h)


def test_no_progress_bar_when_not_asked_and_not_a_terminal(files):
    r = fastcell_cmd("run", "lstm.safetensors", "-i", "x.npy", cwd=files)
    assert ok(r) and "steps" not in r.stderr


def test_progress_on_a_bidirectional_model_runs_in_one_call(files):
    r = fastcell_cmd("run", "gru.safetensors", "-i", "xb.npy", "-o", "y.npy", "--progress", cwd=files)
    ok(r)
    model = load(files / "gru.safetensors")
    assert np.load(files / "y.npy").tobytes() == model(np.load(files / "xb.npy"))[0].tobytes()


def test_run_errors(files, in_process):
    np.save(files / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(files / "wrong.npy", np.zeros((5, 2, 7), np.float32))
    np.save(files / "cplx.npy", np.zeros((5, 2, 4), np.complex64))
    np.savez(files / "arch.npz", x=np.zeros(3))
    (files / "junk.npy").write_bytes(b"\x93NUMPY\x01\x00" + b"\xff" * 40)
    fails(fastcell_cmd("run", "missing.safetensors", "-i", "x.npy", cwd=files), "missing.safetensors", "No such file")
    fails(in_process("run", "lstm.safetensors", "-i", "nope.npy", cwd=files), "nope.npy", "No such file")
    fails(fastcell_cmd("run", "lstm.safetensors", "-i", "obj.npy", cwd=files), "--input obj.npy")
    fails(in_process("run", "lstm.safetensors", "-i", "wrong.npy", cwd=files), "x: expected shape", "(5, 2, 7)")
    np.save(files / "long_wrong.npy", np.zeros((1000, 2, 7), np.float32))
    fails(fastcell_cmd("run", "lstm.safetensors", "-i", "long_wrong.npy", "--progress", cwd=files),
          "got (1000, 2, 7)")  # the whole input's shape, not a chunk's; no progress bar drawn
    fails(in_process("run", "lstm.safetensors", "-i", "cplx.npy", cwd=files), "complex")
    fails(in_process("run", "lstm.safetensors", "-i", "arch.npz", cwd=files), ".npz archive")
    fails(in_process("run", "lstm.safetensors", "-i", "junk.npy", cwd=files), "--input junk.npy")
    fails(in_process("run", "cell.safetensors", "-i", "x.npy", "--lengths", "lengths.npy", cwd=files),
          "--lengths: only for layers")
    np.save(files / "badlen.npy", np.array([20, 0, 3]))
    fails(in_process("run", "gru.safetensors", "-i", "xb.npy", "--lengths", "badlen.npy", cwd=files), "lengths")
    np.save(files / "fltlen.npy", np.array([2.0, 1.0, 1.0]))
    fails(in_process("run", "gru.safetensors", "-i", "xb.npy", "--lengths", "fltlen.npy", cwd=files), "lengths")
    fails(in_process("run", "x.npy", "-i", "x.npy", cwd=files), "x.npy", "NumPy .npy file")


def test_usage_errors(files):
    r = fastcell_cmd(cwd=files)
    assert r.returncode == 2 and "usage: fastcell" in r.stderr
    r = fastcell_cmd("run", "lstm.safetensors", cwd=files)  # --input is required
    assert r.returncode == 2 and "--input" in r.stderr and "Traceback" not in r.stderr
    r = fastcell_cmd("frobnicate", cwd=files)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_bad_model_files(files, in_process):
    (files / "empty.safetensors").write_bytes(b"")
    (files / "rand.safetensors").write_bytes(np.random.default_rng(0).bytes(3000))
    blob = (files / "lstm.safetensors").read_bytes()
    (files / "trunc.safetensors").write_bytes(blob[:-10])
    fails(fastcell_cmd("info", "empty.safetensors", cwd=files), "empty.safetensors: empty file")
    fails(in_process("info", "rand.safetensors", cwd=files), "rand.safetensors:")
    fails(in_process("run", "trunc.safetensors", "-i", "x.npy", cwd=files), "past the end")
    fails(in_process("info", ".", cwd=files), "Is a directory")


# ---- export ----
# torch takes seconds to import, so the export variants run through cli.main in this process
# (the same code the console script runs); the subprocess tests cover the command itself, a
# refused whole module and the malicious pickles.

def torch_or_skip():
    return pytest.importorskip("torch")


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
        code = ("import sys; sys.modules['onnx'] = None\n"
                "from fastcell.cli import main\n"
                f"sys.exit(main({command!r}))\n")
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                           env=ENV, timeout=120)
        fails(r, "needs the onnx package: pip install 'fastcell[onnx]'")


def test_info_on_a_reverse_layer(tmp_path, in_process):
    save(fastcell.GRU(3, 4, reverse=True), tmp_path / "r.safetensors")
    assert "directions   1 (reverse: runs backwards in time)" in ok(in_process("info", "r.safetensors", cwd=tmp_path))


# ---- demo ----

def test_demo(tmp_path):
    r = fastcell_cmd("demo", cwd=tmp_path, timeout=300)
    if importlib.util.find_spec("fastcell.demo") is None:
        fails(r, "the demo is not part of this installation")
    else:
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip()
