"""Benchmarks, the cost-model calibration and the prepared GPU check.

Run from the repository root as ``python -m scripts.benchmarks.NAME`` (results: docs/benchmarks.md).
"""
