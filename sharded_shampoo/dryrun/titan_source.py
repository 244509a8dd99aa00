"""Dry-run model source ``torchtitan:<model>:<flavor>``: torchtitan builds and parallelizes, we plan.

A torchtitan user trains the layout torchtitan's own ``parallelize_fn`` (and, with pipeline
parallelism, ``pipelining_fn``) produces, not ours. So this source takes the model from
torchtitan's registry (``torchtitan.models.<model>.model_registry(flavor)``, a ``ModelSpec``),
builds it on the meta device and runs torchtitan's own functions over a fake process group of the
job's world: the DTensors the planner reads are the ones the training job will have, and the
plan is the optimizer's plan of that job (``tests/test_torchtitan_dist.py`` compares it with the
state a real run allocates, byte for byte).

Pipeline parallelism: torchtitan's ``pipelining_fn`` splits the model, keeps the stages of *this*
rank's pipeline coordinate and parallelizes them. It runs on the meta device and the fake process
group, so every pipeline rank ``p`` is planned by joining the fake group as global rank
``p * W`` (``W`` = ranks of one stage) and planning the model parts it returns with one optimizer
(the container builds one ShardedShampoo over all model parts of a rank).

What is set for the build, and restored afterwards: torchtitan's SPMD backend is
``"partial_dtensor"`` (parameters are DTensors, as ShardedShampoo needs; see
docs/parallelism.md) and torchtitan's mesh device type is ``cpu`` (the fake process group needs
no accelerator). Where ``triton`` is not installed (CPU builds of torch), a stand-in for
torchtitan's Triton kernel module is registered, since every model package imports it; its
kernels raise if called (only torchtitan's GPU expert dispatcher calls them, never a dry-run).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import pkgutil
import sys
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..planning.experts import is_expert_weight
from ..runtime.placements import param_specs_from_tensors
from .meshes import MeshAxes, view_coordinates
from .sharded import ShardedModel

TITAN_PREFIX = "torchtitan:"
#: ShardedShampoo needs DTensor parameters (docs/parallelism.md, "spmd backend").
SPMD_BACKEND = "partial_dtensor"
_KERNELS = "torchtitan.distributed.minimal_async_ep.kernels"
_KERNEL_NAMES = ("copy_full_counts_to_peers_kernel", "copy_rows_to_peers_kernel", "expand_topk_grad_kernel",
                 "fill_combine_metadata_kernel", "fill_dispatch_metadata_kernel", "invert_flat_indices_kernel",
                 "reduce_topk_slots_kernel", "topk_scores_grad_kernel")
_NOT_MODELS = ("common", "utils")


def is_titan_source(source: Any) -> bool:
    """True for ``"torchtitan:<model>:<flavor>"`` and for a torchtitan ``ModelSpec`` object."""
    if isinstance(source, str):
        return source.strip().startswith(TITAN_PREFIX)
    return callable(getattr(source, "parallelize_fn", None)) and hasattr(source, "model")


def install_triton_stub() -> bool:
    """Register a stand-in for torchtitan's Triton kernel module; True if it was installed now."""
    if _KERNELS in sys.modules:
        return False
    stub = types.ModuleType(_KERNELS)

    def unavailable(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("MinimalAsyncEP Triton kernels are not available without triton")

    for kernel in _KERNEL_NAMES:
        setattr(stub, kernel, unavailable)
    sys.modules[_KERNELS] = stub
    return True


def _import_titan(module: str, source: str) -> Any:
    if importlib.util.find_spec("torchtitan") is None:
        raise ValueError(f"--model {source!r} needs torchtitan: pip install 'sharded-shampoo[torchtitan]' "
                         "(torchtitan==0.3.0 is the tested version).")
    if importlib.util.find_spec("triton") is None:
        install_triton_stub()
    return importlib.import_module(module)


def titan_model_module(model: str) -> Any:
    """``torchtitan.models.<model>`` imported (a Triton stand-in first where triton is missing).

    For building a custom ``ModelSpec`` to plan: ``titan_model_module("qwen3").model_registry(flavor)``,
    edited, then ``plan_model(spec, mesh)``.
    """
    return _import_titan(f"torchtitan.models.{model}", f"torchtitan:{model}")


def titan_model_names() -> list[str]:
    """The model packages of the installed torchtitan (``llama3``, ``qwen3``, ...)."""
    models = _import_titan("torchtitan.models", "torchtitan:")
    return sorted(m.name for m in pkgutil.iter_modules(models.__path__) if m.ispkg and m.name not in _NOT_MODELS)


def _flavors(module: Any) -> list[str]:
    """Flavor names of a model package: the keys of its ``*_configs`` registry dicts."""
    names: set[str] = set()
    for attr in dir(module):
        value = getattr(module, attr)
        if attr.endswith("_configs") and isinstance(value, dict):
            names.update(str(k) for k in value)
    return sorted(names)


def titan_spec(source: Any) -> tuple[str, Any]:
    """A display name and torchtitan's ``ModelSpec`` for ``"torchtitan:<model>:<flavor>"`` (or a ModelSpec)."""
    if not isinstance(source, str):
        return f"torchtitan:{getattr(source, 'name', '?')}:{getattr(source, 'flavor', '?')}", source
    text = source.strip()
    model, _, flavor = text[len(TITAN_PREFIX):].partition(":")
    if not model or not flavor or ":" in flavor:
        raise ValueError(f"--model {text!r}: write torchtitan:<model>:<flavor>, e.g. torchtitan:llama3:8B or "
                         "torchtitan:qwen3:debugmodel_moe.")
    known = titan_model_names()
    if model not in known:
        raise ValueError(f"--model {text!r}: torchtitan has no model {model!r}; its models are {', '.join(known)}.")
    module = titan_model_module(model)
    registry = getattr(module, "model_registry", None)
    if not callable(registry):
        raise ValueError(f"--model {text!r}: torchtitan.models.{model} has no model_registry(flavor) to build from.")
    try:
        spec = registry(flavor)
    except KeyError:
        raise ValueError(f"--model {text!r}: torchtitan's {model} has no flavor {flavor!r}; its flavors are "
                         f"{', '.join(_flavors(module))}.") from None
    return text, spec


@contextmanager
def _titan_build_settings() -> Iterator[None]:
    """torchtitan's SPMD backend and mesh device type for the build (module doc); restored after."""
    from torchtitan.distributed import parallel_dims, utils

    backend, device_type = utils.get_spmd_backend(), parallel_dims.device_type
    utils.set_spmd_backend(SPMD_BACKEND)
    parallel_dims.device_type = "cpu"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # torchtitan's and FSDP's notes about meta tensors
            yield
    finally:
        utils.set_spmd_backend(backend)
        parallel_dims.device_type = device_type


def _configs(axes: MeshAxes) -> tuple[Any, Any, Any]:
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig

    parallelism = ParallelismConfig(pipeline_parallel_degree=axes.pp, data_parallel_replicate_degree=axes.dp,
                                    data_parallel_shard_degree=axes.fsdp, tensor_parallel_degree=axes.tp,
                                    expert_parallel_degree=axes.ep, spmd_backend=SPMD_BACKEND)
    # the batch size only has to give the pipeline schedule one microbatch per stage
    training = TrainingConfig(local_batch_size=max(8, axes.pp), seq_len=2048)
    return parallelism, training, CompileConfig()


def _views(axes: MeshAxes) -> dict[tuple[str, ...], tuple[int, ...]]:
    """torchtitan's dense and sparse meshes (``ParallelDims.build_mesh``, partial_dtensor), as named views."""
    return {("pp", "dp_replicate", "fsdp", "tp"): (axes.pp, axes.dp, axes.fsdp, axes.tp),
            ("pp", "dp_replicate", "efsdp", "ep"): (axes.pp, axes.dp, axes.efsdp, axes.ep)}


def _part_modules(part: nn.Module) -> list[str]:
    """A model part's modules as pipeline stages name them (``tok_embeddings``, ``layers.3``, ``lm_head``)."""
    out: list[str] = []
    for name, child in part.named_children():
        if isinstance(child, (nn.ModuleDict, nn.ModuleList)):
            out.extend(f"{name}.{key}" for key, _ in child.named_children())
        elif any(True for _ in child.parameters()):
            out.append(name)
    return out


def _model_parts(spec: Any, axes: MeshAxes, param_dtype: torch.dtype | None, name: str) -> list[nn.Module]:
    """torchtitan builds and parallelizes the model parts of this (fake) rank's pipeline coordinate."""
    import torch.distributed as dist
    from torchtitan.distributed import ParallelDims

    parallelism, training, compile_config = _configs(axes)
    phase = "ParallelDims"
    try:
        parallel_dims = ParallelDims.from_config(parallelism, dist.get_world_size())
        parallel_dims.build_mesh()
        phase = "model build"
        model_config = copy.deepcopy(spec.model)
        model_config.update_from_config(config=types.SimpleNamespace(parallelism=parallelism, training=training))
        with torch.device("meta"):
            model = model_config.build()
        if param_dtype is not None:
            model = model.to(dtype=param_dtype)
        common = dict(parallel_dims=parallel_dims, training=training, parallelism=parallelism,
                      compile_config=compile_config, ac_config=None, dump_folder="")
        if axes.pp == 1:
            phase = "parallelize_fn"
            return [spec.parallelize_fn(model, **common)]
        phase = "pipelining_fn"
        _, parts, _, _ = spec.pipelining_fn(model, **common, device=torch.device("meta"), model_config=model_config,
                                            parallelize_fn=spec.parallelize_fn, loss_fn=_no_loss)
        return list(parts)
    except (AssertionError, ValueError, NotImplementedError, KeyError, TypeError, RuntimeError) as err:
        raise ValueError(f"--model {name!r} on {_describe(axes)}: torchtitan's {phase} refused the layout "
                         f"({type(err).__name__}: {err}).") from err


def _no_loss(*args: Any) -> torch.Tensor:
    raise RuntimeError("the dry-run never runs a pipeline schedule")


def _describe(axes: MeshAxes) -> str:
    return ",".join(f"{n}={getattr(axes, n)}" for n in ("pp", "dp", "fsdp", "tp", "ep") if getattr(axes, n) > 1) \
        or "fsdp=1"


def shard_titan_stages(spec: Any, axes: MeshAxes, param_dtype: torch.dtype | None = None,
                       name: str = "torchtitan") -> list[ShardedModel]:
    """One :class:`ShardedModel` per pipeline rank (one in all for ``pp = 1``), laid out by torchtitan.

    Expert weights are named as torchtitan's container names them (3-D, under a module ending in
    ``experts``: ``planning/experts.py``), so they get per-expert blocks as in training.
    """
    import torch.distributed as dist
    from .._torch_compat import fake_store

    from .errors import DryRunError

    if dist.is_initialized():
        raise DryRunError("a default process group is already initialized; the dry-run creates its own fake one. "
                          "Run it in a separate process or call torch.distributed.destroy_process_group() first.")
    views, stage_ranks = _views(axes), axes.stage_world_size
    out: list[ShardedModel] = []
    for pp_rank in range(axes.pp):
        dist.init_process_group("fake", store=fake_store(), rank=pp_rank * stage_ranks, world_size=axes.world_size)
        try:
            with _titan_build_settings():
                parts = _model_parts(spec, axes, param_dtype, name)
                named = [(n, p) for part in parts for n, p in part.named_parameters() if p.requires_grad]
                if not named:
                    raise ValueError(f"--model {name!r} has no trainable parameters on pipeline rank {pp_rank}.")

                def coordinates(mesh: Any, plan_mesh: Any) -> list[tuple[int, ...]]:
                    return view_coordinates(views, mesh, [int(r) for r in plan_mesh.mesh.flatten().tolist()])

                specs, mesh = param_specs_from_tensors(named, coordinates=coordinates)
        finally:
            dist.destroy_process_group()
        experts = {n for n, p in named if is_expert_weight(n, p.ndim)}
        modules = [m for part in parts for m in _part_modules(part)] if axes.pp > 1 else []
        out.append(ShardedModel(specs, mesh, experts, modules))
    return out


__all__ = ["SPMD_BACKEND", "TITAN_PREFIX", "install_triton_stub", "is_titan_source", "shard_titan_stages",
           "titan_model_module", "titan_model_names", "titan_spec"]
