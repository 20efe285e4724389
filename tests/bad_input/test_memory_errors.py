"""Sizes that cannot be allocated raise MemoryError, never a crash: zero-strided inputs whose copy,
output or workspace is larger than the address space, and the kernel's own workspace under an
address-space limit (the process stays healthy)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import fastcell
from helpers import I, cell_of, make_layer


# Each more than 2**47 bytes (the x86-64 user address space), so no machine and no overcommit
# setting lets the allocation succeed.
HUGE = [(1, 2**46, I), (2**46, 1, I), (2**23, 2**23, I)]


@pytest.mark.parametrize("shape", HUGE, ids=str)
@pytest.mark.parametrize("kind", ["gru", "lstm_proj"])
def test_huge_layer_input_is_memory_error(shape, kind):
    """A zero-strided input of a few bytes whose copy, output or workspace cannot be allocated."""
    layer = make_layer(kind, np.float32)
    x = np.broadcast_to(np.float32(1), shape)
    with pytest.raises(MemoryError):
        layer(x)
    if shape[1] <= 2**21:
        with pytest.raises(MemoryError):
            layer(x, None, np.broadcast_to(np.int64(1), (shape[1],)))


@pytest.mark.parametrize("shape", HUGE, ids=str)
@pytest.mark.parametrize("variant", ["gru", "lstm"])
def test_huge_cell_input_is_memory_error(shape, variant):
    cell = cell_of(variant, np.float32)
    x = np.broadcast_to(np.float32(1), shape)
    with pytest.raises(MemoryError):
        cell.run(x)
    if shape[1] * shape[2] * 4 > 2**47:  # a step of that batch cannot be allocated either
        with pytest.raises(MemoryError):
            cell(x[0])


WORKSPACE_SCRIPT = textwrap.dedent("""
    import resource, sys
    import numpy as np
    import fastcell

    # An LSTM with a wide cell and a one-number projection: input and output are tiny, but the
    # kernel's workspace (T*B rows of 4*H gate values) is 16 GiB.
    H = 2**14
    layer = fastcell.LSTM(1, H, proj_size=1)
    x = np.ones((2**16, 1, 1), np.float32)
    small = layer(x[:8])
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
    limit = vm + 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:
        layer(x)
    except MemoryError as e:
        print("MemoryError:", e)
    else:
        sys.exit("no MemoryError")
    try:
        layer.new_state(2**26)
    except MemoryError as e:
        print("MemoryError:", e)
    else:
        sys.exit("no MemoryError")
    # The process is still healthy: the same call on a short sequence gives the same numbers.
    again = layer(x[:8])
    assert np.array_equal(again[0], small[0])
    print("ok")
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc: Linux")
def test_workspace_that_cannot_be_allocated_is_memory_error():
    """The kernel's own workspace allocation fails (under an address-space limit, so the test
    does not depend on the machine's memory or overcommit setting): MemoryError, no crash."""
    root = Path(fastcell.__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
               OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", WORKSPACE_SCRIPT], cwd=root, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.split("\n")
    assert lines[0].startswith("MemoryError: workspace of ")
    assert lines[1].startswith("MemoryError")
    assert lines[2] == "ok"
