"""Folding an ONNX model's constants: the value behind a name, an initializer or a node output
computed in NumPy from constants by the shape ops exporters emit (Constant, Identity, Cast,
Reshape, Squeeze, Unsqueeze, Concat, Slice, Split, Transpose, as the ONNX operator spec says, at
any opset), also from an enclosing graph. A value that depends on a graph input or on any other
op is a run-time value (NotConstant).

The folded values may not grow past a bound set by the bytes the file actually holds: a 16 KiB
file cannot make gigabytes.
"""

import numpy as np

from fastcell.convert.onnx_reader import (A_FLOAT, A_FLOATS, A_INT, A_INTS, A_TENSOR, TYPE_NAMES,
                                          Bad, FormatError, attributes, get, short, text)

__all__ = ["ConstantFolder", "NotConstant", "FOLDABLE", "FOLD_BASE_BYTES", "FOLD_FACTOR"]

FOLDABLE = ("Constant", "Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Concat", "Slice",
            "Split", "Transpose")
MAX_FOLD_DEPTH = 64          # nodes in one chain of constants
FOLD_BASE_BYTES = 16 << 20   # folded values may total this plus FOLD_FACTOR x the bytes read
FOLD_FACTOR = 16


class NotConstant(FormatError):
    """A value computed from a graph input or by an op fastcell does not fold: a run-time value."""


class ConstantFolder:
    """The constant values of one OnnxModel, folded on demand and kept (memo)."""

    def __init__(self, model):
        self.model = model
        self._memo, self._busy, self._spent = {}, set(), 0

    def budget(self):
        """Bytes that folding, and a model built from the folded values, may take."""
        return FOLD_BASE_BYTES + FOLD_FACTOR * self.model.read_bytes

    def value(self, name, scope, role, depth=0):
        """The constant array behind a value name: an initializer, or a node output folded from
        constants. A graph input or any other op is refused."""
        owner, entry = scope.find(name)
        if entry is None:
            raise self.model.fail(f"{role}: {name!r} is produced by no node, initializer or input of "
                            f"{scope.path} or the graphs around it")
        key = (id(owner), name)
        if key in self._memo:
            return self._memo[key]
        kind = entry[0]
        if kind == "input":
            raise NotConstant(f"{self.model.label}: {role} depends on the graph input {name!r} of "
                               f"{owner.path}: fastcell needs the weights as constants "
                               "(initializers or constant nodes)")
        if kind == "sparse":
            raise self.model.fail(f"{role}: {name!r} is a sparse initializer; fastcell reads dense ones")
        if kind == "initializer":
            arr = self.model.tensor(entry[1], f"initializer {name!r}")
            self._memo[key] = arr
            return arr
        node, k = entry[1], entry[2]
        if depth >= MAX_FOLD_DEPTH:
            raise self.model.fail(f"{role}: {name!r} comes from a chain of more than {MAX_FOLD_DEPTH} "
                            "nodes; fastcell folds shorter chains of constants only")
        if key in self._busy:
            raise self.model.fail(f"{role}: {name!r} depends on itself (a cycle in the graph)")
        label = f"{text(node.op_type)} node {text(node.name) or '(unnamed)'!r}"
        if node.domain not in ("", "ai.onnx") or node.op_type not in FOLDABLE:
            raise NotConstant(f"{self.model.label}: {role}: {name!r} comes from a {label} (domain "
                               f"{text(node.domain) or 'ai.onnx'!r}); fastcell folds only "
                               f"constants and {', '.join(FOLDABLE[1:])} of constants")
        self._busy.add(key)
        try:
            args = [self.value(i, owner, role, depth + 1) if i else None for i in node.input]
            outs = self._fold(node, args, owner, label, role)
        finally:
            self._busy.discard(key)
        if len(outs) != len(node.output):
            raise self.model.fail(f"{role}: {label} has {len(node.output)} outputs, its op gives "
                            f"{len(outs)}")
        for o, v in zip(node.output, outs):
            if o:
                self._memo[(id(owner), o)] = v
        return outs[k]

    def _fold(self, node, args, scope, label, role):
        where = f"{role}: {label}"
        attrs = attributes(node, where)
        # Every op here makes at most as many elements as it reads (Concat: their sum; Cast: at
        # most 8 bytes each), so this bounds what the evaluation allocates.
        bound = sum(a.nbytes * (8 if node.op_type == "Cast" else 1) for a in args if a is not None)
        if self._spent + bound > FOLD_BASE_BYTES + FOLD_FACTOR * self.model.read_bytes:
            raise self.model.fail(f"{where}: folding the model's constants would take more than "
                            f"{FOLD_BASE_BYTES + FOLD_FACTOR * self.model.read_bytes} bytes, far more "
                            "than the tensors it holds")
        try:
            outs = evaluate(node.op_type, args, attrs, self.model.opset, len(node.output), self.model,
                            where)
        except (FormatError, Bad):
            raise
        except (ValueError, TypeError, IndexError, OverflowError) as exc:
            raise self.model.fail(f"{where}: cannot evaluate it ({short(exc)})") from None
        self._spent += sum(o.nbytes for o in outs)
        return outs


# ---- the ops folded into constants (NumPy, from the ONNX operator spec) ----

_CAST_TO = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32,
            7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


def _ints(a, what):
    """A tensor of integers (axes, shape, starts, ...) as a list of Python ints."""
    if a is None:
        return None
    if a.dtype.kind not in "iu" or a.ndim > 1 or a.size > 64:
        raise Bad(f"{what}: expected at most 64 integers, got {a.dtype} of shape {a.shape}")
    return [int(v) for v in a.reshape(-1)]


def _axis(axis, rank, what):
    if not -rank <= axis < rank:
        raise Bad(f"{what}: axis {axis} is out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def evaluate(op, args, attrs, opset, n_out, model, where):
    """[outputs] of one constant node. `args` are its inputs (None for absent optional ones)."""
    def fail(msg):
        return Bad(f"{where}: {msg}")

    def arg(k, name):
        if k >= len(args) or args[k] is None:
            raise fail(f"input {name} is missing")
        return args[k]

    def opt(k):
        return args[k] if k < len(args) else None

    if op == "Constant":
        return [_constant(attrs, model, where)]
    x = arg(0, "input")
    if op == "Identity":
        return [x]
    if op == "Cast":
        to = get(attrs, "to", A_INT, None, where)
        if to not in _CAST_TO:
            raise fail(f"Cast to {TYPE_NAMES.get(to, to)} is not a type fastcell folds")
        return [x.astype(_CAST_TO[to])]
    if op == "Transpose":
        perm = get(attrs, "perm", A_INTS, None, where)
        perm = list(range(x.ndim))[::-1] if perm is None else perm
        if sorted(perm) != list(range(x.ndim)):
            raise fail(f"perm {perm} is not a permutation of the {x.ndim} axes")
        return [np.transpose(x, perm)]
    if op in ("Squeeze", "Unsqueeze"):
        axes = (get(attrs, "axes", A_INTS, None, where) if opset < 13
                else _ints(opt(1), f"{where}: axes"))
        if op == "Unsqueeze":
            if not axes:
                raise fail("Unsqueeze needs axes")
            rank = x.ndim + len(axes)
            axes = [_axis(a, rank, where) for a in axes]
            if len(set(axes)) != len(axes):
                raise fail(f"axes {axes} repeat an axis")
            shape, it = [], iter(x.shape)
            for k in range(rank):
                shape.append(1 if k in axes else next(it))
            return [x.reshape(shape)]
        if not axes:
            return [x.reshape([d for d in x.shape if d != 1])]
        axes = sorted({_axis(a, x.ndim, where) for a in axes})
        if any(x.shape[a] != 1 for a in axes):
            raise fail(f"Squeeze axes {axes} of shape {x.shape}: not all of size 1")
        return [x.reshape([d for k, d in enumerate(x.shape) if k not in axes])]
    if op == "Reshape":
        shape = (get(attrs, "shape", A_INTS, None, where) if opset < 5
                 else _ints(arg(1, "shape"), f"{where}: shape"))
        if shape is None:
            raise fail("Reshape needs a shape")
        allowzero = get(attrs, "allowzero", A_INT, 0, where)
        if not allowzero:
            if any(s == 0 and k >= x.ndim for k, s in enumerate(shape)):
                raise fail(f"shape {shape}: a 0 copies an input axis, but the input has rank {x.ndim}")
            shape = [x.shape[k] if s == 0 else s for k, s in enumerate(shape)]
        if shape.count(-1) > 1 or any(s < -1 for s in shape):
            raise fail(f"shape {shape} is not a valid Reshape target")
        return [x.reshape(shape)]
    if op == "Concat":
        axis = get(attrs, "axis", A_INT, None, where)
        if axis is None:
            raise fail("Concat needs an axis")
        parts = [a for a in args if a is not None]
        if any(p.ndim != x.ndim or p.dtype != x.dtype for p in parts):
            raise fail("Concat inputs of different ranks or types")
        return [np.concatenate(parts, axis=_axis(axis, max(x.ndim, 1), where))]
    if op == "Slice":
        if opset < 10:
            starts = get(attrs, "starts", A_INTS, None, where)
            ends = get(attrs, "ends", A_INTS, None, where)
            axes = get(attrs, "axes", A_INTS, None, where)
            steps = None
        else:
            starts = _ints(arg(1, "starts"), f"{where}: starts")
            ends = _ints(arg(2, "ends"), f"{where}: ends")
            axes, steps = _ints(opt(3), f"{where}: axes"), _ints(opt(4), f"{where}: steps")
        if starts is None or ends is None or len(starts) != len(ends):
            raise fail("Slice needs starts and ends of one length")
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        if len(axes) != len(starts) or len(steps) != len(starts):
            raise fail("Slice's starts, ends, axes and steps differ in length")
        index = [slice(None)] * x.ndim
        seen = set()
        for s, e, a, st in zip(starts, ends, axes, steps):
            a = _axis(a, x.ndim, where)
            if a in seen or st == 0:
                raise fail("Slice repeats an axis or has a step of 0")
            seen.add(a)
            index[a] = _slice(s, e, st, x.shape[a])
        return [x[tuple(index)]]
    if op == "Split":
        axis = _axis(get(attrs, "axis", A_INT, 0, where), x.ndim, where)
        dim = x.shape[axis]
        split = (get(attrs, "split", A_INTS, None, where) if opset < 13
                 else _ints(opt(1), f"{where}: split"))
        if split is None:
            n = get(attrs, "num_outputs", A_INT, None, where) if opset >= 18 else None
            n = n_out if n is None else n
            if n != n_out or n < 1:
                raise fail(f"num_outputs {n} but {n_out} outputs")
            if dim % n == 0:
                split = [dim // n] * n
            elif opset >= 18:   # the last chunk takes what is left
                chunk = -(-dim // n)
                split = [chunk] * (n - 1) + [dim - chunk * (n - 1)]
            else:
                raise fail(f"axis of size {dim} does not split into {n} equal parts")
        if len(split) != n_out or any(s < 0 for s in split) or sum(split) != dim:
            raise fail(f"split {split} does not cut an axis of size {dim} into {n_out} outputs")
        outs, begin = [], 0
        for size in split:
            index = [slice(None)] * x.ndim
            index[axis] = slice(begin, begin + size)
            outs.append(x[tuple(index)])
            begin += size
        return outs
    raise fail(f"op {op} is not folded")  # unreachable: callers check FOLDABLE


def _slice(start, end, step, dim):
    """ONNX Slice's clamping (opset 10+) as a Python slice."""
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        return slice(start, end, step)
    if dim == 0:
        return slice(0, 0, 1)
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return slice(start, None if end == -1 else end, step)


def _constant(attrs, model, where):
    if len(attrs) != 1:
        raise model.fail(f"{where}: a Constant needs exactly one value attribute, it has "
                         f"{sorted(attrs) or 'none'}")
    (name, a), = attrs.items()
    if name == "value":
        return model.tensor(get(attrs, name, A_TENSOR, None, where), where)
    if name in ("value_float", "value_floats", "value_int", "value_ints"):
        kind = {"value_float": A_FLOAT, "value_floats": A_FLOATS, "value_int": A_INT,
                "value_ints": A_INTS}[name]
        arr = np.array(get(attrs, name, kind, None, where),
                       dtype=np.float32 if "float" in name else np.int64)
        model.read_bytes += arr.nbytes
        return arr
    raise model.fail(f"{where}: a Constant with {name} is not one fastcell folds (value, "
                     "value_float(s), value_int(s))")
