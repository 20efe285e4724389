"""The weight file (docs/DESIGN.md "The weight file"; issue 5 "Bad files"): an exact round trip for
every model, loading without torch or pickle, and FormatError with the reason for every hostile
file, in bounded time and memory, including a Hypothesis fuzz over mutated valid files."""

import json
import os
import pickle
import re
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastcell
from fastcell.io import weights_file as wf
from fastcell.io.weights_file import FormatError, load, save
from conftest import ROOT, VARIANTS, load_or_refuse, init_weights
from conftest import make_cell as cell_from_weights

DTYPES = [np.float32, np.float64]


# ---- models ----

def make_layer(variant, dtype=np.float32, num_layers=1, bidirectional=False, proj_size=0,
               bias=True, batch_first=False, input_size=3, hidden_size=4):
    common = dict(num_layers=num_layers, bias=bias, batch_first=batch_first,
                  bidirectional=bidirectional, dtype=dtype)
    if variant.startswith("rnn"):
        return fastcell.RNN(input_size, hidden_size, **VARIANTS[variant][1], **common)
    if variant.startswith("gru"):
        return fastcell.GRU(input_size, hidden_size, **VARIANTS[variant][1], **common)
    if variant == "lstm":
        return fastcell.LSTM(input_size, hidden_size, proj_size=proj_size, **common)
    return fastcell.PeepholeLSTM(input_size, hidden_size, **common)


def make_cell(variant, dtype=np.float32, bias=True, seed=0, input_size=3, hidden_size=4):
    w = init_weights(np.random.default_rng(seed), VARIANTS[variant][0], input_size, hidden_size,
                     dtype, peephole=variant == "peephole_lstm", bias=bias)
    return cell_from_weights(variant, w)


def assert_same_model(a, b):
    assert type(a) is type(b)
    assert a.config() == b.config()
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and sa[name].shape == sb[name].shape, name
        assert sa[name].tobytes() == sb[name].tobytes(), f"{name} differs"


# ---- round trip ----

LAYER_CASES = [(v, dt, bidi, proj, bias)
               for v in VARIANTS for dt in DTYPES for bidi in (False, True)
               for proj in ((0, 2) if v == "lstm" else (0,)) for bias in (True, False)]


@pytest.mark.parametrize("variant,dtype,bidirectional,proj_size,bias", LAYER_CASES,
                         ids=lambda p: getattr(p, "__name__", str(p)))
def test_layer_round_trip_is_exact(tmp_path, variant, dtype, bidirectional, proj_size, bias):
    model = make_layer(variant, dtype, num_layers=2, bidirectional=bidirectional,
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
    model = make_cell(variant, dtype, bias=bias)
    path = tmp_path / "c.safetensors"
    save(model, str(path))
    back = load(str(path))
    assert_same_model(model, back)
    assert wf.expected_shapes(model.config()) == {k: v.shape for k, v in model.state_dict().items()}
    x = np.random.default_rng(1).standard_normal((6, 2, 3)).astype(dtype)
    assert model.run(x)[0].tobytes() == back.run(x)[0].tobytes()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_special_values_round_trip_bitwise(tmp_path, dtype):
    model = make_layer("lstm", dtype)
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

    model = make_layer("gru_reset_before", np.float64, num_layers=2, bidirectional=True)
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
    save(make_layer("rnn_tanh"), path)
    save(make_layer("gru"), path)
    assert load(path).config()["cell"] == "gru"
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_save_to_a_bad_path_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        save(make_layer("gru"), tmp_path / "no" / "such" / "dir.safetensors")
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        save(make_layer("gru"), tmp_path / "d")
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
    model = pickle.loads(pickle.dumps(make_layer("peephole_lstm", num_layers=2)))
    save(model, tmp_path / "p.safetensors")
    assert_same_model(model, load(tmp_path / "p.safetensors"))


# ---- loading needs neither torch nor pickle ----

def test_loads_in_a_process_where_torch_cannot_be_imported(tmp_path):
    model = make_layer("lstm", np.float64, num_layers=2, bidirectional=True, proj_size=2)
    save(model, tmp_path / "m.safetensors")
    x = np.random.default_rng(0).standard_normal((7, 2, 3))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model(x)[0])
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

    save(make_layer("gru", num_layers=2), tmp_path / "m.safetensors")

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


# ---- hostile files ----

def build(tensors, metadata, *, header_extra=None, raw_header=None, length=None, tail=b""):
    """A safetensors file: tensors {name: array or (dtype, shape, bytes)}, laid out in order."""
    header, data = {}, b""
    for name, t in tensors.items():
        if isinstance(t, np.ndarray):
            t = ({"float32": "F32", "float64": "F64"}[t.dtype.name], list(t.shape),
                 np.ascontiguousarray(t).astype(t.dtype.newbyteorder("<")).tobytes())
        dtype, shape, raw = t
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata is not None:
        header["__metadata__"] = metadata
    header.update(header_extra or {})
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data + tail


def parts(model):
    """(tensors, metadata) of a valid file for this model."""
    meta = {"format": "fastcell", "version": "1", "config": json.dumps(model.config())}
    return {k: np.array(v) for k, v in model.state_dict().items()}, meta


def split(blob):
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join(header, data):
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.fixture
def valid():
    """A valid file's bytes: a 2-layer bidirectional float32 LSTM with projection."""
    tensors, meta = parts(make_layer("lstm", num_layers=2, bidirectional=True, proj_size=2))
    return build(tensors, meta)


def load_bytes(tmp_path, blob, name="bad.safetensors"):
    path = tmp_path / name
    path.write_bytes(blob)
    return load(path)


def expect(tmp_path, blob, pattern):
    with pytest.raises(FormatError, match=pattern):
        load_bytes(tmp_path, blob)


def test_valid_fixture_loads(tmp_path, valid):
    assert isinstance(load_bytes(tmp_path, valid), fastcell.LSTM)


def test_empty_file(tmp_path):
    expect(tmp_path, b"", "empty file")


@pytest.mark.parametrize("n", [1, 7])
def test_shorter_than_the_length_field(tmp_path, n):
    expect(tmp_path, b"\x10" * n, "truncated")


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes(tmp_path, seed):
    rng = np.random.default_rng(seed)
    expect(tmp_path, rng.bytes(int(rng.integers(1, 5000))), ".")


def test_random_bytes_with_a_plausible_length(tmp_path):
    blob = struct.pack("<Q", 200) + np.random.default_rng(0).bytes(400)
    expect(tmp_path, blob, "not UTF-8|not valid JSON")


@pytest.mark.parametrize("length", [2**64 - 1, 2**40, wf.MAX_HEADER_BYTES + 1])
def test_header_claiming_a_huge_length(tmp_path, length):
    tracemalloc.start()
    try:
        expect(tmp_path, struct.pack("<Q", length) + b"{}" * 10, "claims")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_header_length_past_the_end(tmp_path, valid):
    n = struct.unpack("<Q", valid[:8])[0]
    expect(tmp_path, struct.pack("<Q", len(valid)) + valid[8:], "truncated: the header claims")
    expect(tmp_path, valid[: 8 + n // 2], "truncated: the header claims")


def test_zero_header_length(tmp_path):
    expect(tmp_path, struct.pack("<Q", 0) + b"{}", "header length is 0")


@pytest.mark.parametrize("cut", [1, 4, 100, -1])
def test_truncated_data(tmp_path, valid, cut):
    header, data = split(valid)
    expect(tmp_path, join(header, data[:-cut] if cut > 0 else data[:cut]), "past the end")


def test_truncated_in_every_region(tmp_path, valid):
    # Every cut of a valid file is refused with a FormatError, from the length field to the data.
    for cut in list(range(0, 40)) + list(range(40, len(valid), 37)):
        with pytest.raises(FormatError):
            load_bytes(tmp_path, valid[:cut])


@pytest.mark.parametrize("raw,pattern", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b"{not json", "not valid JSON"),
    (b"[1, 2, 3]", "a JSON list, expected an object"),
    (b"\"text\"", "a JSON str"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # recursion depth, not a crash
    (b'{"a": 1, "a": 2}', "duplicate key"),
    (b"{}", "no __metadata__"),
], ids=["not-utf8", "not-json", "list", "string", "deep-nesting", "duplicate-key", "no-metadata"])
def test_header_not_a_json_object(tmp_path, raw, pattern):
    expect(tmp_path, build({}, None, raw_header=raw), pattern)


def test_torch_checkpoint_is_recognised(tmp_path):
    expect(tmp_path, b"PK\x03\x04" + b"\0" * 200, "PyTorch checkpoint.*fastcell export")
    expect(tmp_path, b"\x80\x02}q\x00." + b"\0" * 20, "PyTorch checkpoint")


# metadata

def meta_case(change):
    tensors, meta = parts(make_layer("gru", num_layers=1))
    return build(tensors, change(dict(meta)))


def drop(key):
    def f(m):
        m.pop(key)
        return m
    return f


def put(key, value):
    def f(m):
        m[key] = value
        return m
    return f


@pytest.mark.parametrize("change,pattern", [
    (lambda m: None, "no __metadata__"),
    (lambda m: ["format", "fastcell"], "__metadata__ is a JSON list"),
    (put("format", "pt"), "not a fastcell file: .*format 'pt'"),
    (drop("format"), "not a fastcell file: __metadata__ has no 'format'"),
    (put("version", "3"), "unknown format version '3'"),
    (put("version", "1.0"), "unknown format version"),
    (drop("version"), "no 'version'"),
    (put("version", 1), r"__metadata__\['version'\] is a JSON int, expected a string"),
    (drop("config"), "no 'config'"),
    (put("config", "{not json"), "config is not valid JSON"),
    (put("config", "[" * 50_000), "config is not valid JSON"),
    (put("config", "[1]"), "config is a JSON list"),
    (put("config", json.dumps({"cell": "gru"})), "config has no 'module'"),
    (put("extra", {"nested": 1}), "expected a string"),
])
def test_bad_metadata(tmp_path, change, pattern):
    expect(tmp_path, meta_case(change), pattern)


def test_extra_string_metadata_is_allowed(tmp_path):
    model = load_bytes(tmp_path, meta_case(put("note", "trained on 2 GPUs")))
    assert isinstance(model, fastcell.GRU)


def config_case(model, change):
    tensors, meta = parts(model)
    cfg = model.config()
    change(cfg)
    meta["config"] = json.dumps(cfg)
    return build(tensors, meta)


def setter(key, value):
    return lambda c: c.__setitem__(key, value)


def deleter(key):
    return lambda c: c.pop(key)


@pytest.mark.parametrize("change,pattern", [
    (setter("cell", "transformer"), "config 'cell' is 'transformer', expected one of"),
    (setter("module", "network"), "config 'module' is 'network'"),
    (setter("hidden_size", "4"), "config 'hidden_size' is '4', expected an integer"),
    (setter("hidden_size", 4.0), "config 'hidden_size' is 4.0, expected an integer"),
    (setter("hidden_size", True), "config 'hidden_size' is True"),
    (setter("input_size", 0), "config 'input_size' is 0, expected an integer in \\[1, "),
    (setter("input_size", -3), "config 'input_size' is -3"),
    (setter("input_size", 2**40), "config 'input_size' is 1099511627776"),
    (setter("num_layers", 10**9), "config 'num_layers' is 1000000000, expected an integer in \\[1, 512\\]"),
    (setter("bidirectional", "yes"), "config 'bidirectional' is 'yes', expected true or false"),
    (setter("dtype", "float16"), "config 'dtype' is 'float16'"),
    (setter("proj_size", 4), "proj_size' is 4, expected 0 or less than hidden_size=4"),
    (setter("proj_size", -1), "proj_size' is -1"),
    (deleter("proj_size"), "config has no 'proj_size'"),
    (deleter("batch_first"), "config has no 'batch_first'"),
    (setter("reset_after", True), "unexpected key 'reset_after' for a lstm layer"),
])
def test_bad_config(tmp_path, change, pattern):
    expect(tmp_path, config_case(make_layer("lstm"), change), pattern)


@pytest.mark.parametrize("change,pattern", [
    (setter("hidden_size", 8), "disagree with the config.*weight_ih_l0 has shape \\(16, 3\\), expected \\(32, 3\\)"),
    (setter("input_size", 5), "weight_ih_l0 has shape \\(16, 3\\), expected \\(16, 5\\)"),
    (setter("num_layers", 2), "missing weight_ih_l1 \\(16, 4\\)"),
    (setter("bidirectional", True), "missing weight_ih_l0_reverse"),
    (setter("bias", False), "unexpected 'bias_ih_l0'.*unexpected 'bias_hh_l0'"),
    (setter("dtype", "float64"), "weight_ih_l0 has dtype F32, expected F64"),
    (lambda c: (c.pop("proj_size"), c.update(cell="gru", reset_after=True)),
     "weight_ih_l0 has shape \\(16, 3\\), expected \\(12, 3\\)"),
    (setter("cell", "gru"), "config has no 'reset_after'.*unexpected key 'proj_size'"),
    (setter("cell", "peephole_lstm"), "unexpected key 'proj_size'"),
    (lambda c: (c.pop("proj_size"), c.__setitem__("cell", "peephole_lstm")), "missing weight_ph_l0 \\(3, 4\\)"),
    (lambda c: c.update(module="cell", cell="lstm") or [c.pop(k) for k in
                                                        ("num_layers", "batch_first", "bidirectional", "proj_size")],
     "missing weight_ih \\(16, 3\\)"),
])
def test_config_disagreeing_with_tensors(tmp_path, change, pattern):
    expect(tmp_path, config_case(make_layer("lstm"), change), pattern)


def test_every_problem_is_listed_and_long_lists_are_cut(tmp_path):
    model = make_layer("gru", num_layers=3, bidirectional=True)
    blob = config_case(model, setter("hidden_size", 5))
    with pytest.raises(FormatError) as err:
        load_bytes(tmp_path, blob)
    msg = str(err.value)
    assert "has shape" in msg and re.search(r"and \d+ more", msg)


# tensors

def tensors_case(model, change):
    tensors, meta = parts(model)
    change(tensors)
    return build(tensors, meta)


def reshape(name, shape):
    def f(t):
        t[name] = np.zeros(shape, t[name].dtype)
    return f


def retype(name, dtype, itemsize):
    def f(t):
        a = t[name]
        t[name] = (dtype, a.shape, b"\0" * (a.size * itemsize))
    return f


@pytest.mark.parametrize("change,pattern", [
    (lambda t: t.pop("weight_hh_l0"), "missing weight_hh_l0 \\(12, 4\\)"),
    (lambda t: t.pop("bias_ih_l0_reverse"), "missing bias_ih_l0_reverse \\(12,\\)"),
    (lambda t: t.__setitem__("weight_ph_l0", np.zeros((3, 4), np.float32)), "unexpected 'weight_ph_l0'"),
    (lambda t: t.__setitem__("x" * 500, np.zeros(1, np.float32)), "unexpected 'xxxxx.*\\.\\.\\."),
    (reshape("weight_ih_l0", (12, 5)), "weight_ih_l0 has shape \\(12, 5\\), expected \\(12, 3\\)"),
    (reshape("weight_hh_l0", (4, 12)), "weight_hh_l0 has shape \\(4, 12\\), expected \\(12, 4\\)"),
    (reshape("bias_hh_l0", (1, 12)), "bias_hh_l0 has shape \\(1, 12\\), expected \\(12,\\)"),
    (reshape("bias_hh_l0", ()), "bias_hh_l0 has shape \\(\\), expected \\(12,\\)"),
    (lambda t: t.__setitem__("weight_ih_l0", t["weight_ih_l0"].astype(np.float64)),
     "weight_ih_l0 has dtype F64, expected F32"),
    (retype("weight_hh_l0", "F16", 2), "weight_hh_l0 has dtype F16, expected F32"),
    (retype("weight_hh_l0", "I32", 4), "weight_hh_l0 has dtype I32, expected F32"),
    (retype("weight_hh_l0", "BF16", 2), "weight_hh_l0 has dtype BF16"),
    (retype("weight_hh_l0", "Q4", 1), "unknown dtype 'Q4'"),
])
def test_bad_tensors(tmp_path, change, pattern):
    expect(tmp_path, tensors_case(make_layer("gru", bidirectional=True), change), pattern)


def entry_case(change):
    tensors, meta = parts(make_layer("rnn_tanh"))
    header, data = split(build(tensors, meta))
    change(header, len(data))
    return join(header, data)


def offsets(name, begin, end):
    return lambda h, n: h[name].__setitem__("data_offsets", [begin, end])


def entry(name, key, value):
    return lambda h, n: h[name].__setitem__(key, value)


# build() lays rnn_tanh's tensors out in state_dict order: weight_ih_l0 [0, 48], weight_hh_l0
# [48, 112], bias_ih_l0 [112, 128], bias_hh_l0 [128, 144].
@pytest.mark.parametrize("change,pattern", [
    (offsets("weight_ih_l0", 0, 10**6), "weight_ih_l0'.*run past the end of the data"),
    (offsets("bias_hh_l0", 10**12, 10**12 + 16), "run past the end"),
    (offsets("weight_hh_l0", 0, 64), "overlaps"),
    (offsets("weight_hh_l0", 20, 10), "not 0 <= begin <= end"),
    (offsets("weight_hh_l0", -16, 48), "not 0 <= begin <= end"),
    (offsets("weight_hh_l0", 48, 100), "needs 64 bytes, data_offsets \\[48, 100\\] hold 52"),
    (entry("weight_hh_l0", "data_offsets", [48]), "not a \\[begin, end\\] pair"),
    (entry("weight_hh_l0", "data_offsets", [48.0, 112.0]), "not a \\[begin, end\\] pair"),
    (entry("weight_hh_l0", "data_offsets", "48-112"), "not a \\[begin, end\\] pair"),
    (entry("weight_hh_l0", "shape", [4, -4]), "not a list of at most 8 non-negative integers"),
    (entry("weight_hh_l0", "shape", [4, True]), "non-negative integers"),
    (entry("weight_hh_l0", "shape", [1] * 9), "at most 8"),
    (entry("weight_hh_l0", "shape", [2**62, 2**62]), "needs"),
    (entry("weight_hh_l0", "shape", "4x4"), "non-negative integers"),
    (entry("weight_hh_l0", "shape", [4, 2]), "needs 32 bytes"),
    (entry("weight_hh_l0", "dtype", 4), "unknown dtype 4"),
    (entry("weight_hh_l0", "dtype", None), "unknown dtype None"),
    (entry("weight_hh_l0", "dtype", ["F32"]), "unknown dtype \\['F32'\\]"),
    (entry("weight_hh_l0", "dtype", {"F32": 1}), "unknown dtype"),
    (entry("weight_hh_l0", "extra", 1), "unexpected entry field 'extra'"),
    (lambda h, n: h["weight_hh_l0"].pop("shape"), "entry has no shape"),
    (lambda h, n: h.__setitem__("weight_hh_l0", [1, 2]), "entry is a JSON list"),
])
def test_bad_entries_and_offsets(tmp_path, change, pattern):
    expect(tmp_path, entry_case(change), pattern)


def test_gap_and_trailing_bytes(tmp_path):
    tensors, meta = parts(make_layer("rnn_tanh"))
    header, data = split(build(tensors, meta))
    expect(tmp_path, join(header, data + b"\0" * 8), "8 bytes after the last tensor")
    for name in header:
        if name != "__metadata__":
            b, e = header[name]["data_offsets"]
            header[name]["data_offsets"] = [b + 4, e + 4] if b > 0 else [b, e]
    expect(tmp_path, join(header, data + b"\0" * 4), "a gap in the data")


def test_hostile_sizes_allocate_nothing_big(tmp_path):
    # A config and a tensor claiming terabytes: refused before anything is allocated.
    tensors, meta = parts(make_layer("lstm"))
    cfg = json.loads(meta["config"])
    cfg.update(input_size=2**30, hidden_size=2**30)
    meta["config"] = json.dumps(cfg)
    header, data = split(build(tensors, meta))
    header["weight_ih_l0"]["shape"] = [2**32, 2**30]
    tracemalloc.start()
    try:
        with pytest.raises(FormatError):
            load_bytes(tmp_path, join(header, data))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20


def test_largest_header_is_parsed_in_bounded_time(tmp_path):
    # A header at the size limit made of tiny JSON objects: parsed and refused quickly.
    body = b"[" + b"{}," * ((wf.MAX_HEADER_BYTES - 3) // 3) + b"{}]"
    expect(tmp_path, struct.pack("<Q", len(body)) + body, "a JSON list")


# ---- fuzzing ----

def _base_files():
    models = [make_layer("lstm", num_layers=2, bidirectional=True, proj_size=2, input_size=2, hidden_size=3),
              make_layer("peephole_lstm", np.float64, input_size=2, hidden_size=2),
              make_cell("gru_reset_before", np.float32, input_size=2, hidden_size=2),
              make_cell("rnn_relu", np.float64, bias=False, input_size=2, hidden_size=2)]
    return [build(*parts(m)) for m in models]


BASES = _base_files()

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


BYTE_OPS = ["flip", "set", "truncate", "insert", "delete", "length"]
JSON_OPS = ["replace", "delete", "add", "nudge", "rename", "dtype"]


@st.composite
def mutated(draw):
    """A valid file, then one to three mutations: byte edits, or edits of the parsed header or
    config (re-serialised with a correct length, so the loader's later checks are reached)."""
    blob = bytearray(draw(st.sampled_from(BASES)))
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
        elif kind in ("header", "config"):
            try:
                header, data = split(bytes(blob))
                root = json.loads(header["__metadata__"]["config"]) if kind == "config" else header
            except Exception:
                continue
            if not isinstance(header, dict) or not isinstance(root, dict) or not root:
                continue
            op = draw(st.sampled_from(JSON_OPS))
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
                                                        "module", "num_layers"]))
                    root[new] = root.pop(old)
            elif op == "dtype":
                for path in leaves:
                    if path and path[-1] == "dtype":
                        _set(root, path, draw(st.sampled_from(["F32", "F64", "F16", "I32", "float64", "float32"])))
                        break
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


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=600, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(blob=mutated())
def test_fuzz_mutated_files_raise_only_format_error(fuzz_dir, blob):
    path = fuzz_dir / "fuzz.safetensors"
    path.write_bytes(blob)
    model = load_or_refuse(path)
    if model is None:
        return
    assert isinstance(model, (fastcell.RNN, fastcell.GRU, fastcell.LSTM, fastcell.PeepholeLSTM,
                              fastcell.RNNCell, fastcell.GRUCell, fastcell.LSTMCell,
                              fastcell.PeepholeLSTMCell))
    # What fastcell accepts, the reference safetensors reader reads the same way.
    from safetensors.numpy import load_file

    reference = load_file(str(path))
    sd = model.state_dict()
    assert set(reference) == set(sd)
    assert all(reference[n].tobytes() == sd[n].tobytes() for n in sd)
