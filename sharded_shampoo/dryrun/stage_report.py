"""The dry-run's output for a pipeline plan: one row per stage, the worst stage in detail, a chart.

A pipeline job fits when its worst stage fits, so the report leads with one row per stage (the
maxima over the stage's ranks), names the worst stage by memory and by load, and then shows the
worst stage's ranks as the one-plan report does (``plan_report.py``), numbered job-wide.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..config import PlanSettings
from ..planning.costs import RANK_STATE_KINDS
from ..planning.pipeline import PipelinePlan, StageSummary
from .plan_report import format_plan_report, human_bytes, human_flops, pyplot, table


def modules_text(names: Sequence[str], limit: int = 60) -> str:
    """``["tok_embeddings", "layers.0", "layers.1", "layers.2"]`` -> ``"tok_embeddings, layers.0-2"``."""
    parts: list[str] = []
    run: tuple[str, int, int] | None = None
    for n in names:
        m = re.fullmatch(r"(.*)\.(\d+)", n)
        if m and run and run[0] == m.group(1) and run[2] + 1 == int(m.group(2)):
            run = (run[0], run[1], int(m.group(2)))
            continue
        if run:
            parts.append(f"{run[0]}.{run[1]}" + (f"-{run[2]}" if run[2] > run[1] else ""))
            run = None
        if m:
            run = (m.group(1), int(m.group(2)), int(m.group(2)))
        else:
            parts.append(n)
    if run:
        parts.append(f"{run[0]}.{run[1]}" + (f"-{run[2]}" if run[2] > run[1] else ""))
    text = ", ".join(parts) or "(no modules)"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def pipeline_mesh_text(plan: PipelinePlan) -> str:
    """``pp=16 x dp=32 x fsdp=16 x tp=8``."""
    mesh = plan.stage_mesh
    names = mesh.dim_names or tuple(f"d{i}" for i in range(len(mesh.shape)))
    return " x ".join([f"pp={plan.pp}"] + [f"{n}={s}" for n, s in zip(names, mesh.shape)])


def _stage_row(s: StageSummary, plan: PipelinePlan) -> list[str]:
    last = s.first_rank + plan.stage_world_size - 1
    return [str(s.stage), f"{s.first_rank}-{last}", modules_text(plan.stage_modules[s.stage]),
            human_bytes(s.param_bytes), str(s.num_blocks), human_bytes(s.max_persistent_bytes),
            human_bytes(s.max_optimizer_state_bytes), human_bytes(s.max_comm_bytes_per_step),
            human_bytes(s.max_peak_transient_bytes), human_flops(s.max_load), f"{s.imbalance:.4f}"]


def format_pipeline_report(plan: PipelinePlan, model_name: str = "model", *, top: int = 8,
                           all_ranks: bool = False, expert_mesh: str | None = None) -> str:
    """Per-stage table, the worst stages, then the worst stage by memory rank by rank.

    ``expert_mesh``: the experts' mesh of a stage, shown in the header (see ``report.format_report``).
    """
    stages = plan.stage_summaries()
    settings = next((p.settings[0] for p in plan.stages if p.settings), PlanSettings())
    total_state = sum(p.summary.total_optimizer_state_bytes for p in plan.stages)
    by_mem, by_load = plan.worst_stage("memory"), plan.worst_stage("load")
    header = ["stage", "ranks", "modules", "params", "blocks", "max params+grads+state+buffers", "max opt state",
              "max comm/step", "max transient", "max load/step", "imbalance"]
    worst = plan.stages[by_mem]
    busiest = max(range(plan.stage_world_size), key=lambda r: (worst.ranks[r].persistent_bytes, -r))
    lines = [
        f"model {model_name} | mesh {pipeline_mesh_text(plan)} ({plan.world_size} ranks: {plan.pp} stages of "
        f"{plan.stage_world_size}{f'; experts on {expert_mesh}' if expert_mesh else ''}) | {sum(s.num_params for s in stages)} params | "
        f"{sum(s.num_blocks for s in stages)} blocks | max_preconditioner_dim {settings.max_preconditioner_dim} | "
        f"precondition_frequency {settings.precondition_frequency} | {type(settings.preconditioner).__name__}",
        f"parameters: {human_bytes(sum(s.param_bytes for s in stages))} total; optimizer state: "
        f"{human_bytes(total_state)} total (stage-local optimizers: a stage's ranks own only its blocks)",
        "",
        "per stage (maxima over the stage's ranks; imbalance = max/mean load within the stage):",
        table(header, [_stage_row(s, plan) for s in stages]),
        "",
        f"worst stage by memory: {by_mem} (params+grads+state+buffers {human_bytes(stages[by_mem].max_persistent_bytes)} "
        f"on rank {plan.global_rank(by_mem, busiest)}); by load: {by_load} "
        f"(load/step {human_flops(stages[by_load].max_load)})",
        "",
        f"stage {by_mem} (worst by memory), ranks {stages[by_mem].first_rank}-"
        f"{stages[by_mem].first_rank + plan.stage_world_size - 1}:",
        format_plan_report(worst, model_name, top=top, all_ranks=all_ranks, rank_offset=stages[by_mem].first_rank,
                           mesh_label=f"{pipeline_mesh_text(plan)}, stage {by_mem}"),
    ]
    return "\n".join(lines)


def write_pipeline_png(plan: PipelinePlan, path: str, model_name: str = "model") -> None:
    """Per stage: the fullest rank's memory by kind (top) and the max and mean load (bottom)."""
    plt = pyplot()
    x = list(range(plan.pp))
    fullest = [max(p.ranks, key=lambda r: (r.persistent_bytes, -r.rank)) for p in plan.stages]
    gib = 1024 ** 3
    series: dict[str, list[float]] = {"params": [r.param_bytes / gib for r in fullest],
                                      "grads": [r.grad_bytes / gib for r in fullest]}
    for kind in RANK_STATE_KINDS:
        vals = [r.state_bytes_by_kind.get(kind, 0) / gib for r in fullest]
        if any(vals):
            series[kind] = vals
    fig, (ax_mem, ax_load) = plt.subplots(2, 1, figsize=(12, 7.5), sharex=True)
    bottom = [0.0] * plan.pp
    for label, vals in series.items():
        ax_mem.bar(x, vals, bottom=bottom, width=0.8, label=label, linewidth=0)
        bottom = [a + b for a, b in zip(bottom, vals)]
    by_mem, by_load = plan.worst_stage("memory"), plan.worst_stage("load")
    ax_mem.set_ylabel("GiB on the stage's fullest rank")
    ax_mem.set_title(f"{model_name}: memory by kind per pipeline stage (mesh {pipeline_mesh_text(plan)}); "
                     f"worst stage {by_mem}")
    ax_mem.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    summaries = plan.stage_summaries()
    ax_load.bar(x, [s.max_load / 1e9 for s in summaries], width=0.8, label="max over the stage's ranks", linewidth=0)
    ax_load.plot(x, [s.mean_load / 1e9 for s in summaries], "k_", markersize=18, label="mean over the stage's ranks")
    ax_load.set_ylabel("modeled GFLOP per step")
    ax_load.set_xlabel("pipeline stage")
    ax_load.set_xticks(x)
    ax_load.set_title(f"load per stage (worst stage by load: {by_load})")
    ax_load.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["format_pipeline_report", "modules_text", "pipeline_mesh_text", "write_pipeline_png"]
