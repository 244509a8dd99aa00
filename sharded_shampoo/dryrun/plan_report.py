"""The dry-run's output for one plan: the per-rank text table and summary, and the PNG chart.

Pure functions of a :class:`~..planning.plan.ShampooPlan` (no process group, no model);
``report.py`` picks between these and the pipeline report (``stage_report.py``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from ..config import PlanSettings
from ..planning.costs import RANK_STATE_KINDS
from ..planning.plan import ShampooPlan
from .errors import DryRunError


def human_bytes(n: float) -> str:
    """Binary units, 3 significant digits: 1536 -> '1.50 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError


def human_flops(n: float) -> str:
    for unit, scale in (("PF", 1e15), ("TF", 1e12), ("GF", 1e9), ("MF", 1e6), ("KF", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g} F"


_COLUMNS: list[tuple[str, Callable[[Any], float], Callable[[float], str]]] = [
    ("blocks", lambda r: r.num_blocks, lambda v: f"{v:.0f}"),
    ("params", lambda r: r.param_bytes, human_bytes),
    ("grads", lambda r: r.grad_bytes, human_bytes),
    ("opt state", lambda r: r.optimizer_state_bytes, human_bytes),
    ("resident", lambda r: r.resident_buffer_bytes, human_bytes),
    ("comm/step", lambda r: r.comm_bytes_per_step, human_bytes),
    ("transient", lambda r: r.peak_transient_bytes, human_bytes),
    ("step FLOPs", lambda r: r.step_flops, human_flops),
    ("root FLOPs", lambda r: r.amortized_flops, human_flops),
    ("load/step", lambda r: r.load, human_flops),
]


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def mesh_text(plan: ShampooPlan) -> str:
    """``4 (FSDP)``, ``2x16 (HSDP: replicate x shard)`` or ``dp=2 x fsdp=4 x tp=2``."""
    shape, names = plan.mesh.shape, plan.mesh.dim_names
    if len(shape) == 1:
        return f"{shape[0]} (FSDP)"
    if len(shape) == 2 and names in (None, ("dp", "fsdp"), ("replicate", "shard")):
        return f"{shape[0]}x{shape[1]} (HSDP: replicate x shard)"
    if names is None:
        return "x".join(map(str, shape))
    return " x ".join(f"{n}={s}" for n, s in zip(names, shape))


def _lead_columns(plan: ShampooPlan) -> tuple[list[str], Callable[[Any, bool], list[str]]]:
    """Rank columns: rank; + replica/shard for HSDP; + the mesh coordinate for other meshes."""
    ndim = len(plan.mesh.shape)
    if ndim == 1:
        return ["rank"], lambda r, blank: []
    if ndim == 2 and plan.mesh.dim_names in (None, ("dp", "fsdp"), ("replicate", "shard")):
        return ["rank", "rep", "shard"], lambda r, blank: ["", ""] if blank else [str(r.replica), str(r.shard)]
    names = plan.mesh.dim_names or tuple(f"d{i}" for i in range(ndim))
    return ["rank", ",".join(names)], lambda r, blank: [""] if blank else [",".join(map(str, r.coordinate))]


def format_plan_report(plan: ShampooPlan, model_name: str = "model", *, top: int = 8, all_ranks: bool = False,
                       rank_offset: int = 0, mesh_label: str | None = None) -> str:
    """The per-rank table (or min/median/max + busiest ranks for big meshes) and the balance summary.

    ``rank_offset`` is added to the rank numbers shown (a pipeline stage's first job-wide rank) and
    ``mesh_label`` replaces the mesh description.
    """
    s = plan.summary
    n = plan.mesh.world_size
    settings = plan.settings[0] if plan.settings else PlanSettings()
    lines = [
        f"model {model_name} | mesh {mesh_label or mesh_text(plan)} | {s.num_params} params | {s.num_blocks} blocks | "
        f"max_preconditioner_dim {settings.max_preconditioner_dim} | precondition_frequency "
        f"{settings.precondition_frequency} | {type(settings.preconditioner).__name__}",
        f"parameters: {human_bytes(s.total_param_bytes)} total; optimizer state: "
        f"{human_bytes(s.total_optimizer_state_bytes)} total",
        "",
    ]
    lead, lead_cells = _lead_columns(plan)
    header = lead + [c[0] for c in _COLUMNS]

    def row(r: Any, label: str | None = None) -> list[str]:
        return [label if label is not None else str(r.rank + rank_offset)] + lead_cells(r, label is not None) + \
            [fmt(get(r)) for _, get, fmt in _COLUMNS]

    if all_ranks or n <= 16:
        lines.append(table(header, [row(r) for r in plan.ranks]))
    else:
        stats_rows = []
        for label, fn in (("min", min), ("median", statistics.median), ("max", max)):
            vals = [fmt(fn([get(r) for r in plan.ranks])) for _, get, fmt in _COLUMNS]
            stats_rows.append([label] + [""] * (len(lead) - 1) + vals)
        lines.append(f"over {n} ranks (each column independently):")
        lines.append(table(header, stats_rows))
        busiest = sorted(plan.ranks, key=lambda r: (-r.load, r.rank))[:top]
        lines += ["", f"busiest {len(busiest)} ranks by load:", table(header, [row(r) for r in busiest])]
    lines += ["", *_summary_lines(plan)]
    return "\n".join(lines)


def _summary_lines(plan: ShampooPlan) -> list[str]:
    s = plan.summary
    kinds = s.total_state_bytes_by_kind
    return [
        "optimizer state by kind (all ranks): " + ", ".join(f"{k} {human_bytes(v)}" for k, v in kinds.items() if v),
        "load = step FLOPs + root FLOPs / precondition_frequency (modeled; see docs/cost_model.md)",
        f"imbalance max/mean: {s.imbalance:.4f}   lower bound max(total/N, largest block): "
        f"{human_flops(s.lower_bound)} -> max/lower bound {s.max_over_lower_bound:.4f}"
        + (f" (pigeonhole bound {human_flops(s.tight_lower_bound)} -> {s.max_over_tight_lower_bound:.4f})"
           if s.tight_lower_bound > s.lower_bound * (1 + 1e-9) else ""),
        f"whole parameters round-robin would give: max/mean {s.round_robin_param_imbalance:.3f}, "
        f"max/lower bound {s.round_robin_param_max_over_lower_bound:.3f}",
        f"max per rank: params+grads+state+buffers {human_bytes(s.max_persistent_bytes)} "
        f"(resident buffers {human_bytes(s.max_resident_buffer_bytes)}), "
        f"transient peak {human_bytes(s.max_peak_transient_bytes)}, "
        f"comm/step total {human_bytes(s.total_comm_bytes_per_step)}",
    ]


# ----------------------------------------------------------------------------- PNG


def pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise DryRunError("--png needs matplotlib: pip install 'sharded-shampoo[plot]' (or matplotlib).") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_plan_png(plan: ShampooPlan, path: str, model_name: str = "model") -> None:
    """Per-rank memory stacked by kind (top) and per-rank load split step/root (bottom)."""
    plt = pyplot()
    ranks = list(range(plan.mesh.world_size))
    series: dict[str, list[int]] = {
        "params": [r.param_bytes for r in plan.ranks],
        "grads": [r.grad_bytes for r in plan.ranks],
    }
    for kind in RANK_STATE_KINDS:
        vals = [r.state_bytes_by_kind.get(kind, 0) for r in plan.ranks]
        if any(vals):
            series[kind] = vals
    gib = 1024 ** 3
    fig, (ax_mem, ax_load) = plt.subplots(2, 1, figsize=(12, 7.5), sharex=True)
    bars = len(ranks) <= 256
    bottom = [0.0] * len(ranks)
    for label, vals in series.items():
        v = [x / gib for x in vals]
        if bars:
            ax_mem.bar(ranks, v, bottom=bottom, width=0.9, label=label, linewidth=0)
        else:
            ax_mem.fill_between(ranks, bottom, [a + b for a, b in zip(bottom, v)], step="mid", label=label,
                                linewidth=0)
        bottom = [a + b for a, b in zip(bottom, v)]
    ax_mem.set_ylim(0, 1.06 * max(bottom) if bottom and max(bottom) > 0 else 1)
    ax_mem.set_ylabel("GiB per rank")
    ax_mem.set_title(f"{model_name}: memory per rank by kind (mesh {mesh_text(plan)})")
    ax_mem.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    step = [r.step_flops / 1e9 for r in plan.ranks]
    amort = [(r.load - r.step_flops) / 1e9 for r in plan.ranks]
    if bars:
        ax_load.bar(ranks, step, width=0.9, label="step", linewidth=0)
        ax_load.bar(ranks, amort, bottom=step, width=0.9, label="root / precondition_frequency", linewidth=0)
    else:
        top_vals = [a + b for a, b in zip(step, amort)]
        ax_load.fill_between(ranks, 0, step, step="mid", label="step", linewidth=0)
        ax_load.fill_between(ranks, step, top_vals, step="mid", label="root / precondition_frequency", linewidth=0)
    s = plan.summary
    ax_load.axhline(s.mean_load / 1e9, color="k", linestyle="--", linewidth=1, label="mean")
    ax_load.axhline(s.lower_bound / 1e9, color="r", linestyle=":", linewidth=1, label="lower bound")
    ax_load.set_ylabel("modeled GFLOP per step")
    ax_load.set_xlabel("rank")
    title = f"load per rank: max/mean {s.imbalance:.3f}, max/lower bound {s.max_over_lower_bound:.3f}"
    totals = [a + b for a, b in zip(step, amort)]
    if totals and min(totals) > 0 and max(totals) / min(totals) < 1.2:
        # well balanced: zoom in so the differences are visible (and say so)
        ax_load.set_ylim(0.97 * min(totals), 1.015 * max(totals + [s.lower_bound / 1e9]))
        title += " (y axis zoomed)"
    ax_load.set_title(title)
    ax_load.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["format_plan_report", "human_bytes", "human_flops", "mesh_text", "pyplot", "table", "write_plan_png"]
