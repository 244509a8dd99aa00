"""scripts/tools/check_reference_mapping.py on a tiny synthetic reference tree (the real reference is not needed)."""

from __future__ import annotations

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
