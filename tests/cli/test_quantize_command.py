"""``fastcell quantize`` (int8 and bf16 files from float ones, bit for bit what fastcell.quantize
gives, and its errors), ``fastcell info``'s weight format and bytes, and ``fastcell run`` on a
reduced file."""

import numpy as np
import pytest

import fastcell
from fastcell.io.weights_file import load, save
from conftest import fails, fastcell_cmd, ok
from helpers import FORMATS, ODD_I as I, ODD_P as P
from helpers import assert_same_outputs, assert_same_stored, header_of, odd_cell, odd_layer, same_bits


@pytest.fixture
def files(tmp_path):
    save(odd_layer("lstm", num_layers=2, proj_size=P), tmp_path / "lstm.safetensors")
    save(odd_layer("gru", bidirectional=True, dtype=np.float64), tmp_path / "gru64.safetensors")
    save(odd_cell("peephole_lstm"), tmp_path / "cell.safetensors")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((20, 2, I)).astype(np.float32))
    return tmp_path


def test_quantize_command(files):
    out = ok(fastcell_cmd("quantize", "lstm.safetensors", "q.safetensors", "--weights", "int8", cwd=files))
    src = load(files / "lstm.safetensors")
    want = fastcell.quantize(src, "int8")
    back = load(files / "q.safetensors")
    assert_same_stored(want, back)
    assert "wrote q.safetensors" in out and "weight_format='int8'" in out
    before = sum(v.nbytes for v in src._stored_state_dict().values())
    after = sum(v.nbytes for v in back._stored_state_dict().values())
    assert f"weights {before:,} -> {after:,} bytes" in out and after < before
    assert header_of(files / "q.safetensors")[0]["__metadata__"]["version"] == "2"


@pytest.mark.parametrize("name", ["lstm", "gru64", "cell"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_command_every_model(files, in_process, name, fmt):
    ok(in_process("quantize", f"{name}.safetensors", "q.safetensors", "--weights", fmt, cwd=files))
    want = fastcell.quantize(load(files / f"{name}.safetensors"), fmt)
    back = load(files / "q.safetensors")
    assert back.weight_format == fmt
    assert_same_stored(want, back)
    x = np.load(files / "x.npy")
    assert_same_outputs(want, back, x)


def test_quantize_command_errors(files, in_process):
    ok(in_process("quantize", "lstm.safetensors", "q8.safetensors", "--weights", "int8", cwd=files))
    fails(fastcell_cmd("quantize", "q8.safetensors", "again.safetensors", "--weights", "bf16", cwd=files),
          "fastcell quantize: error:", "q8.safetensors", "already int8")
    fails(in_process("quantize", "q8.safetensors", "again.safetensors", "--weights", "int8", cwd=files),
          "already int8")
    assert not (files / "again.safetensors").exists()
    fails(in_process("quantize", "missing.safetensors", "o.safetensors", "--weights", "int8", cwd=files),
          "missing.safetensors", "No such file")
    (files / "junk.safetensors").write_bytes(b"\x10" * 5)
    fails(in_process("quantize", "junk.safetensors", "o.safetensors", "--weights", "bf16", cwd=files),
          "junk.safetensors", "truncated")
    fails(in_process("quantize", "lstm.safetensors", "no/such/dir.safetensors", "--weights", "bf16", cwd=files),
          "No such file")
    assert not (files / "o.safetensors").exists()
    r = fastcell_cmd("quantize", "lstm.safetensors", "o.safetensors", cwd=files)  # --weights is required
    assert r.returncode == 2 and "--weights" in r.stderr and "Traceback" not in r.stderr
    for bad in ("int4", "float32"):
        with pytest.raises(SystemExit) as exc:
            in_process("quantize", "lstm.safetensors", "o.safetensors", "--weights", bad, cwd=files)
        assert exc.value.code == 2
    assert not (files / "o.safetensors").exists()


@pytest.mark.parametrize("name", ["lstm", "cell"])
def test_quantize_command_input_bits(files, in_process, name):
    ok(in_process("quantize", f"{name}.safetensors", "q.safetensors", "--weights", "int8",
                  "--input-bits", "8", cwd=files))
    want = fastcell.quantize(load(files / f"{name}.safetensors"), "int8", input_bits=8)
    back = load(files / "q.safetensors")
    assert back.input_bits == 8 and header_of(files / "q.safetensors")[0]["__metadata__"]["version"] == "2"
    assert_same_stored(want, back)
    x = np.load(files / "x.npy")
    assert_same_outputs(want, back, x)
    rows = info_rows(ok(fastcell_cmd("info", "q.safetensors", cwd=files)))
    assert rows["input_bits"].startswith("8 (each layer's input x is quantized to 8 bits per row")
    ok(in_process("quantize", f"{name}.safetensors", "q16.safetensors", "--weights", "int8", cwd=files))
    assert info_rows(ok(in_process("info", "q16.safetensors", cwd=files)))["input_bits"].startswith("16 ")
    ok(in_process("quantize", f"{name}.safetensors", "b.safetensors", "--weights", "bf16", cwd=files))
    assert "input_bits" not in info_rows(ok(in_process("info", "b.safetensors", cwd=files)))
    assert "input_bits" not in info_rows(ok(in_process("info", f"{name}.safetensors", cwd=files)))


def test_quantize_command_input_bits_errors(files, in_process):
    fails(in_process("quantize", "lstm.safetensors", "o.safetensors", "--weights", "bf16",
                     "--input-bits", "8", cwd=files),
          "fastcell quantize: error: --input-bits: only with --weights int8", "got --weights bf16")
    for bad in ("4", "8.0", "x"):
        with pytest.raises(SystemExit) as exc:
            in_process("quantize", "lstm.safetensors", "o.safetensors", "--weights", "int8",
                       "--input-bits", bad, cwd=files)
        assert exc.value.code == 2
    r = fastcell_cmd("quantize", "lstm.safetensors", "o.safetensors", "--weights", "int8",
                     "--input-bits", "12", cwd=files)
    assert r.returncode == 2 and "--input-bits" in r.stderr and "Traceback" not in r.stderr
    assert not (files / "o.safetensors").exists()


def info_rows(out):
    return {line[:11].strip(): line[13:] for line in out.splitlines()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_info_shows_weight_format_and_bytes(files, in_process, fmt):
    ok(in_process("quantize", "lstm.safetensors", "q.safetensors", "--weights", fmt, cwd=files))
    out = ok(fastcell_cmd("info", "q.safetensors", cwd=files))
    rows = info_rows(out)
    model = load(files / "q.safetensors")
    _, _, data = header_of(files / "q.safetensors")
    assert rows["weights"].startswith(f"{fmt} matrices")
    assert ("scale" in rows["weights"]) == (fmt == "int8")
    assert f"{len(data):,} bytes of weights" in rows["in file"]
    assert f"{model.weight_bytes:,} bytes of weights" in rows["in memory"]
    assert rows["dtype"] == "float32"
    float_rows = info_rows(ok(in_process("info", "lstm.safetensors", cwd=files)))
    assert float_rows["parameters"] == rows["parameters"]  # same parameters, fewer bytes
    assert float_rows["weights"] == "float32"
    _, _, fdata = header_of(files / "lstm.safetensors")
    assert f"{len(fdata):,} bytes of weights" in float_rows["in file"] and len(data) < len(fdata)


def test_info_float64_file(files, in_process):
    rows = info_rows(ok(in_process("info", "gru64.safetensors", cwd=files)))
    assert rows["weights"] == "float64"
    assert f"{load(files / 'gru64.safetensors').weight_bytes:,} bytes" in rows["in memory"]


def test_run_command_on_a_reduced_file(files, in_process):
    ok(in_process("quantize", "lstm.safetensors", "q.safetensors", "--weights", "int8", cwd=files))
    ok(fastcell_cmd("run", "q.safetensors", "-i", "x.npy", "-o", "y.npy", cwd=files))
    want, _ = load(files / "q.safetensors")(np.load(files / "x.npy"))
    assert same_bits(np.load(files / "y.npy"), want)
