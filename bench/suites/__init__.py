"""The pytest-benchmark timing suites, run only when asked for: `python -m pytest bench/suites`."""
