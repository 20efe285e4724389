"""bench.report's int8-with-8-bit-inputs rows (INPUT8_SCENARIOS): their pair ratios, their own
table and their targets, from made-up samples (no timing here)."""

from bench import report
from bench.scenarios import INPUT8_SCENARIOS, competitor


def row_of(sc, samples, errors):
    steps = {c: sc.T for c in samples}
    return {"kind": "lstm", "mode": sc.mode, "T": sc.T, "B": sc.B, "H": sc.H,
            "formats": list(sc.formats), "competitors": list(sc.competitors), "rounds": 3,
            "max_abs_diff": 0.0, "error": errors,
            "median_s": {c: v[0] for c, v in samples.items()}, "steps": steps,
            "ratio": report.ratios(sc, samples, steps), "notes": {}}


def test_input8_rows():
    sc = INPUT8_SCENARIOS[0]
    assert competitor("fastcell", "int8x8") in sc.competitors and "int8x8" in sc.formats
    # three rounds: ONNX Runtime int8 takes 1.5x, 1.2x and 1.4x fastcell int8x8's time
    samples = {"fastcell": [4.0, 4.0, 4.0], "fastcell-int8": [2.4, 2.4, 2.4],
               "fastcell-int8x8": [2.0, 2.0, 2.0], "onnxruntime-int8": [3.0, 2.4, 2.8]}
    errors = {"fastcell-int8": 4e-3, "fastcell-int8x8": 8e-3, "onnxruntime-int8": 2e-2}
    row = row_of(sc, samples, errors)
    assert row["ratio"]["onnxruntime-int8/fastcell-int8x8"] == 1.4          # the median
    assert row["ratio"]["fastcell-int8/fastcell-int8x8"] == 1.2
    assert row["ratio"]["fastcell-int8x8"] == 2.0                           # float32 / int8x8
    assert report.is_input8(row)
    table = "\n".join(report.input8_section([row]))
    assert "| LSTM | 1 | 1024 | 128 | " in table and "| 1.40× | 1.20× | 2.00× | 4.0e-03 | 8.0e-03 | 2.0e-02 |" in table
    got = {what: (value, ok) for what, value, ok in report.targets([row], {})}
    assert got["LSTM, step B=1024 H=128, int8 x8: ≥ 1.3× ONNX Runtime int8"] == ("1.40×", "met")
    assert got["LSTM, step B=1024 H=128, int8 x8: error ≤ ONNX Runtime int8's"] == ("8.0e-03 vs 2.0e-02", "met")
    row["error"]["fastcell-int8x8"] = 3e-2
    got = {what: ok for what, _, ok in report.targets([row], {})}
    assert got["LSTM, step B=1024 H=128, int8 x8: error ≤ ONNX Runtime int8's"] == "**not met**"
