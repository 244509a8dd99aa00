"""Which parameters are stacked MoE expert weights ``[E, d_in, d_out]`` (E independent matrices).

Preconditioning such a tensor as one 3-D block would mix experts, so expert weights get
per-expert blocks (``BlockingConfig(batch_dims=1)``). Two rules recognise them, both pure
functions so the optimizer, the dry-run and the integrations read the same answer:

* by name (what torchtitan's container and the dry-run of a torchtitan model use): a **3-D**
  parameter whose owning module's path has a component matching a pattern, by default
  ``r"experts$"`` (``layers.3.moe.routed_experts.inner_experts.w1_EFD``). 2-D weights of
  ``shared_experts`` (plain FFNs) fail the 3-D test and stay dense;
* by layout (what ``ShardedShampoo`` applies to parameters passed directly): a **3-D** DTensor
  whose dim 0 is sharded over a mesh dim named ``ep`` (expert parallel) -- see
  :func:`expert_parallel_sharded`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, Optional

from ..config import PlanSettings
from .layout import ParamSpec

#: A parameter is an expert weight when it is 3-D and one component of its owning module's
#: path ends in "experts" (torchtitan: ``layers.3.moe.routed_experts.inner_experts.w1_EFD``).
DEFAULT_EXPERT_MODULE_PATTERN = r"experts$"

#: Mesh dim names that mean "expert parallel" (torchtitan and the dry-run call it ``ep``).
EXPERT_PARALLEL_DIM_NAMES = ("ep",)


def expert_pattern(pattern: Any, setting: str = "expert_module_pattern") -> Optional[re.Pattern[str]]:
    """``pattern`` compiled (None stays None); a ValueError naming ``setting`` if it is not a regex."""
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise ValueError(f"{setting} must be a string (a regular expression) or None; got {pattern!r}.")
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{setting} {pattern!r} is not a valid regular expression ({err}). Fix it (the default "
                         f"{DEFAULT_EXPERT_MODULE_PATTERN!r} matches module names ending in 'experts'), or set it to "
                         "None for no expert group.") from None


def is_expert_weight(fqn: str, ndim: int,
                     module_pattern: str | re.Pattern[str] = DEFAULT_EXPERT_MODULE_PATTERN) -> bool:
    """True for a 3-D parameter whose owning module path has a component matching the pattern."""
    if ndim != 3:
        return False
    modules = fqn.split(".")[:-1]
    rx = module_pattern if isinstance(module_pattern, re.Pattern) else expert_pattern(module_pattern)
    return rx is not None and any(rx.search(m) for m in modules)


def expert_parallel_sharded(ndim: int, mesh_dim_names: Optional[Sequence[str]], placements: Sequence[Any]) -> bool:
    """True for a 3-D tensor whose dim 0 is sharded over an expert-parallel mesh dim (``ep``).

    ``placements`` are DTensor placements (anything with ``is_shard(dim)``), one per mesh dim.
    """
    if ndim != 3 or not mesh_dim_names:
        return False
    return any(name in EXPERT_PARALLEL_DIM_NAMES and placement.is_shard(0)
               for name, placement in zip(mesh_dim_names, placements))


def expert_parallel_spec(spec: ParamSpec) -> bool:
    """:func:`expert_parallel_sharded` of a planner ParamSpec (its DTensor layout, if any)."""
    layout = spec.layout
    return layout is not None and expert_parallel_sharded(len(spec.shape), layout.mesh.dim_names, layout.placements)


def with_expert_blocks(spec: ParamSpec, settings: PlanSettings) -> PlanSettings:
    """Per-expert blocks (``batch_dims=1``) for a parameter sharded over ``ep`` whose group has ``batch_dims=0``.

    Why by default: blocks across experts would mix E independent matrices that live on different
    expert-parallel ranks into one preconditioner, which no expert-parallel job wants; the torchtitan
    container and the dry-run already precondition experts per expert, and a user who passes
    ``model.named_parameters()`` directly gets the same blocks. A group that sets ``batch_dims`` itself
    keeps it.
    """
    if settings.blocking.batch_dims != 0 or not expert_parallel_spec(spec):
        return settings
    return dataclasses.replace(settings, blocking=dataclasses.replace(settings.blocking, batch_dims=1))


__all__ = ["DEFAULT_EXPERT_MODULE_PATTERN", "EXPERT_PARALLEL_DIM_NAMES", "expert_parallel_sharded",
           "expert_parallel_spec", "expert_pattern", "is_expert_weight", "with_expert_blocks"]
