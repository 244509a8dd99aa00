"""The dry-run's output: text report and PNG chart of a plan or of a pipeline plan.

:func:`format_report` and :func:`write_png` take either a :class:`~..planning.plan.ShampooPlan`
(``plan_report.py``: per-rank table and chart) or a :class:`~..planning.pipeline.PipelinePlan`
(``stage_report.py``: per-stage table and chart, then the worst stage's ranks).
"""

from __future__ import annotations

from ..planning.pipeline import PipelinePlan
from ..planning.plan import ShampooPlan
from .errors import DryRunError
from .plan_report import format_plan_report, human_bytes, human_flops, mesh_text, write_plan_png
from .stage_report import format_pipeline_report, write_pipeline_png


def format_report(plan: ShampooPlan | PipelinePlan, model_name: str = "model", *, top: int = 8,
                  all_ranks: bool = False, expert_mesh: str | None = None) -> str:
    """The text report: per rank (or min/median/max + busiest ranks), per stage for a pipeline plan.

    ``expert_mesh`` (e.g. ``"efsdp=8 x ep=8"``, :meth:`~.meshes.MeshAxes.expert_mesh_text`) is shown
    in the header: the plan's mesh is the dense one, so expert parallelism is not visible in it.
    """
    if isinstance(plan, PipelinePlan):
        return format_pipeline_report(plan, model_name, top=top, all_ranks=all_ranks, expert_mesh=expert_mesh)
    label = f"{mesh_text(plan)}, experts on {expert_mesh}" if expert_mesh else None
    return format_plan_report(plan, model_name, top=top, all_ranks=all_ranks, mesh_label=label)


def write_png(plan: ShampooPlan | PipelinePlan, path: str, model_name: str = "model") -> None:
    """The chart: memory by kind and load per rank, or per stage for a pipeline plan (needs matplotlib)."""
    if isinstance(plan, PipelinePlan):
        write_pipeline_png(plan, path, model_name)
    else:
        write_plan_png(plan, path, model_name)


__all__ = ["DryRunError", "format_report", "human_bytes", "human_flops", "mesh_text", "write_png"]
