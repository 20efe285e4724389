"""examples/ray_streams.py: streams routed by key to Ray actors that each own a StreamPool step
bit-for-bit as in one process, each stream through its own model.new_state(1)."""

import importlib.util
import logging
import os
import sys

import numpy as np
import pytest

# Read when Ray starts, so set before: no usage-stats report (nor its network call).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray")

import fastcell  # noqa: E402
from conftest import ROOT  # noqa: E402


def load_example():
    spec = importlib.util.spec_from_file_location("ray_streams", ROOT / "examples/ray_streams.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    # The actors' processes cannot import examples/ (not on their path): Ray ships its code instead.
    ray.cloudpickle.register_pickle_by_value(module)
    return module


rs = load_example()


@pytest.fixture(scope="module")
def local_ray(request):
    # First, so that even an init failing half-way leaves no Ray process behind.
    request.addfinalizer(ray.shutdown)
    # A new local instance (never a cluster named by RAY_ADDRESS), no dashboard, and none of the
    # workers' output or Ray's INFO lines on the test's stderr.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)


class Reference:
    """The one-process reference: each stream through its own StreamState."""

    def __init__(self, model, router):
        self.model, self.router, self.states = model, router, {}

    def open(self):
        key = self.router.open()
        self.states[key] = self.model.new_state(1)
        return key

    def close(self, key):
        self.router.close(key)
        del self.states[key]

    def step(self, keys, x):
        return np.concatenate([self.model.step(x[i:i + 1], self.states[k])
                               for i, k in enumerate(keys)])


MODELS = {
    "lstm_proj_2_layers": lambda: fastcell.LSTM(5, 12, num_layers=2, proj_size=4),
    "gru_float64": lambda: fastcell.GRU(5, 9, dtype=np.float64),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_routed_steps_are_those_of_one_process(name, local_ray):
    rng = np.random.default_rng(11)
    model = MODELS[name]()  # random weights, pickled to each actor
    with rs.StreamRouter(model, actors=2, capacity=16) as router:
        ref = Reference(model, router)
        for _ in range(20):
            ref.open()
        assert router.loads == [10, 10]
        closed = []
        for tick in range(12):
            if tick % 3 == 2:
                # Streams end and new ones start, in the freed slots of either actor.
                for k in rng.choice(sorted(ref.states), 4, replace=False):
                    ref.close(int(k))
                    closed.append(int(k))
                for _ in range(4):
                    ref.open()
            # A shuffled subset of the open streams: frames arrive in any order.
            n = rng.integers(len(ref.states) // 2, len(ref.states) + 1)
            keys = rng.permutation(sorted(ref.states))[:n]
            assert len({router.actor_of(int(k)) for k in keys}) == 2
            x = rng.standard_normal((len(keys), model.input_size)).astype(model.dtype)
            assert np.array_equal(router.step(keys, x), ref.step(keys, x))
        assert sum(router.loads) == len(router) == 20
        # A closed stream's key stays refused, and the refused step advances no stream.
        live = sorted(ref.states)[:3]
        with pytest.raises(fastcell.StreamIdError, match="keys: stream") as e:
            router.step([*live, closed[0]], np.zeros((4, model.input_size)))
        assert e.value.sid == closed[0]
        x = rng.standard_normal((3, model.input_size)).astype(model.dtype)
        assert np.array_equal(router.step(live, x), ref.step(live, x))


def test_capacity_and_bad_calls(local_ray):
    model = fastcell.GRU(3, 4)
    with rs.StreamRouter(model, actors=2, capacity=2) as router:
        ref = Reference(model, router)
        keys = [ref.open() for _ in range(4)]
        assert router.loads == [2, 2]
        with pytest.raises(fastcell.PoolFullError, match="all 2 actors are full"):
            router.open()
        freed = router.actor_of(keys[1])
        ref.close(keys[1])
        keys[1] = ref.open()  # into the slot just freed
        assert router.loads == [2, 2] and router.actor_of(keys[1]) == freed
        x = np.ones((4, 3), np.float32)
        with pytest.raises(ValueError, match="keys: duplicate key"):
            router.step([keys[0], keys[2], keys[0], keys[3]], x)
        with pytest.raises(ValueError, match=r"x: expected shape \(4, 3\)"):
            router.step(keys, x[:, :2])
        with pytest.raises(fastcell.StreamIdError, match="key: stream 99"):
            router.close(99)
        # None of those moved a stream.
        assert np.array_equal(router.step(keys, x), ref.step(keys, x))
        assert router.step([], np.zeros((0, 3))).shape == (0, 4)
    for kw in ({"actors": 0}, {"capacity": 0}, {"threads": True}):
        with pytest.raises(ValueError, match=f"{next(iter(kw))}: expected an integer >= 1"):
            rs.StreamRouter(model, **kw)


def test_actors_load_the_model_file(local_ray, tmp_path):
    path = tmp_path / "model.safetensors"
    fastcell.save(fastcell.LSTM(4, 6), path)
    model = fastcell.load(path)
    rng = np.random.default_rng(3)
    with rs.StreamRouter(str(path), actors=2, capacity=4) as router:
        ref = Reference(model, router)
        keys = [ref.open() for _ in range(6)]
        for _ in range(5):
            keys = list(rng.permutation(keys))
            x = rng.standard_normal((6, 4)).astype(np.float32)
            assert np.array_equal(router.step(keys, x), ref.step(keys, x))
