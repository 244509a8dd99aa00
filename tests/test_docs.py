"""Every Python block of README.md and docs/ runs as written; every quoted command output is current.

A block may say, on the line before its fence, what it needs: ``<!-- doc-test: context=NAME -->``
(names it may assume, from ``tests/support/doc_contexts.py``: a model, an optimizer, a torchtitan
config) or ``<!-- doc-test: fragment (why) -->`` (not run: it needs e.g. a multi-rank torchrec
model). The blocks of one file run in order in one working directory, so a later block may read
the checkpoint an earlier one wrote. Quoted outputs: ``scripts/tools/doc_outputs.py --check``
(run by ``.ci/run``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.support.doc_contexts import CONTEXTS

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?:<!-- doc-test: (?P<marker>[^>]*?) -->[ \t]*\n)?^```python[ \t]*\n(?P<code>.*?)^```[ \t]*$",
                   re.S | re.M)


def python_blocks() -> list[tuple[str, str, str]]:
    """(file:line, marker, code) of every ```python block."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        for m in BLOCK.finditer(text):
            line = text[:m.start("code")].count("\n")
            found.append((f"{path.relative_to(ROOT)}:{line}", m["marker"] or "", m["code"]))
    return found


BLOCKS = python_blocks()


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {}


def test_the_docs_have_python_blocks_and_every_marker_is_known() -> None:
    assert len(BLOCKS) >= 15
    for where, marker, _ in BLOCKS:
        assert marker == "" or marker.startswith("fragment") or marker.removeprefix("context=") in CONTEXTS, \
            f"{where}: unknown doc-test marker {marker!r}"


@pytest.mark.parametrize("where, marker, code", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_python_block_runs(where: str, marker: str, code: str, workdirs: dict[str, Path],
                           tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    if marker.startswith("fragment"):
        pytest.skip(f"marked as a fragment: {marker}")
    context = marker.removeprefix("context=") if marker else None
    if context == "torchtitan":
        pytest.importorskip("torchtitan")
    doc = where.split(":")[0]
    if doc not in workdirs:
        workdirs[doc] = tmp_path_factory.mktemp(doc.replace("/", "_"))
    monkeypatch.chdir(workdirs[doc])
    names, undo = CONTEXTS[context]() if context else ({}, lambda: None)
    try:
        exec(compile(code, where, "exec"), {"__name__": "__doc_block__", **names})
    finally:
        undo()
    assert os.getcwd() == str(workdirs[doc])


def test_every_script_module_and_test_file_the_docs_name_exists() -> None:
    missing, checked = [], 0
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        modules = re.findall(r"python3? -m (scripts(?:\.\w+)+)", text)
        modules += re.findall(r"torchrun [^\n`]*?-m (scripts(?:\.\w+)+)", text)
        checked += len(modules)
        for module in modules:   # NAME: a placeholder
            if not module.split(".")[-1].isupper() and not (ROOT / (module.replace(".", "/") + ".py")).is_file():
                missing.append(f"{path.name}: {module}")
        files = re.findall(r"(?<![\w/.])((?:scripts|tests)/[\w/]+\.(?:py|sh))", text)
        checked += len(files)
        for file in files:
            if not (ROOT / file).is_file():
                missing.append(f"{path.name}: {file}")
    assert checked > 50 and missing == [], "the docs name scripts or tests that do not exist:\n" + "\n".join(missing)
