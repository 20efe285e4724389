"""The weight file (docs/DESIGN.md "The weight file"), float and reduced: an exact round trip for
every model (int8 and bf16 ones bit for bit, their data, scales and bf16 bits), loading without
torch, safetensors or pickle, plain safetensors files any reader opens (float tensors F32 / F64 in
version "1"; int8 and bf16 models in safetensors' own I8 and BF16 dtypes with the int8 scales as F32
tensors "<matrix>.scale", version "2"), version-1 files of the old writer and the shipped demo
still loading, and saving's errors. Hostile files: files/test_hostile_files.py."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import fastcell
from fastcell.formats.reduced import Reduced
from fastcell.io import weights_file as wf
from fastcell.io.weights_file import FormatError, load, save
from conftest import ENV, ROOT, VARIANTS
from helpers import FORMATS, ODD_I as I, ODD_H as H, ODD_P as P, QFORMATS, QUANTIZED, quantized
from helpers import (assert_same_model, assert_same_outputs, assert_same_stored, expected_dtypes,
                     header_of, layer_of, odd_cell, odd_layer, reduced_layer, same_bits, saved_with_a_run,
                     small_cell)

DTYPES = [np.float32, np.float64]


# ---- round trip: float ----

LAYER_CASES = [(v, dt, bidi, proj, bias)
               for v in VARIANTS for dt in DTYPES for bidi in (False, True)
               for proj in ((0, 2) if v == "lstm" else (0,)) for bias in (True, False)]


@pytest.mark.parametrize("variant,dtype,bidirectional,proj_size,bias", LAYER_CASES,
                         ids=lambda p: getattr(p, "__name__", str(p)))
def test_layer_round_trip_is_exact(tmp_path, variant, dtype, bidirectional, proj_size, bias):
    model = layer_of(variant, dtype, num_layers=2, bidirectional=bidirectional,
                       proj_size=proj_size, bias=bias, batch_first=bidirectional)
    path = tmp_path / "m.safetensors"
    save(model, path)
    back = load(path)
    assert_same_model(model, back)
    assert wf.expected_shapes(model.config()) == model.expected_shapes()
    x = np.random.default_rng(0).standard_normal((2, 5, 3)).astype(dtype)
    out, state = model(x)
    out2, state2 = back(x)
    assert out.tobytes() == out2.tobytes()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cell_round_trip_is_exact(tmp_path, variant, dtype, bias):
    model = small_cell(variant, dtype, bias=bias)
    path = tmp_path / "c.safetensors"
    save(model, str(path))
    back = load(str(path))
    assert_same_model(model, back)
    assert wf.expected_shapes(model.config()) == {k: v.shape for k, v in model.state_dict().items()}
    x = np.random.default_rng(1).standard_normal((6, 2, 3)).astype(dtype)
    assert model.run(x)[0].tobytes() == back.run(x)[0].tobytes()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_special_values_round_trip_bitwise(tmp_path, dtype):
    model = layer_of("lstm", dtype)
    sd = {k: np.array(v) for k, v in model.state_dict().items()}
    info = np.finfo(dtype)
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, info.tiny / 2, info.max, info.eps], dtype)
    sd["weight_ih_l0"].reshape(-1)[: special.size] = special
    model.load_state_dict(sd)
    save(model, tmp_path / "s.safetensors")
    assert_same_model(model, load(tmp_path / "s.safetensors"))


def test_saved_non_contiguous_weights_are_stored_correctly(tmp_path):
    # safetensors 0.8's numpy writer stores wrong bytes for non-contiguous arrays.
    big = np.random.default_rng(0).standard_normal((16, 10)).astype(np.float32)
    cell = fastcell.RNNCell(big[::4, ::2], big[1::4, 1:9:2])  # (4, 5) and (4, 4), strided
    save(cell, tmp_path / "nc.safetensors")
    back = load(tmp_path / "nc.safetensors")
    assert np.array_equal(back.weight_ih, big[::4, ::2])
    assert np.array_equal(back.weight_hh, big[1::4, 1:9:2])


def test_file_is_plain_safetensors_with_fastcell_metadata(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    model = layer_of("gru_reset_before", np.float64, num_layers=2, bidirectional=True)
    path = tmp_path / "g.safetensors"
    save(model, path)
    tensors = load_file(str(path))
    assert set(tensors) == set(model.expected_shapes())
    with safe_open(str(path), "numpy") as f:
        meta = f.metadata()
    assert meta["format"] == "fastcell" and meta["version"] == "1"
    assert json.loads(meta["config"]) == model.config()
    assert wf.read_config(path) == model.config()


def test_save_overwrites_atomically_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "m.safetensors"
    save(layer_of("rnn_tanh"), path)
    save(layer_of("gru"), path)
    assert load(path).config()["cell"] == "gru"
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_save_to_a_bad_path_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        save(layer_of("gru"), tmp_path / "no" / "such" / "dir.safetensors")
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        save(layer_of("gru"), tmp_path / "d")
    assert sorted(os.listdir(tmp_path)) == ["d"]


@pytest.mark.parametrize("obj", [object(), {"weight_ih": np.zeros((4, 3))}, np.zeros(3), None])
def test_save_refuses_non_fastcell_objects(tmp_path, obj):
    with pytest.raises(TypeError, match="expected a fastcell model"):
        save(obj, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_save_refuses_torch_modules_and_points_to_from_torch(tmp_path):
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="from_torch"):
        save(torch.nn.LSTM(3, 4), tmp_path / "x.safetensors")


def test_pickled_model_round_trips_through_the_file(tmp_path):
    model = pickle.loads(pickle.dumps(layer_of("peephole_lstm", num_layers=2)))
    save(model, tmp_path / "p.safetensors")
    assert_same_model(model, load(tmp_path / "p.safetensors"))


# ---- loading needs neither torch nor pickle ----

def test_loads_in_a_process_where_torch_cannot_be_imported(tmp_path):
    model = layer_of("lstm", np.float64, num_layers=2, bidirectional=True, proj_size=2)
    saved_with_a_run(model, tmp_path, np.random.default_rng(0).standard_normal((7, 2, 3)))
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "sys.modules['safetensors'] = None  # the loader parses the format itself\n"
        "import numpy as np, fastcell\n"
        "m = fastcell.load('m.safetensors')\n"
        "y = m(np.load('x.npy'))[0]\n"
        "assert y.tobytes() == np.load('y.npy').tobytes()\n"
        "assert sys.modules['torch'] is None\n"
        "print('ok', type(m).__name__)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok LSTM"


def test_public_names():
    assert fastcell.save is save and fastcell.load is load and fastcell.FormatError is FormatError


def test_load_never_unpickles(tmp_path, monkeypatch):
    import _pickle

    save(layer_of("gru", num_layers=2), tmp_path / "m.safetensors")

    def refuse(*args, **kwargs):
        raise AssertionError("the loader unpickled something")

    for mod in (pickle, _pickle):
        for name in ("load", "loads", "Unpickler"):
            monkeypatch.setattr(mod, name, refuse)
    assert load(tmp_path / "m.safetensors").config()["cell"] == "gru"


# ---- OS errors stay OSError ----

def test_missing_file_and_directory_are_os_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nope.safetensors")
    with pytest.raises(IsADirectoryError):
        load(tmp_path)
    assert not issubclass(FormatError, OSError) and issubclass(FormatError, ValueError)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(FormatError, match="not a regular file"):
        load(fifo)


# ---- round trip: int8 and bf16, bit for bit ----

LAYER_CASES = [
    ("rnn_tanh", {}), ("rnn_relu", {}), ("gru", {}), ("gru_reset_before", {}), ("lstm", {}),
    ("peephole_lstm", {}),
    ("lstm", {"proj_size": P}),
    ("rnn_tanh", {"num_layers": 2, "bidirectional": True}),
    ("rnn_relu", {"num_layers": 3, "bias": False}),
    ("gru", {"num_layers": 2, "bidirectional": True, "batch_first": True}),
    ("gru_reset_before", {"num_layers": 2, "bidirectional": True}),
    ("lstm", {"num_layers": 2, "bidirectional": True, "proj_size": P}),
    ("lstm", {"num_layers": 2, "bias": False, "proj_size": P, "batch_first": True}),
    ("peephole_lstm", {"num_layers": 2, "bidirectional": True}),
    ("peephole_lstm", {"bias": False}),
]


@pytest.mark.parametrize("fmt", QFORMATS)
@pytest.mark.parametrize("variant,kwargs", LAYER_CASES,
                         ids=[f"{v}-" + "-".join(f"{k}={x}" for k, x in kw.items()) for v, kw in LAYER_CASES])
def test_layer_round_trip_is_bit_exact(tmp_path, rng, fmt, variant, kwargs):
    model = reduced_layer(fmt, variant, **kwargs)
    assert model.weight_format == QUANTIZED[fmt][0]
    save(model, tmp_path / "m.safetensors")
    back = load(tmp_path / "m.safetensors")
    assert_same_stored(model, back)
    assert back.input_bits == model.input_bits
    assert wf.expected_shapes(model.config()) == model.expected_shapes()
    x = rng.standard_normal((2, 9, I) if kwargs.get("batch_first") else (9, 2, I)).astype(np.float32)
    assert_same_outputs(model, back, x)
    if not kwargs.get("bidirectional"):  # the streaming step reads the same weights
        sa, sb = model.new_state(2), back.new_state(2)
        for k in range(3):
            xk = x[:, k] if kwargs.get("batch_first") else x[k]
            assert same_bits(model.step(xk, sa), back.step(xk, sb))


@pytest.mark.parametrize("fmt", QFORMATS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cell_round_trip_is_bit_exact(tmp_path, rng, fmt, variant, bias):
    model = quantized(odd_cell(variant, bias=bias), fmt)
    save(model, tmp_path / "c.safetensors")
    back = load(tmp_path / "c.safetensors")
    assert_same_stored(model, back)
    assert back.input_bits == model.input_bits
    x = rng.standard_normal((7, 2, I)).astype(np.float32)
    assert_same_outputs(model, back, x)
    one, two = model(x[0]), back(x[0])
    for u, v in zip(one if isinstance(one, tuple) else (one,), two if isinstance(two, tuple) else (two,)):
        assert same_bits(u, v)


def test_float64_model_quantized_round_trips(tmp_path, rng):
    model = reduced_layer("int8", "gru", dtype=np.float64, num_layers=2)
    assert model.dtype == np.float32 and model.config()["dtype"] == "float32"
    save(model, tmp_path / "m.safetensors")
    back = load(tmp_path / "m.safetensors")
    assert_same_stored(model, back)
    assert_same_outputs(model, back, rng.standard_normal((5, 2, I)).astype(np.float32))


def test_special_bit_patterns_round_trip(tmp_path):
    # int8's -128 and extreme finite scales; bf16 NaN payloads, infinities, -0 and subnormals.
    q = np.arange(-128, -128 + 17 * 3, dtype=np.int8).reshape(17, 3)
    scale = np.full(17, 0.01, np.float32)
    scale[:4] = [np.finfo(np.float32).smallest_subnormal, np.finfo(np.float32).tiny, 3e38, 1.0]
    hh = Reduced("int8", np.full((17, 17), 127, np.int8), np.linspace(1e-3, 2, 17, dtype=np.float32))
    cell = fastcell.RNNCell(Reduced("int8", q, scale), hh)
    save(cell, tmp_path / "i.safetensors")
    assert_same_stored(cell, load(tmp_path / "i.safetensors"))

    bits = np.array([0x7FC1, 0xFFC0, 0x7F81, 0x7F80, 0xFF80, 0x8000, 0x0000, 0x0001, 0x807F,
                     0x3F80, 0xBF80, 0x7F7F, 0xFF7F], np.uint16)
    ih = np.resize(bits, (3 * 17, 3)).astype(np.uint16)
    hh = np.resize(bits[::-1], (3 * 17, 17)).astype(np.uint16)
    cell = fastcell.GRUCell(Reduced("bf16", ih), Reduced("bf16", hh))
    save(cell, tmp_path / "b.safetensors")
    back = load(tmp_path / "b.safetensors")
    assert_same_stored(cell, back)
    assert same_bits(back._stored_state_dict()["weight_ih"].data, ih)


def test_loaded_file_reads_back_what_quantize_gave(tmp_path):
    # The file holds exactly the Reduced data: dequantized, the loaded model's state_dict is the
    # quantized model's, and it differs from the float model's (the test could tell a float copy).
    fmodel = odd_layer("lstm", proj_size=P, num_layers=2)
    for fmt in FORMATS:
        model = fastcell.quantize(fmodel, fmt)
        save(model, tmp_path / f"{fmt}.safetensors")
        back = load(tmp_path / f"{fmt}.safetensors").state_dict()
        assert all(same_bits(back[n], v) for n, v in model.state_dict().items())
        assert not same_bits(back["weight_hh_l1"], fmodel.state_dict()["weight_hh_l1"])


# ---- the reduced file: plain safetensors, version 2, dtypes I8 / BF16 / F32 ----

@pytest.mark.parametrize("name", QFORMATS)
def test_file_layout_names_dtypes_and_version(tmp_path, name):
    model = reduced_layer(name, "lstm", num_layers=2, bidirectional=True, proj_size=P)
    fmt = QUANTIZED[name][0]
    path = tmp_path / "m.safetensors"
    save(model, path)
    header, n, data = header_of(path)
    meta = header.pop("__metadata__")
    assert meta["format"] == "fastcell" and meta["version"] == "2"
    config = json.loads(meta["config"])
    assert config == model.config() and model.config()["weight_format"] == fmt
    # input_bits in the config only where it is 8: 16-bit int8 files are as before the key
    assert config.get("input_bits") == (8 if name == "int8x8" else None)
    assert {k: e["dtype"] for k, e in header.items()} == expected_dtypes(model)
    if fmt == "int8":
        assert header["weight_hr_l1_reverse.scale"]["shape"] == [P]
        assert header["weight_ih_l0.scale"]["shape"] == [4 * H]
    assert not any(k.endswith(".scale") for k in header) or fmt == "int8"
    # Aligned as the safetensors package writes: header padded to 8, each tensor on its item size.
    assert n % 8 == 0
    size = {"F32": 4, "F64": 8, "BF16": 2, "I8": 1}
    for k, e in header.items():
        assert e["data_offsets"][0] % size[e["dtype"]] == 0, k
    assert sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values()) == len(data)
    assert wf.read_config(path) == model.config()


def test_file_read_by_safetensors_numpy_int8(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    model = reduced_layer("int8", "peephole_lstm", num_layers=2, bidirectional=True)
    save(model, tmp_path / "m.safetensors")
    tensors = load_file(str(tmp_path / "m.safetensors"))
    stored = model._stored_state_dict()
    assert set(tensors) == set(expected_dtypes(model))
    for name, v in stored.items():
        if isinstance(v, Reduced):
            assert same_bits(tensors[name], v.data) and tensors[name].dtype == np.int8
            assert same_bits(tensors[name + ".scale"], v.scale)
            # The convention: weight = q * scale per output row.
            deq = tensors[name].astype(np.float32) * tensors[name + ".scale"][:, None]
            assert same_bits(deq, model.state_dict()[name])
        else:
            assert same_bits(tensors[name], v) and v.dtype == np.float32
    with safe_open(str(tmp_path / "m.safetensors"), "numpy") as f:
        assert f.metadata()["version"] == "2"


def test_file_read_by_safetensors_numpy_bf16(tmp_path):
    pytest.importorskip("ml_dtypes")  # NumPy has no bfloat16 of its own
    from safetensors.numpy import load_file

    model = reduced_layer("bf16", "gru", num_layers=2)
    save(model, tmp_path / "m.safetensors")
    tensors = load_file(str(tmp_path / "m.safetensors"))
    assert set(tensors) == set(expected_dtypes(model))
    for name, v in model._stored_state_dict().items():
        if isinstance(v, Reduced):
            assert tensors[name].dtype.name == "bfloat16"
            assert same_bits(tensors[name].view(np.uint16), v.data)
            assert same_bits(tensors[name].astype(np.float32), model.state_dict()[name])
        else:
            assert same_bits(tensors[name], v)


@pytest.mark.parametrize("fmt", FORMATS)
def test_file_read_by_safetensors_torch(tmp_path, fmt):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    model = reduced_layer(fmt, "lstm", proj_size=P, bidirectional=True)
    save(model, tmp_path / "m.safetensors")
    tensors = load_file(str(tmp_path / "m.safetensors"))
    want = {"I8": torch.int8, "BF16": torch.bfloat16, "F32": torch.float32}
    assert {k: t.dtype for k, t in tensors.items()} == {k: want[d] for k, d in expected_dtypes(model).items()}
    sd = model.state_dict()
    for name, v in model._stored_state_dict().items():
        t = tensors[name]
        if isinstance(v, Reduced) and fmt == "int8":
            assert same_bits(t.numpy(), v.data)
            assert same_bits(tensors[name + ".scale"].numpy(), v.scale)
            assert same_bits((t.float() * tensors[name + ".scale"][:, None]).numpy(), sd[name])
        elif isinstance(v, Reduced):
            assert same_bits(t.view(torch.int16).numpy().view(np.uint16), v.data)
            assert same_bits(t.float().numpy(), sd[name])
        else:
            assert same_bits(t.numpy(), v)


def test_reduced_files_save_and_load_without_torch_or_safetensors(tmp_path):
    model = reduced_layer("int8", "lstm", num_layers=2, proj_size=P)
    saved_with_a_run(model, tmp_path, np.random.default_rng(0).standard_normal((6, 2, I)).astype(np.float32))
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['safetensors'] = None\n"
        "import numpy as np, fastcell\n"
        "m = fastcell.load('m.safetensors')\n"
        "assert m(np.load('x.npy'))[0].tobytes() == np.load('y.npy').tobytes()\n"
        "b = fastcell.quantize(fastcell.GRUCell(np.ones((51, 3), np.float32), np.ones((51, 17), np.float32)), 'bf16')\n"
        "fastcell.save(b, 'b.safetensors')\n"
        "print(fastcell.load('b.safetensors').weight_format, m.weight_format)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["bf16", "int8"]


# ---- version 1 ----

@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_float_files_are_still_written_as_version_1(tmp_path, dtype):
    model = odd_layer("gru", num_layers=2, dtype=dtype)
    save(model, tmp_path / "f.safetensors")
    header, _, _ = header_of(tmp_path / "f.safetensors")
    meta = header.pop("__metadata__")
    assert meta["version"] == "1" and "weight_format" not in json.loads(meta["config"])
    assert {e["dtype"] for e in header.values()} == {"F32" if dtype == np.float32 else "F64"}


def test_version_1_file_of_the_old_writer_loads(tmp_path, rng):
    # The version-1 writer, as it was: safetensors.numpy.save of the state_dict.
    from safetensors.numpy import save as serialize

    model = odd_layer("lstm", num_layers=2, bidirectional=True, proj_size=P)
    meta = {"format": "fastcell", "version": "1", "config": json.dumps(model.config(), sort_keys=True)}
    blob = serialize({k: np.ascontiguousarray(v) for k, v in model.state_dict().items()}, metadata=meta)
    (tmp_path / "old.safetensors").write_bytes(blob)
    back = load(tmp_path / "old.safetensors")
    assert back.weight_format == "float32"
    assert_same_stored(model, back)
    assert_same_outputs(model, back, rng.standard_normal((4, 2, I)).astype(np.float32))


@pytest.mark.parametrize("name", ["rnn", "gru", "lstm", "peephole_lstm"])
def test_shipped_version_1_demo_files_load(name):
    path = ROOT / "fastcell" / "demo_models" / f"{name}.safetensors"
    if not path.exists():
        pytest.skip("no demo models in this tree")
    header, _, _ = header_of(path)
    assert header["__metadata__"]["version"] == "1"
    model = load(path)
    assert model.weight_format == "float32"
    assert model.config() == json.loads(header["__metadata__"]["config"])
