"""The built wheel installs `checkpointing/` as `sharded_shampoo.checkpointing`, never top-level."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    (whl,) = out.glob("sharded_shampoo-*.whl")
    return whl


def test_wheel_layout(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "sharded_shampoo/checkpointing/__init__.py" in names
    assert "sharded_shampoo/py.typed" in names
    assert "sharded_shampoo/integrations/torchtitan.py" in names
    assert not any(n.startswith("checkpointing/") for n in names), "no top-level checkpointing package"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "sharded-shampoo = sharded_shampoo.dryrun.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_imports_checkpointing(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    assert not (target / "checkpointing").exists()
    code = ("import sharded_shampoo, sharded_shampoo.checkpointing as c; "
            "print(sharded_shampoo.__file__); print(c.__file__)")
    # -I: isolated mode, so neither the repository nor an editable install can shadow the wheel
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
                         check=True, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    pkg_file, ckpt_file = res.stdout.split()
    assert pkg_file.startswith(str(target)) and ckpt_file.startswith(str(target)), res.stdout
