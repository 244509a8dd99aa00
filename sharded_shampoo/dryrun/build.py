"""Dry-run pipeline: model -> meta device -> fake-process-group parallelism -> the optimizer's plan.

Build the model on the meta device, apply tensor parallel, expert parallel and FSDP2 over a
*fake* process group of the requested mesh (``parallelize.py``, ``meshes.py``), read the
DTensor placements with the optimizer's own parser (``runtime/placements.py``) and run the
same :func:`~..planning.plan.make_plan` the optimizer runs. Nothing is allocated and nothing is
communicated, so a 405B model on a 2048-rank mesh plans on a laptop.

Why go through ``fully_shard`` and ``parallelize_module`` instead of computing placements by
hand: the dry-run must see exactly the DTensors a training job sees (global shapes, dtypes,
``Shard``/``_StridedShard``/``Replicate``), including whatever torch does with tied or odd-shaped
parameters. This module is the one home of the pipeline: the CLI calls :func:`plan_model`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import PlanSettings
from ..planning.balance import DEFAULT_LOCALITY_TOLERANCE
from ..planning.costs import DEFAULT_COST_MODEL, CostModel
from ..planning.layout import MeshSpec, ParamSpec
from ..planning.pipeline import PipelinePlan, make_pipeline_plan
from ..planning.plan import ShampooPlan, make_plan
from ..runtime.placements import param_specs_from_tensors
from .meshes import FakeMeshes, MeshAxes, parse_axes
from .parallelize import apply_parallelism, expert_param_names
from .presets import PRESETS, preset_names
from .errors import DryRunError
from .stages import StageSplit, split_stages
from .sharded import ShardedModel
from .titan_source import is_titan_source, shard_titan_stages, titan_spec
from .twins import find_twins
from .views import ModelView

#: a preset name, ``"pkg.mod:factory"``, ``"torchtitan:<model>:<flavor>"``, a factory, or a torchtitan ModelSpec
ModelSource = str | Callable[[], nn.Module] | Any

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "f32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "f16": torch.float16, "half": torch.float16,
    "fp64": torch.float64, "float64": torch.float64, "f64": torch.float64,
}


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
                         "package.module:factory or torchtitan:<model>:<flavor>.")
    module_name, _, attr = source.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model {source!r}: write package.module:factory, both parts non-empty.")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise ValueError(f"--model {source!r}: cannot import module {module_name!r} ({type(err).__name__}: {err}); "
                         "check the name and that its directory is on PYTHONPATH.") from err
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"--model {source!r}: module {module_name!r} has no attribute {attr!r}.")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"--model {source!r}: {attr!r} is a {type(factory).__name__}, not a callable that "
                         "returns an nn.Module.")
    return source, factory


def _build_on_meta(factory: Callable[[], nn.Module], name: str) -> nn.Module:
    """Call the user's factory under the meta device; any failure becomes one clear ValueError."""
    try:
        with torch.device("meta"):
            model = factory()
    except TypeError as err:
        raise ValueError(f"--model {name!r}: calling the factory failed ({err}); it must be callable with no "
                         "arguments (wrap it, e.g. `def build(): return MyModel(cfg)`).") from err
    except Exception as err:
        raise ValueError(f"--model {name!r}: the factory raised {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {name!r} returned a {type(model).__name__}; the factory must return an "
                         "nn.Module.")
    if any(p.device.type != "meta" for p in model.parameters()):
        model = model.to("meta")  # a factory that pinned a device: drop the storage
    return model


def _parallelize(model: nn.Module, meshes: FakeMeshes, name: str) -> None:
    axes, dense = meshes.axes, meshes.dense
    dp_names = tuple(n for n in ("dp", "fsdp") if n in dense.mesh_dim_names)
    dp = dense[dp_names] if len(dp_names) > 1 else dense[dp_names[0]]
    kwargs: dict[str, Any] = {"tp_mesh": dense["tp"] if axes.tp > 1 else None}
    if meshes.sparse is not None:
        sparse = meshes.sparse
        edp = tuple(n for n in ("dp", "efsdp") if n in sparse.mesh_dim_names)
        kwargs.update(ep_mesh=sparse["ep"], expert_dp_mesh=sparse[edp] if len(edp) > 1 else sparse[edp[0]])
    apply_parallelism(model, dp, name=name, **kwargs)


def shard_model(factory: Callable[[], nn.Module], axes: MeshAxes, param_dtype: torch.dtype | None = None,
                name: str = "model") -> ShardedModel:
    """ParamSpecs of ``factory()`` after the parallelization of a job on ``axes``, over a fake process group.

    Only trainable parameters are reported. The fake process group is destroyed afterwards, so
    this can be called repeatedly in one process. For ``pp > 1`` use :func:`shard_stages`.
    """
    if axes.pp > 1:
        raise ValueError(f"shard_model plans one model part; with pp={axes.pp} use shard_stages (one per stage).")
    return shard_stages(factory, axes, param_dtype, name)[0]


def shard_stages(factory: Callable[[], nn.Module], axes: MeshAxes, param_dtype: torch.dtype | None = None,
                 name: str = "model", stage_split: StageSplit | None = None,
                 parallelize_all: bool = False) -> list[ShardedModel]:
    """One :class:`ShardedModel` per pipeline stage (one in all for ``pp = 1``).

    The model is built whole, cut into stages (``stages.py``), and every stage is parallelized over
    the same fake process group of one stage's ``dp x fsdp x tp`` ranks; identical layers are
    parallelized once (``twins.py``) unless ``parallelize_all``.
    """
    import torch.distributed as dist
    from .._torch_compat import fake_store

    if not dist.is_available():
        raise DryRunError("the dry-run needs torch.distributed, which this torch build lacks.")
    if dist.is_initialized():
        raise DryRunError("a default process group is already initialized; the dry-run creates its own fake one. "
                          "Run it in a separate process or call torch.distributed.destroy_process_group() first.")
    model = _build_on_meta(factory, name)
    if param_dtype is not None:
        model = model.to(dtype=param_dtype)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"--model {name!r} has no trainable parameters to plan.")
    parts: list[nn.Module] = [model] if axes.pp == 1 else list(split_stages(model, axes.pp, stage_split, name))
    names = [[n for n, p in part.named_parameters() if p.requires_grad] for part in parts]
    twins = [None if parallelize_all else find_twins(part, axes.tp > 1) for part in parts]
    dist.init_process_group("fake", store=fake_store(), rank=0, world_size=axes.stage_world_size)
    try:
        meshes = FakeMeshes(axes)
        targets = [twin.view if twin is not None else part for part, twin in zip(parts, twins)]
        for target in targets:
            _parallelize(target, meshes, name)
        built = [(n, p) for target in targets for n, p in target.named_parameters() if p.requires_grad]
        specs, mesh = param_specs_from_tensors(built, meshes.dense, coordinates=meshes.coordinates)
    finally:
        dist.destroy_process_group()
    by_name = {s.name: s for s in specs}
    out = []
    for part, part_names, twin in zip(parts, names, twins):
        copies = twin.copies if twin is not None else {}
        stage_specs = [by_name[n] if n in by_name else dataclasses.replace(by_name[copies[n]], name=n)
                       for n in part_names]
        modules = list(part.names) if isinstance(part, ModelView) else []
        out.append(ShardedModel(stage_specs, mesh, expert_param_names(part), modules))
    return out


def sharded_param_specs(factory: Callable[[], nn.Module], mesh: str | tuple[int, ...] | MeshAxes,
                        param_dtype: torch.dtype | None = None, name: str = "model"
                        ) -> tuple[list[ParamSpec], MeshSpec]:
    """ParamSpecs and the plan mesh of ``factory()`` laid out on ``mesh`` (see :func:`shard_model`)."""
    sharded = shard_model(factory, parse_axes(mesh), param_dtype, name)
    return sharded.specs, sharded.mesh


def settings_per_param(sharded: ShardedModel, settings: PlanSettings) -> list[PlanSettings]:
    """The optimizer's param groups of a training job: expert weights get per-expert blocks."""
    experts = dataclasses.replace(settings, blocking=dataclasses.replace(settings.blocking, batch_dims=1))
    return [experts if s.name in sharded.experts else settings for s in sharded.specs]


def plan_model(model: ModelSource, mesh: str | tuple[int, ...] | MeshAxes, settings: PlanSettings = PlanSettings(),
               *, param_dtype: torch.dtype | str | None = None, memory_cap_bytes: int | None = None,
               cost_model: CostModel = DEFAULT_COST_MODEL, tp: int | None = None, ep: int | None = None,
               stage_split: StageSplit | None = None, parallelize_all: bool = False,
               tolerance: float = DEFAULT_LOCALITY_TOLERANCE) -> ShampooPlan | PipelinePlan:
    """The dry-run as a function (for notebooks and the CLI): the plan a training job on ``mesh`` would use.

    ``model``: preset name, ``"package.module:factory"``, a zero-argument callable returning an
    ``nn.Module`` (called under ``torch.device("meta")``), or a torchtitan model:
    ``"torchtitan:<model>:<flavor>"`` (e.g. ``"torchtitan:llama3:8B"``) or a torchtitan ``ModelSpec``,
    built and parallelized by torchtitan's own ``parallelize_fn`` / ``pipelining_fn``
    (``dryrun/titan_source.py``). ``mesh``: ``"64"``, ``"16x64"``,
    ``"dp=8,fsdp=32,tp=8"``, ``"pp=16,dp=32,fsdp=16,tp=8"``, a shape tuple or :class:`MeshAxes`;
    ``tp``/``ep`` add those axes. With ``pp > 1`` the result is a :class:`PipelinePlan` (one plan per
    stage, over that stage's ranks); the stages are the model's ``pipeline_stages(pp)`` unless
    ``stage_split`` gives them (see ``dryrun/stages.py``). Identical layers are parallelized once and
    share the placements (``dryrun/twins.py``); ``parallelize_all`` parallelizes every layer.
    ``tolerance``: the balancer's extra load room (``planning/balance.py``).
    """
    axes = parse_axes(mesh, tp=tp, ep=ep)
    dtype = parse_dtype(param_dtype) if isinstance(param_dtype, str) else param_dtype
    if is_titan_source(model):
        if stage_split is not None:
            raise ValueError("stage_split: a torchtitan model is split into stages by torchtitan's own "
                             "pipelining_fn; leave stage_split unset.")
        name, spec = titan_spec(model)
        sharded = shard_titan_stages(spec, axes, dtype, name)
    else:
        name, factory = resolve_model(model)
        sharded = shard_stages(factory, axes, dtype, name, stage_split, parallelize_all)
    if axes.pp == 1:
        return make_plan(sharded[0].specs, sharded[0].mesh, settings_per_param(sharded[0], settings),
                         memory_cap_bytes, cost_model=cost_model, tolerance=tolerance)
    return make_pipeline_plan([s.specs for s in sharded], sharded[0].mesh,
                              [settings_per_param(s, settings) for s in sharded], memory_cap_bytes,
                              stage_modules=[s.modules for s in sharded], cost_model=cost_model, tolerance=tolerance)


__all__ = ["ModelSource", "ShardedModel", "parse_dtype", "plan_model", "resolve_model", "settings_per_param",
           "shard_model", "shard_stages", "sharded_param_specs"]
