"""The .keras reader (fastcell/convert/keras_file.py) on hostile and broken files: every one raises
FormatError naming the problem (never another exception, a crash or a hang), nothing in the file
runs, and nothing larger than the file allows is allocated.

The files are a real model saved by Keras, rewritten member by member (zipfile) and dataset by
dataset (h5py).
"""

import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from keras_cases import keras, layers, randomize

import fastcell  # noqa: E402
from fastcell import FormatError  # noqa: E402
from fastcell.convert import keras_file  # noqa: E402

h5py = pytest.importorskip("h5py")

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")]

CELL = "layers/lstm/cell/vars"   # where the base model keeps its LSTM's variables


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A saved Sequential: Masking -> LSTM(4, sequences) -> GRU(3, reset_after=False); its bytes."""
    rng = np.random.default_rng(0)
    mdl = keras.Sequential([keras.Input((None, 3)), layers.Masking(0.0, name="masking"),
                            layers.LSTM(4, return_sequences=True, name="lstm"),
                            layers.GRU(3, reset_after=False, name="gru")])
    for lay in mdl.layers[1:]:
        randomize(lay, rng)
    path = tmp_path_factory.mktemp("keras") / "base.keras"
    mdl.save(path)
    return path.read_bytes()


def rewrite(data, config=None, h5=None, members=None, add=()):
    """The .keras bytes with config.json edited (config(cfg) in place), model.weights.h5 edited
    (h5(file) on an h5py.File open for writing), members renamed or dropped (members: {old: new
    or None}) and members added ((name, bytes) pairs)."""
    src = zipfile.ZipFile(io.BytesIO(data))
    files = {n: src.read(n) for n in src.namelist()}
    if config is not None:
        cfg = json.loads(files["config.json"])
        config(cfg)
        files["config.json"] = json.dumps(cfg).encode()
    if h5 is not None:
        buf = io.BytesIO(files["model.weights.h5"])
        with h5py.File(buf, "r+") as f:
            h5(f)
        files["model.weights.h5"] = buf.getvalue()
    for old, new in (members or {}).items():
        value = files.pop(old)
        if new is not None:
            files[new] = value
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, value in [*files.items(), *add]:
            z.writestr(name, value)
    return out.getvalue()


def refused(data, *fragments, layer="lstm"):
    with pytest.raises(FormatError) as e:
        fastcell.from_keras(data, layer=layer)
    for f in fragments:
        assert f in str(e.value), str(e.value)
    return str(e.value)


def _layers(cfg):
    return cfg["config"]["layers"]


def _lstm(cfg):
    return next(e for e in _layers(cfg) if e["class_name"] == "LSTM")["config"]


def _replace(f, path, value, **kw):
    del f[path]
    f.create_dataset(path, data=value, **kw)


def test_the_base_file_converts(base, tmp_path):
    path = tmp_path / "m.keras"
    path.write_bytes(base)
    for source in (base, path, str(path)):
        assert fastcell.from_keras(source, layer="lstm").hidden_size == 4
        assert fastcell.from_keras(source, layer=["lstm"]).hidden_size == 4
        assert not fastcell.from_keras(source, layer="gru").reset_after
    assert [k.mask for k in fastcell.keras_layers(path)] == ["Masking 'masking' (mask_value=0.0)"] * 2


ARCHIVE = {
    "path traversal": (lambda d: rewrite(d, add=[("../evil.txt", b"x")]),
                       "'../evil.txt' has a path that leaves the archive"),
    "absolute path": (lambda d: rewrite(d, add=[("/etc/evil", b"x")]), "'/etc/evil' has a path that leaves"),
    "windows path": (lambda d: rewrite(d, add=[("assets\\..\\..\\evil", b"x")]), "leaves the archive"),
    "twice": (lambda d: rewrite(d, add=[("config.json", b"{}")]), "'config.json' is in the archive twice"),
    "no config": (lambda d: rewrite(d, members={"config.json": None}), "the archive has no config.json"),
    "no weights": (lambda d: rewrite(d, members={"model.weights.h5": None}),
                   "the archive has no model.weights.h5"),
    "npz weights": (lambda d: rewrite(d, members={"model.weights.h5": "model.weights.npz"}),
                    "model.weights.npz: fastcell reads only the default weights format"),
    "config not json": (lambda d: rewrite(d, members={"config.json": None}, add=[("config.json", b"{nope")]),
                        "config.json is not valid JSON"),
    "config not utf-8": (lambda d: rewrite(d, members={"config.json": None},
                                           add=[("config.json", b'{"a": "\xff"}')]),
                         "config.json is not UTF-8"),
    "config a list": (lambda d: rewrite(d, members={"config.json": None}, add=[("config.json", b"[1]")]),
                      "config.json holds a JSON list, expected an object"),
    "keras 2": (lambda d: rewrite(d, members={"metadata.json": None},
                                  add=[("metadata.json", b'{"keras_version": "2.15.0"}')]),
                "written by Keras 2.15.0 (tf.keras): fastcell reads the files of Keras 3"),
    "not a zip": (lambda d: b"\x00" * 64, "not a .keras file: a .keras file is a zip archive"),
    "an hdf5 file": (lambda d: zipfile.ZipFile(io.BytesIO(d)).read("model.weights.h5"),
                     "this is an HDF5 file"),
    "empty": (lambda d: b"", "empty file (0 bytes)"),
    "truncated zip": (lambda d: d[: len(d) // 2], "a corrupt or malformed .keras file"),
    "bad crc": (lambda d: d.replace(b"recurrent_activation", b"recurrent_activatiOn"),
                "a corrupt or malformed .keras file (BadZipFile: Bad CRC-32"),
    "hdf5 garbage": (lambda d: rewrite(d, members={"model.weights.h5": None},
                                       add=[("model.weights.h5", b"\x89HDF\r\n\x1a\n" + b"\x07" * 500)]),
                     "model.weights.h5 is not a readable HDF5 file"),
    "hdf5 truncated": (lambda d: rewrite(d, members={"model.weights.h5": None},
                                         add=[("model.weights.h5", zipfile.ZipFile(io.BytesIO(d))
                                               .read("model.weights.h5")[:3000])]),
                       "model.weights.h5"),
}


@pytest.mark.parametrize("case", ARCHIVE)
def test_hostile_archives(base, case, tmp_path):
    make, fragment = ARCHIVE[case]
    data = make(base)
    path = tmp_path / "m.keras"
    path.write_bytes(data)
    message = refused(str(path), fragment)
    assert message.startswith(str(path))
    with pytest.raises(FormatError):
        fastcell.keras_layers(data)


def test_members_are_size_checked_before_they_are_read(base, monkeypatch):
    """A member claiming more than its limit is refused from its entry; a highly compressed one
    larger than 16 MiB is refused as a zip bomb before being inflated."""
    monkeypatch.setattr(keras_file, "MAX_JSON_BYTES", {"config.json": 1000, "metadata.json": 1000})
    refused(base, "config.json claims", "more than the 1000-byte limit for it")
    monkeypatch.undo()
    bomb = rewrite(base, members={"model.weights.h5": None})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for n in ("config.json", "metadata.json"):
            z.writestr(n, zipfile.ZipFile(io.BytesIO(bomb)).read(n))
        z.writestr("model.weights.h5", bytes(20 << 20))
    refused(out.getvalue(), "model.weights.h5 claims 20971520 bytes compressed into", "(a zip bomb?)")


def test_a_compressed_archive_reads(base):
    out = io.BytesIO()
    src = zipfile.ZipFile(io.BytesIO(base))
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for n in src.namelist():
            z.writestr(n, src.read(n))
    assert fastcell.from_keras(out.getvalue(), layer="gru").config() == \
        fastcell.from_keras(base, layer="gru").config()


def _external(f):
    del f[f"{CELL}/1"]
    f.create_dataset(f"{CELL}/1", shape=(4, 16), dtype="f4", external=[("/etc/hostname", 0, 256)])


WEIGHTS = {
    "wrong shape": (lambda f: _replace(f, f"{CELL}/1", np.zeros((4, 12), "f4")),
                    "layers/lstm/cell/vars/1 (recurrent_kernel) has shape (4, 12), expected (4, 16)"),
    "wrong kernel": (lambda f: _replace(f, f"{CELL}/0", np.zeros((3, 15), "f4")),
                     "vars/0 (kernel) has shape (3, 15), expected (input_size, 16) for units 4"),
    "missing bias": (lambda f: f.__delitem__(f"{CELL}/2"), "missing 2 (bias)"),
    "extra variable": (lambda f: f.create_dataset(f"{CELL}/3", data=np.zeros(3, "f4")),
                       "the variables at layers/lstm/cell/vars are ['0', '1', '2', '3'], expected ['0', '1', '2']"),
    "no cell": (lambda f: f.__delitem__("layers/lstm/cell"), "no variables at layers/lstm/cell/vars"),
    "no layer": (lambda f: f.__delitem__("layers/lstm"), "no variables at ?/cell/vars"),
    "float16": (lambda f: _replace(f, f"{CELL}/1", np.zeros((4, 16), "f2")), "has dtype float16"),
    "int32": (lambda f: _replace(f, f"{CELL}/2", np.zeros(16, "i4")), "has dtype int32"),
    "mixed dtypes": (lambda f: _replace(f, f"{CELL}/2", np.zeros(16, "f8")),
                     "bias has dtype float64, the layer's dtype is float32"),
    "a group": (lambda f: (f.__delitem__(f"{CELL}/1"), f.create_group(f"{CELL}/1")),
                "vars/1 is a group, expected a dataset"),
    "soft link": (lambda f: (f.__delitem__(f"{CELL}/1"), f.__setitem__(f"{CELL}/1", h5py.SoftLink("/x"))),
                  "'1' is a SoftLink, not a plain member"),
    "external link": (lambda f: (f.__delitem__("layers/lstm"),
                                 f.__setitem__("layers/lstm", h5py.ExternalLink("/etc/other.h5", "/"))),
                      "'lstm' is a ExternalLink, not a plain member"),
    "external storage": (_external, "keeps its data in external files ('/etc/hostname'"),
    "plugin filter": (lambda f: _replace(f, f"{CELL}/1", np.zeros((4, 16), "f4"), compression="lzf"),
                      "uses HDF5 filter 32000"),
}


@pytest.mark.parametrize("case", WEIGHTS)
def test_hostile_weights(base, case):
    edit, fragment = WEIGHTS[case]
    refused(rewrite(base, h5=edit), fragment)
    if case != "external link":     # the other layer is untouched (a link where a layer's group
        # should be makes the file unreadable as a whole: the layers are found before one is chosen)
        assert fastcell.from_keras(rewrite(base, h5=edit), layer="gru").hidden_size == 3


def test_allowed_filters_read(base):
    def deflate(f):
        data = f[f"{CELL}/1"][()]
        _replace(f, f"{CELL}/1", data, compression="gzip", shuffle=True, fletcher32=True)

    sd = fastcell.from_keras(rewrite(base, h5=deflate), layer="lstm").state_dict()
    ref = fastcell.from_keras(base, layer="lstm").state_dict()
    assert all(np.array_equal(sd[n], ref[n]) for n in ref)


def test_a_dataset_claiming_more_than_the_file_holds(base, tmp_path):
    """A chunked dataset can claim any shape and store nothing: the bytes read are held to a budget
    set by the file's size, checked before anything is allocated."""
    units = 1 << 20

    def config(cfg):
        _lstm(cfg)["units"] = units

    def h5(f):
        for k, shape in (("0", (3, 4 * units)), ("1", (units, 4 * units)), ("2", (4 * units,))):
            del f[f"{CELL}/{k}"]
            f.create_dataset(f"{CELL}/{k}", shape=shape, dtype="f4", chunks=(1, 1024)[-len(shape):])

    data = rewrite(base, config=config, h5=h5)
    assert len(data) < 1 << 20
    refused(data, "layers/lstm/cell/vars/0 (kernel) would take 50331648 bytes, past the")
    if sys.platform.startswith("linux"):   # and nothing near it was allocated (a fresh process)
        from conftest import ENV

        code = ("import sys, fastcell\n"
                "def rss():\n"
                "    return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) << 10\n"
                "data = open(sys.argv[1], 'rb').read()\n"
                "fastcell.from_keras(data, layer='gru')\n"      # every module loaded first
                "before = rss()\n"
                "try:\n"
                "    fastcell.from_keras(data, layer='lstm')\n"
                "except fastcell.FormatError:\n"
                "    print(rss() - before)\n")
        path = tmp_path / "claims.keras"
        path.write_bytes(data)
        r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                           env=ENV, timeout=120)
        assert r.returncode == 0, r.stderr
        assert int(r.stdout) < 16 << 20, r.stdout


CONFIGS = {
    "time_major": (lambda c: _lstm(c).__setitem__("time_major", True), "attribute time_major is True"),
    "unknown key": (lambda c: _lstm(c).__setitem__("peepholes", 1),
                    "attribute 'peepholes' (1) is not one fastcell knows"),
    "units": (lambda c: _lstm(c).__setitem__("units", "4"), "attribute units is '4', expected a positive"),
    "go_backwards": (lambda c: _lstm(c).__setitem__("go_backwards", "yes"),
                     "attribute go_backwards is 'yes', expected true or false"),
    "activation": (lambda c: _lstm(c).__setitem__("activation", {"class_name": "function", "config": "evil",
                                                                 "module": "builtins"}),
                   "attribute activation is 'evil' (a function)"),
    "custom recurrent": (lambda c: next(e for e in _layers(c) if e["class_name"] == "LSTM").update(
        class_name="MyLSTM", module="my.models", registered_name="Custom>MyLSTM"),
        "custom class ('MyLSTM', registered as 'Custom>MyLSTM')"),
    "custom model": (lambda c: c.update(class_name="MyModel", module="my.models",
                                        registered_name="Custom>MyModel"),
                     "the model is a subclassed Keras model ('MyModel')"),
    "a layer": (lambda c: c.update(class_name="Dense", module="keras.layers", registered_name=None),
                "config.json describes a 'Dense', expected a Sequential or Functional model"),
    "no layers": (lambda c: c["config"].pop("layers"), "its config has no list of layers"),
    "custom layer in the mask's way": (
        lambda c: _layers(c).insert(2, {"module": "my.layers", "class_name": "Evil",
                                        "registered_name": "Custom>Evil", "config": {"name": "evil"}}),
        "the mask of Masking 'masking' (mask_value=0.0) goes through a custom layer 'evil' (Evil)"),
}


@pytest.mark.parametrize("case", CONFIGS)
def test_hostile_configs(base, case):
    edit, fragment = CONFIGS[case]
    data = rewrite(base, config=edit)
    try:
        listed = fastcell.keras_layers(data)
    except FormatError as exc:      # the model as a whole cannot be read
        assert fragment in str(exc)
    else:
        assert fragment in listed[0].problem
    refused(data, fragment, layer=0)


def test_a_lambda_is_never_run(base, tmp_path):
    """A Lambda's serialized code in config.json is data: the model converts around it, and the
    code never runs (it would create a file)."""
    marker = tmp_path / "ran"
    code = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('x')"
    lam = {"module": "keras.layers", "class_name": "Lambda", "registered_name": None,
           "config": {"name": "lambda", "function": {"class_name": "__lambda__", "config": {
               "code": code, "defaults": None, "closure": None}}, "mask": None}}
    data = rewrite(base, config=lambda c: _layers(c).insert(3, lam))
    listed = fastcell.keras_layers(data)
    assert listed[1].mask is None        # a Lambda without a mask function drops the mask
    assert fastcell.from_keras(data, layer="gru").hidden_size == 3
    assert not marker.exists()


def test_not_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo.keras"
    os.mkfifo(fifo)
    with pytest.raises(FormatError, match="not a regular file"):
        fastcell.from_keras(fifo)
    with pytest.raises(IsADirectoryError):
        fastcell.from_keras(tmp_path)
    with pytest.raises(FileNotFoundError):
        fastcell.from_keras(tmp_path / "missing.keras")


FUZZ = """
import io, random, sys, zipfile
import fastcell
from fastcell import FormatError
data = open(sys.argv[1], "rb").read()
src = zipfile.ZipFile(io.BytesIO(data))
h5 = src.read("model.weights.h5")
rnd = random.Random(int(sys.argv[2]))
seen = set()
for trial in range(int(sys.argv[3])):
    b = bytearray(h5)
    for _ in range(rnd.choice([1, 4, 16])):
        b[rnd.randrange(len(b))] = rnd.randrange(256)
    if rnd.random() < 0.2:
        b = b[: rnd.randrange(len(b))]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for n in ("metadata.json", "config.json"):
            z.writestr(n, src.read(n))
        z.writestr("model.weights.h5", bytes(b))
    try:
        for layer in ("lstm", "gru"):
            fastcell.from_keras(out.getvalue(), layer=layer)
        seen.add("ok")
    except FormatError as exc:
        assert str(exc).startswith("<.keras bytes>: "), exc
        seen.add("refused")
print(sorted(seen))
"""


def test_corrupted_weights_fuzz(base, tmp_path):
    """Random bytes changed in model.weights.h5 (behind a valid zip CRC): each conversion succeeds
    or raises FormatError, in a child process that must neither crash nor hang (HDF5 is C)."""
    from conftest import ENV

    path = tmp_path / "base.keras"
    path.write_bytes(base)
    r = subprocess.run([sys.executable, "-c", FUZZ, str(path), "21", "150"], capture_output=True,
                       text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "refused" in r.stdout
