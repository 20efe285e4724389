"""Streaming step: one step of one stream per call, T = 1, B = 1, I = H.

The floor runs its GEMV FLOOR_MIN_STEPS times per call (extra_info["steps"]): divide by that for
the bare per-step product."""

import pytest

from bench.scenarios import case_id, cases


@pytest.mark.parametrize("kind, sc, competitor", cases("step"), ids=map(case_id, cases("step")))
def test_step(run_case, kind, sc, competitor):
    run_case(kind, sc, competitor)
