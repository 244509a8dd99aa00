"""Each stage imports only what its ``__init__`` docstring allows (docs/design.md's module map)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: stage -> the library modules (prefixes) its modules may import, besides their own stage
#: (``config`` is the config modules: config, averaging_config, the Shampoo-family options and their checks)
CONFIG = ("config", "averaging_config", "shampoo_options", "checks")
ALLOWED = {
    # compute.kinds: each preconditioner kind describes its state fields and costs once, for the bucket and the planner
    "planning": (*CONFIG, "_torch_compat", "compute.kinds"),
    "compute": (*CONFIG, "planning.blocking", "_torch_compat", "profiling"),
    "runtime": ("planning", "compute", *CONFIG, "param_groups", "update_options", "_torch_compat", "profiling"),
    # compute.kinds: the config classes of the kinds the CLI can name (--preconditioner) live beside their kind
    "dryrun": ("planning", "runtime.placements", *CONFIG, "_torch_compat", "compute.kinds"),
    "checkpointing": ("", *CONFIG, "_torch_compat",         # "": the public API, ``from sharded_shampoo import``
                      "compute.packing"),                   # a checkpoint's symmetric state in the other layout
    "config": ("averaging_config", "shampoo_options", "checks"), "averaging_config": ("checks",), "checks": (),
    "shampoo_options": ("checks",), "_torch_compat": (),
    "update_options": CONFIG, "param_groups": (*CONFIG, "update_options"),
    # the optimizer's own policy helpers (group membership, root schedule): plain Python, no library imports
    "membership": (), "root_schedule": (),
    # the named profiler ranges of a step's phases (used by compute/ and runtime/)
    "profiling": ("_torch_compat",),
}
#: nothing in the library may import these (the outer stages)
OUTERMOST = ("integrations", "checkpointing", "dryrun")


def stage_modules() -> list[tuple[str, str, Path]]:
    """(stage, dotted module name without the ``sharded_shampoo.`` prefix, path) of every library module."""
    out = []
    for path in sorted((ROOT / "sharded_shampoo").rglob("*.py")) + sorted((ROOT / "checkpointing").glob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("").parts
        if rel[0] == "sharded_shampoo" and len(rel) > 1 and rel[1] == "checkpointing":
            continue                                       # the link to ../checkpointing
        parts = list(rel[1:]) if rel[0] == "sharded_shampoo" else list(rel)
        if parts and parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        out.append((parts[0] if parts else "", name, path))
    return out


def imported(name: str, path: Path) -> set[str]:
    """Library modules ``path`` imports anywhere (also inside functions), without the package prefix."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
                found.add(".".join(base))
            elif node.module and node.module.split(".")[0] == "sharded_shampoo":
                found.add(node.module.removeprefix("sharded_shampoo").lstrip("."))
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("sharded_shampoo").lstrip(".") for a in node.names
                         if a.name.split(".")[0] == "sharded_shampoo")
    return found


MODULES = stage_modules()


def test_every_module_belongs_to_a_known_place() -> None:
    assert len(MODULES) > 50
    known = set(ALLOWED) | set(OUTERMOST) | {"", "optimizer"}
    assert {stage for stage, _, _ in MODULES} <= known


@pytest.mark.parametrize("stage, name, path", MODULES, ids=[m[1] or "sharded_shampoo" for m in MODULES])
def test_imports_follow_the_stage_contract(stage: str, name: str, path: Path) -> None:
    for target in imported(name, path):
        here = target.split(".")[0]
        if here == stage or stage in ("integrations", "", "optimizer"):
            if stage in ("", "optimizer"):
                assert here not in OUTERMOST, f"{name} imports {target}: an outer stage"
            continue
        assert stage in ALLOWED, name
        assert any(target == a or target.startswith(a + ".") or (a == "" and target == "") for a in ALLOWED[stage]), \
            f"{name} (stage {stage}) imports {target or 'sharded_shampoo'}; its stage may import {ALLOWED[stage]}"


def test_design_doc_maps_every_module() -> None:
    design = (ROOT / "docs" / "design.md").read_text()
    missing = []
    for _, _, path in MODULES:
        if path.name == "__init__.py":
            continue
        shown = path.relative_to(ROOT / ("checkpointing" if path.parent.name == "checkpointing" else "sharded_shampoo"))
        shown_as = f"checkpointing/{shown}" if path.parent.name == "checkpointing" else str(shown)
        if f"`{shown_as}`" not in design:
            missing.append(shown_as)
    assert missing == [], f"docs/design.md has no line for {missing}"
