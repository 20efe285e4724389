"""fastcell's benchmarks against PyTorch, ONNX Runtime and the bare BLAS floor (issue 4).

    python -m pytest bench -q      # the pytest-benchmark suites, grouped per (cell, shape)
    python -m bench.report         # one interleaved run -> bench/RESULTS.md, bench/results.png
    python -m bench.report --only int8 --quick   # a part of it (here the int8/bf16 groups), no files

Bench-only requirements: bench/requirements.txt.
"""
