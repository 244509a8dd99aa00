"""List the reference Distributed Shampoo's arguments and config classes the user guide's mapping table omits.

    python -m scripts.tools.check_reference_mapping --reference /work/ref   # exit 1 naming each omission

The user guide promises that its table "Switching from the reference Distributed Shampoo" maps every
argument of the reference's ``DistributedShampoo.__init__`` and every config class of its
``shampoo_types.py`` and ``preconditioner/matrix_functions_types.py`` to ours (or says why not). The
reference changes; this keeps the promise checkable. It reads the reference's source with ``ast``
(nothing of the reference is imported or installed, so its torch version does not matter) and
counts a name as mapped when it appears inside backticks in the table's first column (the
reference's side; prose below the table and our column do not count).

Config classes are the public classes of those two modules that are dataclasses (``@dataclass`` in
any spelling, a subclass of one, or a subclass of a ``make_dataclass(...)`` result) or enums
(a subclass of ``Enum``, ``IntEnum``, ``StrEnum`` or ``Flag``); exceptions and helpers are not.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "user_guide.md"
SECTION = "## Switching from the reference Distributed Shampoo"
OPTIMIZER_MODULE = Path("distributed_shampoo.py")
CONFIG_MODULES = (Path("shampoo_types.py"), Path("preconditioner") / "matrix_functions_types.py")
ENUM_BASES = {"Enum", "IntEnum", "StrEnum", "Flag", "IntFlag"}
IDENTIFIER = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*")  # not the e of 1e-2
CELL_SPLIT = re.compile(r"(?<!\\)\|")


@dataclass(frozen=True)
class ReferenceNames:
    """What the mapping table must mention: ``__init__`` arguments and config class names, in source order."""

    arguments: tuple[str, ...]
    config_classes: tuple[str, ...]


def package_dir(reference: Path) -> Path:
    """The reference's ``distributed_shampoo`` package directory (``reference`` may be it or its checkout root)."""
    for candidate in (reference / "distributed_shampoo", reference):
        if (candidate / OPTIMIZER_MODULE).is_file():
            return candidate
    raise FileNotFoundError(f"--reference {reference}: no distributed_shampoo/{OPTIMIZER_MODULE} under it; pass the "
                            "reference checkout (the folder holding distributed_shampoo/) or that package folder.")


def _parse(path: Path) -> ast.Module:
    if not path.is_file():
        raise FileNotFoundError(f"reference module {path} is missing; is --reference a Distributed Shampoo checkout?")
    return ast.parse(path.read_text(), filename=str(path))


def init_arguments(module: ast.Module, class_name: str = "DistributedShampoo") -> tuple[str, ...]:
    """Every parameter name of ``class_name.__init__`` except ``self`` (positional, keyword-only, ``*``/``**``)."""
    for node in module.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    a = item.args
                    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
                    names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
                    return tuple(n for n in names if n != "self")
            raise ValueError(f"class {class_name} defines no __init__ in the reference source.")
    raise ValueError(f"the reference source defines no class {class_name}.")


def _last_name(node: ast.expr) -> str | None:
    """``dataclass`` for ``dataclass``, ``dataclasses.dataclass``, ``dataclass(...)`` and the like."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _made_dataclasses(module: ast.Module) -> set[str]:
    """Module-level names bound to ``make_dataclass(...)`` (classes built without a ``class`` statement)."""
    made = set()
    for node in module.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Call) \
                and _last_name(node.value) == "make_dataclass":
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            made.update(t.id for t in targets if isinstance(t, ast.Name))
    return made


def config_classes(module: ast.Module) -> tuple[str, ...]:
    """Public dataclass and enum classes of ``module``, in source order (see the module docstring)."""
    dataclass_like = _made_dataclasses(module)
    enum_like = set(ENUM_BASES)
    found = []
    for node in module.body:
        if not isinstance(node, ast.ClassDef):
            continue
        bases = {_last_name(b) for b in node.bases}
        decorated = any(_last_name(d) == "dataclass" for d in node.decorator_list)
        if decorated or bases & dataclass_like:
            dataclass_like.add(node.name)
        elif bases & enum_like:
            enum_like.add(node.name)
        else:
            continue
        if not node.name.startswith("_"):
            found.append(node.name)
    return tuple(found)


def reference_names(reference: Path) -> ReferenceNames:
    """The names of the reference checkout at ``reference`` that the mapping table must mention."""
    package = package_dir(reference)
    classes: list[str] = []
    for relative in CONFIG_MODULES:
        classes += [c for c in config_classes(_parse(package / relative)) if c not in classes]
    return ReferenceNames(init_arguments(_parse(package / OPTIMIZER_MODULE)), tuple(classes))


def table_cells(guide_text: str, section: str = SECTION) -> list[list[str]]:
    """The cells of every row of the table under ``section``, header first (an escaped ``\\|`` stays in its cell)."""
    lines = guide_text.splitlines()
    try:
        start = lines.index(section)
    except ValueError:
        raise ValueError(f"the user guide has no heading {section!r}; the mapping table lives under it.") from None
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("|") and not set(line.replace("|", "").strip()) <= set("-: "):   # not the --- line
            cells = [cell.strip() for cell in CELL_SPLIT.split(line)[1:]]
            rows.append(cells[:-1] if len(cells) > 1 and not cells[-1] else cells)   # the closing | is optional
    if not rows:
        raise ValueError(f"the section {section!r} of the user guide has no table.")
    return rows


def backticked(cell: str) -> list[str]:
    """The backtick spans of a table cell."""
    return re.findall(r"`([^`]*)`", cell)


def mapped_names(guide_text: str, section: str = SECTION) -> set[str]:
    """Identifiers inside backticks in the first column of the table under ``section``."""
    return {name for cells in table_cells(guide_text, section) for span in backticked(cells[0])
            for name in IDENTIFIER.findall(span)}


def missing_names(names: ReferenceNames, mapped: set[str]) -> ReferenceNames:
    """The ``names`` the table does not mention."""
    return ReferenceNames(tuple(n for n in names.arguments if n not in mapped),
                          tuple(n for n in names.config_classes if n not in mapped))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, required=True,
                    help="reference Distributed Shampoo checkout (the folder holding distributed_shampoo/)")
    ap.add_argument("--guide", type=Path, default=GUIDE, help="the user guide with the mapping table")
    args = ap.parse_args(argv)
    try:
        names = reference_names(args.reference)
        missing = missing_names(names, mapped_names(args.guide.read_text()))
    except (OSError, ValueError, SyntaxError) as err:
        print(f"check_reference_mapping: {err}", file=sys.stderr)
        return 2
    total = len(names.arguments) + len(names.config_classes)
    if not missing.arguments and not missing.config_classes:
        print(f"the mapping table mentions all {len(names.arguments)} DistributedShampoo arguments and "
              f"{len(names.config_classes)} config classes of the reference.")
        return 0
    for label, found in (("DistributedShampoo arguments", missing.arguments),
                         ("config classes", missing.config_classes)):
        if found:
            print(f"{label} missing from the mapping table ({len(found)}): {', '.join(found)}")
    print(f"{len(missing.arguments) + len(missing.config_classes)} of {total} reference names are not mapped "
          f"in {args.guide} ({SECTION!r}, first column, in backticks).")
    return 1


if __name__ == "__main__":
    sys.exit(main())
