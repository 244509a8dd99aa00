"""Shared pytest configuration of the suite.

Layout: ``tests/test_*.py`` are the tests, one file per subject; ``tests/support/`` holds what they
share (numerical helpers, the multi-rank launcher, the scenarios that spawned ranks import, the fuzz
harness, the torchtitan/torchrec harnesses). Everything is imported by its full name
(``from tests.support.dist_utils import run_ranks``, ``from scripts import train``): pytest puts the
repository root on ``sys.path`` (``tests/`` is a package), spawned ranks inherit it, and no file edits
``sys.path``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


def pytest_report_header() -> str:
    """Name the torch build in the header: the suite runs on more than one (``.ci/run``)."""
    return f"torch {torch.__version__}"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test's in-process math with 1 thread, as the spawned ranks do (``run_ranks``).

    It also keeps the eigendecompositions of amortized steps fast on a loaded 2-core machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
