"""The ``fastcell`` command: info, run, export, quantize, demo.

    fastcell info MODEL                  (a fastcell file; an .onnx or .keras model: its recurrent
                                          nodes or layers)
    fastcell run MODEL --input x.npy [--output y.npy] [--lengths l.npy] [--state-output s.npz]
    fastcell export SRC DEST [--nonlinearity tanh|relu] [--reset-after | --reset-before]
                             [--batch-first] [--prefix NAME.] [--weights int8|bf16]
                             [--input-bits 16|8]
    fastcell export MODEL.onnx DEST [--node NAME] [--weights int8|bf16] [--input-bits 16|8]
    fastcell export MODEL.keras DEST [--layer NAME [--layer NAME ...]] [--weights int8|bf16]
                                [--input-bits 16|8]
    fastcell quantize IN OUT --weights int8|bf16 [--input-bits 16|8]
    fastcell demo

Errors print one line to stderr and exit with status 2. Only ``export`` of a PyTorch checkpoint
imports torch, and it reads the checkpoint with ``torch.load(..., weights_only=True)``: nothing
else is unpickled. A file named ``*.onnx`` is read with the onnx package (fastcell.convert.onnx_import),
one named ``*.keras`` with h5py (fastcell.convert.keras_import; neither Keras nor TensorFlow).
"""

import argparse
import math
import os
import sys
import time

import numpy as np

from fastcell.formats.reduced import INPUT_BITS, REDUCED_FORMATS
from fastcell.io.weights_file import FormatError, load, save
from fastcell.models.quantize import quantize

# Progress is drawn for runs of at least this many multiply-adds (tens of milliseconds).
_LONG_RUN = 10**8


class CliError(Exception):
    """An error the user can fix; printed as one line."""


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        rc = args.func(args)
        return rc if isinstance(rc, int) else 0
    except KeyboardInterrupt:
        print("fastcell: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fastcell run ... | head`
        sys.stderr.close()
        return 1
    except (CliError, FormatError, ValueError, TypeError, MemoryError, OSError) as exc:
        print(f"fastcell {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc):
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    if isinstance(exc, MemoryError):
        return f"out of memory{': ' + str(exc) if str(exc) else ''}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


def _parser():
    p = argparse.ArgumentParser(
        prog="fastcell",
        description="Fast, exact CPU inference for recurrent networks trained in PyTorch.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    info = sub.add_parser("info", help="describe a fastcell weight file, or an ONNX or Keras model",
                          description="Print a fastcell model's cell type, sizes, layers, "
                                      "directions, parameter count, dtype, weight format (float32, "
                                      "float64, int8, bf16), file size, and the bytes of its "
                                      "weights in the file and in memory once loaded. For an "
                                      ".onnx model, list its RNN, GRU and LSTM nodes (needs the "
                                      "onnx package); for a .keras model, its recurrent layers "
                                      "(needs h5py).")
    info.add_argument("model", metavar="MODEL",
                      help="a fastcell weight file (.safetensors), an ONNX model (.onnx) or a "
                           "Keras model (.keras)")
    info.set_defaults(func=_info)

    run = sub.add_parser("run", help="run a model on a NumPy array",
                         description="Run a fastcell model on an .npy input and save or print "
                                     "the output.")
    run.add_argument("model", metavar="MODEL", help="a fastcell weight file")
    run.add_argument("--input", "-i", required=True, metavar="X.npy",
                     help="the input: (T, B, I), (B, T, I) for a batch_first layer, or (T, I)")
    run.add_argument("--output", "-o", metavar="Y.npy", help="where to save the output")
    run.add_argument("--lengths", metavar="L.npy",
                     help="integer lengths (B,) of a padded batch (layers only)")
    run.add_argument("--state-output", metavar="S.npz",
                     help="where to save the final state (h_n, and c_n for the LSTMs)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="draw a progress bar on stderr (default: on a terminal, for long runs)")
    run.set_defaults(func=_run)

    exp = sub.add_parser("export", help="convert a PyTorch checkpoint, an ONNX node or a Keras layer "
                                        "to a fastcell file",
                         description="Read a PyTorch state_dict saved with torch.save (with "
                                     "torch.load(weights_only=True): no code in it can run; needs "
                                     "PyTorch), or one RNN, GRU or LSTM node of an ONNX model "
                                     "(SRC named *.onnx; needs the onnx package), or a recurrent "
                                     "layer of a Keras model (SRC named *.keras; needs h5py, not "
                                     "Keras), and write a fastcell weight file, its weight "
                                     "matrices in int8 or bf16 with --weights.")
    exp.add_argument("src", metavar="SRC",
                     help="a PyTorch checkpoint holding a state_dict, an ONNX model (.onnx) or a "
                          "Keras model (.keras)")
    exp.add_argument("dest", metavar="DEST", help="the fastcell file to write (.safetensors)")
    exp.add_argument("--nonlinearity", choices=("tanh", "relu"),
                     help="a vanilla RNN's nonlinearity (names cannot tell; default tanh)")
    ra = exp.add_mutually_exclusive_group()
    ra.add_argument("--reset-after", dest="reset_after", action="store_true", default=None,
                    help="a GRU in PyTorch's reset-after form (the default)")
    ra.add_argument("--reset-before", dest="reset_after", action="store_false",
                    help="a GRU in the reset-before form of Cho et al. 2014")
    exp.add_argument("--batch-first", action="store_true", default=None,
                     help="the layer takes (B, T, I) inputs")
    exp.add_argument("--prefix", metavar="NAME.",
                     help="take only the entries under this prefix (e.g. 'rnn.' for a model "
                          "whose recurrent layer is self.rnn), and strip it")
    exp.add_argument("--node", metavar="NAME",
                     help="ONNX only: the recurrent node to convert, by name (or by its index in "
                          "`fastcell info MODEL.onnx`); needed when the model has several")
    exp.add_argument("--layer", metavar="NAME", action="append",
                     help="Keras only: the recurrent layer to convert, by name (or by its index in "
                          "`fastcell info MODEL.keras`); needed when the model has several. Given "
                          "more than once, the layers are stacked into one multi-layer model")
    _weights_option(exp, required=False)
    exp.set_defaults(func=_export)

    qua = sub.add_parser("quantize", help="reduce a fastcell file's weights to int8 or bf16",
                         description="Read a float fastcell weight file and write the same model "
                                     "with its weight matrices (W_ih, W_hh, W_hr) in int8 (one "
                                     "float32 scale per output row) or bf16; biases and "
                                     "peepholes stay float32.")
    qua.add_argument("src", metavar="IN", help="a float fastcell weight file (.safetensors)")
    qua.add_argument("dest", metavar="OUT", help="the fastcell file to write (.safetensors)")
    _weights_option(qua, required=True)
    qua.set_defaults(func=_quantize)

    demo = sub.add_parser("demo", help="run the bundled demo models",
                          description="Run four small trained models, one per cell type, on a "
                                      "long-range memory task and print a table.")
    demo.set_defaults(func=_demo)
    return p


def _weights_option(parser, required):
    parser.add_argument(
        "--weights", choices=REDUCED_FORMATS, required=required,
        help="store the weight matrices in int8 (one float32 scale per output row) or bf16; "
             "biases and peepholes stay float32" + ("" if required else " (default: keep float)"))
    parser.add_argument(
        "--input-bits", type=int, choices=INPUT_BITS, metavar="{16,8}",
        help="with --weights int8: the bits each layer's input x is quantized to per row on "
             "every call, 16 (the default, the more exact) or 8 (faster in batches and long "
             "sequences, about twice the error)")


def _reduced(model, args):
    """model with its weights in --weights' format (and --input-bits, int8 only)."""
    if args.input_bits is not None and args.weights != "int8":
        raise CliError(f"--input-bits: only with --weights int8 (how an int8 model quantizes its "
                       f"inputs), got {'--weights ' + args.weights if args.weights else 'no --weights'}")
    return quantize(model, args.weights, input_bits=args.input_bits)


# ---- info ----

class _Foreign:
    """A model file of another framework that `info` lists and `export` converts."""

    def __init__(self, suffix, what, module, needs, extra, option, items, lister, converter,
                 keyword):
        self.suffix, self.what, self.module, self.needs, self.extra = suffix, what, module, needs, extra
        self.option, self.items = option, items
        self.lister, self.converter, self.keyword = lister, converter, keyword

    def load(self):
        """The converter module, after checking that what reading the file needs is installed."""
        import importlib

        try:
            importlib.import_module(self.needs)
        except ImportError:
            raise CliError(f"reading {self.suffix} files needs the {self.needs} package: pip "
                           f"install 'fastcell[{self.extra}]'") from None
        return importlib.import_module(self.module)


_FOREIGN = {
    ".onnx": _Foreign(".onnx", "an ONNX model", "fastcell.convert.onnx_import", "onnx", "onnx", "--node",
                      "recurrent node", "onnx_nodes", "from_onnx", "node"),
    ".keras": _Foreign(".keras", "a Keras model", "fastcell.convert.keras_import", "h5py", "keras", "--layer",
                       "recurrent layer", "keras_layers", "from_keras", "layer"),
}


def _foreign(path):
    """The _Foreign reading this file (by its suffix), or None for a fastcell file."""
    return _FOREIGN.get(os.path.splitext(str(path))[1].lower())


def _print_table(rows):
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


def _info_foreign(args, kind):
    items = getattr(kind.load(), kind.lister)(args.model)
    size = os.path.getsize(args.model)
    print(f"file   {args.model} ({_bytes(size)}), {kind.what}")
    label = "nodes " if kind.option == "--node" else "layers"
    if not items:
        print(f"{label} no {kind.items} (fastcell converts "
              + ("RNN, GRU and LSTM nodes)" if kind.option == "--node" else
                 "SimpleRNN, GRU, LSTM, RNN and Bidirectional layers)"))
        return 0
    print(f"{label} {len(items)} {kind.items}{'s' if len(items) > 1 else ''} (convert one with "
          f"`fastcell export MODEL{kind.suffix} OUT.safetensors {kind.option} NAME`)")
    if kind.option == "--node":
        rows = [("#", "op", "name", "graph", "direction", "input_size", "hidden_size", "layout")]
        rows += [(str(n.index), n.op_type, n.name or "(unnamed)", n.graph, n.direction,
                  "?" if n.input_size is None else str(n.input_size),
                  "?" if n.hidden_size is None else str(n.hidden_size), str(n.layout)) for n in items]
        _print_table(rows)
        return 0
    rows = [("#", "type", "name", "direction", "input_size", "units", "layers", "dtype", "options")]
    rows += [(str(k.index), k.type, k.path, k.direction,
              "?" if k.input_size is None else str(k.input_size), str(k.units), str(k.num_layers),
              k.options.get("dtype", "?"),
              ", ".join(f"{o}={v!r}" for o, v in k.changed_options.items()) or "-")
             for k in items]
    _print_table(rows)
    for k in items:
        if k.mask:
            print(f"  #{k.index} is masked by {k.mask}: call the converted layer with lengths "
                  "(right-padded sequences)")
        if k.problem:
            print(f"  #{k.index} cannot be converted: {k.problem}")
    return 0


def _info(args):
    kind = _foreign(args.model)
    if kind is not None:
        return _info_foreign(args, kind)
    model = load(args.model)
    cfg = model.config()
    stored = model._stored_state_dict()
    rows = [("file", f"{args.model} ({_bytes(os.path.getsize(args.model))})"),
            ("cell", _CELL_NAMES[cfg["cell"]]),
            ("module", f"{cfg['module']} ({type(model).__name__})"),
            ("input_size", cfg["input_size"]),
            ("hidden_size", cfg["hidden_size"])]
    if cfg["module"] == "layer":
        if cfg["cell"] == "lstm":
            rows.append(("proj_size", cfg["proj_size"] or "0 (none)"))
        rows += [("num_layers", cfg["num_layers"]),
                 ("directions", "2 (bidirectional)" if cfg["bidirectional"] else
                  "1 (reverse: runs backwards in time)" if cfg.get("reverse") else "1"),
                 ("batch_first", cfg["batch_first"])]
    if "nonlinearity" in cfg:
        rows.append(("nonlinearity", cfg["nonlinearity"]))
    if "reset_after" in cfg:
        rows.append(("reset_after", f"{cfg['reset_after']} "
                                    f"({'PyTorch form' if cfg['reset_after'] else 'Cho et al. 2014 form'})"))
    rows += [("bias", cfg["bias"]), ("parameters", f"{_n_params(stored):,}"), ("dtype", cfg["dtype"]),
             ("weights", _FORMAT_NAMES.get(model.weight_format, model.weight_format)),
             *([("input_bits", f"{model.input_bits} (each layer's input x is quantized to "
                               f"{model.input_bits} bits per row on every call, h to 8)")]
               if model.input_bits is not None else []),
             ("in file", f"{_bytes(_stored_bytes(stored))} of weights"),
             ("in memory", f"{_bytes(model.weight_bytes)} of weights (as stored and as packed "
                           "for the kernels)")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _n_params(stored):
    """Parameters of a model's weights as kept (shapes only: nothing dequantized to count them)."""
    return sum(math.prod(v.shape) for v in stored.values())


def _stored_bytes(stored):
    """Bytes of the weights as kept, the same as the tensors' bytes in the file."""
    return sum(int(v.nbytes) for v in stored.values())


_FORMAT_NAMES = {
    "int8": "int8 matrices with one float32 scale per output row; other parameters float32",
    "bf16": "bf16 matrices; other parameters float32",
}


_CELL_NAMES = {"rnn": "rnn (vanilla RNN)", "gru": "gru", "lstm": "lstm",
               "peephole_lstm": "peephole_lstm (LSTM with peephole connections)"}


def _bytes(n):
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}, {n:,} bytes"
    return f"{n} bytes"


# ---- run ----

def _load_npy(path, option):
    """An .npy array, memory-mapped (so a header claiming a huge shape is checked against the file
    size instead of allocated), never unpickled."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError) as exc:
        raise CliError(f"{option} {path}: cannot read as .npy ({_one_line(exc)})") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        arr.close()
        raise CliError(f"{option} {path}: expected an .npy file (one array), got an .npz archive")
    return arr


def _run(args):
    kind = _foreign(args.model)
    if kind is not None:
        raise CliError(f"{args.model} is {kind.what}; convert it first: fastcell export "
                       f"{args.model} OUT.safetensors [{kind.option} NAME]")
    model = load(args.model)
    x = _load_npy(args.input, "--input")
    lengths = None if args.lengths is None else _load_npy(args.lengths, "--lengths")
    cfg = model.config()
    is_layer = cfg["module"] == "layer"
    if lengths is not None and not is_layer:
        raise CliError("--lengths: only for layers; this file holds a single cell")

    # The time axis, for chunking; shapes are checked by the model itself.
    time_axis = 1 if (is_layer and cfg["batch_first"] and x.ndim == 3) else 0
    T = x.shape[time_axis] if x.ndim >= 1 else 0
    n_params = _n_params(model._stored_state_dict())
    work = n_params * max(1, math.prod(x.shape[:-1]) if x.ndim else 1)
    progress = args.progress if args.progress is not None else (sys.stderr.isatty() and work >= _LONG_RUN)
    # Chunks carry the state across their boundary: exact for a one-directional model on full
    # sequences. A backward direction or per-sequence lengths need the whole sequence in one call.
    # An input of the wrong shape goes in whole, so the model's error names its real shape.
    chunkable = (not (is_layer and (cfg["bidirectional"] or cfg.get("reverse") or lengths is not None))
                 and x.ndim in (2, 3) and x.shape[-1] == cfg["input_size"])

    start = time.perf_counter()
    bar = _Progress(T, enabled=progress)
    try:
        if progress and chunkable and T > 1:
            out, state = _run_chunks(model, x, time_axis, T, is_layer, bar)
        else:
            out, state = _call(model, x, None, lengths, is_layer)
            bar.update(T)
    finally:
        bar.close()
    elapsed = time.perf_counter() - start

    states = state if isinstance(state, tuple) else (state,)
    names = ("h_n", "c_n")[: len(states)]
    desc = ", ".join(f"{n} {s.shape}" for n, s in zip(names, states))
    print(f"{type(model).__name__} {cfg['cell']}: input {tuple(x.shape)} {x.dtype} -> output "
          f"{out.shape} {out.dtype}; {desc}; {elapsed * 1e3:.1f} ms")
    if args.output:
        with open(args.output, "wb") as f:  # a file object: np.save would append ".npy"
            np.save(f, out)
        print(f"wrote {args.output}")
    else:
        flat = out.reshape(-1)
        print(f"output first values: {np.array2string(flat[:6], precision=5, separator=', ')}")
        print(f"output last values:  {np.array2string(flat[-6:], precision=5, separator=', ')}")
    if args.state_output:
        with open(args.state_output, "wb") as f:
            np.savez(f, **dict(zip(names, states)))
        print(f"wrote {args.state_output} ({', '.join(names)})")
    return 0


def _call(model, x, state, lengths, is_layer):
    if is_layer:
        return model(x, state, lengths=lengths)
    return model.run(x, state)


def _run_chunks(model, x, axis, T, is_layer, bar):
    step = max(64, -(-T // 100))
    outs, state = [], None
    for a in range(0, T, step):
        chunk = x[:, a:a + step] if axis == 1 else x[a:a + step]
        out, state = _call(model, chunk, state, None, is_layer)
        outs.append(out)
        bar.update(min(T, a + step))
    return np.concatenate(outs, axis=axis), state


class _Progress:
    """A one-line progress bar on stderr, redrawn at most ten times a second. Nothing is drawn
    before the first chunk is done, so an input the model refuses leaves only the error line."""

    def __init__(self, total, enabled):
        self.total, self.enabled, self.drawn = total, enabled, False
        self.start = self.last = time.perf_counter()

    def update(self, done):
        now = time.perf_counter()
        if self.enabled and (not self.drawn or now - self.last >= 0.1 or done >= self.total):
            self.last, self.drawn = now, True
            frac = done / self.total if self.total else 1.0
            filled = int(30 * frac)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {100 * frac:5.1f}% "
                             f"{done}/{self.total} steps {now - self.start:.1f} s")
            sys.stderr.flush()

    def close(self):
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ---- export ----


def _export(args):
    kind = _foreign(args.src)
    for other in _FOREIGN.values():
        if other is not kind and getattr(args, other.keyword) is not None:
            raise CliError(f"{other.option}: only for {other.what.split()[1]} models (SRC named "
                           f"*{other.suffix}), got {args.src}")
    model = _model_from_foreign(args, kind) if kind else _model_from_checkpoint(args)
    if args.weights or args.input_bits is not None:
        model = _reduced(model, args)
    save(model, args.dest)
    print(f"wrote {args.dest}: {model!r}, {_n_params(model._stored_state_dict()):,} parameters, "
          f"{_bytes(os.path.getsize(args.dest))}")
    return 0


def _model_from_foreign(args, kind):
    """The fastcell layer of one recurrent node of an ONNX model, or one recurrent layer (or a
    stack of them) of a Keras model: args.src."""
    given = [opt for opt, v in (("--nonlinearity", args.nonlinearity), ("--reset-after/--reset-before",
             args.reset_after), ("--batch-first", args.batch_first), ("--prefix", args.prefix))
             if v is not None]
    if given:
        says = ("an ONNX node's attributes say this (activations, linear_before_reset, layout)"
                if kind.option == "--node" else
                "a Keras layer's config says this (activation, reset_after; Keras is batch-first)")
        raise CliError(f"{given[0]}: only for PyTorch checkpoints; {says}")
    module = kind.load()
    chosen = getattr(args, kind.keyword)
    names = None

    def pick(value):   # an index, unless an item has that name
        nonlocal names
        if not value.isdigit():
            return value
        if names is None:
            names = {n for i in getattr(module, kind.lister)(args.src)
                     for n in ((i.name,) if kind.option == "--node" else (i.name, i.path))}
        return value if value in names else int(value)

    if isinstance(chosen, list):
        chosen = [pick(v) for v in chosen]
        chosen = chosen[0] if len(chosen) == 1 else chosen
    elif chosen is not None:
        chosen = pick(chosen)
    return getattr(module, kind.converter)(args.src, **{kind.keyword: chosen})


def _model_from_checkpoint(args):
    """The fastcell model of a PyTorch checkpoint (args.src) holding a state_dict, with the
    command's overrides."""
    from fastcell.convert.checkpoint import read_state_dict
    from fastcell.convert.state_dict import from_state_dict

    try:
        sd, notes = read_state_dict(args.src, args.prefix)
    except ImportError:
        raise CliError("export needs PyTorch to read the checkpoint: pip install torch") from None
    except ValueError as exc:
        if str(exc).startswith("prefix "):      # the option's name on the command line
            raise CliError(f"--{exc}") from None
        raise
    for note in notes:
        print(f"fastcell export: {note}", file=sys.stderr)
    overrides = {k: v for k, v in (("nonlinearity", args.nonlinearity),
                                   ("reset_after", args.reset_after),
                                   ("batch_first", args.batch_first)) if v is not None}
    return from_state_dict(sd, **overrides)


# ---- quantize ----

def _quantize(args):
    model = load(args.src)
    if model.weight_format in REDUCED_FORMATS:
        raise CliError(f"{args.src}: its weights are already {model.weight_format}; quantize the "
                       "float file it came from")
    before = _stored_bytes(model._stored_state_dict())
    reduced = _reduced(model, args)
    save(reduced, args.dest)
    after = _stored_bytes(reduced._stored_state_dict())
    print(f"wrote {args.dest}: {reduced!r}, weights {before:,} -> {after:,} bytes "
          f"({_bytes(os.path.getsize(args.dest))} file)")
    return 0


# ---- demo ----

def _demo(args):
    import importlib

    try:
        demo = importlib.import_module("fastcell.demo")
    except ModuleNotFoundError as exc:
        if exc.name == "fastcell.demo":
            raise CliError("the demo is not part of this installation") from None
        raise
    rc = demo.main()
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
