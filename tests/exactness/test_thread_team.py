"""A model on n threads gives exactly the bytes of one thread (issue 19, README "Threads").

Every cell kind, weight format and call (layer and cell calls, lengths, bidirectional, stacks,
the streaming step of one stream and of a batch, the pool) at 2 and 3 threads (3 on a 2-core
machine too: conftest lifts the CPU limit), against the same model at one thread. The split rule
is lowered for most tests (`split_everything`) so that small models split too, by units at B = 1
(down to one 16-unit vector a part, at H = 17) and by rows for batches; the rule moves time,
never bits. The default rule is checked on shapes large enough to split on their own.
"""

import multiprocessing
import pickle
import threading

import numpy as np
import pytest

import fastcell
from fastcell_c.kernel import split_rule
from fastcell_c.team import max_threads
from helpers import QUANTIZED, quantized

FORMATS = ["float32", "float64", "int8", "int8x8", "bf16"]
KINDS = ["rnn_tanh", "rnn_relu", "gru", "gru_reset_before", "lstm", "lstm_proj", "peephole_lstm"]
I = 11


@pytest.fixture
def split_everything():
    """Split any call that can split: rows from 1 a part, units whatever the work."""
    previous = split_rule(1, 0)
    yield
    split_rule(*previous)


def layer(kind, fmt, H, rng, **kw):
    dtype = np.float64 if fmt == "float64" else np.float32
    make = {"rnn_tanh": lambda: fastcell.RNN(I, H, nonlinearity="tanh", dtype=dtype, **kw),
            "rnn_relu": lambda: fastcell.RNN(I, H, nonlinearity="relu", dtype=dtype, **kw),
            "gru": lambda: fastcell.GRU(I, H, dtype=dtype, **kw),
            "gru_reset_before": lambda: fastcell.GRU(I, H, reset_after=False, dtype=dtype, **kw),
            "lstm": lambda: fastcell.LSTM(I, H, dtype=dtype, **kw),
            "lstm_proj": lambda: fastcell.LSTM(I, H, proj_size=max(1, H // 3), dtype=dtype, **kw),
            "peephole_lstm": lambda: fastcell.PeepholeLSTM(I, H, dtype=dtype, **kw)}[kind]
    m = make()
    # Non-zero biases and peepholes, weights large enough that the nonlinearities bend.
    m.load_state_dict({k: rng.uniform(-0.6, 0.6, v.shape).astype(dtype)
                       for k, v in m.state_dict().items()})
    return quantized(m, fmt) if fmt in QUANTIZED else m


def cell_of(model):
    """The cell with a one-layer model's weights."""
    sd = {k.removesuffix("_l0"): v for k, v in model.state_dict().items()}
    cls = {"rnn": fastcell.RNNCell, "gru": fastcell.GRUCell, "lstm": fastcell.LSTMCell,
           "peephole_lstm": fastcell.PeepholeLSTMCell}[model.kind]
    extra = {"rnn": {"nonlinearity": getattr(model, "nonlinearity", None)},
             "gru": {"reset_after": getattr(model, "reset_after", None)}}.get(model.kind, {})
    cell = cls(**sd, **extra)
    if model.weight_format in QUANTIZED:
        return fastcell.quantize(cell, model.weight_format, input_bits=model.input_bits)
    return cell


def flat(result):
    if isinstance(result, (tuple, list)):
        return [a for r in result for a in flat(r)]
    return [np.asarray(result)]


def assert_same_bytes(a, b, what):
    fa, fb = flat(a), flat(b)
    assert len(fa) == len(fb), what
    for u, v in zip(fa, fb):
        assert u.dtype == v.dtype and u.shape == v.shape, what
        assert u.tobytes() == v.tobytes(), f"{what}: max |diff| {np.max(np.abs(u - v))}"


def state_of(model, B, rng):
    dt = model.dtype
    L = getattr(model, "num_layers", None)
    hshape = (B, model.hidden_size if L is None else model.proj_size or model.hidden_size)
    if L is not None:
        hshape = (L * model.num_directions,) + hshape
    h = (0.5 * rng.standard_normal(hshape)).astype(dt)
    if model.kind not in ("lstm", "peephole_lstm"):
        return h
    return h, (0.5 * rng.standard_normal(hshape[:-1] + (model.hidden_size,))).astype(dt)


# ---- every kind and format, every call ----

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("H", [17, 40])
def test_layer_calls_at_n_threads_give_one_threads_bytes(kind, fmt, H, rng, split_everything):
    one = layer(kind, fmt, H, rng)
    T = 9
    for B in (1, 5):
        x = rng.standard_normal((T, B, I)).astype(one.dtype)
        hx = state_of(one, B, rng)
        lengths = rng.integers(1, T + 1, B)
        calls = [((x,), {}), ((x, hx), {})]
        if B > 1:
            calls.append(((x, hx), {"lengths": lengths}))
        want = [one(*a, **k) for a, k in calls]
        for n in (2, 3):
            many = one.with_threads(n)
            assert many.threads == n
            for (a, k), w in zip(calls, want):
                assert_same_bytes(many(*a, **k), w, f"{kind} {fmt} H={H} B={B} {sorted(k)} {n}t")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["gru", "lstm_proj", "rnn_relu"])
def test_stacks_and_both_directions(kind, fmt, rng, split_everything):
    one = layer(kind, fmt, 33, rng, num_layers=2, bidirectional=True, batch_first=True)
    x = rng.standard_normal((3, 7, I)).astype(one.dtype)
    hx = state_of(one, 3, rng)
    want = one(x, hx, lengths=[7, 2, 5])
    for n in (2, 3, 4):     # 2, 3: a direction a thread; 4: each direction split in turn
        assert_same_bytes(one.with_threads(n)(x, hx, lengths=[7, 2, 5]), want, f"{kind} {fmt} {n}t")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_streaming_steps_at_n_threads(kind, fmt, rng, split_everything):
    one = layer(kind, fmt, 35, rng, num_layers=2)
    for B in (1, 4):
        xs = rng.standard_normal((6, B, I)).astype(one.dtype)
        ref = one.new_state(B)
        want = [one.step(x, ref).copy() for x in xs]
        for n in (2, 3):
            many = one.with_threads(n)
            s = many.new_state(B) if n == 2 else one.new_state(B)   # a twin steps its model's states
            got = [many.step(x, s).copy() for x in xs]
            assert_same_bytes(got, want, f"{kind} {fmt} B={B} {n}t")
            assert_same_bytes((s.h, s.c if s.c is not None else s.h), (ref.h, ref.c if ref.c is not None else ref.h),
                              f"{kind} {fmt} B={B} {n}t: state")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_cells_at_n_threads(kind, fmt, rng, split_everything):
    if kind == "lstm_proj":
        pytest.skip("cells have no projection")
    one = cell_of(layer(kind, fmt, 19, rng))
    for B in (1, 6):
        x = rng.standard_normal((B, I)).astype(one.dtype)
        xs = rng.standard_normal((5, B, I)).astype(one.dtype)
        hx = state_of(one, B, rng)
        want = one(x, hx), one.run(xs, hx)
        ref = one.new_state(B)
        steps = [one.step(x, ref).copy() for x in xs]
        for n in (2, 3):
            many = one.with_threads(n)
            assert_same_bytes((many(x, hx), many.run(xs, hx)), want, f"{kind} {fmt} B={B} {n}t")
            s = many.new_state(B)
            assert_same_bytes([many.step(x, s).copy() for x in xs], steps, f"{kind} {fmt} {n}t step")


@pytest.mark.parametrize("fmt", FORMATS)
def test_pool_of_a_threaded_model(fmt, rng, split_everything):
    """A pool keeps its own threads; its model's threads change no bits of its steps."""
    one = layer("lstm", fmt, 33, rng)
    for n in (1, 3):
        pool = fastcell.StreamPool(one.with_threads(n), capacity=8, threads=2)
        ids = [pool.open() for _ in range(5)]
        ref = one.new_state(5)
        for t in range(4):
            x = rng.standard_normal((5, I)).astype(one.dtype)
            assert_same_bytes(pool.step(ids, x), one.step(x, ref), f"{fmt} model at {n}t, t={t}")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_pool_splits_a_few_streams_by_units(kind, fmt, rng, split_everything):
    """A pool step too small to split by rows (fewer than 64 streams on 2 threads) splits each
    layer by hidden units, and one of 64 or more by rows: every stream gets the bytes of the
    model's own step, at 2 and 3 threads, in a stack of 2 layers too."""
    for L in (1, 2):
        one = layer(kind, fmt, 40, rng, num_layers=L)
        for n in (2, 3):
            pool = fastcell.StreamPool(one, capacity=70, threads=n)
            for rows in (1, 5, 63, 70):
                ids = [pool.open() for _ in range(rows)]
                ref = one.new_state(rows)
                for t in range(3):
                    x = rng.standard_normal((rows, I)).astype(one.dtype)
                    assert_same_bytes(pool.step(ids, x), one.step(x, ref),
                                      f"{L} layers, {n} threads, {rows} rows, t={t}")
                for sid in ids:
                    pool.close(sid)


def test_a_pool_split_by_units_survives_a_stall(rng, split_everything):
    """A pool's worker stalled at a barrier of a units split: taken over, the same bytes."""
    one = layer("lstm", "float32", 40, rng)
    pool = fastcell.StreamPool(one, capacity=4, threads=2)
    ids = [pool.open() for _ in range(3)]
    ref = one.new_state(3)
    pool._team._fault(1, 0, 20_000, times=2)
    for t in range(3):
        x = rng.standard_normal((3, I)).astype(np.float32)
        assert_same_bytes(pool.step(ids, x), one.step(x, ref), f"t={t}")
    assert pool._team.stalls >= 1


def test_default_rule_splits_big_shapes_exactly(rng):
    """Without the lowered rule: a long single sequence splits by units, a batch by rows."""
    one = layer("lstm", "float32", 160, rng)
    for T, B in ((20, 1), (4, 32)):
        x = rng.standard_normal((T, B, I)).astype(np.float32)
        want = one(x)
        assert_same_bytes(one.with_threads(2)(x), want, f"T={T} B={B}")
    pool = fastcell.StreamPool(one, capacity=2, threads=2)     # a few streams: by units
    ids, ref = [pool.open(), pool.open()], one.new_state(2)
    for x in rng.standard_normal((3, 2, I)).astype(np.float32):
        assert_same_bytes(pool.step(ids, x), one.step(x, ref), "pool")
    cell = cell_of(one)
    two = cell.with_threads(2)
    s, ref = two.new_state(1), cell.new_state(1)
    for x in rng.standard_normal((5, 1, I)).astype(np.float32):
        assert_same_bytes(two.step(x, s), cell.step(x, ref), "step")
    two.step(x, ref)            # a twin steps the states of the model it came from


# ---- the API ----

def test_threads_is_an_immutable_attribute_defaulting_to_one(rng):
    m = layer("gru", "float32", 8, rng)
    assert m.threads == 1
    with pytest.raises(AttributeError):
        m.threads = 2
    two = m.with_threads(2)
    assert (two.threads, m.threads) == (2, 1)
    assert two._weights[0] is m._weights[0]             # the packed weights, shared
    assert two.with_threads(1).threads == 1
    c = cell_of(m)
    assert c.threads == 1 and c.with_threads(3).threads == 3
    assert c.with_threads(3)._rec is c._rec
    assert fastcell.GRU(I, 8, threads=2).threads == 2
    assert fastcell.LSTMCell(**cell_of(layer("lstm", "float32", 4, rng)).state_dict(),
                             threads=2).threads == 2


@pytest.mark.parametrize("bad, err, words", [
    (0, ValueError, "threads: expected"), (-1, ValueError, "threads: expected"),
    ("2", TypeError, "threads"), (2.5, TypeError, "threads"), (None, TypeError, "threads"),
])
def test_bad_threads_are_refused_by_name(bad, err, words, rng):
    m = layer("rnn_tanh", "float32", 4, rng)
    for call in (lambda: m.with_threads(bad), lambda: fastcell.RNN(I, 4, threads=bad),
                 lambda: cell_of(m).with_threads(bad),
                 *([lambda: fastcell.quantize(m, "int8", threads=bad)] if bad is not None else []),
                 lambda: fastcell.from_state_dict(m.state_dict(), threads=bad)):
        with pytest.raises(err, match=words):
            call()


def test_more_threads_than_allowed_are_refused(monkeypatch, rng):
    m = layer("rnn_tanh", "float32", 4, rng)
    monkeypatch.setenv("FASTCELL_MAX_THREADS", "2")
    assert max_threads() == 2
    with pytest.raises(ValueError, match="threads: expected at most 2"):
        m.with_threads(3)


def test_loaders_take_threads(tmp_path, rng):
    m = layer("lstm", "float32", 20, rng)
    fastcell.save(m, tmp_path / "m.safetensors")
    loaded = fastcell.load(tmp_path / "m.safetensors", threads=2)
    assert loaded.threads == 2
    assert fastcell.load(tmp_path / "m.safetensors").threads == 1
    assert fastcell.from_state_dict(m.state_dict(), threads=3).threads == 3
    q = fastcell.quantize(m.with_threads(2), "int8")
    assert q.threads == 2                               # the model's, unless given
    assert fastcell.quantize(m, "bf16", threads=3).threads == 3
    x = rng.standard_normal((4, 2, I)).astype(np.float32)
    assert_same_bytes(loaded(x), m(x), "loaded at 2 threads")


def test_from_torch_and_onnx_take_threads(rng):
    torch = pytest.importorskip("torch")
    mod = torch.nn.GRU(I, 6)
    assert fastcell.from_torch(mod, threads=2).threads == 2
    cell = fastcell.from_torch(torch.nn.LSTMCell(I, 6), threads=2)
    assert cell.threads == 2
    pytest.importorskip("onnx")
    import io

    buf = io.BytesIO()
    torch.onnx.export(mod, (torch.zeros(3, 1, I),), buf, dynamo=False)
    assert fastcell.from_onnx(buf.getvalue(), threads=2).threads == 2


def test_pickled_models_keep_their_threads(rng):
    m = layer("gru", "float32", 20, rng).with_threads(2)
    c = cell_of(m).with_threads(3)
    m2, c2 = pickle.loads(pickle.dumps(m)), pickle.loads(pickle.dumps(c))
    assert (m2.threads, c2.threads) == (2, 3)
    x = rng.standard_normal((3, 1, I)).astype(np.float32)
    assert_same_bytes(m2(x), m(x), "layer")
    assert_same_bytes(c2.run(x), c.run(x), "cell")


# ---- many callers, fork ----

def test_python_threads_sharing_a_threaded_model(rng, split_everything):
    """Calls at once on one model of 2 threads: each claims the model's team or runs alone on
    its caller (never more busy threads than asked, never a wait on another call): every
    result is the serial one."""
    m = layer("lstm", "float32", 48, rng, num_layers=2).with_threads(2)
    xs = [rng.standard_normal((6, 1 + i % 3, I)).astype(np.float32) for i in range(6)]
    want = [m(x) for x in xs]
    errors = []

    def worker(k):
        try:
            s = m.new_state(2)
            for r in range(60):
                i = (k + r) % len(xs)
                got = m(xs[i])
                assert_same_bytes(got, want[i], f"caller {k} call {r}")
                m.step(xs[i][0, :1].repeat(2, 0), s)
        except BaseException as exc:     # reported below, on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert not errors, errors[0]


def _child_calls(conn, model, x):
    try:
        conn.send(model(x))
    finally:
        conn.close()


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork")
def test_a_forked_child_computes_on_its_one_thread(rng, split_everything):
    m = layer("gru", "float32", 40, rng).with_threads(2)
    x = rng.standard_normal((12, 1, I)).astype(np.float32)
    want = m(x)                      # the parent's team is started before the fork
    ctx = multiprocessing.get_context("fork")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_child_calls, args=(b, m, x))
    p.start()
    assert a.poll(120), "the forked child did not answer"
    got = a.recv()
    p.join(60)
    assert p.exitcode == 0
    assert_same_bytes(got, want, "forked child")
    assert_same_bytes(m(x), want, "parent after the fork")


# ---- a part whose CPU is taken ----

@pytest.mark.parametrize("kind", ["rnn_tanh", "gru", "gru_reset_before", "lstm", "lstm_proj",
                                  "peephole_lstm"])
@pytest.mark.parametrize("at", [0, 1, 4, 7])
def test_a_stalled_part_is_taken_over_with_the_same_bits(kind, at, rng, split_everything):
    """A worker that stops for 20 ms at its at-th barrier and at the next (its CPU shared with a
    busy neighbour): the first stall is waited out, at the second the caller takes the rest of
    the run over, and the bits are one thread's; the run counts as stalled (the team stands
    down: its next calls run on their caller a while). `at` reaches the middle of a step for the
    cells with two barriers a step."""
    one = layer(kind, "float32", 40, rng)
    x = rng.standard_normal((12, 1, I)).astype(np.float32)
    hx = state_of(one, 1, rng)
    want = one(x, hx)
    two = one.with_threads(2)
    team = two._team
    team._fault(1, at, 20_000, times=2)
    assert_same_bytes(two(x, hx), want, f"{kind}: worker stalled at barrier {at}")
    assert team.takeovers >= 1 and team.stalls >= 1
    assert_same_bytes(two(x, hx), want, f"{kind}: the next call")


def test_one_stall_is_waited_out(rng, split_everything):
    """A single stall (a vCPU taken away once) is waited out: no takeover, the same bits."""
    one = layer("gru_reset_before", "float32", 40, rng)
    x = rng.standard_normal((12, 1, I)).astype(np.float32)
    want = one(x)
    two = one.with_threads(2)
    two._team._fault(1, 2, 20_000)
    assert_same_bytes(two(x), want, "worker stalled once")
    assert two._team.stalls >= 1


def test_a_stalled_caller_stands_the_team_down(rng, split_everything):
    """The caller's own part stalls: the workers wait (only the caller may take over), the bits
    are one thread's, and the team stands down."""
    one = layer("lstm", "int8", 40, rng)
    x = rng.standard_normal((12, 1, I)).astype(np.float32)
    want = one(x)
    two = one.with_threads(2)
    two._team._fault(0, 3, 20_000, times=2)
    assert_same_bytes(two(x), want, "caller stalled")
    assert two._team.stalls >= 1
