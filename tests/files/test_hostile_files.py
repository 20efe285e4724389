"""Reduced weight formats in the weight file and the command (fastcell/weights_file.py, cli.py):
int8 and bf16 models saved in safetensors' own I8 and BF16 dtypes with the int8 scales as F32
tensors "<matrix>.scale", version "2"; a bit-exact round trip for every cell and layer type; files
any safetensors reader opens; version-1 float files still loading; FormatError naming the tensor
for every hostile reduced file; ``fastcell export --weights``, ``fastcell quantize`` and
``fastcell info``'s weight format and bytes."""

import json
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastcell
from fastcell.io import weights_file as wf
from fastcell.models.layers import _Layer
from fastcell.formats.reduced import Reduced
from fastcell.io.weights_file import FormatError, load, save
from conftest import ENV, ROOT, VARIANTS, fails, fastcell_cmd, load_or_refuse, init_weights, ok
from conftest import make_cell as cell_from_weights

FORMATS = ["int8", "bf16"]
I, H, P = 3, 17, 5  # not multiples of any vector width


# ---- models ----

def make_layer(variant, num_layers=1, bidirectional=False, proj_size=0, bias=True,
               batch_first=False, dtype=np.float32):
    common = dict(num_layers=num_layers, bias=bias, batch_first=batch_first,
                  bidirectional=bidirectional, dtype=dtype)
    if variant.startswith("rnn"):
        return fastcell.RNN(I, H, **VARIANTS[variant][1], **common)
    if variant.startswith("gru"):
        return fastcell.GRU(I, H, **VARIANTS[variant][1], **common)
    if variant == "lstm":
        return fastcell.LSTM(I, H, proj_size=proj_size, **common)
    return fastcell.PeepholeLSTM(I, H, **common)


def make_cell(variant, bias=True, seed=0, dtype=np.float32):
    w = init_weights(np.random.default_rng(seed), VARIANTS[variant][0], I, H, dtype,
                     peephole=variant == "peephole_lstm", bias=bias)
    return cell_from_weights(variant, w)


def reduced_layer(fmt, variant="lstm", **kwargs):
    return fastcell.quantize(make_layer(variant, **kwargs), fmt)


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_same_stored(a, b):
    """The weights as kept, bit for bit: float arrays, int8 data and scales, bf16 bits."""
    assert type(a) is type(b) and a.config() == b.config()
    assert a.weight_format == b.weight_format and a.weight_bytes == b.weight_bytes
    sa, sb = a._stored_state_dict(), b._stored_state_dict()
    assert list(sa) == list(sb)
    for name, u in sa.items():
        v = sb[name]
        assert type(u) is type(v), name
        if isinstance(u, Reduced):
            assert u.format == v.format and same_bits(u.data, v.data), name
            assert (u.scale is None) == (v.scale is None), name
            assert u.scale is None or same_bits(u.scale, v.scale), name
        else:
            assert same_bits(u, v), name


def assert_same_outputs(a, b, x):
    """Bitwise the same outputs and final states (np.array_equal, and the same bytes)."""
    if isinstance(a, _Layer):
        ya, sa = a(x)
        yb, sb = b(x)
    else:
        ya, sa = a.run(x)
        yb, sb = b.run(x)
    sa, sb = (sa if isinstance(sa, tuple) else (sa,)), (sb if isinstance(sb, tuple) else (sb,))
    for u, v in zip((ya, *sa), (yb, *sb)):
        assert np.array_equal(u, v) and same_bits(u, v)


def header_of_bytes(blob):
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), n, blob[8 + n:]


def header_of(path):
    return header_of_bytes(Path(path).read_bytes())


# ---- round trip ----

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


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant,kwargs", LAYER_CASES,
                         ids=[f"{v}-" + "-".join(f"{k}={x}" for k, x in kw.items()) for v, kw in LAYER_CASES])
def test_layer_round_trip_is_bit_exact(tmp_path, rng, fmt, variant, kwargs):
    model = reduced_layer(fmt, variant, **kwargs)
    assert model.weight_format == fmt
    save(model, tmp_path / "m.safetensors")
    back = load(tmp_path / "m.safetensors")
    assert_same_stored(model, back)
    assert wf.expected_shapes(model.config()) == model.expected_shapes()
    x = rng.standard_normal((2, 9, I) if kwargs.get("batch_first") else (9, 2, I)).astype(np.float32)
    assert_same_outputs(model, back, x)
    if not kwargs.get("bidirectional"):  # the streaming step reads the same weights
        sa, sb = model.new_state(2), back.new_state(2)
        for k in range(3):
            xk = x[:, k] if kwargs.get("batch_first") else x[k]
            assert same_bits(model.step(xk, sa), back.step(xk, sb))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cell_round_trip_is_bit_exact(tmp_path, rng, fmt, variant, bias):
    model = fastcell.quantize(make_cell(variant, bias=bias), fmt)
    save(model, tmp_path / "c.safetensors")
    back = load(tmp_path / "c.safetensors")
    assert_same_stored(model, back)
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
    fmodel = make_layer("lstm", proj_size=P, num_layers=2)
    for fmt in FORMATS:
        model = fastcell.quantize(fmodel, fmt)
        save(model, tmp_path / f"{fmt}.safetensors")
        back = load(tmp_path / f"{fmt}.safetensors").state_dict()
        assert all(same_bits(back[n], v) for n, v in model.state_dict().items())
        assert not same_bits(back["weight_hh_l1"], fmodel.state_dict()["weight_hh_l1"])


# ---- the file: plain safetensors, version 2, dtypes I8 / BF16 / F32 ----

def expected_dtypes(model):
    """{name: safetensors dtype} by the convention of the module docstring."""
    fmt = model.weight_format
    out = {}
    for name, v in model._stored_state_dict().items():
        if isinstance(v, Reduced):
            out[name] = {"int8": "I8", "bf16": "BF16"}[fmt]
            if fmt == "int8":
                out[name + ".scale"] = "F32"
        else:
            out[name] = {"float32": "F32", "float64": "F64"}[v.dtype.name]
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_file_layout_names_dtypes_and_version(tmp_path, fmt):
    model = reduced_layer(fmt, "lstm", num_layers=2, bidirectional=True, proj_size=P)
    path = tmp_path / "m.safetensors"
    save(model, path)
    header, n, data = header_of(path)
    meta = header.pop("__metadata__")
    assert meta["format"] == "fastcell" and meta["version"] == "2"
    assert json.loads(meta["config"]) == model.config() and model.config()["weight_format"] == fmt
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
    save(model, tmp_path / "m.safetensors")
    x = np.random.default_rng(0).standard_normal((6, 2, I)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model(x)[0])
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
    model = make_layer("gru", num_layers=2, dtype=dtype)
    save(model, tmp_path / "f.safetensors")
    header, _, _ = header_of(tmp_path / "f.safetensors")
    meta = header.pop("__metadata__")
    assert meta["version"] == "1" and "weight_format" not in json.loads(meta["config"])
    assert {e["dtype"] for e in header.values()} == {"F32" if dtype == np.float32 else "F64"}


def test_version_1_file_of_the_old_writer_loads(tmp_path, rng):
    # The version-1 writer, as it was: safetensors.numpy.save of the state_dict.
    from safetensors.numpy import save as serialize

    model = make_layer("lstm", num_layers=2, bidirectional=True, proj_size=P)
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


# ---- hostile files ----

def build(tensors, metadata, raw_header=None):
    """A safetensors file: tensors {name: (dtype, shape, bytes)}, laid out in order."""
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata is not None:
        header["__metadata__"] = metadata
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def t(dtype, a):
    """A tensor entry: safetensors dtype and an array's little-endian bytes."""
    a = np.asarray(a)
    return (dtype, a.shape, a.astype(a.dtype.newbyteorder("<")).tobytes())


def parts(model, version=None):
    """({name: (dtype, shape, bytes)}, metadata) of a valid file for this model, by the convention."""
    tensors = {}
    for name, v in model._stored_state_dict().items():
        if isinstance(v, Reduced):
            tensors[name] = t("I8" if v.format == "int8" else "BF16", v.data)
            if v.scale is not None:
                tensors[name + ".scale"] = t("F32", v.scale)
        else:
            tensors[name] = t({"float32": "F32", "float64": "F64"}[v.dtype.name], v)
    reduced = model.weight_format in FORMATS
    meta = {"format": "fastcell", "version": version if version is not None else ("2" if reduced else "1"),
            "config": json.dumps(model.config())}
    return tensors, meta


def load_bytes(tmp_path, blob):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    return load(path)


def expect(tmp_path, blob, pattern):
    with pytest.raises(FormatError, match=pattern) as err:
        load_bytes(tmp_path, blob)
    assert str(err.value).startswith(str(tmp_path / "bad.safetensors"))
    return str(err.value)


# int8 LSTM 3 -> 17, proj 5: weight_ih_l0 (68, 3), weight_hh_l0 (68, 5), weight_hr_l0 (5, 17).
INT8 = reduced_layer("int8", "lstm", proj_size=P)
BF16 = reduced_layer("bf16", "lstm", proj_size=P)


def tensors_case(model, change, version=None):
    tensors, meta = parts(model, version)
    change(tensors)
    return build(tensors, meta)


@pytest.mark.parametrize("model", [INT8, BF16], ids=FORMATS)
def test_valid_hand_built_files_load(tmp_path, model):
    back = load_bytes(tmp_path, build(*parts(model)))
    assert_same_stored(model, back)


def set_scale(name, row, value):
    def f(ts):
        s = np.frombuffer(ts[name][2], "<f4").copy()
        s[row] = value
        ts[name] = t("F32", s)
    return f


@pytest.mark.parametrize("change,pattern", [
    (set_scale("weight_ih_l0.scale", 3, -0.5),
     r"tensor weight_ih_l0\.scale: 1 of its 68 int8 scales are not finite and > 0 \(row 3 is -0\.5\)"),
    (set_scale("weight_hh_l0.scale", 0, np.nan), r"weight_hh_l0\.scale: .*row 0 is nan"),
    (set_scale("weight_hr_l0.scale", 4, 0.0), r"weight_hr_l0\.scale: .*row 4 is 0\.0"),
    (set_scale("weight_hr_l0.scale", 1, -0.0), r"weight_hr_l0\.scale: .*row 1 is -0\.0"),
    (set_scale("weight_ih_l0.scale", 67, np.inf), r"weight_ih_l0\.scale: .*row 67 is inf"),
    (set_scale("weight_ih_l0.scale", 2, -np.inf), r"weight_ih_l0\.scale: .*row 2 is -inf"),
], ids=["negative", "nan", "zero", "minus-zero", "inf", "minus-inf"])
def test_bad_scale_values(tmp_path, change, pattern):
    expect(tmp_path, tensors_case(INT8, change), pattern)


def test_every_bad_scale_is_counted(tmp_path):
    def change(ts):
        ts["weight_hh_l0.scale"] = t("F32", np.full(68, np.nan, np.float32))
    expect(tmp_path, tensors_case(INT8, change), r"weight_hh_l0\.scale: 68 of its 68 int8 scales")


def replace(name, entry):
    return lambda ts: ts.__setitem__(name, entry)


def remove(name):
    return lambda ts: ts.pop(name)


def retype(name, dtype, itemsize):
    def f(ts):
        _, shape, _ = ts[name]
        ts[name] = (dtype, shape, b"\1" * (int(np.prod(shape)) * itemsize))
    return f


@pytest.mark.parametrize("change,pattern", [
    (remove("weight_hh_l0.scale"), r"missing weight_hh_l0\.scale \(68,\)"),
    (remove("weight_hr_l0.scale"), r"missing weight_hr_l0\.scale \(5,\)"),
    (replace("weight_ih_l0.scale", t("F32", np.ones(69, np.float32))),
     r"weight_ih_l0\.scale has shape \(69,\), expected \(68,\)"),
    (replace("weight_ih_l0.scale", t("F32", np.ones((68, 1), np.float32))),
     r"weight_ih_l0\.scale has shape \(68, 1\), expected \(68,\)"),
    (replace("weight_hr_l0.scale", t("F32", np.ones(17, np.float32))),
     r"weight_hr_l0\.scale has shape \(17,\), expected \(5,\)"),  # columns, not rows
    (replace("weight_ih_l0.scale", t("F32", np.float32(1))), r"weight_ih_l0\.scale has shape \(\), expected"),
    (retype("weight_ih_l0.scale", "F64", 8), r"weight_ih_l0\.scale has dtype F64, expected F32 \(int8 scales are float32\)"),
    (retype("weight_ih_l0.scale", "BF16", 2), r"weight_ih_l0\.scale has dtype BF16, expected F32"),
    (retype("weight_ih_l0.scale", "I8", 1), r"weight_ih_l0\.scale has dtype I8, expected F32"),
    # an I8 tensor where F32 belongs
    (retype("bias_ih_l0", "I8", 1), r"bias_ih_l0 has dtype I8, expected F32 \(biases and peepholes stay float32"),
    # an F32 tensor where I8 belongs, and other wrong matrix dtypes
    (retype("weight_ih_l0", "F32", 4), r"weight_ih_l0 has dtype F32, expected I8 \(config weight_format int8\)"),
    (retype("weight_hr_l0", "F32", 4), r"weight_hr_l0 has dtype F32, expected I8"),
    (retype("weight_hh_l0", "BF16", 2), r"weight_hh_l0 has dtype BF16, expected I8"),
    (retype("weight_hh_l0", "U8", 1), r"weight_hh_l0 has dtype U8, expected I8"),
    (retype("weight_hh_l0", "F8_E4M3", 1), r"weight_hh_l0 has dtype F8_E4M3, expected I8"),
    (replace("weight_ih_l0", t("I8", np.zeros((68, 4), np.int8))), r"weight_ih_l0 has shape \(68, 4\), expected \(68, 3\)"),
    (replace("bias_ih_l0.scale", t("F32", np.ones(68, np.float32))), r"unexpected 'bias_ih_l0\.scale'"),
    (replace("weight_ih_l0.zero_point", t("I8", np.zeros(68, np.int8))), r"unexpected 'weight_ih_l0\.zero_point'"),
    (replace("weight_ih_l0_scale", t("F32", np.ones(68, np.float32))), r"unexpected 'weight_ih_l0_scale'"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None)
def test_bad_int8_tensors(tmp_path, change, pattern):
    msg = expect(tmp_path, tensors_case(INT8, change), pattern)
    assert "(lstm layer, int8)" in msg


@pytest.mark.parametrize("change,pattern", [
    (replace("weight_ih_l0.scale", t("F32", np.ones(68, np.float32))), r"unexpected 'weight_ih_l0\.scale'"),
    (retype("weight_ih_l0", "I8", 1), r"weight_ih_l0 has dtype I8, expected BF16 \(config weight_format bf16\)"),
    (retype("weight_hh_l0", "F32", 4), r"weight_hh_l0 has dtype F32, expected BF16"),
    (retype("weight_hr_l0", "U16", 2), r"weight_hr_l0 has dtype U16, expected BF16"),
    (retype("weight_hr_l0", "F16", 2), r"weight_hr_l0 has dtype F16, expected BF16"),
    (retype("bias_hh_l0", "BF16", 2), r"bias_hh_l0 has dtype BF16, expected F32 \(biases and peepholes"),
    (remove("weight_hh_l0"), r"missing weight_hh_l0 \(68, 5\)"),
])
def test_bad_bf16_tensors(tmp_path, change, pattern):
    msg = expect(tmp_path, tensors_case(BF16, change), pattern)
    assert "(lstm layer, bf16)" in msg


@pytest.mark.parametrize("fmt", FORMATS)
def test_reduced_peephole_must_stay_float32(tmp_path, fmt):
    model = fastcell.quantize(make_cell("peephole_lstm"), fmt)
    dtype, itemsize = ("I8", 1) if fmt == "int8" else ("BF16", 2)
    expect(tmp_path, tensors_case(model, retype("weight_ph", dtype, itemsize)),
           rf"weight_ph has dtype {dtype}, expected F32 \(biases and peepholes stay float32 in {fmt} models\)")


def test_reduced_cell_names(tmp_path):
    model = fastcell.quantize(make_cell("gru"), "int8")
    expect(tmp_path, tensors_case(model, remove("weight_hh.scale")), r"missing weight_hh\.scale \(51,\)")
    expect(tmp_path, tensors_case(model, set_scale("weight_ih.scale", 50, np.nan)), r"weight_ih\.scale: .*row 50 is nan")


def config_case(model, change, version=None):
    tensors, meta = parts(model, version)
    cfg = model.config()
    change(cfg)
    meta["config"] = json.dumps(cfg)
    return build(tensors, meta)


def setter(key, value):
    return lambda c: c.__setitem__(key, value)


@pytest.mark.parametrize("change,pattern", [
    (setter("weight_format", "int4"),
     r"config 'weight_format' is 'int4', expected one of \['float32', 'float64', 'int8', 'bf16'\]"),
    (setter("weight_format", "INT8"), r"config 'weight_format' is 'INT8'"),
    (setter("weight_format", "bfloat16"), r"config 'weight_format' is 'bfloat16'"),
    (setter("weight_format", ""), r"config 'weight_format' is ''"),
    (setter("weight_format", 8), r"config 'weight_format' is 8"),
    (setter("weight_format", None), r"config 'weight_format' is None"),
    (setter("weight_format", ["int8"]), r"config 'weight_format' is \['int8'\]"),
    (setter("dtype", "float64"),
     r"config 'weight_format' is 'int8', which computes in float32, but 'dtype' is 'float64'"),
    (setter("weight_format", "float64"), r"config 'weight_format' is 'float64' but 'dtype' is 'float32'"),
    (lambda c: c.pop("weight_format"),
     r"unexpected 'weight_ih_l0\.scale'.*weight_ih_l0 has dtype I8, expected F32 \(config dtype float32\)"),
    (setter("weight_format", "bf16"), r"unexpected 'weight_ih_l0\.scale'.*weight_ih_l0 has dtype I8, expected BF16"),
])
def test_bad_weight_format_config(tmp_path, change, pattern):
    expect(tmp_path, config_case(INT8, change), pattern)


def test_bf16_config_with_float64_dtype(tmp_path):
    expect(tmp_path, config_case(BF16, setter("dtype", "float64")),
           r"'weight_format' is 'bf16', which computes in float32, but 'dtype' is 'float64'")


def test_version_1_cannot_hold_a_reduced_format(tmp_path):
    for model, fmt in ((INT8, "int8"), (BF16, "bf16")):
        expect(tmp_path, build(*parts(model, version="1")),
               rf"weight_format is '{fmt}', but version 1 files hold float weights only \({fmt} needs version '2'\)")


@pytest.mark.parametrize("version", ["3", "2.0", "02", ""])
def test_unknown_versions_are_refused(tmp_path, version):
    expect(tmp_path, build(*parts(INT8, version=version)), "unknown format version")


def test_float_file_claiming_int8_is_refused(tmp_path):
    model = make_layer("gru")
    msg = expect(tmp_path, config_case(model, setter("weight_format", "int8"), version="2"),
                 r"missing weight_ih_l0\.scale \(51,\)")
    assert "weight_ih_l0 has dtype F32, expected I8" in msg and "weight_hh_l0 has dtype F32" in msg


def test_version_2_file_may_hold_float_weights(tmp_path):
    # A version-2 reader reads float files under either version; an explicit float weight_format
    # equal to the dtype is accepted.
    model = make_layer("gru", dtype=np.float64)
    assert_same_stored(model, load_bytes(tmp_path, build(*parts(model, version="2"))))
    back = load_bytes(tmp_path, config_case(model, setter("weight_format", "float64"), version="2"))
    assert back.weight_format == "float64" and back.dtype == np.float64
    back = load_bytes(tmp_path, config_case(model, setter("weight_format", "float64")))
    assert back.weight_format == "float64"


def test_hostile_int8_sizes_allocate_nothing_big(tmp_path):
    # A config and an int8 matrix with its scales claiming gigabytes: refused before allocating.
    tensors, meta = parts(INT8)
    cfg = json.loads(meta["config"])
    cfg.update(input_size=2**30, hidden_size=2**29, proj_size=0)
    meta["config"] = json.dumps(cfg)
    header, _, data = header_of_bytes(build(tensors, meta))
    header["weight_ih_l0"]["shape"] = [2**31, 2**30]
    header["weight_ih_l0.scale"]["shape"] = [2**31]
    h = json.dumps(header).encode()
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="needs"):
            load_bytes(tmp_path, struct.pack("<Q", len(h)) + h + data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20


@pytest.mark.parametrize("model", [INT8, BF16], ids=FORMATS)
def test_truncated_in_every_region(tmp_path, model):
    blob = build(*parts(model))
    for cut in list(range(0, 40)) + list(range(40, len(blob), 29)):
        with pytest.raises(FormatError):
            load_bytes(tmp_path, blob[:cut])


# ---- fuzzing the reduced files ----

BASES = [build(*parts(m)) for m in (
    reduced_layer("int8", "gru", num_layers=2, bidirectional=True),
    fastcell.quantize(make_cell("peephole_lstm"), "int8"),
    reduced_layer("bf16", "lstm", proj_size=P),
)]


@st.composite
def mutated(draw):
    """A valid reduced file, then one or two edits: a byte (often in the data, where the scales
    are), or a header entry's dtype, shape or a config field."""
    blob = bytearray(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 2))):
        n = struct.unpack("<Q", bytes(blob[:8]))[0] if len(blob) >= 8 else 0
        kind = draw(st.sampled_from(["byte", "data", "dtype", "shape", "config", "truncate"]))
        if kind == "byte" and blob:
            i = draw(st.integers(0, len(blob) - 1))
            blob[i] = draw(st.integers(0, 255))
        elif kind == "data" and len(blob) > 8 + n:
            i = draw(st.integers(8 + n, len(blob) - 1))
            blob[i] = draw(st.sampled_from([0x00, 0x80, 0xFF, 0x7F, 0xC0]))
        elif kind == "truncate":
            del blob[draw(st.integers(0, len(blob))):]
        else:
            try:
                header = json.loads(bytes(blob[8:8 + n]))
                names = sorted(k for k in header if k != "__metadata__")
                cfg = json.loads(header["__metadata__"]["config"])
            except Exception:
                continue
            if kind == "config":
                key = draw(st.sampled_from(["weight_format", "dtype", "hidden_size", "bias"]))
                cfg[key] = draw(st.sampled_from(["int8", "bf16", "float32", "float64", "int4", 17, 16, True, None]))
                header["__metadata__"]["config"] = json.dumps(cfg)
            elif names:
                name = draw(st.sampled_from(names))
                if kind == "dtype":
                    header[name]["dtype"] = draw(st.sampled_from(["I8", "U8", "BF16", "F16", "F32", "F64"]))
                else:
                    shape = header[name]["shape"]
                    header[name]["shape"] = draw(st.sampled_from([shape[::-1], shape + [1], shape[:1], [0]]))
            h = json.dumps(header).encode()
            blob = bytearray(struct.pack("<Q", len(h)) + h + bytes(blob[8 + n:]))
    return bytes(blob)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz_reduced")


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(blob=mutated())
def test_fuzz_mutated_reduced_files_raise_only_format_error(fuzz_dir, blob):
    path = fuzz_dir / "fuzz.safetensors"
    path.write_bytes(blob)
    model = load_or_refuse(path)
    if model is None:
        return
    # What fastcell accepts holds what the file holds, and its scales are usable.
    header, _, _ = header_of(path)
    stored = model._stored_state_dict()
    for name, v in stored.items():
        if isinstance(v, Reduced) and v.scale is not None:
            assert np.all(np.isfinite(v.scale) & (v.scale > 0))
    assert set(header) - {"__metadata__"} == set(expected_dtypes(model))


# ---- the command ----





@pytest.fixture
def files(tmp_path):
    save(make_layer("lstm", num_layers=2, proj_size=P), tmp_path / "lstm.safetensors")
    save(make_layer("gru", bidirectional=True, dtype=np.float64), tmp_path / "gru64.safetensors")
    save(make_cell("peephole_lstm"), tmp_path / "cell.safetensors")
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
