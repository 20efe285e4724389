"""Hostile weight files (docs/DESIGN.md "The weight file"; issue 5 "Bad files"), float and reduced:
every one is refused with a FormatError that starts with the path and gives the reason (naming the
tensor, the entry or the config key), in bounded time and memory: truncations anywhere, headers
that are not JSON objects, bad metadata, configs, tensors, entries and offsets, int8 scales that are
not finite and > 0, dtypes a weight format cannot hold, versions that cannot hold it. The Hypothesis
fuzz over mutated files: files/test_weight_file_fuzz.py."""

import json
import re
import struct
import tracemalloc

import numpy as np
import pytest

import fastcell
from fastcell.io import weights_file as wf
from fastcell.io.weights_file import FormatError, load
from helpers import FORMATS, ODD_P as P
from helpers import (assert_same_stored, build, header_of_bytes, join, layer_of, odd_cell, odd_layer,
                     reduced_layer, split, stored_parts, tensor_entry)


# ======================= float files =======================

def parts(model):
    """(tensors, metadata) of a valid file for this model."""
    meta = {"format": "fastcell", "version": "1", "config": json.dumps(model.config())}
    return {k: np.array(v) for k, v in model.state_dict().items()}, meta


@pytest.fixture
def valid():
    """A valid file's bytes: a 2-layer bidirectional float32 LSTM with projection."""
    tensors, meta = parts(layer_of("lstm", num_layers=2, bidirectional=True, proj_size=2))
    return build(tensors, meta)


def load_bytes(tmp_path, blob, name="bad.safetensors"):
    path = tmp_path / name
    path.write_bytes(blob)
    return load(path)


def expect(tmp_path, blob, pattern):
    """FormatError matching pattern, its message starting with the path; the message."""
    with pytest.raises(FormatError, match=pattern) as err:
        load_bytes(tmp_path, blob)
    assert str(err.value).startswith(str(tmp_path / "bad.safetensors"))
    return str(err.value)


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
    tensors, meta = parts(layer_of("gru", num_layers=1))
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


def config_case(model, change, version=None):
    tensors, meta = stored_parts(model, version)
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
    expect(tmp_path, config_case(layer_of("lstm"), change), pattern)


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
    expect(tmp_path, config_case(layer_of("lstm"), change), pattern)


def test_every_problem_is_listed_and_long_lists_are_cut(tmp_path):
    model = layer_of("gru", num_layers=3, bidirectional=True)
    blob = config_case(model, setter("hidden_size", 5))
    with pytest.raises(FormatError) as err:
        load_bytes(tmp_path, blob)
    msg = str(err.value)
    assert "has shape" in msg and re.search(r"and \d+ more", msg)


# tensors

def retype(name, dtype, itemsize, fill=b"\0"):
    """The tensor `name` (an array, or a (dtype, shape, bytes) entry) turned into another dtype:
    `fill` repeated over its size."""
    def f(t):
        a = t[name]
        shape = a.shape if isinstance(a, np.ndarray) else a[1]
        t[name] = (dtype, shape, fill * (int(np.prod(shape)) * itemsize))
    return f


def tensors_case(model, change):
    tensors, meta = parts(model)
    change(tensors)
    return build(tensors, meta)


def reshape(name, shape):
    def f(t):
        t[name] = np.zeros(shape, t[name].dtype)
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
    expect(tmp_path, tensors_case(layer_of("gru", bidirectional=True), change), pattern)


def entry_case(change):
    tensors, meta = parts(layer_of("rnn_tanh"))
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
    tensors, meta = parts(layer_of("rnn_tanh"))
    header, data = split(build(tensors, meta))
    expect(tmp_path, join(header, data + b"\0" * 8), "8 bytes after the last tensor")
    for name in header:
        if name != "__metadata__":
            b, e = header[name]["data_offsets"]
            header[name]["data_offsets"] = [b + 4, e + 4] if b > 0 else [b, e]
    expect(tmp_path, join(header, data + b"\0" * 4), "a gap in the data")


def test_hostile_sizes_allocate_nothing_big(tmp_path):
    # A config and a tensor claiming terabytes: refused before anything is allocated.
    tensors, meta = parts(layer_of("lstm"))
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


# ======================= reduced files (int8, bf16) =======================


# int8 LSTM 3 -> 17, proj 5: weight_ih_l0 (68, 3), weight_hh_l0 (68, 5), weight_hr_l0 (5, 17).
INT8 = reduced_layer("int8", "lstm", proj_size=P)
BF16 = reduced_layer("bf16", "lstm", proj_size=P)


def stored_tensors_case(model, change, version=None):
    tensors, meta = stored_parts(model, version)
    change(tensors)
    return build(tensors, meta)


@pytest.mark.parametrize("model", [INT8, BF16], ids=FORMATS)
def test_valid_hand_built_files_load(tmp_path, model):
    back = load_bytes(tmp_path, build(*stored_parts(model)))
    assert_same_stored(model, back)


def set_scale(name, row, value):
    def f(ts):
        s = np.frombuffer(ts[name][2], "<f4").copy()
        s[row] = value
        ts[name] = tensor_entry("F32", s)
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
    expect(tmp_path, stored_tensors_case(INT8, change), pattern)


def test_every_bad_scale_is_counted(tmp_path):
    def change(ts):
        ts["weight_hh_l0.scale"] = tensor_entry("F32", np.full(68, np.nan, np.float32))
    expect(tmp_path, stored_tensors_case(INT8, change), r"weight_hh_l0\.scale: 68 of its 68 int8 scales")


def replace(name, entry):
    return lambda ts: ts.__setitem__(name, entry)


def remove(name):
    return lambda ts: ts.pop(name)


@pytest.mark.parametrize("change,pattern", [
    (remove("weight_hh_l0.scale"), r"missing weight_hh_l0\.scale \(68,\)"),
    (remove("weight_hr_l0.scale"), r"missing weight_hr_l0\.scale \(5,\)"),
    (replace("weight_ih_l0.scale", tensor_entry("F32", np.ones(69, np.float32))),
     r"weight_ih_l0\.scale has shape \(69,\), expected \(68,\)"),
    (replace("weight_ih_l0.scale", tensor_entry("F32", np.ones((68, 1), np.float32))),
     r"weight_ih_l0\.scale has shape \(68, 1\), expected \(68,\)"),
    (replace("weight_hr_l0.scale", tensor_entry("F32", np.ones(17, np.float32))),
     r"weight_hr_l0\.scale has shape \(17,\), expected \(5,\)"),  # columns, not rows
    (replace("weight_ih_l0.scale", tensor_entry("F32", np.float32(1))), r"weight_ih_l0\.scale has shape \(\), expected"),
    (retype("weight_ih_l0.scale", "F64", 8, fill=b"\1"), r"weight_ih_l0\.scale has dtype F64, expected F32 \(int8 scales are float32\)"),
    (retype("weight_ih_l0.scale", "BF16", 2, fill=b"\1"), r"weight_ih_l0\.scale has dtype BF16, expected F32"),
    (retype("weight_ih_l0.scale", "I8", 1, fill=b"\1"), r"weight_ih_l0\.scale has dtype I8, expected F32"),
    # an I8 tensor where F32 belongs
    (retype("bias_ih_l0", "I8", 1, fill=b"\1"), r"bias_ih_l0 has dtype I8, expected F32 \(biases and peepholes stay float32"),
    # an F32 tensor where I8 belongs, and other wrong matrix dtypes
    (retype("weight_ih_l0", "F32", 4, fill=b"\1"), r"weight_ih_l0 has dtype F32, expected I8 \(config weight_format int8\)"),
    (retype("weight_hr_l0", "F32", 4, fill=b"\1"), r"weight_hr_l0 has dtype F32, expected I8"),
    (retype("weight_hh_l0", "BF16", 2, fill=b"\1"), r"weight_hh_l0 has dtype BF16, expected I8"),
    (retype("weight_hh_l0", "U8", 1, fill=b"\1"), r"weight_hh_l0 has dtype U8, expected I8"),
    (retype("weight_hh_l0", "F8_E4M3", 1, fill=b"\1"), r"weight_hh_l0 has dtype F8_E4M3, expected I8"),
    (replace("weight_ih_l0", tensor_entry("I8", np.zeros((68, 4), np.int8))), r"weight_ih_l0 has shape \(68, 4\), expected \(68, 3\)"),
    (replace("bias_ih_l0.scale", tensor_entry("F32", np.ones(68, np.float32))), r"unexpected 'bias_ih_l0\.scale'"),
    (replace("weight_ih_l0.zero_point", tensor_entry("I8", np.zeros(68, np.int8))), r"unexpected 'weight_ih_l0\.zero_point'"),
    (replace("weight_ih_l0_scale", tensor_entry("F32", np.ones(68, np.float32))), r"unexpected 'weight_ih_l0_scale'"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None)
def test_bad_int8_tensors(tmp_path, change, pattern):
    msg = expect(tmp_path, stored_tensors_case(INT8, change), pattern)
    assert "(lstm layer, int8)" in msg


@pytest.mark.parametrize("change,pattern", [
    (replace("weight_ih_l0.scale", tensor_entry("F32", np.ones(68, np.float32))), r"unexpected 'weight_ih_l0\.scale'"),
    (retype("weight_ih_l0", "I8", 1, fill=b"\1"), r"weight_ih_l0 has dtype I8, expected BF16 \(config weight_format bf16\)"),
    (retype("weight_hh_l0", "F32", 4, fill=b"\1"), r"weight_hh_l0 has dtype F32, expected BF16"),
    (retype("weight_hr_l0", "U16", 2, fill=b"\1"), r"weight_hr_l0 has dtype U16, expected BF16"),
    (retype("weight_hr_l0", "F16", 2, fill=b"\1"), r"weight_hr_l0 has dtype F16, expected BF16"),
    (retype("bias_hh_l0", "BF16", 2, fill=b"\1"), r"bias_hh_l0 has dtype BF16, expected F32 \(biases and peepholes"),
    (remove("weight_hh_l0"), r"missing weight_hh_l0 \(68, 5\)"),
])
def test_bad_bf16_tensors(tmp_path, change, pattern):
    msg = expect(tmp_path, stored_tensors_case(BF16, change), pattern)
    assert "(lstm layer, bf16)" in msg


@pytest.mark.parametrize("fmt", FORMATS)
def test_reduced_peephole_must_stay_float32(tmp_path, fmt):
    model = fastcell.quantize(odd_cell("peephole_lstm"), fmt)
    dtype, itemsize = ("I8", 1) if fmt == "int8" else ("BF16", 2)
    expect(tmp_path, stored_tensors_case(model, retype("weight_ph", dtype, itemsize, fill=b"\1")),
           rf"weight_ph has dtype {dtype}, expected F32 \(biases and peepholes stay float32 in {fmt} models\)")


def test_reduced_cell_names(tmp_path):
    model = fastcell.quantize(odd_cell("gru"), "int8")
    expect(tmp_path, stored_tensors_case(model, remove("weight_hh.scale")), r"missing weight_hh\.scale \(51,\)")
    expect(tmp_path, stored_tensors_case(model, set_scale("weight_ih.scale", 50, np.nan)), r"weight_ih\.scale: .*row 50 is nan")


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


@pytest.mark.parametrize("value", [7, 0, 32, -8, "8", 8.0, True, None, [8], {"bits": 8}])
def test_bad_input_bits_config(tmp_path, value):
    expect(tmp_path, config_case(INT8, setter("input_bits", value)),
           rf"config 'input_bits' is {re.escape(repr(value))}, expected one of \[16, 8\]")


def test_input_bits_is_for_int8_files_alone(tmp_path):
    expect(tmp_path, config_case(BF16, setter("input_bits", 8)),
           r"config 'input_bits' is for int8 weights, but the weight format is 'bf16'")
    expect(tmp_path, config_case(odd_layer("gru"), setter("input_bits", 16)),
           r"config 'input_bits' is for int8 weights, but the weight format is 'float32'")
    expect(tmp_path, config_case(odd_cell("gru"), setter("input_bits", 8)),
           r"config 'input_bits' is for int8 weights, but the weight format is 'float32'")


@pytest.mark.parametrize("model", [INT8, fastcell.quantize(odd_cell("rnn_tanh"), "int8")],
                         ids=["layer", "cell"])
def test_input_bits_in_an_int8_file(tmp_path, model):
    # Absent (every int8 file before the key) or 16: x takes 16 bits; 8: 8 bits, bit for bit the
    # model quantize(..., input_bits=8) makes of the same weights.
    x = np.random.default_rng(0).standard_normal((6, 2, model.input_size)).astype(np.float32)
    run = (lambda m: m(x)[0]) if model.config()["module"] == "layer" else (lambda m: m.run(x)[0])
    assert "input_bits" not in model.config()
    for change, bits in ((lambda c: None, 16), (setter("input_bits", 16), 16), (setter("input_bits", 8), 8)):
        back = load_bytes(tmp_path, config_case(model, change))
        assert back.input_bits == bits
        twin = type(model)(**model.constructor_args(), weights=model._stored_state_dict(),
                           input_bits=bits) if model.config()["module"] == "layer" else \
            type(model)(**model._stored_state_dict(), **model._extra_config(), input_bits=bits)
        assert np.array_equal(run(back), run(twin))
        assert np.array_equal(run(back), run(model)) == (bits == 16)


def test_bf16_config_with_float64_dtype(tmp_path):
    expect(tmp_path, config_case(BF16, setter("dtype", "float64")),
           r"'weight_format' is 'bf16', which computes in float32, but 'dtype' is 'float64'")


def test_version_1_cannot_hold_a_reduced_format(tmp_path):
    for model, fmt in ((INT8, "int8"), (BF16, "bf16")):
        expect(tmp_path, build(*stored_parts(model, version="1")),
               rf"weight_format is '{fmt}', but version 1 files hold float weights only \({fmt} needs version '2'\)")


@pytest.mark.parametrize("version", ["3", "2.0", "02", ""])
def test_unknown_versions_are_refused(tmp_path, version):
    expect(tmp_path, build(*stored_parts(INT8, version=version)), "unknown format version")


def test_float_file_claiming_int8_is_refused(tmp_path):
    model = odd_layer("gru")
    msg = expect(tmp_path, config_case(model, setter("weight_format", "int8"), version="2"),
                 r"missing weight_ih_l0\.scale \(51,\)")
    assert "weight_ih_l0 has dtype F32, expected I8" in msg and "weight_hh_l0 has dtype F32" in msg


def test_version_2_file_may_hold_float_weights(tmp_path):
    # A version-2 reader reads float files under either version; an explicit float weight_format
    # equal to the dtype is accepted.
    model = odd_layer("gru", dtype=np.float64)
    assert_same_stored(model, load_bytes(tmp_path, build(*stored_parts(model, version="2"))))
    back = load_bytes(tmp_path, config_case(model, setter("weight_format", "float64"), version="2"))
    assert back.weight_format == "float64" and back.dtype == np.float64
    back = load_bytes(tmp_path, config_case(model, setter("weight_format", "float64")))
    assert back.weight_format == "float64"


def test_hostile_int8_sizes_allocate_nothing_big(tmp_path):
    # A config and an int8 matrix with its scales claiming gigabytes: refused before allocating.
    tensors, meta = stored_parts(INT8)
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


@pytest.mark.parametrize("fmt", ["float32", *FORMATS])
def test_truncated_in_every_region(tmp_path, valid, fmt):
    # Every cut of a valid file is refused with a FormatError, from the length field to the data:
    # the float fixture every 37 bytes past the first 40, the reduced files every 29.
    blob, stride = (valid, 37) if fmt == "float32" else (build(*stored_parts({"int8": INT8, "bf16": BF16}[fmt])), 29)
    for cut in list(range(0, 40)) + list(range(40, len(blob), stride)):
        with pytest.raises(FormatError):
            load_bytes(tmp_path, blob[:cut])
