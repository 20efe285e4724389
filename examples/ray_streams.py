"""Streams past one process: Ray actors that each own a fastcell.StreamPool, every stream routed
to its actor by id.

A stream's state (h and c of every layer) lives in the pool that opened it, so every frame of that
stream must go to that pool: the router hands out keys that remember their actor, and each step
sends every actor the rows of its own streams in one call, the actors stepping in parallel. The
outputs are bit-for-bit those of one process (a StreamPool steps each stream exactly as its own
model.new_state(1) would), whatever the grouping.

    router = StreamRouter(model, actors=4, capacity=10_000)   # or a path: each actor loads the file
    key = router.open()                                        # on the least-loaded actor
    y = router.step(keys, x)                                   # row i: the output of stream keys[i]
    router.close(key)

On a cluster, call ray.init(address=...) first; the actors spread over its nodes (pass
actor_options={"scheduling_strategy": "SPREAD"} to insist). An actor that dies takes its streams'
states with it: their keys then fail, and their clients must open new streams. The actors
import this module by name, so on a cluster keep it in a package every node has (run as a script,
as in the demo, Ray ships its code).

Demo: starts a local Ray with 2 actors, steps a few hundred streams and checks every output
against one process:

    python examples/ray_streams.py [--actors 2] [--streams 400] [--ticks 50] [--model PATH]
"""

import argparse
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import ray

import fastcell


class PoolActor:
    """One StreamPool in one Ray actor process; the router makes it remote (ray.remote(PoolActor)).

    model: a fastcell model (it pickles), or the path of a model file that this actor loads
    itself, so nothing is shipped but every node needs the file.
    """

    def __init__(self, model, capacity, threads=1):
        if isinstance(model, (str, os.PathLike)):
            model = fastcell.load(model)
        self.pool = fastcell.StreamPool(model, capacity, threads)

    def info(self):
        p = self.pool
        return {"input_size": p.input_size, "output_size": p.output_size,
                "dtype": np.dtype(p.dtype).str, "capacity": p.capacity}

    def open(self):
        return self.pool.open()

    def close(self, sid):
        self.pool.close(sid)

    def reset(self, sid):
        self.pool.reset(sid)

    def step(self, ids, x):
        return self.pool.step(ids, x)


class StreamRouter:
    """Routes streams by key to `actors` PoolActors of `capacity` streams each, from the driver.

    source: a fastcell model, or a model file's path (each actor loads it).
    threads: the threads of each actor's pool, and the CPUs Ray reserves for each actor.
    actor_options: more ray .options() for the actors (num_cpus, scheduling_strategy, ...).

    Keys are ints from one counter, never reused, so a closed stream's key never reaches a new
    stream. Thread-safe: one lock guards the key table; steps of different threads overlap.
    """

    def __init__(self, source, actors=2, capacity=1024, threads=1, actor_options=None):
        # Checked here, not only by the pools: an actor's failed start reads as ActorDiedError.
        for name, v in (("actors", actors), ("capacity", capacity), ("threads", threads)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        if not ray.is_initialized():
            raise RuntimeError("StreamRouter: call ray.init() first (ray.init(address=...) for a "
                               "cluster)")
        if not isinstance(source, (str, os.PathLike)):
            source = ray.put(source)  # pickled once, read by every actor from the object store
        options = {"num_cpus": threads, **(actor_options or {})}
        cls = ray.remote(PoolActor).options(**options)
        self.actors = [cls.remote(source, capacity, threads) for _ in range(actors)]
        try:
            # Waits for every actor: a bad model, file or capacity fails here, not at a first step.
            infos = ray.get([a.info.remote() for a in self.actors])
        except BaseException:
            self.shutdown()
            raise
        info = infos[0]
        self.input_size, self.output_size = info["input_size"], info["output_size"]
        self.dtype, self.capacity = np.dtype(info["dtype"]), info["capacity"]
        self._streams = {}              # key -> (actor index, the pool's sid)
        self._loads = [0] * actors      # open streams per actor
        self._next_key = 0
        self._lock = threading.Lock()

    def __len__(self):
        return len(self._streams)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    @property
    def loads(self):
        """Open streams per actor."""
        with self._lock:
            return list(self._loads)

    def actor_of(self, key):
        """The index of the actor that holds stream `key`."""
        return self._lookup(key)[0]

    def open(self):
        """Opens a stream (state zero) on the least-loaded actor; returns its key."""
        with self._lock:
            a = min(range(len(self.actors)), key=self._loads.__getitem__)
            if self._loads[a] >= self.capacity:
                raise fastcell.PoolFullError(
                    f"StreamRouter: all {len(self.actors)} actors are full ({self.capacity} "
                    "streams each): close streams, or make the router with more actors or capacity")
            # Counted before the call, so concurrent opens spread instead of all picking `a`.
            self._loads[a] += 1
        try:
            sid = ray.get(self.actors[a].open.remote())
        except BaseException:
            with self._lock:
                self._loads[a] -= 1
            raise
        with self._lock:
            key = self._next_key
            self._next_key += 1
            self._streams[key] = (a, sid)
        return key

    def close(self, key):
        with self._lock:
            a, sid = self._lookup(key)
            del self._streams[key]
            self._loads[a] -= 1
        ray.get(self.actors[a].close.remote(sid))

    def reset(self, key):
        """Starts stream `key` over from state zero."""
        a, sid = self._lookup(key)
        ray.get(self.actors[a].reset.remote(sid))

    def step(self, keys, x):
        """One step of the streams `keys` (distinct, any order) on frames x (n, input_size):
        returns y (n, output_size), row i the output of stream keys[i].

        Every key and x are checked here before any actor steps, so a refused call changes no
        state (a step spanning actors is not atomic once sent: an actor can still fail).
        """
        keys = [int(k) for k in np.asarray(keys, dtype=np.int64).reshape(-1)]
        n = len(keys)
        x = np.asarray(x, dtype=self.dtype)
        if x.shape != (n, self.input_size):
            raise ValueError(f"x: expected shape ({n}, {self.input_size}) for {n} keys, "
                             f"got {x.shape}")
        if len(set(keys)) != n:
            raise ValueError(f"keys: duplicate key {_first_duplicate(keys)}")
        with self._lock:
            route = [self._lookup(k, "keys") for k in keys]
        actor = np.fromiter((a for a, _ in route), dtype=np.intp, count=n)
        sid = np.fromiter((s for _, s in route), dtype=np.int64, count=n)
        rows = [np.flatnonzero(actor == a) for a in range(len(self.actors))]
        # One call per actor with rows, all sent before the first ray.get: they run in parallel.
        calls = [(r, self.actors[a].step.remote(sid[r], x[r]))
                 for a, r in enumerate(rows) if len(r)]
        y = np.empty((n, self.output_size), dtype=self.dtype)
        for (r, _), y_a in zip(calls, ray.get([ref for _, ref in calls])):
            y[r] = y_a
        return y

    def shutdown(self):
        """Ends the actors (and every stream's state with them)."""
        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def _lookup(self, key, arg="key"):
        try:
            return self._streams[key]
        except KeyError:
            # The pool's error for a stream that is not open, so callers catch one class.
            raise fastcell.StreamIdError(f"{arg}: stream {key!r} is not open on this router",
                                         key) from None


def _first_duplicate(keys):
    seen = set()
    for k in keys:
        if k in seen:
            return k
        seen.add(k)


# ---- the demo ----

DEMO_MODEL = Path(fastcell.__file__).parent / "demo_models" / "lstm.safetensors"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--streams", type=int, default=400)
    ap.add_argument("--ticks", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1, help="threads of each actor's pool")
    ap.add_argument("--model", default=str(DEMO_MODEL),
                    help="a fastcell model file (default: the demo LSTM)")
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a demo reports nothing home
    cpus = args.actors * args.threads
    t = time.perf_counter()
    # No dashboard, worker output or INFO lines: only what the demo prints. Enough CPUs for every
    # actor: an actor Ray cannot place would wait for them forever.
    ray.init(num_cpus=max(2, cpus), include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    print(f"ray.init: {time.perf_counter() - t:.2f} s")
    try:
        per_actor = -(-args.streams // args.actors)
        with StreamRouter(args.model, args.actors, capacity=per_actor, threads=args.threads) as router:
            model = fastcell.load(args.model)
            rng = np.random.default_rng(0)
            x = rng.uniform(-1, 1, (args.ticks, args.streams, router.input_size)).astype(router.dtype)

            keys = [router.open() for _ in range(args.streams)]
            t = time.perf_counter()
            got = np.stack([router.step(keys, x_t) for x_t in x])
            ray_s = time.perf_counter() - t

            # The same cores in one process: one pool with as many threads as all the actors.
            pool = fastcell.StreamPool(model, args.streams, threads=cpus)
            ids = [pool.open() for _ in range(args.streams)]
            t = time.perf_counter()
            want = np.stack([pool.step(ids, x_t) for x_t in x])
            one_s = time.perf_counter() - t

            steps = args.streams * args.ticks
            print(f"{args.streams} streams on {args.actors} actors (loads {router.loads}), "
                  f"{args.ticks} ticks")
            print(f"  {args.actors} Ray actors:          {steps / ray_s:12,.0f} stream steps/s "
                  f"({1e3 * ray_s / args.ticks:.2f} ms a tick)")
            print(f"  one process, {cpus} threads: {steps / one_s:12,.0f} stream steps/s "
                  f"({1e3 * one_s / args.ticks:.2f} ms a tick)")
            same = np.array_equal(got, want)
            print("  outputs bit-for-bit those of one process:", "yes" if same else "NO")
            return 0 if same else 1
    finally:
        ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
