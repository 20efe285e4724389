"""The benchmark's own tests (its parity checks, its accounting, its output files): no timing, so
the repository's `pytest` runs them with the library's tests (pyproject.toml's testpaths)."""
