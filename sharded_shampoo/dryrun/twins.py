"""Identical layers are parallelized once: the dry-run's shortcut for deep models.

The placements tensor parallelism and FSDP give a layer depend on the layer's structure (its
parameters' names, shapes and dtypes, its submodules, the TP styles of its plan entries, whether
it holds expert weights) and on the meshes, never on where the layer sits. So the dry-run
parallelizes one representative of every group of identical top-level FSDP units and gives the
others the representative's placements under their own names: the 126 layers of llama3-405b cost
one layer of ``parallelize_module`` + ``fully_shard`` instead of 126 (``plan_model(...,
parallelize_all=True)`` parallelizes every layer; ``tests/test_dryrun_cli.py`` checks that both give
the same parameter specs).

Kept out of the shortcut (parallelized as themselves): a unit sharing a parameter with anything
else, a unit under a module that holds parameters of its own, and every unit when the TP plan
uses wildcards or a style has no comparable ``repr``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from .parallelize import expert_modules, fsdp_units
from .views import ModelView


@dataclass
class Twins:
    """What to parallelize (``view``: everything but the duplicate units) and where duplicates' specs come from."""

    view: ModelView
    copies: dict[str, str]            # parameter of a duplicate unit -> the same parameter of its representative


def _top_level(units: Iterable[nn.Module], path: dict[int, str]) -> list[tuple[str, nn.Module]]:
    named = sorted(((path[id(u)], u) for u in units if id(u) in path), key=lambda t: t[0])
    out: list[tuple[str, nn.Module]] = []
    for p, u in named:
        if p and not any(p.startswith(q + ".") for q, _ in out):
            out.append((p, u))
    return out


def _signature(unit: nn.Module, prefix: str, plan: dict[str, object], experts: set[int],
               shared: set[int]) -> tuple | None:
    """What fixes a unit's placements; None when it must be parallelized as itself."""
    if any(id(p) in shared for p in unit.parameters()):
        return None
    styles = []
    for key, style in plan.items():
        if key == prefix or key.startswith(prefix + "."):
            text = repr(style)
            if " at 0x" in text:
                return None
            styles.append((key[len(prefix) + 1:], text))
    params = tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in unit.named_parameters())
    modules = tuple((n, type(m).__module__, type(m).__qualname__, id(m) in experts) for n, m in unit.named_modules())
    return (type(unit), params, modules, tuple(sorted(styles)))


def _view_names(part: nn.Module, keep: set[str], drop: set[str]) -> list[str] | None:
    """Module paths covering ``part`` except the dropped units; None if a unit's ancestor holds parameters."""
    units = keep | drop
    names: list[str] = []

    def visit(module: nn.Module, prefix: str) -> bool:
        for child_name, child in module.named_children():
            path = f"{prefix}.{child_name}" if prefix else child_name
            if path in drop:
                continue
            if path in keep or not any(u.startswith(path + ".") for u in units):
                names.append(path)
                continue
            if any(True for _ in child.parameters(recurse=False)) or not visit(child, path):
                return False
        return True

    if any(True for _ in part.parameters(recurse=False)) or not visit(part, ""):
        return None
    return names


def find_twins(part: nn.Module, tensor_parallel: bool) -> Twins | None:
    """The twins of ``part``'s top-level FSDP units, or None when no unit has a twin (or the shortcut
    does not apply; see the module doc)."""
    path = {id(m): n for n, m in part.named_modules()}
    part_plan = getattr(part, "tp_plan", None)
    plan = part_plan() if tensor_parallel and callable(part_plan) else {}
    if any(c in key for key in plan for c in "*?["):
        return None
    seen: dict[int, int] = {}
    for _, p in part.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    shared = {i for i, n in seen.items() if n > 1}
    experts = {id(m) for m in expert_modules(part)}
    first: dict[tuple, tuple[str, nn.Module]] = {}
    keep, drop, copies = set(), set(), {}
    for prefix, unit in _top_level(fsdp_units(part), path):
        sig = _signature(unit, prefix, plan, experts, shared)
        rep = first.setdefault(sig, (prefix, unit)) if sig is not None else (prefix, unit)
        if rep[1] is unit:
            keep.add(prefix)
            continue
        drop.add(prefix)
        for rel, _ in unit.named_parameters():
            copies[f"{prefix}.{rel}"] = f"{rep[0]}.{rel}"
    if not drop:
        return None
    names = _view_names(part, keep, drop)
    return Twins(ModelView(part, names), copies) if names is not None else None


__all__ = ["Twins", "find_twins"]
