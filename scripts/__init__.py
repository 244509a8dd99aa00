"""Runnable examples (train.py, train_dlrm.py, compare_optimizers.py) and, below, benchmarks/ and tools/."""
