"""Benchmarks run only when asked for: `python -m pytest bench/suites -q` (the repository's
testpaths, tests/ and bench/tests/, leave this folder out, so a plain `pytest` never collects
them). Float32, one thread on every side."""

import pytest

from bench.scenarios import group_name, runners_for, single_threaded

WARMUP_CALLS = 3


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    with single_threaded():
        yield


@pytest.fixture
def run_case(benchmark):
    """Times one competitor of one (cell, scenario); all competitors of it share a group."""

    def run(kind, sc, competitor):
        r = runners_for(kind, sc)[competitor]
        if not r.available:
            pytest.skip(r.reason)
        benchmark.group = group_name(kind, sc)
        benchmark.extra_info.update(cell=kind, scenario=sc.mode, T=sc.T, B=sc.B, H=sc.H,
                                    competitor=competitor, steps=r.steps, note=r.note)
        for _ in range(WARMUP_CALLS):
            r.fn()
        benchmark(r.fn)

    return run

