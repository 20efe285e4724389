"""Reading an untrusted ``.keras`` file without Keras or TensorFlow: a zip archive of
``config.json`` (the model's architecture), ``metadata.json`` (the Keras version) and
``model.weights.h5`` (the variables, an HDF5 file read with h5py).

Nothing in the file is run or deserialized into Python objects: config.json is parsed as JSON
data (a lambda, a custom layer or a registered function stays a string in a dict), and the HDF5
file is read dataset by dataset, each checked before a byte of it is allocated:

- the archive: a regular file or bytes, at most ``MAX_MEMBERS`` members, no name that is absolute
  or holds ``..`` (nothing is ever extracted, but such an archive is hostile), no name twice;
  each member read is checked against a size limit and a compression ratio first, and zipfile
  stops at its declared size and checks its CRC;
- the HDF5 file: only hard links are followed (a soft or external link, which could point into
  another file, is refused); a dataset is read only if its dtype is float32 or float64, its
  shape the one the config implies, its storage in this file (no external raw data, no virtual
  dataset) and its filters HDF5's own deflate, shuffle or checksum (no plugin is loaded); and
  the bytes read may not pass a budget set by the file's size (16 MiB plus 16 times it), since a
  chunked dataset can claim a shape far larger than the bytes it stores.

Whatever is wrong raises ``FormatError`` naming the file and the problem.
"""

import contextlib
import io
import json
import math
import os
import re
import zipfile
import zlib

import numpy as np

from fastcell.io.weights_file import FormatError, open_regular

__all__ = ["KerasArchive", "FormatError", "snake_case"]

CONFIG = "config.json"
METADATA = "metadata.json"
WEIGHTS = "model.weights.h5"

MAX_MEMBERS = 4096
MAX_JSON_BYTES = {CONFIG: 64 << 20, METADATA: 1 << 20}
MAX_WEIGHTS_BYTES = 16 << 30
# Deflate reaches about 1000x on constant data; float weights compress to about 0.9x. A member
# bigger than this floor that claims more than MAX_RATIO times its compressed bytes is a bomb.
MAX_RATIO = 100
RATIO_FLOOR = 16 << 20
BUDGET_FLOOR = 16 << 20
BUDGET_FACTOR = 16
# HDF5's built-in filters that need no plugin: deflate, shuffle, fletcher32.
_FILTERS = {1: "deflate", 2: "shuffle", 3: "fletcher32"}
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def snake_case(class_name):
    """Keras' name for an object's group in the weights file (keras.src.utils.naming.to_snake_case)."""
    name = re.sub(r"\W+", "", class_name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def unique_names(class_names):
    """The group names Keras gives a container's objects: snake_case of the class, then _1, _2 for
    the repeats (keras.src.saving.saving_lib._get_unique_name)."""
    used, out = {}, []
    for c in class_names:
        name = snake_case(c)
        if name in used:
            used[name] += 1
            name = f"{name}_{used[name]}"
        else:
            used[name] = 0
        out.append(name)
    return out


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError("reading .keras files needs h5py: pip install 'fastcell[keras]' (or pip "
                          "install h5py); neither Keras nor TensorFlow is needed, and serving a "
                          "converted model needs none of them") from None
    return h5py


def _short(exc, limit=200):
    s = " ".join(str(exc).split()) or type(exc).__name__
    return s if len(s) <= limit else s[: limit - 3] + "..."


class KerasArchive:
    """An opened .keras file (a path or the file's bytes): ``config`` (config.json as JSON data),
    ``metadata`` (metadata.json, {} if absent) and ``weights`` (an ``H5Weights``). Use it as a
    context manager, or ``close()`` it."""

    def __init__(self, source):
        h5py = _h5py()
        self._stack = contextlib.ExitStack()
        try:
            self._open(source, h5py)
        except BaseException:
            self._stack.close()
            raise

    def _open(self, source, h5py):
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.label = "<.keras bytes>"
            raw, size = io.BytesIO(bytes(source)), len(source)
        else:
            path = os.fspath(source)
            self.label = os.fsdecode(path)
            raw = self._stack.enter_context(open_regular(path))
            size = os.fstat(raw.fileno()).st_size
        if size == 0:
            raise self.fail("empty file (0 bytes), not a .keras file")
        magic = raw.read(4)
        raw.seek(0)
        if magic != b"PK\x03\x04":
            hint = ""
            if magic == b"\x89HDF":
                hint = (" (this is an HDF5 file: a legacy .h5 model or a .weights.h5 file; fastcell "
                        "reads .keras archives, save the model with model.save('model.keras'))")
            raise self.fail(f"not a .keras file: a .keras file is a zip archive, this file starts "
                            f"with {magic!r}{hint}")
        with self.errors():
            self.zip = self._stack.enter_context(zipfile.ZipFile(raw))
            self.members = self._members(size)
            self.metadata = self._json(METADATA) if METADATA in self.members else {}
            if not isinstance(self.metadata, dict):
                raise self.fail(f"{METADATA} holds a JSON {type(self.metadata).__name__}, "
                                "expected an object")
            version = self.metadata.get("keras_version")
            if isinstance(version, str) and version.split(".")[0].isdigit() and int(version.split(".")[0]) < 3:
                raise self.fail(f"written by Keras {version} (tf.keras): fastcell reads the files of "
                                "Keras 3. Load it with Keras 3 (keras.saving.load_model) and pass "
                                "the model to fastcell.from_keras, or save it again from there")
            if CONFIG not in self.members:
                raise self.fail(f"the archive has no {CONFIG} (members: {self._listing()})")
            self.config = self._json(CONFIG)
            if not isinstance(self.config, dict):
                raise self.fail(f"{CONFIG} holds a JSON {type(self.config).__name__}, expected an "
                                "object")
            if WEIGHTS not in self.members:
                other = [n for n in self.members if n.startswith("model.weights")]
                hint = (f" ({other[0]}: fastcell reads only the default weights format, HDF5)"
                        if other else "")
                raise self.fail(f"the archive has no {WEIGHTS}{hint} (members: {self._listing()})")
            info = self.members[WEIGHTS]
            self._check_size(info, MAX_WEIGHTS_BYTES)
            data = self._read(info)
            try:
                h5 = self._stack.enter_context(h5py.File(io.BytesIO(data), "r"))
            except Exception as exc:  # h5py raises OSError, and others, for a file it cannot read
                raise self.fail(f"{WEIGHTS} is not a readable HDF5 file (h5py: {_short(exc)})") from None
            self.weights = H5Weights(h5, self, len(data))

    def fail(self, message):
        return FormatError(f"{self.label}: {message}")

    @contextlib.contextmanager
    def errors(self):
        """Whatever goes wrong while reading the archive or the HDF5 file becomes FormatError
        naming the file (a corrupt zip, a truncated member, HDF5 errors), except MemoryError."""
        try:
            yield
        except (FormatError, MemoryError):
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError,
                OSError, KeyError, ValueError, TypeError, UnicodeError, RecursionError) as exc:
            raise self.fail(f"a corrupt or malformed .keras file ({type(exc).__name__}: "
                            f"{_short(exc)})") from None

    def close(self):
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the archive --

    def _members(self, size):
        infos = self.zip.infolist()
        if len(infos) > MAX_MEMBERS:
            raise self.fail(f"the archive has {len(infos)} members, more than {MAX_MEMBERS}")
        members = {}
        for info in infos:
            name = info.filename
            parts = re.split(r"[/\\]", name)
            if (name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts
                    or "\0" in name):
                raise self.fail(f"member {name[:80]!r} has a path that leaves the archive (absolute "
                                "or with '..'); a .keras file never holds one")
            if name in members:
                raise self.fail(f"member {name[:80]!r} is in the archive twice")
            if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
                raise self.fail(f"member {name[:80]!r}: stored (not compressed) but its sizes "
                                f"differ ({info.compress_size} and {info.file_size} bytes)")
            if info.compress_size > size:
                raise self.fail(f"member {name[:80]!r} claims {info.compress_size} bytes, more "
                                f"than the whole file ({size} bytes): truncated or corrupt")
            members[name] = info
        return members

    def _listing(self):
        names = list(self.members)
        return ", ".join(repr(n[:60]) for n in names[:8]) + (f" and {len(names) - 8} more"
                                                            if len(names) > 8 else "") or "none"

    def _check_size(self, info, limit):
        if info.file_size > limit:
            raise self.fail(f"{info.filename} claims {info.file_size} bytes, more than the "
                            f"{limit}-byte limit for it")
        if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise self.fail(f"{info.filename} claims {info.file_size} bytes compressed into "
                            f"{info.compress_size}, a ratio over {MAX_RATIO} (a zip bomb?)")

    def _read(self, info):
        """A member's bytes, after its size checks; zipfile stops at the declared size and checks
        the CRC, so no more than that is ever allocated."""
        with self.zip.open(info) as f:
            data = f.read(info.file_size + 1)
        if len(data) != info.file_size:
            raise self.fail(f"{info.filename}: read {len(data)} bytes, its entry says "
                            f"{info.file_size}")
        return data

    def _json(self, name):
        info = self.members[name]
        self._check_size(info, MAX_JSON_BYTES[name])
        data = self._read(info)
        try:
            return json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise self.fail(f"{name} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
        except (ValueError, RecursionError) as exc:
            raise self.fail(f"{name} is not valid JSON ({_short(exc)})") from None


class H5Weights:
    """The variables in model.weights.h5. Keras writes an object's variables as datasets "0",
    "1", ... in a group "<path>/vars", where <path> follows the model's attributes: a model's
    layers under "layers/<snake_case(class)>[_n]", a recurrent layer's cell under "cell", a
    Bidirectional layer's halves under "forward_layer" and "backward_layer", stacked cells under
    "cell/cells/<snake_case(class)>[_n]"."""

    def __init__(self, h5, archive, file_bytes):
        self.h5py = _h5py()
        self.h5 = h5
        self.archive = archive
        self.budget = BUDGET_FLOOR + BUDGET_FACTOR * file_bytes
        self.spent = 0

    def fail(self, message):
        return self.archive.fail(f"{WEIGHTS}: {message}")

    def _get(self, path):
        """The group or dataset at path (slash-separated, from the root), following hard links
        only; None where a part is missing."""
        node = self.h5
        for part in [p for p in path.split("/") if p]:
            if not isinstance(node, self.h5py.Group):
                return None
            link = node.get(part, getlink=True)
            if link is None:
                return None
            if not isinstance(link, self.h5py.HardLink):
                kind = type(link).__name__
                raise self.fail(f"{path!r}: {part!r} is a {kind}, not a plain member (soft and "
                                "external links are refused: they could point into another file)")
            node = node[part]
        return node

    def group(self, path):
        node = self._get(path)
        return node if isinstance(node, self.h5py.Group) else None

    def container(self, model_path):
        """The group path of a model's layers ("layers" under the model's own path), or None."""
        path = f"{model_path}/layers" if model_path else "layers"
        return path if self.group(path) is not None else None

    def layer_path(self, model_path, names, classes, i):
        """The group of the i-th of a model's layers (their class names in the model's order), by
        Keras' naming rule. The names Keras may also write on the groups are not read: they are
        variable-length strings, whose reading a corrupt file can send into an endless loop
        inside HDF5, and they add nothing the rule does not give."""
        container = self.container(model_path)
        if container is None:
            return None
        path = f"{container}/{unique_names(classes)[i]}"
        return path if self.group(path) is not None else None

    def variables(self, path):
        """{key: dataset} of "<path>/vars" (nothing read yet); {} when there is none."""
        g = self.group(f"{path}/vars")
        if g is None:
            return {}
        out = {}
        for key in list(g.keys())[:MAX_MEMBERS]:
            node = self._get(f"{path}/vars/{key}")
            if not isinstance(node, self.h5py.Dataset):
                raise self.fail(f"{path}/vars/{key} is a group, expected a dataset (a variable)")
            out[key] = node
        return out

    def read(self, ds, shape, what):
        """A dataset's values, after checking its dtype, shape, storage and filters and the
        budget; a float32 or float64 array in native byte order."""
        where = f"{ds.name.lstrip('/')} ({what})"
        if ds.dtype.kind != "f" or ds.dtype.newbyteorder("=") not in _FLOATS:
            raise self.fail(f"{where} has dtype {ds.dtype}; fastcell computes in float32 or "
                            "float64")
        if tuple(ds.shape) != tuple(shape):
            raise self.fail(f"{where} has shape {tuple(ds.shape)}, expected {tuple(shape)} "
                            "(from the layer's config)")
        if ds.is_virtual:
            raise self.fail(f"{where} is a virtual dataset (its data in other files)")
        if ds.external:
            raise self.fail(f"{where} keeps its data in external files ({ds.external[0][0]!r}...)")
        plist = ds.id.get_create_plist()
        for k in range(plist.get_nfilters()):
            fid = plist.get_filter(k)[0]
            if fid not in _FILTERS:
                raise self.fail(f"{where} uses HDF5 filter {fid}; fastcell reads only "
                                f"{', '.join(_FILTERS.values())} (no filter plugin is loaded)")
        nbytes = math.prod(shape) * ds.dtype.itemsize
        if self.spent + nbytes > self.budget:
            raise self.fail(f"{where} would take {nbytes} bytes, past the {self.budget}-byte budget "
                            "that the file's size allows")
        self.spent += nbytes
        out = np.empty(shape, ds.dtype.newbyteorder("="))
        if out.size:
            ds.read_direct(out)
        return out
