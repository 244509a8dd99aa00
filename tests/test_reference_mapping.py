"""scripts/tools/check_reference_mapping.py on a tiny synthetic reference tree (the real reference is not needed)."""

from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
from pathlib import Path

import pytest

from scripts.tools import check_reference_mapping as crm

OPTIMIZER = """
import torch

class Helper:
    def __init__(self, not_an_argument): ...

class DistributedShampoo(torch.optim.Optimizer):
    \"\"\"Docs.\"\"\"
    def step(self, closure=None): ...
    def __init__(self, params, lr=1e-2, /, betas=(0.9, 1.0), *extra, use_pin_memory=False, **rest):
        super().__init__(params, {})
"""

TYPES = """
import enum
import dataclasses
from dataclasses import dataclass, make_dataclass

class PreconditionerValueError(ValueError):
    pass

@dataclass(init=False)
class PreconditionerConfig:
    pass

class SubWithoutDecorator(PreconditionerConfig):
    pass

@dataclasses.dataclass(kw_only=True)
class _PrivateConfig:
    x: int = 1

@enum.unique
class WeightDecayType(enum.Enum):
    L2 = "L2"

class MoreDecay(WeightDecayType):
    pass

_CompileImpl = make_dataclass("_CompileImpl", [("fullgraph", bool, False)])

class CompileConfig(_CompileImpl):
    pass

class PlainHelper:
    pass

DefaultConfig = PreconditionerConfig()
"""

MATRIX_TYPES = """
from dataclasses import dataclass

@dataclass
class EigenConfig:
    retry: bool = True

@dataclass
class PreconditionerConfig:  # the same name in both modules is listed once
    pass
"""


def make_reference(root: Path) -> Path:
    package = root / "distributed_shampoo"
    (package / "preconditioner").mkdir(parents=True)
    (package / "distributed_shampoo.py").write_text(OPTIMIZER)
    (package / "shampoo_types.py").write_text(TYPES)
    (package / "preconditioner" / "matrix_functions_types.py").write_text(MATRIX_TYPES)
    return root


GUIDE = textwrap.dedent("""\
    # User guide

    `betas` `EigenConfig` are mentioned above the section: that does not count.

    ## Switching from the reference Distributed Shampoo

    | reference `DistributedShampoo` argument | sharded-shampoo | notes |
    |---|---|---|
    | `params`, `lr` (default `1e-2`) | `params`, `lr` | |
    | `weight_decay_type=WeightDecayType.L2` \\| `MoreDecay` | `weight_decay_type` | an escaped pipe stays in the cell |
    | betas, `use_pin_memory` | `CompileConfig` | betas outside backticks; CompileConfig only in our column |

    Prose below the table: `extra`, `rest`, `SubWithoutDecorator`, `CompileConfig`.

    ## Next section

    | `PreconditionerConfig` | | |
    """)


def test_reads_init_arguments_and_config_classes_from_source(tmp_path: Path) -> None:
    names = crm.reference_names(make_reference(tmp_path))
    assert names.arguments == ("params", "lr", "betas", "use_pin_memory", "extra", "rest")
    assert names.config_classes == ("PreconditionerConfig", "SubWithoutDecorator", "WeightDecayType", "MoreDecay",
                                    "CompileConfig", "EigenConfig")
    # the package folder itself works as --reference too
    assert crm.reference_names(tmp_path / "distributed_shampoo") == names


def test_only_backticked_names_in_the_tables_first_column_count() -> None:
    assert crm.mapped_names(GUIDE) == {"DistributedShampoo", "params", "lr", "weight_decay_type",
                                       "WeightDecayType", "L2", "MoreDecay", "use_pin_memory"}


def test_main_lists_the_missing_names_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reference = make_reference(tmp_path / "ref")
    guide = tmp_path / "guide.md"
    guide.write_text(GUIDE)
    assert crm.main(["--reference", str(reference), "--guide", str(guide)]) == 1
    out = capsys.readouterr().out
    assert "DistributedShampoo arguments missing from the mapping table (3): betas, extra, rest" in out
    assert ("config classes missing from the mapping table (4): PreconditionerConfig, SubWithoutDecorator, "
            "CompileConfig, EigenConfig") in out
    assert "7 of 12 reference names are not mapped" in out


def test_main_exits_0_when_every_name_is_mapped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reference = make_reference(tmp_path / "ref")
    guide = tmp_path / "guide.md"
    row = "| `betas`, `extra`, `rest`, `PreconditionerConfig`, `SubWithoutDecorator`, `CompileConfig`, `EigenConfig` | | |"
    guide.write_text(GUIDE.replace("\n\nProse below", f"\n{row}\n\nProse below"))
    assert crm.main(["--reference", str(reference), "--guide", str(guide)]) == 0
    assert "mentions all 6 DistributedShampoo arguments and 6 config classes" in capsys.readouterr().out


def test_bad_inputs_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    guide = tmp_path / "guide.md"
    guide.write_text(GUIDE)
    assert crm.main(["--reference", str(tmp_path / "nowhere"), "--guide", str(guide)]) == 2
    assert "no distributed_shampoo/distributed_shampoo.py under it" in capsys.readouterr().err

    reference = make_reference(tmp_path / "ref")
    (reference / "distributed_shampoo" / "preconditioner" / "matrix_functions_types.py").unlink()
    assert crm.main(["--reference", str(reference), "--guide", str(guide)]) == 2
    assert "matrix_functions_types.py is missing" in capsys.readouterr().err

    with pytest.raises(ValueError, match="no heading '## Switching from the reference Distributed Shampoo'"):
        crm.mapped_names("# User guide\n")
    with pytest.raises(ValueError, match="has no table"):
        crm.mapped_names("## Switching from the reference Distributed Shampoo\n\nno table here\n")
    with pytest.raises(ValueError, match="defines no class DistributedShampoo"):
        crm.init_arguments(crm.ast.parse("class Other:\n    def __init__(self, a): ...\n"))


# ----------------------------------------------------------------------------- our column of the real guide

TOKEN = re.compile(r"[A-Za-z_][\w.]*|==|[(){}\[\],=]")


def calls_and_keywords(span: str) -> list[tuple[str | None, str]]:
    """``(callee, argument name)`` for every argument name in a backtick span of our column.

    ``Name(a, b=1)`` gives ``(Name, a)`` and ``(Name, b)``; ``kw=`` outside any call gives ``(None, kw)``;
    a callee with no arguments gives ``(Name, "")``. Values (after ``=``) and dict/list contents are skipped.
    """
    tokens = TOKEN.findall(span)
    found: list[tuple[str | None, str]] = []
    stack: list[str | None] = []
    for i, tok in enumerate(tokens):
        prev, nxt = (tokens[i - 1] if i else None), (tokens[i + 1] if i + 1 < len(tokens) else None)
        if tok in "([{":
            callee = prev if tok == "(" and prev and prev[0].isalpha() else None
            stack.append(callee if tok == "(" else "{")
            if callee:
                found.append((callee, ""))
        elif tok in ")]}":
            if stack:
                stack.pop()
        elif tok[0].isalpha() or tok[0] == "_":
            context = stack[-1] if stack else None
            if context == "{" or prev == "=" or nxt == "(":
                continue
            if context is None and nxt == "=":
                found.append((None, tok))
            elif context and prev in ("(", ",") and nxt in ("=", ",", ")"):
                found.append((context, tok))
    return found


def parameter_names(obj: object) -> set[str]:
    if dataclasses.is_dataclass(obj):
        return {f.name for f in dataclasses.fields(obj)}
    return set(inspect.signature(obj).parameters)  # type: ignore[arg-type]


def test_our_column_names_only_existing_classes_fields_and_arguments() -> None:
    """Every class our column calls exists in ``sharded_shampoo`` (``opt.m()``: a ShardedShampoo method), and every argument it names is a field of
    that class; a ``kw=`` outside a call is an optimizer argument or a field of a config class. A stale row
    (a renamed field, a class that moved) fails here."""
    import sharded_shampoo

    optimizer_args = parameter_names(sharded_shampoo.ShardedShampoo)
    config_fields = {f for name in dir(sharded_shampoo) if dataclasses.is_dataclass(getattr(sharded_shampoo, name))
                     for f in parameter_names(getattr(sharded_shampoo, name))}
    rows = crm.table_cells(crm.GUIDE.read_text())[1:]
    checked, problems = 0, []
    for cells in rows:
        for span in crm.backticked(cells[1]):
            for callee, arg in calls_and_keywords(span):
                if callee is None:
                    ok = arg in optimizer_args | config_fields
                elif not callee[0].isupper() and "." not in callee:
                    continue      # eigh(...), float(...): math or torch, not ours
                else:
                    obj = sharded_shampoo.ShardedShampoo if callee.startswith("opt.") else sharded_shampoo
                    for part in callee.removeprefix("opt.").removeprefix("sharded_shampoo.").split("."):
                        obj = getattr(obj, part, None)
                    ok = obj is not None and (not arg or arg in parameter_names(obj))
                checked += 1
                if not ok:
                    problems.append(f"{callee or 'ShardedShampoo'}: {arg or 'does not exist'} (in `{span}`)")
    assert checked >= 40, checked
    assert not problems, problems


def test_calls_and_keywords_parses_nested_calls() -> None:
    assert calls_and_keywords("preconditioner=RootInverseShampoo(root=EighRootConfig() or CoupledNewtonConfig(), "
                              "inverse_exponent_override={order: {dim: 0}}, factor_dtype=...)") == [
        (None, "preconditioner"), ("RootInverseShampoo", ""), ("RootInverseShampoo", "root"),
        ("EighRootConfig", ""), ("CoupledNewtonConfig", ""), ("RootInverseShampoo", "inverse_exponent_override"),
        ("RootInverseShampoo", "factor_dtype")]
    assert calls_and_keywords("AdamGrafting(beta2, epsilon)") == [
        ("AdamGrafting", ""), ("AdamGrafting", "beta2"), ("AdamGrafting", "epsilon")]
    assert calls_and_keywords("(0.9, 0.999)") == []


def test_table_cells_keep_escaped_pipes_and_accept_rows_without_a_closing_pipe() -> None:
    guide = f"{crm.SECTION}\n\n| a | b |\n|---|---|\n| `x` \\| `y` | z |\n| `w` | v\n\n## Next\n| q | r |\n"
    assert crm.table_cells(guide) == [["a", "b"], ["`x` \\| `y`", "z"], ["`w`", "v"]]
