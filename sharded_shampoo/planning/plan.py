"""The Shampoo plan: parameters + mesh + settings -> blocks, owners, per-rank report.

The single source of truth shared by the optimizer and the dry-run planner. :func:`make_plan`
runs the pipeline, each stage a pure function of shapes, placements, mesh and settings, so
every rank computes the same plan without communicating (``stages.py``):

1. blocks (``blocking.block_grid``) of every parameter, on global shapes, as one grid each;
2. prices (``costs.block_cost``): state bytes, step and amortized FLOPs of each distinct block shape;
3. geometry (``layout.param_geometry``): the region of each parameter every rank holds;
4. locality: which holder groups hold how much of each block (per distinct box and geometry);
5. owners (``class_balance``): class-wise LPT with the locality preference and the memory cap;
6. the per-rank report (``accounting``, ``tally``): bytes by kind, communication (the model is in
   ``tally.py``), transient peak, FLOPs.

Blocks are built lazily (``plan.blocks[i]``), so a plan with hundreds of thousands of blocks costs
arrays, not objects, until someone reads its blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import PlanSettings, config_to_dict
from .accounting import PlanSummary, RankReport, plan_summary, rank_reports
from .cap_advice import cap_advice
from .balance import DEFAULT_LOCALITY_TOLERANCE, BlockDoesNotFitError
from .blocking import Block
from .costs import DEFAULT_COST_MODEL, BlockCost, CostModel
from .layout import MeshSpec, ParamGeometry, ParamSpec
from .sequences import IndexedList, LazyBlocks
from .stages import Balanced, balance_blocks

JSON_SCHEMA = "sharded-shampoo.plan/1"


@dataclass
class ShampooPlan:
    """Blocks (parameter order), their owners and costs, per-rank reports and a summary."""

    params: list[ParamSpec]
    mesh: MeshSpec
    settings: list[PlanSettings]            # one per parameter
    blocks: Sequence[Block]                 # built on first access (``LazyBlocks``)
    owners: list[int]
    block_param: list[int]                  # index into params, per block
    block_costs: Sequence[BlockCost]
    block_loads: list[float]                # balance weight per block
    geometries: list[ParamGeometry]         # per parameter: the region each rank holds
    ranks: list[RankReport]
    summary: PlanSummary
    _owned: list[list[int]] | None = field(default=None, repr=False)

    def owned_blocks(self, rank: int) -> list[Block]:
        """Blocks owned by ``rank``, in plan (parameter) order."""
        return [self.blocks[i] for i in self.owned_indices(rank)]

    def owned_indices(self, rank: int) -> list[int]:
        """Plan indices of the blocks ``rank`` owns, ascending."""
        if not 0 <= rank < self.mesh.world_size:
            raise ValueError(f"rank must be in [0, {self.mesh.world_size}); got {rank!r}.")
        if self._owned is None:
            owners = np.asarray(self.owners, dtype=np.int64)
            by_owner = np.argsort(owners, kind="stable")
            cuts = np.cumsum(np.bincount(owners, minlength=self.mesh.world_size)).tolist()
            self._owned = [by_owner[a:b].tolist() for a, b in zip([0] + cuts[:-1], cuts)]
        return self._owned[rank]

    def owner_of(self) -> dict[str, int]:
        """``{block_id: owner rank}``."""
        return {b.block_id: r for b, r in zip(self.blocks, self.owners)}

    def to_json(self, include_blocks: bool = True) -> dict[str, Any]:
        """A JSON-safe dict: mesh, settings, params, ranks, summary and (optionally) blocks."""
        distinct: list[PlanSettings] = []
        index: list[int] = []
        for s in self.settings:
            if s not in distinct:
                distinct.append(s)
            index.append(distinct.index(s))
        out: dict[str, Any] = {
            "schema": JSON_SCHEMA,
            "mesh": {"shape": list(self.mesh.shape), "world_size": self.mesh.world_size},
            "settings": [config_to_dict(s) for s in distinct],
            "params": [_param_json(p, k) for p, k in zip(self.params, index)],
            "ranks": [r.to_json() for r in self.ranks],
            "summary": self.summary.to_json(),
        }
        if self.mesh.dim_names is not None:
            out["mesh_dim_names"] = list(self.mesh.dim_names)
        if include_blocks:
            out["blocks"] = [
                {"block_id": b.block_id, "param": b.param_name, "shape": list(b.shape),
                 "factor_dims": list(b.factor_dims), "owner": r, "state_bytes": c.total_state_bytes,
                 "step_flops": c.step_flops, "amortized_flops": c.amortized_flops, "load": w}
                for b, r, c, w in zip(self.blocks, self.owners, self.block_costs, self.block_loads)]
        return out


def _param_json(p: ParamSpec, settings_index: int) -> dict[str, Any]:
    out: dict[str, Any] = {"name": p.name, "shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."),
                           "sharded": p.sharded, "settings_index": settings_index}
    if p.layout is not None:
        out["mesh_shape"] = list(p.layout.mesh.shape)
        if p.layout.mesh.dim_names is not None:
            out["mesh_dim_names"] = list(p.layout.mesh.dim_names)
        out["placements"] = [repr(x) for x in p.layout.placements]
    return out


def _normalize_settings(params: Sequence[ParamSpec],
                        settings: PlanSettings | Sequence[PlanSettings]) -> list[PlanSettings]:
    if isinstance(settings, PlanSettings):
        return [settings] * len(params)
    settings = list(settings)
    if len(settings) != len(params):
        raise ValueError(f"settings must be one PlanSettings or one per parameter ({len(params)}); "
                         f"got {len(settings)}.")
    for i, s in enumerate(settings):
        if not isinstance(s, PlanSettings):
            raise ValueError(f"settings[{i}] must be a PlanSettings; got {type(s).__name__}.")
    # Equal settings -> one shared object, so parameters plan and price together (the
    # optimizer builds one PlanSettings per parameter).
    canonical: dict[PlanSettings, PlanSettings] = {}
    return [canonical.setdefault(s, s) for s in settings]


def _validate_params(params: Sequence[ParamSpec], mesh: MeshSpec) -> None:
    if not isinstance(mesh, MeshSpec):
        raise ValueError(f"mesh must be a MeshSpec (e.g. MeshSpec((S,)) or MeshSpec((R, S))); got {mesh!r}.")
    names = set()
    for i, p in enumerate(params):
        if not isinstance(p, ParamSpec):
            raise ValueError(f"params[{i}] must be a ParamSpec; got {type(p).__name__}.")
        if p.name in names:
            raise ValueError(f"parameter names must be unique (they key the optimizer state); {p.name!r} repeats.")
        if p.dtype.is_complex or not p.dtype.is_floating_point:
            raise ValueError(f"parameter {p.name!r} is {p.dtype}; Shampoo needs real floating-point parameters "
                             "(complex ones: torch.view_as_real; integer ones: freeze them).")
        names.add(p.name)


def make_plan(params: Sequence[ParamSpec], mesh: MeshSpec, settings: PlanSettings | Sequence[PlanSettings],
              memory_cap_bytes: int | None = None, *, cost_model: CostModel = DEFAULT_COST_MODEL,
              tolerance: float = DEFAULT_LOCALITY_TOLERANCE) -> ShampooPlan:
    """Blocks, owners and per-rank accounting for ``params`` on ``mesh``.

    ``settings``: one :class:`PlanSettings` for all parameters or one per parameter.
    ``memory_cap_bytes``: per-rank cap on params + grads + optimizer state; a block that fits
    nowhere raises a ValueError naming it and the largest ``max_preconditioner_dim`` that fits.
    Blocks are balanced on ``step_flops + amortized_flops / precondition_frequency``.
    """
    params = list(params)
    _validate_params(params, mesh)
    per_param = _normalize_settings(params, settings)
    try:
        b = balance_blocks(params, mesh, per_param, memory_cap_bytes, cost_model, tolerance)
    except BlockDoesNotFitError as err:
        raise ValueError(cap_advice(params, mesh, per_param, memory_cap_bytes, cost_model, tolerance, err)) \
            from err
    return _report(params, mesh, per_param, b, memory_cap_bytes)


def _report(params: list[ParamSpec], mesh: MeshSpec, per_param: list[PlanSettings], b: Balanced,
            memory_cap_bytes: int | None) -> ShampooPlan:
    ranks = rank_reports(mesh, per_param, b)
    loads = b.loads
    summary = plan_summary(params, mesh, len(b.owners), b.block_param, loads, ranks, memory_cap_bytes)
    return ShampooPlan(params=params, mesh=mesh, settings=per_param, blocks=LazyBlocks(b.grids, b.offsets.tolist()),
                       owners=b.owners.tolist(), block_param=b.block_param.tolist(),
                       block_costs=IndexedList(b.costs, b.cost_id), block_loads=loads.tolist(),
                       geometries=b.geometries, ranks=ranks, summary=summary)


__all__ = ["JSON_SCHEMA", "PlanSettings", "RankReport", "ShampooPlan", "make_plan"]
