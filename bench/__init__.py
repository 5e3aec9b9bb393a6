"""Benchmarks for uniformer_kernels: timing harness, model shapes, results writer, bench_*.py files.

Run them with pytest from the repository root, e.g. ``python -m pytest bench/bench_models.py -s``
(see bench/README.md). They are not tests: the repository's test run does not collect them.
"""
