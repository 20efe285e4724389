"""``fastcell.StreamPool``: the states of many streams of one model, stepped by id.

The compiled half (fastcell_c.stream_pool.StatePool) holds the states and steps them; this half
knows models: it hands the pool a model's stepper (its kernels and initial state) and serves a
new model's with ``reload``. Every other method is the compiled one, called directly.
"""

from fastcell_c.stream_pool import PoolFullError, StatePool, StreamIdError
from fastcell_c.team import max_threads

__all__ = ["StreamPool", "StreamIdError", "PoolFullError", "max_threads"]


def _stepper_of(model):
    require = getattr(model, "_require_stepper", None)
    if require is None:
        raise TypeError(f"model: expected a fastcell model (a cell or unidirectional layers), "
                        f"got {type(model).__name__}")
    return require()        # raises for a layer that cannot stream, saying why


class StreamPool(StatePool):
    """The states of up to `capacity` streams of one unidirectional model, stepped by id.

    StreamPool(model, capacity, threads=1). `sid = pool.open()` starts a stream at the model's
    initial state (zeros unless it has an initial_state); `pool.step(ids, x)` advances the
    streams `ids` (distinct, any subset, any order) by one step of x (n, I) and returns their
    outputs (n, H_out) in the order of ids; `pool.close(sid)` ends one. Ids are opaque ints
    carrying a slot and a generation: an id is valid from its open() to its close(), and a
    reused slot refuses the old id.

    With threads > 1 the rows of a step are split among that many native threads (the caller
    and threads - 1 workers the pool owns), at most as many as the CPUs this process may run on
    (max_threads()). Every method is thread-safe, and none makes a Python object while it holds
    a lock, so a finalizer may call any of them. Other methods: reset, is_open, open_ids,
    get_state, set_state, len(pool); see the README ("Many live streams").
    """

    def __init__(self, model, capacity, threads=1):
        super().__init__(_stepper_of(model), capacity, threads)
        self._model = model

    @property
    def model(self):
        """The model whose weights the pool serves (the last one given to reload)."""
        return self._model

    def reload(self, model):
        """Serves `model`'s weights from the next step on, keeping every stream's state: a model
        of the same architecture (cell type, layers, sizes, dtype and weight format), such as
        this pool's model after load_state_dict. A step runs with the old weights or the new
        ones, never a mix; a step in progress finishes with the old ones."""
        try:
            self.swap(_stepper_of(model))
        except ValueError as exc:
            if not str(exc).startswith("stepper:"):
                raise
            raise ValueError(f"model: expected a model of this pool's architecture "
                             f"({self._model!r}), got {model!r}") from None
        self._model = model

    def __repr__(self):
        return (f"StreamPool({type(self._model).__name__}, capacity={self.capacity}, "
                f"threads={self.threads}, open={len(self)}, dtype={self.dtype.name})")
