"""The built wheel holds every library module, and installs `checkpointing/` only as `sharded_shampoo.checkpointing`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def library_modules() -> set[str]:
    """Every module file of the library in the checkout, as its path inside the wheel.

    Read from the folders themselves (not from the packaging config), so a module or subpackage that
    the build drops is missing from the wheel and fails the test.
    """
    found = set()
    for folder, installed_as in (("sharded_shampoo", "sharded_shampoo"), ("checkpointing", "sharded_shampoo/checkpointing")):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder)
            if folder == "sharded_shampoo" and rel.parts[0] == "checkpointing":
                continue                                   # the link to ../checkpointing: counted below
            found.add(f"{installed_as}/{rel.as_posix()}")
    return found


def test_wheel_ships_every_module_and_installs_no_top_level_checkpointing(tmp_path: Path) -> None:
    # built from a copy without the checkout's build/ folder: setuptools reuses build/lib, so a module
    # renamed or deleted since the last local build would otherwise still be shipped (and fail here)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "checkpoints"))
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("sharded_shampoo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = library_modules()
    assert len(expected) > 50 and "sharded_shampoo/checkpointing/storage.py" in expected
    assert expected - names == set(), f"modules missing from the wheel: {sorted(expected - names)}"
    assert {n for n in names if n.endswith(".py")} == expected, "the wheel holds a module the checkout does not"
    assert "sharded_shampoo/py.typed" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "sharded-shampoo = sharded_shampoo.dryrun.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    # installed: no generic top-level `checkpointing`, and the subpackage imports from the installed copy
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith((".dist-info", "bin"))) == ["sharded_shampoo"]
    code = ("import importlib.util, sys, sharded_shampoo, sharded_shampoo.checkpointing as c; "
            "assert 'checkpointing' not in sys.modules; "
            "print(sharded_shampoo.__file__); print(c.__file__); print(importlib.util.find_spec('checkpointing'))")
    # -E -s: no PYTHONPATH and no user site; run in `target`, which `-c` puts first on the child's
    # path, so neither the repository nor an editable install can shadow the installed wheel
    res = subprocess.run([sys.executable, "-E", "-s", "-c", code], check=True, capture_output=True, text=True,
                         cwd=target, env=dict(os.environ), timeout=120)
    pkg_file, ckpt_file, top_level = res.stdout.split()
    assert pkg_file.startswith(str(target)) and ckpt_file.startswith(str(target)), res.stdout
    assert top_level == "None", "a top-level `checkpointing` module is importable"
