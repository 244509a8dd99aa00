"""A view of part of a model: some of its modules at their original paths, parallelized as the model is.

Pipeline stages (``stages.py``) and the representatives of identical layers (``twins.py``) are
parts of a model that the dry-run parallelizes on their own. A :class:`ModelView` holds the
chosen modules under their original dotted paths (layer lists become ``ModuleDict``s keyed by the
original indices, as torchtitan keeps its layers), so parameter names stay the whole model's, and
answers ``tp_plan``, ``fsdp_units`` and ``expert_modules`` from the model, restricted to the
view, so ``apply_parallelism`` treats it as a training job treats that part of its model.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatch
from typing import Any

from torch import nn

from .parallelize import expert_modules, fsdp_units


class ModelView(nn.Module):
    """``names`` (dotted module paths of ``model``) at their original paths; the model itself is not a submodule."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.whole = (model,)                 # a tuple: not registered as a submodule
        self.names = list(names)
        for n in self.names:
            *path, leaf = n.split(".")
            parent: nn.Module = self
            for depth, part in enumerate(path):
                child = parent.get_submodule(part) if hasattr(parent, part) else None
                if child is None:      # a container like the model's: a ModuleDict (keeps layer keys) or a plain Module
                    original = model.get_submodule(".".join(path[:depth + 1]))
                    child = nn.ModuleDict() if isinstance(original, (nn.ModuleDict, nn.ModuleList)) else nn.Module()
                    parent.add_module(part, child)
                parent = child
            parent.add_module(leaf, model.get_submodule(n))
        self.own = {id(m) for m in self.modules()}

    def tp_plan(self) -> dict[str, Any]:
        whole = self.whole[0]
        whole_plan = getattr(whole, "tp_plan", None)
        plan = whole_plan() if callable(whole_plan) else {}
        names = [n for n, _ in self.named_modules()]
        present = set(names)
        return {k: v for k, v in plan.items()
                if k in present or (any(c in k for c in "*?[") and any(fnmatch(n, k) for n in names))}

    def fsdp_units(self) -> list[nn.Module]:
        return [u for u in fsdp_units(self.whole[0]) if id(u) in self.own]

    def expert_modules(self) -> list[nn.Module]:
        return [m for m in expert_modules(self.whole[0]) if id(m) in self.own]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("a dry-run model view holds modules for planning only.")


__all__ = ["ModelView"]
