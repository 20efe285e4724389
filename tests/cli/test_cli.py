"""The ``fastcell`` command through a subprocess: info, run and demo, and their error exits (one line
on stderr, status 2, no traceback). Variants of a command already run through a subprocess go
through ``cli.main`` in this process (the console script's code), to keep the suite quick. Export:
converters/test_export_command.py; quantize: cli/test_quantize_command.py."""

import importlib.util
import os
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
