import contextlib
import os
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

# The suite checks that more threads than cores still give the right bits (3 threads on a
# 2-core machine): lift the default limit of one thread per core for it.
os.environ.setdefault("FASTCELL_MAX_THREADS", "8")

TOL = {np.float32: 1e-5, np.float64: 1e-12}

# Every cell variant of docs/SPEC.md: (name, gates, fastcell keyword arguments).
VARIANTS = {
    "rnn_tanh": (1, {"nonlinearity": "tanh"}),
    "rnn_relu": (1, {"nonlinearity": "relu"}),
    "gru": (3, {"reset_after": True}),
    "gru_reset_before": (3, {"reset_after": False}),
    "lstm": (4, {}),
    "peephole_lstm": (4, {}),
}


def make_cell(variant, weights):
    """The fastcell cell for a VARIANTS name, from weights under PyTorch's cell names."""
    import fastcell

    kwargs = VARIANTS[variant][1]
    if variant.startswith("rnn"):
        return fastcell.RNNCell(**weights, **kwargs)
    if variant.startswith("gru"):
        return fastcell.GRUCell(**weights, **kwargs)
    if variant == "lstm":
        return fastcell.LSTMCell(**weights)
    return fastcell.PeepholeLSTMCell(**weights)


def max_abs(a):
    if isinstance(a, tuple):
        return max(max_abs(u) for u in a)
    return float(np.max(np.abs(a), initial=0))


def max_diff(a, b):
    """Largest |a - b| over arrays or tuples of arrays (h, c), in float64."""
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        return max(max_diff(u, v) for u, v in zip(a, b))
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)),
                        initial=0))


def torch_or_skip():
    return pytest.importorskip("torch")


def init_weights(rng, gates, input_size, hidden_size, dtype, peephole=False, proj_size=0,
                 bias=True):
    """PyTorch's default initialisation, U(-1/sqrt(H), 1/sqrt(H)), under PyTorch's names."""
    k = 1 / np.sqrt(hidden_size)
    hout = proj_size or hidden_size

    def u(*shape):
        return rng.uniform(-k, k, shape).astype(dtype)

    w = {"weight_ih": u(gates * hidden_size, input_size), "weight_hh": u(gates * hidden_size, hout)}
    if bias:
        w["bias_ih"] = u(gates * hidden_size)
        w["bias_hh"] = u(gates * hidden_size)
    if peephole:
        w["weight_ph"] = u(3, hidden_size)
    if proj_size:
        w["weight_hr"] = u(proj_size, hidden_size)
    return w


@pytest.fixture
def rng(request):
    # A seed per test, stable across runs and across moves between the folders of tests/ (test
    # module basenames are unique): the crc32 of "tests/<module basename>::<test name and ids>",
    # which is the test's node id for a module at the top of tests/.
    path, _, name = request.node.nodeid.partition("::")
    return np.random.default_rng(zlib.crc32(f"tests/{path.rsplit('/', 1)[-1]}::{name}".encode()))


# ---- the command line: a subprocess, or main() in this process ----

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def fastcell_cmd(*args, cwd, module="fastcell", timeout=120, env=None):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env or ENV, timeout=timeout)


def ok(r):
    assert r.returncode == 0, r.stderr
    return r.stdout


def fails(r, *fragments):
    """Status 2 and one clear line on stderr naming the problem; no traceback."""
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def in_process(capsys, monkeypatch):
    """Runs the CLI's main() in this process (faster than a subprocess): a Result."""
    from fastcell import cli

    def call(*args, cwd):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        rc = cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return Result(rc, out, err)

    return call


class Hang(Exception):
    pass


def _on_alarm(signum, frame):
    raise Hang()


@contextlib.contextmanager
def hang_guard(seconds=10):
    """Raises Hang in the block after `seconds` (where SIGALRM exists): a hang fails the test
    instead of stalling CI."""
    old = signal.signal(signal.SIGALRM, _on_alarm) if hasattr(signal, "SIGALRM") else None
    if old is not None:
        signal.alarm(seconds)
    try:
        yield
    finally:
        if old is not None:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)


def load_or_refuse(path):
    """fastcell.load(path), or None where it raised FormatError naming the path; a hang or any
    other exception fails the test."""
    from fastcell.io.weights_file import FormatError, load

    with hang_guard(10):
        try:
            return load(path)
        except FormatError as exc:
            assert str(exc).startswith(str(path))
            return None
