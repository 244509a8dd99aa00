"""Dry-run planner: build a model on the meta device, shard it with FSDP2 over a *fake* process
group of the requested mesh, and run the same :func:`~sharded_shampoo.plan.make_plan` the
optimizer runs. Nothing is allocated and nothing is communicated, so a 405B model on a
2048-rank mesh plans on a laptop.

Why go through ``fully_shard`` instead of computing placements by hand: the dry-run must see
exactly the DTensors a training job sees (global shapes, dtypes, ``Shard(0)`` vs
``Replicate``), including whatever FSDP2 does with tied or odd-shaped parameters.

Text tables and the PNG chart live here too (:func:`format_report`, :func:`write_png`).
"""

from __future__ import annotations

import importlib
import math
import re
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..planning.costs import CostModel, DEFAULT_COST_MODEL, RANK_STATE_KINDS
from ..planning.layout import MeshSpec, ParamSpec
from ..config import PlanSettings
from ..planning.plan import ShampooPlan, make_plan
from ..runtime.placements import param_specs_from_tensors
from .presets import PRESETS, fsdp_units, preset_names

ModelSource = str | Callable[[], nn.Module]


class DryRunError(RuntimeError):
    """The dry-run cannot run in this environment (a live process group, no matplotlib, ...)."""


_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "f32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "f16": torch.float16, "half": torch.float16,
    "fp64": torch.float64, "float64": torch.float64, "f64": torch.float64,
}


# ----------------------------------------------------------------------------- parsing


def parse_mesh(text: str) -> tuple[int, ...]:
    """``"64"`` -> ``(64,)`` (FSDP); ``"16x64"`` -> ``(16, 64)`` (HSDP: replicate x shard)."""
    if not isinstance(text, str) or not re.fullmatch(r"\s*[0-9]+\s*([xX]\s*[0-9]+\s*)?", text):
        raise ValueError(f"--mesh {text!r} is not valid: use S (e.g. 64) for FSDP or RxS (e.g. 16x64) for "
                         "HSDP with R replicas of S shards.")
    shape = tuple(int(part) for part in re.split(r"[xX]", text.strip()))
    if any(d < 1 for d in shape):
        raise ValueError(f"--mesh {text!r} has a zero dimension: every mesh dimension must be >= 1.")
    return shape


def parse_dtype(text: str, option: str = "--param-dtype") -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/... -> ``torch.bfloat16``."""
    key = text.strip().lower().removeprefix("torch.") if isinstance(text, str) else None
    if key not in _DTYPES:
        raise ValueError(f"{option} {text!r} is not a known dtype; use one of fp32, bf16, fp16, fp64.")
    return _DTYPES[key]


def resolve_model(source: ModelSource) -> tuple[str, Callable[[], nn.Module]]:
    """A display name and a zero-argument factory for a preset name, ``"pkg.mod:factory"`` or a callable."""
    if callable(source):
        return getattr(source, "__qualname__", repr(source)), source
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"--model must be a preset ({', '.join(preset_names())}) or package.module:factory; "
                         f"got {source!r}.")
    source = source.strip()
    if source in PRESETS:
        return source, PRESETS[source]
    if ":" not in source:
        raise ValueError(f"--model {source!r} is not a preset ({', '.join(preset_names())}) and not of the form "
                         "package.module:factory.")
    module_name, _, attr = source.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model {source!r}: write package.module:factory, both parts non-empty.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"--model {source!r}: cannot import module {module_name!r} ({err}); check the name and "
                         "that its directory is on PYTHONPATH.") from err
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"--model {source!r}: module {module_name!r} has no attribute {attr!r}.")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"--model {source!r}: {attr!r} is a {type(factory).__name__}, not a callable that "
                         "returns an nn.Module.")
    return source, factory


# ----------------------------------------------------------------------------- fake-PG sharding


def sharded_param_specs(factory: Callable[[], nn.Module], mesh_shape: tuple[int, ...],
                        param_dtype: torch.dtype | None = None, name: str = "model"
                        ) -> tuple[list[ParamSpec], MeshSpec]:
    """ParamSpecs of ``factory()`` after ``fully_shard`` over a fake process group of ``mesh_shape``.

    The model is built under ``torch.device("meta")``; each unit of :func:`presets.fsdp_units`
    and then the root get ``fully_shard``; only trainable parameters are reported. The fake
    process group is destroyed afterwards, so this can be called repeatedly in one process.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    mesh_shape = tuple(mesh_shape)
    MeshSpec(mesh_shape)  # validates
    if not dist.is_available():
        raise DryRunError("the dry-run needs torch.distributed, which this torch build lacks.")
    if dist.is_initialized():
        raise DryRunError("a default process group is already initialized; the dry-run creates its own fake one. "
                           "Run it in a separate process or call torch.distributed.destroy_process_group() first.")
    world = math.prod(mesh_shape)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        names = ("shard",) if len(mesh_shape) == 1 else ("replicate", "shard")
        device_mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
        with torch.device("meta"):
            model = factory()
        if not isinstance(model, nn.Module):
            raise ValueError(f"--model {name!r} returned a {type(model).__name__}; the factory must return an "
                             "nn.Module.")
        if any(p.device.type != "meta" for p in model.parameters()):
            model = model.to("meta")  # a factory that pinned a device: drop the storage
        if param_dtype is not None:
            model = model.to(dtype=param_dtype)
        for unit in fsdp_units(model):
            fully_shard(unit, mesh=device_mesh)
        fully_shard(model, mesh=device_mesh)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        specs, mesh = param_specs_from_tensors(trainable)
        if not specs:
            raise ValueError(f"--model {name!r} has no trainable parameters to plan.")
        return specs, MeshSpec(mesh_shape) if mesh.shape == (1,) else mesh
    finally:
        dist.destroy_process_group()


def plan_model(model: ModelSource, mesh: str | tuple[int, ...], settings: PlanSettings = PlanSettings(), *,
               param_dtype: torch.dtype | str | None = None, memory_cap_bytes: int | None = None,
               cost_model: CostModel = DEFAULT_COST_MODEL) -> ShampooPlan:
    """The dry-run as a function (for notebooks): the plan a training job on ``mesh`` would use.

    ``model``: preset name, ``"package.module:factory"`` or a zero-argument callable returning an
    ``nn.Module`` (it is called under ``torch.device("meta")``). ``mesh``: ``"64"``, ``"16x64"``
    or a shape tuple.
    """
    name, factory = resolve_model(model)
    shape = parse_mesh(mesh) if isinstance(mesh, str) else tuple(mesh)
    dtype = parse_dtype(param_dtype) if isinstance(param_dtype, str) else param_dtype
    specs, mesh_spec = sharded_param_specs(factory, shape, dtype, name)
    return make_plan(specs, mesh_spec, settings, memory_cap_bytes, cost_model=cost_model)


# ----------------------------------------------------------------------------- text report


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
    ("comm/step", lambda r: r.comm_bytes_per_step, human_bytes),
    ("transient", lambda r: r.peak_transient_bytes, human_bytes),
    ("step FLOPs", lambda r: r.step_flops, human_flops),
    ("root FLOPs", lambda r: r.amortized_flops, human_flops),
    ("load/step", lambda r: r.load, human_flops),
]


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def format_report(plan: ShampooPlan, model_name: str = "model", *, top: int = 8, all_ranks: bool = False) -> str:
    """The per-rank table (or min/median/max + busiest ranks for big meshes) and the balance summary."""
    s = plan.summary
    n = plan.mesh.world_size
    hsdp = len(plan.mesh.shape) == 2
    settings = plan.settings[0] if plan.settings else PlanSettings()
    mesh_txt = f"{plan.mesh.shape[0]}x{plan.mesh.shape[1]} (HSDP: replicate x shard)" if hsdp \
        else f"{n} (FSDP)"
    lines = [
        f"model {model_name} | mesh {mesh_txt} | {s.num_params} params | {s.num_blocks} blocks | "
        f"max_preconditioner_dim {settings.max_preconditioner_dim} | precondition_frequency "
        f"{settings.precondition_frequency} | {type(settings.preconditioner).__name__}",
        f"parameters: {human_bytes(s.total_param_bytes)} total; optimizer state: "
        f"{human_bytes(s.total_optimizer_state_bytes)} total",
        "",
    ]
    header = ["rank"] + (["rep", "shard"] if hsdp else []) + [c[0] for c in _COLUMNS]

    def row(r: Any, label: str | None = None) -> list[str]:
        lead = [label if label is not None else str(r.rank)]
        if hsdp:
            lead += ["" if label else str(r.replica), "" if label else str(r.shard)]
        return lead + [fmt(get(r)) for _, get, fmt in _COLUMNS]

    if all_ranks or n <= 16:
        lines.append(_table(header, [row(r) for r in plan.ranks]))
    else:
        stats_rows = []
        for label, fn in (("min", min), ("median", statistics.median), ("max", max)):
            vals = [fmt(fn([get(r) for r in plan.ranks])) for _, get, fmt in _COLUMNS]
            stats_rows.append([label] + (["", ""] if hsdp else []) + vals)
        lines.append(f"over {n} ranks (each column independently):")
        lines.append(_table(header, stats_rows))
        busiest = sorted(plan.ranks, key=lambda r: (-r.load, r.rank))[:top]
        lines += ["", f"busiest {len(busiest)} ranks by load:", _table(header, [row(r) for r in busiest])]
    kinds = s.total_state_bytes_by_kind
    lines += [
        "",
        "optimizer state by kind (all ranks): " + ", ".join(
            f"{k} {human_bytes(v)}" for k, v in kinds.items() if v),
        "load = step FLOPs + root FLOPs / precondition_frequency (modeled; see docs/cost_model.md)",
        f"imbalance max/mean: {s.imbalance:.4f}   lower bound max(total/N, largest block): "
        f"{human_flops(s.lower_bound)} -> max/lower bound {s.max_over_lower_bound:.4f}"
        + (f" (pigeonhole bound {human_flops(s.tight_lower_bound)} -> {s.max_over_tight_lower_bound:.4f})"
           if s.tight_lower_bound > s.lower_bound * (1 + 1e-9) else ""),
        f"whole parameters round-robin would give: max/mean {s.round_robin_param_imbalance:.3f}, "
        f"max/lower bound {s.round_robin_param_max_over_lower_bound:.3f}",
        f"max per rank: params+grads+state {human_bytes(s.max_persistent_bytes)}, "
        f"transient peak {human_bytes(s.max_peak_transient_bytes)}, "
        f"comm/step total {human_bytes(s.total_comm_bytes_per_step)}",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- PNG


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise DryRunError("--png needs matplotlib: pip install 'sharded-shampoo[plot]' (or matplotlib).") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_png(plan: ShampooPlan, path: str, model_name: str = "model") -> None:
    """Per-rank memory stacked by kind (top) and per-rank load split step/root (bottom)."""
    plt = _pyplot()
    ranks = list(range(plan.mesh.world_size))
    series: dict[str, list[float]] = {
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
    ax_mem.set_title(f"{model_name}: memory per rank by kind (mesh {'x'.join(map(str, plan.mesh.shape))})")
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


__all__ = ["DryRunError", "parse_mesh", "parse_dtype", "resolve_model", "sharded_param_specs", "plan_model", "format_report",
           "write_png", "human_bytes", "human_flops"]
