"""Sequence: a whole T = 100, B = 1 sequence per call, I = H."""

import pytest

from bench.scenarios import case_id, cases


@pytest.mark.parametrize("kind, sc, competitor", cases("sequence"), ids=map(case_id, cases("sequence")))
def test_sequence(run_case, kind, sc, competitor):
    run_case(kind, sc, competitor)
