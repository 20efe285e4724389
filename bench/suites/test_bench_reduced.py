"""Reduced weight formats, LSTM: fastcell's int8 and bf16 weights against its float32 and PyTorch's
and ONNX Runtime's dynamic int8, at the shapes of REDUCED_SCENARIOS (streaming steps at B = 1
and 1024, T = 100 sequences, T = 50 batches), I = H; and fastcell's int8 with 8-bit inputs against
ONNX Runtime's int8 at those of INPUT8_SCENARIOS."""

import pytest

from bench.scenarios import INPUT8_SCENARIOS, REDUCED_SCENARIOS, case_id, cases

CASES = cases(scenarios=REDUCED_SCENARIOS)
INPUT8_CASES = cases(scenarios=INPUT8_SCENARIOS)


@pytest.mark.parametrize("kind, sc, competitor", CASES, ids=map(case_id, CASES))
def test_reduced(run_case, kind, sc, competitor):
    run_case(kind, sc, competitor)


@pytest.mark.parametrize("kind, sc, competitor", INPUT8_CASES, ids=map(case_id, INPUT8_CASES))
def test_input8(run_case, kind, sc, competitor):
    run_case(kind, sc, competitor)
