"""The torchrec integration ships in the wheel, stays optional, and CI installs it (no torchrec needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_ships_integrations_and_a_cpu_safe_extra() -> None:
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # every subpackage ships (integrations included): found on disk, checked module by module in test_packaging
    assert meta["tool"]["setuptools"]["packages"]["find"]["include"] == ["sharded_shampoo", "sharded_shampoo.*"]
    extra = meta["project"]["optional-dependencies"]["torchrec"]
    # listing torchrec or fbgemm-gpu would make pip resolve the CUDA fbgemm-gpu, which fails on CPU
    assert not any(req.startswith(("torchrec", "fbgemm")) for req in extra), extra
    ci = (ROOT / ".ci" / "run").read_text()
    assert ",torchrec]" in ci and "--no-deps fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0" in ci
    assert "SHARDED_SHAMPOO_REQUIRE_TORCHREC=1" in ci


def test_core_import_does_not_import_torchrec() -> None:
    code = "import sys, sharded_shampoo, sharded_shampoo.integrations; print('torchrec' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False"
