"""Batches: T = 50 with B = 16, H = 256 and B = 64, H = 512 per call, I = H."""

import pytest

from bench.scenarios import case_id, cases


@pytest.mark.parametrize("kind, sc, competitor", cases("batch"), ids=map(case_id, cases("batch")))
def test_batch(run_case, kind, sc, competitor):
    run_case(kind, sc, competitor)
