"""bench.team and bench.scaling run end to end on small shapes: every competitor is checked before
it is timed, the tables name every shape, and the scaling model recovers rates it was given.
Which library is faster is the machine's business: nothing here reads a time as a verdict."""

import pytest

from bench import scaling, team

TINY = dict(batch_ms=0.5, budget_s=0.01, min_rounds=2, max_rounds=2, settle_s=0.0)
SHAPES = (("sequence", 3, 1, 17), ("step", 1, 1, 17), ("sequence", 2, 3, 5))


@pytest.fixture(scope="module")
def rows():
    said = []
    return team.run(TINY, said.append, SHAPES), said


def test_every_shape_timed_with_fastcell_at_each_thread_count(rows):
    got, said = rows
    assert [r["shape"] for r in got] == list(SHAPES)
    for r in got:
        for fmt in ("float32", "int8", "bf16"):
            for n in team.THREADS:
                times = r["rounds"][team.label("fastcell", fmt, n)]
                assert len(times) == 2 and all(t > 0 for t in times)
        assert len(r["cores"]) == 2 and all(c > 0 for c in r["cores"])
    assert said[0] == team.shape_id(SHAPES[0])


def test_markdown_names_every_shape_and_target(rows):
    got, _ = rows
    text = team.markdown(got)
    for shape in SHAPES:
        assert text.count(f"| {team.shape_id(shape)} |") == 2       # times and ratios
    for what, value, ok in team.targets(got):
        assert f"| {what} | {value} | {ok} |" in text
        assert ok in ("yes", "**no**", "n/a")


def test_a_competitor_that_differs_is_refused():
    # fastcell at 2 threads must give the bytes of 1 thread: here its "2 threads" has other weights
    sh = team.Shape(("sequence", 3, 1, 17))
    other = team.Shape(("sequence", 3, 1, 17), seed=9)
    wrong = ("fastcell", "float32", 2)
    sh.call = lambda *c: team.Shape.call(other if c == wrong else sh, *c)
    with pytest.raises(AssertionError, match="fastcell float32 2t: not the bytes of 1 thread"):
        team.competitors(sh, lambda _: None)


def test_the_scaling_model_recovers_its_rates():
    l2, sync = 4 << 20, 60e-9
    true = scaling.Model({"float32": 80e9, "int8": 40e9}, {"float32": 20e9, "int8": 12e9}, sync, l2)
    rows = [{"shape": ("sequence", 100, 1, H),
             "per_call": {f"fastcell {f} {n}t": 100 * true.step(H, f, n)
                          for f in scaling.BYTES for n in (1, 2)}}
            for H in (256, 512, 1024)]
    res = scaling.fit_and_predict(rows, sync, l2)
    for H, f, n, measured, predicted in res["check"]:
        assert predicted == pytest.approx(measured, rel=1e-12), (H, f, n)
    # a slice that fits in L2 only once split: more than twice as fast on two cores
    t = res["predict"][(512, "float32")]
    assert t[0] / t[1] > 2
    text = scaling.scaling_markdown(res)
    assert "| H=512 float32 | 2 |" in text and "64 cores" in text


def test_the_scaling_model_needs_both_sides_of_l2():
    rows = [{"shape": ("sequence", 10, 1, 64),
             "per_call": {f"fastcell {f} {n}t": 1e-4 for f in scaling.BYTES for n in (1, 2)}}]
    with pytest.raises(ValueError, match="inside and beyond one L2"):
        scaling.fit(rows, 1e-7, 2 << 20)
