"""The competitors compute what fastcell computes, since a benchmark against one that computes
something else is worthless: check_parity() runs every float32 competitor against fastcell at a
few shapes of its own (bench.report runs it first), and verify() checks the calls of one timed
(cell, scenario) themselves, the reduced weight formats against PyTorch's float32 model.
"""

import numpy as np

from bench.models import KINDS, LABELS, Models, get_models
from bench.scenarios import COMPETITORS, Scenario, make_runner, split_competitor

PARITY_TOL = 1e-4
# A reduced model further than this (max abs difference of outputs and states, which lie in
# [-1, 1] for h) from PyTorch's float32 model on the same weights computes something else.
REDUCED_TOL = 0.1


# Shapes check_parity() covers: a long batch-1 sequence (errors compound over time), a batched
# sequence and a batched step, at the benchmark's smallest and a larger H.
PARITY_CASES = (("sequence", 100, 1, 64), ("sequence", 20, 3, 256), ("step", 1, 2, 64))


def check_parity(kinds=KINDS, cases=PARITY_CASES, tol=PARITY_TOL):
    """Runs PyTorch and ONNX Runtime against fastcell on the same weights, inputs and states.

    Returns {(kind, case, competitor): max abs difference over outputs and final states};
    raises AssertionError naming every pair beyond tol. Missing competitors are left out.
    """
    diffs, bad = {}, []
    for kind in kinds:
        for mode, T, B, H in cases:
            sc = Scenario(mode, T, B, H)
            m = Models(kind, H, H, seed=1)
            want = make_runner(m, sc, "fastcell").results()
            for comp in COMPETITORS:
                if comp in ("fastcell", "floor"):
                    continue
                r = make_runner(m, sc, comp)
                if not r.available:
                    continue
                d = _max_abs_diff(r.results(), want)
                diffs[(kind, sc.id, comp)] = d
                if not d <= tol:
                    bad.append(f"{comp} vs fastcell, {LABELS[kind]} {sc.id}: max abs diff {d:.3g}")
    if bad:
        raise AssertionError("competitor models disagree with fastcell (tol %g):\n  %s"
                             % (tol, "\n  ".join(bad)))
    return diffs


def _max_abs_diff(got, want):
    return max(float(np.max(np.abs(got[k] - want[k]))) for k in want if k in got)


def verify(kind, sc, runners):
    """The benchmarked calls themselves, checked once before timing: every float32 competitor
    agrees with fastcell within PARITY_TOL; a reduced-format one is within REDUCED_TOL of
    PyTorch's float32 model on the same weights and inputs (of fastcell's float32 model, which
    agrees with it, where PyTorch is missing).

    Returns (worst float32 difference, {reduced-format competitor: max abs error})."""
    want = runners["fastcell"].results()
    worst, errors, reference = 0.0, {}, None
    for comp, r in runners.items():
        library, fmt = split_competitor(comp)
        if comp == "fastcell" or library == "floor" or not r.available:
            continue
        got = r.results()
        if fmt == "float32":
            d = _max_abs_diff(got, want)
            if not d <= PARITY_TOL:
                raise AssertionError(f"{comp} disagrees with fastcell on {LABELS[kind]} {sc.id}: {d:.3g}")
            worst = max(worst, d)
            continue
        if reference is None:
            ref = make_runner(get_models(kind, sc.I, sc.H), sc, "pytorch")
            reference = ref.results() if ref.available else want
            worst = max(worst, _max_abs_diff(want, reference))
        errors[comp] = _max_abs_diff(got, reference)
        if not errors[comp] <= REDUCED_TOL:
            raise AssertionError(f"{comp} is {errors[comp]:.3g} from float32 on {LABELS[kind]} "
                                 f"{sc.id}: not the same model")
    return worst, errors
