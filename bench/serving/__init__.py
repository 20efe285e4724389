"""The real-time serving benchmark, `python -m bench.serve` (bench/serve.py: what it measures, its
options), in its parts:

    load.py      the load: every stream's frames and sessions, drawn in advance (Schedule)
    engines.py   the engines served, one class per way of serving, and ENGINES (--engines)
    drivers.py   the loops that play a schedule on an engine in real time, recording every frame
    harness.py   the accounting, the statistics, the parity check and the search for the largest N
    report.py    the output: bench/RESULTS.md's serve section and bench/serve.png
"""
