"""The converters' one way to choose an item of a model (from_onnx's node=, from_keras' layer=):
None for the only one, an index into the listing, or a name. Errors name the argument and list
what the model has."""

import numpy as np

__all__ = ["choose"]


def choose(value, n, *, argument, item, named, listing, matches, index_hint, ambiguous_hint,
           expected, empty):
    """The index among n items that `value` chooses.

    argument: the argument's name ("node"); item: one item, for counts ("recurrent node");
    named: what "no ... named" says ("RNN, GRU or LSTM node"); listing(): the items described;
    matches(name): lists of the indices answering to a name, the best kind of match first (one
    index in the first list that has any wins); index_hint: how else to choose, when a model has
    several ("give its index"); ambiguous_hint: what to give when several answer to a name;
    expected: the value's accepted types, for a TypeError; empty(): the exception for a model
    with none, when value is None.
    """
    many = f"{item}s" if n != 1 else item
    if value is None:
        if n == 1:
            return 0
        if n == 0:
            raise empty()
        raise ValueError(f"{argument}: the model has {n} {many}, name one (or {index_hint}): "
                         f"{listing()}")
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if not 0 <= value < n:
            raise ValueError(f"{argument}: index {value} is out of range: the model has {n} {many}"
                             + (f": {listing()}" if n else ""))
        return int(value)
    if not isinstance(value, str):
        raise TypeError(f"{argument}: expected {expected}, got {type(value).__name__}")
    groups = [g for g in matches(value) if g]
    if groups and len(groups[0]) == 1:
        return groups[0][0]
    if groups:
        raise ValueError(f"{argument}: {len(groups[0])} {item}s are named {value!r}; "
                         f"{ambiguous_hint}: {listing()}")
    raise ValueError(f"{argument}: no {named} named {value!r}; the model has "
                     + (listing() if n else "none"))
