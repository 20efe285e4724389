"""Reading a PyTorch checkpoint that holds a state_dict, safely: ``read_state_dict(path, prefix)``.

The file is read with ``torch.load(..., weights_only=True)``, a restricted unpickler that builds
tensors and plain containers only, so a checkpoint cannot run code; a file it refuses (a whole
module saved with ``torch.save(model)``, say) is refused here too, never retried otherwise. A
training checkpoint holding the state_dict under a usual key, and a model whose recurrent layer is
one of its submodules (``prefix``), are taken as well. Needs torch (the caller's: fastcell never
imports it otherwise).
"""

import pickle
import re
import warnings

from fastcell.io.weights_file import FormatError

__all__ = ["read_state_dict", "NESTED_KEYS"]

NESTED_KEYS = ("state_dict", "model_state_dict", "model")


def read_state_dict(path, prefix=None):
    """(state_dict, notes): the name -> tensor mapping of the checkpoint at path (under `prefix`,
    which is cut from the names), and notes on what was chosen (for a caller to show). ImportError
    without torch; FormatError for a file that is not such a checkpoint; ValueError for a prefix
    that matches nothing or a checkpoint of several modules without one; OSError as open()."""
    try:
        import torch
    except ImportError:
        raise ImportError("reading a PyTorch checkpoint needs PyTorch: pip install torch") from None
    try:
        # weights_only=True: tensors and plain containers only. Never retried without it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol notes are noise here
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except OSError:
        raise
    except pickle.UnpicklingError as exc:
        raise FormatError(
            f"{path}: refused by torch.load(weights_only=True), which builds only tensors and "
            f"plain containers ({_why(str(exc))}); fastcell never unpickles anything else. If "
            "it is a whole module saved with torch.save(model), save its weights instead with "
            "torch.save(model.state_dict(), PATH) and export that file") from None
    except Exception as exc:  # torch's zip reader raises RuntimeError and others on non-checkpoints
        first = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise FormatError(f"{path}: not a PyTorch checkpoint ({first})") from None
    notes = []
    return _state_dict(obj, path, prefix, torch, notes), notes


def _why(message):
    """The informative part of torch's weights_only refusal: the object it would have built."""
    m = re.search(r"GLOBAL ([\w.]+)", message)
    if m:
        return f"the file asks for the Python object {m.group(1)}"
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    reason = next((ln for ln in lines if "Unsupported" in ln), lines[0] if lines else "no reason given")
    return reason.removeprefix("WeightsUnpickler error: ")[:200]


def _state_dict(obj, path, prefix, torch, notes):
    """The name -> tensor mapping, from a state_dict or a checkpoint dict holding one under a
    usual key, and the prefix."""
    def is_sd(d):
        return isinstance(d, dict) and d and all(isinstance(v, torch.Tensor) for v in d.values())

    if isinstance(obj, dict) and not is_sd(obj):
        nested = [k for k in NESTED_KEYS if is_sd(obj.get(k))]
        if nested:
            notes.append(f"using the state_dict under {nested[0]!r}")
            obj = obj[nested[0]]
    if not is_sd(obj):
        if isinstance(obj, dict):
            other = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
            raise FormatError(f"{path}: expected a state_dict (names to tensors), got a dict with "
                           f"non-tensor entries: {', '.join(map(str, other[:5]))}"
                           if obj else f"{path}: the checkpoint is an empty dict")
        raise FormatError(f"{path}: expected a state_dict (names to tensors), got "
                       f"{type(obj).__name__}; save one with torch.save(model.state_dict(), PATH)")
    sd = {str(k): v for k, v in obj.items()}
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not sd:
            raise ValueError(f"prefix {prefix!r}: no entry starts with it; the entries are "
                           f"{', '.join(list(obj)[:6])}{' ...' if len(obj) > 6 else ''}")
        return sd
    prefixes = sorted({k.rsplit(".", 1)[0] + "." for k in sd if "." in k})
    if len(prefixes) == 1 and all("." in k for k in sd):
        # One submodule, e.g. everything under "lstm." or DataParallel's "module.".
        notes.append(f"using the entries under {prefixes[0]!r}")
        return {k[len(prefixes[0]):]: v for k, v in sd.items()}
    if prefixes:
        recurrent = [p for p in prefixes if p + "weight_hh" in sd or p + "weight_hh_l0" in sd]
        raise FormatError(f"{path}: the checkpoint holds several modules "
                       f"({', '.join(prefixes[:6])}{' ...' if len(prefixes) > 6 else ''}); choose "
                       f"the recurrent one with its prefix (prefix=, or on the command line "
                         f"--prefix {(recurrent or prefixes)[0]})")
    return sd


