"""Measurements of generation speed and memory, and the reports (table, JSON, CSV, plots) made from them.

`toyllm bench` (toyllm/cli/bench.py) is the command line; BENCHMARKS.md holds the numbers for this repository's
reference machine and docs/decoding_performance.md explains them.
"""
