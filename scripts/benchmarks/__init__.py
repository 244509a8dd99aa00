"""Benchmarks, the cost-model calibration and the prepared GPU check; run from the repository root as ``python -m scripts.benchmarks.NAME``."""
