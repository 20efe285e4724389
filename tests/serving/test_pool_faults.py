"""StreamPool under faults: finalizers that call the pool during a refused call, forks while
another thread steps, and more threads than cores. Anything that could deadlock runs in a
subprocess with a timeout (a thread blocked in a C lock cannot be interrupted by a signal)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastcell
from conftest import ENV, init_weights

I, H = 5, 17


def run_script(code, timeout=120):
    """Runs code in a fresh interpreter; a hang fails the test instead of stalling the suite."""
    try:
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=ENV,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the script did not finish in {timeout} s (a deadlock?)")
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


MODEL = """
import gc, os, sys, threading, weakref
import numpy as np
import fastcell
rng = np.random.default_rng(5)
k = 1 / np.sqrt(17)
model = fastcell.LSTMCell(*(rng.uniform(-k, k, s).astype(np.float32)
                            for s in ((68, 5), (68, 17), (68,), (68,))))
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_finalizers_that_call_the_pool_during_refused_calls(threads):
    # A service object in a reference cycle whose __del__ closes its stream, and weakref
    # finalizers doing the same, collected (gc threshold 1: at nearly every allocation) while
    # steps, close, get_state and reset refuse dead ids: no deadlock, and the pool still works.
    out = run_script(MODEL + f"""
pool = fastcell.StreamPool(model, 4096, threads={threads})
gc.set_threshold(1, 1, 1)

class Client:
    def __init__(self):
        self.sid = pool.open()
        self.me = self                      # a cycle: only the collector frees it
    def __del__(self):
        pool.close(self.sid)
        pool.is_open(self.sid)
        len(pool.open_ids())

class Token:
    pass

refused = 0
x = np.ones((2, 5), np.float32)
for i in range(3000):
    Client()
    t = Token()
    weakref.finalize(t, pool.close, pool.open())
    t.me = t
    dead = pool.open()
    pool.close(dead)
    live = pool.open()
    for call in (lambda: pool.step(np.array([live, dead]), x), lambda: pool.close(dead),
                 lambda: pool.get_state(dead), lambda: pool.reset(dead),
                 lambda: pool.set_state(dead, np.zeros(17, np.float32), np.zeros(17, np.float32)),
                 lambda: pool.step(np.array([live, live]), x)):
        try:
            call()
        except ValueError:
            refused += 1
    pool.close(live)
del t
gc.set_threshold(700)
gc.collect()
# The pool still steps, exactly as a stream's own state does.
sid = pool.open()
state = model.new_state()
xs = rng.standard_normal((20, 5)).astype(np.float32)
for t in range(20):
    assert np.array_equal(pool.step(np.array([sid]), xs[t:t + 1])[0], model.step(xs[t], state))
print(refused, len(pool))
""", timeout=120)
    refused, left = map(int, out.split())
    assert refused == 3000 * 6 and left == 1


def test_a_refused_step_lists_every_closed_id_and_changes_nothing():
    rng = np.random.default_rng(1)
    model = fastcell.LSTMCell(**init_weights(rng, 4, I, H, np.float32))
    pool = fastcell.StreamPool(model, 4)
    ids = [pool.open() for _ in range(4)]
    pool.close(ids[1])
    pool.close(ids[3])
    before = [pool.get_state(s) for s in (ids[0], ids[2])]
    x = np.ones((4, I), np.float32)
    with pytest.raises(fastcell.StreamIdError) as e:
        pool.step(np.array(ids), x)
    assert e.value.sid == ids[1] and e.value.sids == (ids[1], ids[3])
    # more ids than the pool has slots: some must be closed or repeated
    with pytest.raises(ValueError, match="appears twice"):
        pool.step(np.array([ids[0], ids[2]] * 3), np.ones((6, I), np.float32))
    for s, (h, c) in zip((ids[0], ids[2]), before):
        h2, c2 = pool.get_state(s)
        assert np.array_equal(h, h2) and np.array_equal(c, c2)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork")
@pytest.mark.parametrize("threads", [1, 2])
def test_fork_while_another_thread_steps(threads):
    # The child's first pool call used to hang: it inherited the pool's lock held by the
    # stepping thread. Now the fork waits for the step, and the child steps on its own thread.
    out = run_script(MODEL + f"""
pool = fastcell.StreamPool(model, 2048, threads={threads})
ids = np.array([pool.open() for _ in range(2000)])
x = rng.standard_normal((2000, 5)).astype(np.float32)
stop = threading.Event()

def stepper():
    while not stop.is_set():
        pool.step(ids, x)

th = threading.Thread(target=stepper)
th.start()
children = 0
for _ in range(5):
    pid = os.fork()
    if pid == 0:
        # the child: its steps run here, equal to a fresh stream's own state
        sid = pool.open()
        state = model.new_state()
        ok = all(np.array_equal(pool.step(np.array([sid]), x[t:t + 1])[0], model.step(x[t], state))
                 for t in range(10))
        pool.step(ids, x)
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    children += 1
stop.set()
th.join()
print(children)
""", timeout=120)
    assert out.split() == ["5"]


def test_more_threads_than_cores_are_refused(monkeypatch):
    monkeypatch.delenv("FASTCELL_MAX_THREADS", raising=False)
    from fastcell.serving.pool import max_threads

    n = max_threads()
    assert 1 <= n <= (os.cpu_count() or 1)
    model = fastcell.LSTMCell(**init_weights(np.random.default_rng(2), 4, I, H, np.float32))
    fastcell.StreamPool(model, 4, threads=n)
    with pytest.raises(ValueError, match=f"threads: expected at most {n}.*got {n + 1}"):
        fastcell.StreamPool(model, 4, threads=n + 1)
    with pytest.raises(ValueError, match="threads: expected at most .*got 1024"):
        fastcell.StreamPool(model, 4, threads=1024)
    monkeypatch.setenv("FASTCELL_MAX_THREADS", "zero")
    with pytest.raises(ValueError, match="FASTCELL_MAX_THREADS: expected an integer"):
        fastcell.StreamPool(model, 4, threads=1)


def test_a_small_step_on_many_threads_gives_the_same_bits():
    # 8 threads (more than this machine's cores, allowed by the suite's FASTCELL_MAX_THREADS):
    # a step of 64 rows wakes only the workers that have a part, and every row is exact.
    rng = np.random.default_rng(3)
    model = fastcell.LSTMCell(**init_weights(rng, 4, I, H, np.float32))
    pools = [fastcell.StreamPool(model, 256, threads=t) for t in (1, 8)]
    ids = [np.array([p.open() for _ in range(200)]) for p in pools]
    for n in (1, 64, 200, 7):
        x = rng.standard_normal((n, I)).astype(np.float32)
        a, b = (p.step(i[:n], x) for p, i in zip(pools, ids))
        assert np.array_equal(a, b)


def test_refused_steps_on_one_thread_never_disturb_steps_on_another():
    # A refused step released the pool's lock twice: another thread's step then ran beside a
    # close, and streams diverged. Here one thread refuses steps as fast as it can while another
    # steps streams and checks every output against their own states.
    out = run_script(MODEL + """
pool = fastcell.StreamPool(model, 256)
mine = [pool.open() for _ in range(8)]
states = [model.new_state() for _ in mine]
stop = threading.Event()

def refuse():
    while not stop.is_set():
        dead = pool.open()
        pool.close(dead)
        live = pool.open()
        for ids in ([live, dead], [live, live], [live]):
            try:       # the last one is stepped: a step that may run beside the other thread's
                pool.step(np.array(ids), np.ones((len(ids), 5), np.float32))
            except ValueError:
                pass
        pool.close(live)

th = threading.Thread(target=refuse)
th.start()
xs = rng.standard_normal((3000, 8, 5)).astype(np.float32)
ok = True
for t in range(3000):
    y = pool.step(np.array(mine), xs[t])
    for k in range(8):
        ok = ok and np.array_equal(y[k], model.step(xs[t, k], states[k]))
stop.set()
th.join()
print(ok)
""", timeout=120)
    assert out.split() == ["True"]
