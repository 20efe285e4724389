"""fastcell's benchmarks against PyTorch, ONNX Runtime and the bare BLAS floor (issue 4).

    python -m pytest bench/suites -q   # the pytest-benchmark suites, grouped per (cell, shape)
    python -m bench.report             # one interleaved run -> bench/RESULTS.md, bench/results.png
    python -m bench.report --only int8 --quick   # a part of it (here the int8/bf16 groups), no files
    pytest bench/tests                 # the bench's own tests (the repository's pytest runs them)

Bench-only requirements: bench/requirements.txt.
"""
