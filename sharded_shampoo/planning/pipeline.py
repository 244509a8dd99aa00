"""The plan of a pipeline-parallel job: one Shampoo plan per stage, over that stage's ranks. Pure.

With pipeline parallelism every stage's ranks run their own optimizer over their own part of the
model (stage-local optimizers, as the optimizer runs them): a stage's blocks are owned by that
stage's ranks only. So the job's plan is :func:`~.plan.make_plan` once per stage, each over the
stage's ``W`` ranks; stage ``s`` holds global ranks ``[s * W, (s + 1) * W)`` (``pp`` is the
outermost mesh axis, as in torchtitan). The job is as tight as its worst stage: the summary names
the stage with the most memory on one rank and the stage with the most load on one rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config import PlanSettings
from .accounting import RankReport
from .balance import DEFAULT_LOCALITY_TOLERANCE
from .costs import DEFAULT_COST_MODEL, CostModel
from .layout import MeshSpec, ParamSpec
from .plan import ShampooPlan, make_plan

PIPELINE_JSON_SCHEMA = "sharded-shampoo.pipeline-plan/1"


@dataclass(frozen=True)
class StageSummary:
    """The figures of one stage that decide whether the job fits: maxima over its ranks."""

    stage: int
    first_rank: int
    num_params: int
    num_blocks: int
    param_bytes: int                  # the stage's parameters, whole
    max_persistent_bytes: int         # params + grads + optimizer state on its fullest rank
    max_optimizer_state_bytes: int
    max_comm_bytes_per_step: int
    max_peak_transient_bytes: int
    max_load: float
    mean_load: float
    imbalance: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PipelinePlan:
    """One :class:`~.plan.ShampooPlan` per pipeline stage (stage-local ranks) and the worst stage."""

    stages: list[ShampooPlan]
    stage_modules: list[list[str]]

    @property
    def pp(self) -> int:
        return len(self.stages)

    @property
    def stage_mesh(self) -> MeshSpec:
        """The mesh every stage is planned over (dp x fsdp x tp of one stage)."""
        return self.stages[0].mesh

    @property
    def stage_world_size(self) -> int:
        return self.stage_mesh.world_size

    @property
    def world_size(self) -> int:
        return self.pp * self.stage_world_size

    def global_rank(self, stage: int, rank: int) -> int:
        """The job-wide rank of ``rank`` of ``stage``."""
        return stage * self.stage_world_size + rank

    def rank(self, global_rank: int) -> tuple[int, RankReport]:
        """``(stage, report)`` of a job-wide rank."""
        if not 0 <= global_rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}); got {global_rank!r}.")
        stage, local = divmod(global_rank, self.stage_world_size)
        return stage, self.stages[stage].ranks[local]

    def stage_summaries(self) -> list[StageSummary]:
        out = []
        for s, plan in enumerate(self.stages):
            ranks, summary = plan.ranks, plan.summary
            out.append(StageSummary(
                stage=s, first_rank=self.global_rank(s, 0), num_params=summary.num_params,
                num_blocks=summary.num_blocks, param_bytes=summary.total_param_bytes,
                max_persistent_bytes=summary.max_persistent_bytes,
                max_optimizer_state_bytes=max(r.optimizer_state_bytes for r in ranks),
                max_comm_bytes_per_step=max(r.comm_bytes_per_step for r in ranks),
                max_peak_transient_bytes=summary.max_peak_transient_bytes, max_load=summary.max_load,
                mean_load=summary.mean_load, imbalance=summary.imbalance))
        return out

    def worst_stage(self, by: str = "memory") -> int:
        """The stage with the most params + grads + state on one rank (``by="memory"``) or the most load
        on one rank (``by="load"``); ties go to the lower stage."""
        if by not in ("memory", "load"):
            raise ValueError(f"by must be 'memory' or 'load'; got {by!r}.")
        key = (lambda p: p.summary.max_persistent_bytes) if by == "memory" else (lambda p: p.summary.max_load)
        return max(range(self.pp), key=lambda s: (key(self.stages[s]), -s))

    def to_json(self, include_blocks: bool = True) -> dict[str, Any]:
        """A JSON-safe dict: the job mesh, per-stage summaries, the worst stages and every stage's plan."""
        stage_mesh = self.stage_mesh
        names = stage_mesh.dim_names
        out: dict[str, Any] = {
            "schema": PIPELINE_JSON_SCHEMA,
            "mesh": {"shape": [self.pp, *stage_mesh.shape], "world_size": self.world_size},
            "pipeline": {"pp": self.pp, "stage_world_size": self.stage_world_size,
                         "stage_mesh_shape": list(stage_mesh.shape)},
            "worst_stage": {"by_memory": self.worst_stage("memory"), "by_load": self.worst_stage("load")},
            "stage_summaries": [s.to_json() for s in self.stage_summaries()],
            "stages": [dict(stage=s, first_rank=self.global_rank(s, 0), modules=list(self.stage_modules[s]),
                            plan=plan.to_json(include_blocks)) for s, plan in enumerate(self.stages)],
        }
        if names is not None:
            out["mesh_dim_names"] = ["pp", *names]
        return out


def make_pipeline_plan(stage_params: Sequence[Sequence[ParamSpec]], mesh: MeshSpec,
                       settings: PlanSettings | Sequence[PlanSettings | Sequence[PlanSettings]],
                       memory_cap_bytes: int | None = None, *, stage_modules: Sequence[Sequence[str]] | None = None,
                       cost_model: CostModel = DEFAULT_COST_MODEL,
                       tolerance: float = DEFAULT_LOCALITY_TOLERANCE) -> PipelinePlan:
    """Plan every stage on its own ranks: ``stage_params[s]`` are stage ``s``'s parameters and ``mesh``
    the ``dp x fsdp x tp`` mesh of one stage.

    ``settings``: one :class:`PlanSettings` for everything, or one entry per stage (a ``PlanSettings``
    or one per parameter of that stage). ``stage_modules``: module names per stage, for the report.
    """
    stage_params = [list(p) for p in stage_params]
    if not stage_params:
        raise ValueError("stage_params must have one list of parameters per pipeline stage; got none.")
    if isinstance(settings, PlanSettings):
        per_stage: list[Any] = [settings] * len(stage_params)
    else:
        per_stage = list(settings)
        if len(per_stage) != len(stage_params):
            raise ValueError(f"settings must be one PlanSettings or one entry per stage ({len(stage_params)}); "
                             f"got {len(per_stage)}.")
    names = [list(m) for m in stage_modules] if stage_modules is not None else [[] for _ in stage_params]
    if len(names) != len(stage_params):
        raise ValueError(f"stage_modules must have one entry per stage ({len(stage_params)}); got {len(names)}.")
    seen: dict[str, int] = {}
    for s, params in enumerate(stage_params):
        for p in params:
            if p.name in seen:
                raise ValueError(f"parameter {p.name!r} is in stages {seen[p.name]} and {s}; every parameter "
                                 "belongs to one pipeline stage.")
            seen[p.name] = s
    plans = []
    for s, (params, st) in enumerate(zip(stage_params, per_stage)):
        try:
            plans.append(make_plan(params, mesh, st, memory_cap_bytes, cost_model=cost_model, tolerance=tolerance))
        except ValueError as err:
            raise ValueError(f"pipeline stage {s}: {err}") from err
    return PipelinePlan(plans, names)


__all__ = ["PIPELINE_JSON_SCHEMA", "PipelinePlan", "StageSummary", "make_pipeline_plan"]
