"""Skip the torchrec tests where torchrec is not installed -- except in CI, where that is an error.

``.ci/run`` installs torchrec and sets ``SHARDED_SHAMPOO_REQUIRE_TORCHREC=1``, so a broken install
fails the run instead of silently skipping the tests.
"""

from __future__ import annotations

import importlib
import os

import pytest


def require_torchrec() -> None:
    for name in ("torchrec", "fbgemm_gpu"):
        if os.environ.get("SHARDED_SHAMPOO_REQUIRE_TORCHREC"):
            importlib.import_module(name)
        else:
            pytest.importorskip(name)
