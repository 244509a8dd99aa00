"""Randomized multi-rank fuzzing, part 2: a :class:`~fuzz_cases.Case` -> a live model, layout and optimizer.

Layouts are built the way training jobs build them: ``fully_shard`` per unit and at the root (FSDP2,
HSDP on a 2-D mesh, some parameters sharded on another dim by ``shard_placement_fn``, 0-D ones as
``ignored_params``), torch's ``parallelize_module`` for tensor parallelism, torchtitan's recipe for
expert parallelism (experts ``Shard(0)`` over ``ep``, then FSDP over the expert data-parallel
mesh), plain replicated tensors for DDP and for the replicated modules of the mixed layouts.
Gradients are a pure function of (seed, parameter name, step), identical in every layout, and are
handed to each rank laid out like its parameter (no collective), so every layout sees exactly the
1-process gradients.

torch's own limits, worked around here and not by the optimizer: FSDP2 refuses non-contiguous
(channels_last, transposed) parameters, 0-D parameters and uneven shards of dims > 0;
``parallelize_module`` makes new Parameters (requires_grad=True), so frozen modules are frozen
again after the layout.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from tests.support.fuzz_cases import Case, ModuleDraw
from sharded_shampoo._torch_compat import unflatten_mesh
from sharded_shampoo import (SVD, AdaGradGrafting, AdamGrafting, BlockingConfig, CoupledNewtonConfig,
                             EigendecomposedShampoo, EigenvalueCorrectedShampoo, EighRootConfig,
                             GeneralizedPrimalAveraging, KLShampoo, NewtonSchulz, PseudoInverse, RMSpropGrafting,
                             RootInverseShampoo, ScheduleFree, SGDGrafting, ShardedShampoo, SignDescent, SpectralDescent)

DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


class Holder(nn.Module):
    """Parameters of arbitrary shapes (0-D..4-D), memory formats and one dtype."""


class FuzzModel(nn.Module):
    """The drawn modules as children; describes its FSDP units, TP plan and experts (the methods
    ``sharded_shampoo.dryrun.apply_parallelism`` reads)."""

    def __init__(self, case: Case) -> None:
        super().__init__()
        self.case_modules = case.modules
        for md in case.modules:
            self.add_module(md.name, _module(md))

    def fsdp_units(self) -> list[nn.Module]:
        return [getattr(self, md.name) for md in self.case_modules if md.own_unit and md.kind != "experts"]

    def tp_plan(self) -> dict[str, Any]:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel, "sequence": SequenceParallel}
        return {md.name: styles[md.tp]() for md in self.case_modules if md.tp}

    def expert_modules(self) -> list[nn.Module]:
        return [getattr(self, md.name) for md in self.case_modules if md.kind == "experts"]


def _module(md: ModuleDraw) -> nn.Module:
    dtype = DTYPE[md.dtype]
    p0 = md.params[0].shape
    if md.kind == "linear":
        m: nn.Module = nn.Linear(p0[1], p0[0], bias=len(md.params) > 1, dtype=dtype)
    elif md.kind == "embedding":
        m = nn.Embedding(p0[0], p0[1], dtype=dtype)
    elif md.kind == "norm":
        m = nn.RMSNorm(p0[0], dtype=dtype)
    else:
        m = Holder()
        for pd in md.params:
            m.register_parameter(pd.attr, nn.Parameter(torch.zeros(pd.shape, dtype=dtype)))
    return m


def make_model(case: Case, keep_memory: Optional[set[str]] = None) -> FuzzModel:
    """The model with the case's initial values (a pure function of the seed), memory formats, frozen flags.

    ``keep_memory``: modules whose channels_last / transposed parameters keep that memory format
    (default: all). FSDP2 refuses non-contiguous parameters, so sharded modules get contiguous ones.
    """
    model = FuzzModel(case)
    gen = torch.Generator().manual_seed(case.seed)
    for md in case.modules:
        mod = getattr(model, md.name)
        for pd in md.params:
            value = torch.randn(pd.shape, generator=gen, dtype=torch.float64) * 0.5
            keep = keep_memory is None or md.name in keep_memory
            if pd.memory == "channels_last" and keep:
                value = value.contiguous(memory_format=torch.channels_last)
            elif pd.memory == "transposed" and keep:
                value = value.t().contiguous().t()        # a transposed (non-contiguous) leaf
            param = nn.Parameter(value.to(DTYPE[md.dtype]))
            setattr(mod, pd.attr, param)
        if md.frozen:
            mod.requires_grad_(False)
    return model


def initial_params(case: Case) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in make_model(case).named_parameters()}


# ----------------------------------------------------------------------------- optimizer config


def _grafting(spec: tuple[str, dict]) -> Any:
    kind, kw = spec
    return {"none": lambda: None, "sgd": SGDGrafting, "adagrad": lambda: AdaGradGrafting(**kw),
            "rmsprop": lambda: RMSpropGrafting(**kw), "adam": lambda: AdamGrafting(**kw)}[kind]()


def _preconditioner(spec: tuple[str, dict]) -> Any:
    kind, kw = spec
    factor = DTYPE[kw["factor_dtype"]]
    if kind == "spectral":
        scale = kw["scale_by_dims_fn"]
        orth = NewtonSchulz(scale_by_dims_fn=scale) if kw["orthogonalization"] == "newton_schulz" else \
            SVD(scale_by_dims_fn=scale)
        return SpectralDescent(orth, factor_dtype=factor)
    if kind == "sign":
        return SignDescent(scale_fn=kw["scale_fn"], factor_dtype=factor)
    common = dict(factor_dtype=factor, symmetric_packing=kw.get("symmetric_packing", True),
                  trace_scaling_exponent=kw.get("trace_scaling_exponent"),
                  drop_weighting_factor_on_gsquare=kw.get("drop_weighting_factor_on_gsquare", False))
    if kind == "eigen_corrected":
        return EigenvalueCorrectedShampoo(tolerance=kw.get("tolerance", 0.0), **common)
    rtol = kw.get("pseudo_inverse_rtol")
    eigh = EighRootConfig(rank_handling=None if rtol is None else PseudoInverse(rank_rtol=rtol))
    if kind == "eigendecomposed":
        return EigendecomposedShampoo(eigenbasis=eigh, tolerance=kw.get("tolerance", 0.0), **common)
    root = CoupledNewtonConfig() if kw["root"] == "newton" else eigh
    cls = KLShampoo if kind == "kl_shampoo" else RootInverseShampoo
    return cls(root=root, **common)


def _settings(spec: dict[str, Any]) -> dict[str, Any]:
    """Plain specs -> config objects; drops the fuzzer's own bookkeeping (``regime``)."""
    kw = {k: v for k, v in spec.items() if k != "regime"}
    if "grafting" in kw:
        kw["grafting"] = _grafting(kw["grafting"])
    if "preconditioner" in kw:
        kw["preconditioner"] = _preconditioner(kw["preconditioner"])
    if "blocking" in kw:
        kw["blocking"] = BlockingConfig(**kw["blocking"])
    if "weight_decay_type" in kw:         # drawn in place of the deprecated alias
        kw.pop("use_decoupled_weight_decay", None)
    if kw.get("iterate_averaging"):
        kind, args = kw["iterate_averaging"]
        kw["iterate_averaging"] = (GeneralizedPrimalAveraging if kind == "gpa" else ScheduleFree)(**args)
    return kw


def optimizer_kwargs(case: Case) -> dict[str, Any]:
    kw = _settings(dict(case.config.kwargs))
    kw["comm_dtype"] = DTYPE[kw["comm_dtype"]]
    if case.nonfinite is not None:
        kw["nonfinite_grads"] = case.nonfinite.policy
    return kw


def param_groups(model: FuzzModel, case: Case) -> list[dict[str, Any]]:
    """Dense parameters in groups 0 and 1 (its own settings); stacked experts in their own group,
    preconditioned per expert."""
    named = list(model.named_parameters())
    second = {md.name for md in case.modules if md.group == 1}
    dense = [(n, p) for n, p in named if not n.startswith("experts.") and n.split(".")[0] not in second]
    other = [(n, p) for n, p in named if n.split(".")[0] in second]
    experts = [(n, p) for n, p in named if n.startswith("experts.")]
    groups: list[dict[str, Any]] = [{"params": dense}] if dense else []
    if other:
        groups.append({"params": other, **_settings(dict(case.config.second_group))})
    if experts:
        blocking = dict(dict(case.config.kwargs)["blocking"], batch_dims=1)
        groups.append({"params": experts, "blocking": BlockingConfig(**blocking), **dict(case.config.expert_group)})
    return groups


def make_optimizer(model: FuzzModel, case: Case, mesh: Any) -> ShardedShampoo:
    return ShardedShampoo(param_groups(model, case), mesh=mesh, **optimizer_kwargs(case))


# ----------------------------------------------------------------------------- gradients


def grad_for(case: Case, name: str, step: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The full gradient of ``name`` at ``step``: the same in every layout and process."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case.seed}/{name}/{step}".encode()))
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * case.grad_scale).to(dtype)


def local_box(p: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this rank's part of ``p`` (torch's own arithmetic for DTensors)."""
    if hasattr(p, "device_mesh"):
        from sharded_shampoo._torch_compat import local_shape_and_offset

        shape, offset = local_shape_and_offset(p.shape, p.device_mesh, p.placements)
        return tuple(shape), tuple(offset)
    return tuple(p.shape), (0,) * p.ndim


def local_part(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of a full tensor laid out like ``p``."""
    shape, offset = local_box(p)
    for d, (n, o) in enumerate(zip(shape, offset)):
        full = full.narrow(d, o, n)
    return full


def set_grad(p: torch.Tensor, g: torch.Tensor, like_param: bool) -> None:
    """``p.grad = g`` laid out like ``p``; ``like_param``: with the parameter's strides (channels_last...)."""
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import DTensor

        part, local = local_part(p, g), p.to_local()
        if part.shape != local.shape:
            # FSDP2 keeps an empty shard of a TP-empty shard as (0, 0), where torch's offset arithmetic says (4, 0)
            if part.numel() or local.numel():
                raise AssertionError(f"harness: local shape {tuple(local.shape)} != computed {tuple(part.shape)}")
            part = torch.empty_like(local)
        p.grad = DTensor.from_local(part.contiguous(), p.device_mesh, p.placements, run_check=False,
                                    shape=p.shape, stride=p.stride())
    else:
        p.grad = torch.empty_like(p).copy_(g) if like_param else g.clone()


def feed(model: nn.Module, case: Case, step: int) -> None:
    """Set every trainable parameter's gradient of ``step`` (None where the case drops it)."""
    for name, p in model.named_parameters():
        if not p.requires_grad or not case.has_grad(name, step):
            p.grad = None
            continue
        like = zlib.crc32(f"{name}/{step}".encode()) % 2 == 1
        g = grad_for(case, name, step, tuple(p.shape), p.dtype)
        set_grad(p, torch.zeros_like(g) if case.zero(name, step) else g, like)


# ----------------------------------------------------------------------------- layouts


@dataclass
class Meshes:
    """The device meshes of one launch, created once, in the same order on every rank (collective)."""

    world: int
    ranges: dict[tuple[int, int], Any]      # (first rank, size) -> 1-D mesh over those ranks
    full: dict[str, Any]                   # layout-family name -> mesh(es) spanning the world

    @classmethod
    def create(cls, world: int, ranges: list[tuple[int, int]], families: list[str]) -> "Meshes":
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        made: dict[tuple[int, int], Any] = {}
        for first, size in sorted(set(ranges)):
            made[(first, size)] = DeviceMesh("cpu", torch.arange(first, first + size), mesh_dim_names=("shard",))
        full: dict[str, Any] = {}
        for fam in sorted(set(families)):
            if fam == "hsdp":
                full[fam] = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
            elif fam == "fsdp_tp":
                full[fam] = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("fsdp", "tp"))
            elif fam == "hsdp_tp":
                full[fam] = init_device_mesh("cpu", (2, 1, world // 2), mesh_dim_names=("dp_replicate", "fsdp", "tp"))
            elif fam in ("ep2", "ep4"):
                ep = int(fam[2:])
                root = init_device_mesh("cpu", (world,), mesh_dim_names=("world",))
                full[fam] = (root, unflatten_mesh(root, 0, (2, world // 2), ("fsdp", "tp")),
                             unflatten_mesh(root, 0, (world // ep, ep), ("efsdp", "ep")))
        return cls(world, made, full)


def family(layout: str) -> Optional[str]:
    """Which full-world mesh a layout needs (None: a 1-D mesh over its ranks, or none)."""
    if layout.startswith("hsdp_tp"):
        return "hsdp_tp"
    if layout.startswith("hsdp"):
        return "hsdp"
    if layout.startswith("fsdp_tp"):
        return "fsdp_tp"
    return layout if layout in ("ep2", "ep4") else None


def build(case: Case, layout: str, meshes: Optional[Meshes], first: int) -> tuple[FuzzModel, ShardedShampoo]:
    """The case's model under ``layout`` on ranks ``[first, first + world)`` of the launch, and its optimizer."""
    unsharded = {md.name for md in case.modules if layout == "single" or layout.startswith("ddp")
                 or layout.startswith("mixed") and md.replicated}
    model = make_model(case, unsharded)
    mesh = lay_out(model, case, layout, meshes, first)
    for md in case.modules:      # parallelize_module makes new Parameters (requires_grad=True)
        if md.frozen:
            getattr(model, md.name).requires_grad_(False)
    return model, make_optimizer(model, case, mesh)


def lay_out(model: FuzzModel, case: Case, layout: str, meshes: Optional[Meshes], first: int) -> Any:
    """Shard / parallelize ``model`` in place as ``layout`` does; the optimizer's ``mesh`` argument.

    FSDP2 refuses 0-D parameters, so they are ``ignored_params`` (kept whole on every rank, as a
    user must do); parameters drawn with ``shard_dim > 0`` are sharded on that dim
    (``shard_placement_fn``).
    """
    fam = family(layout)
    if layout == "single":
        return "local" if meshes is not None else None
    assert meshes is not None
    if fam is None:
        size = int(layout[-1])
        mesh = meshes.ranges[(first, size)]
        if layout.startswith("ddp"):
            # the whole world: mesh=None (the documented DDP default); a sub-range: its 1-D mesh
            return None if size == meshes.world else mesh
        for md in case.modules:
            if layout.startswith("fsdp") and md.own_unit or layout.startswith("mixed") and not md.replicated:
                _shard(model, getattr(model, md.name), mesh)
        if layout.startswith("fsdp"):
            _shard(model, model, mesh)
        return mesh
    if fam in ("ep2", "ep4"):
        root, dense, sparse = meshes.full[fam]
        _tensor_parallel(model, dense["tp"])
        _expert_parallel(model, sparse["ep"])
        for unit in model.expert_modules():
            _shard(model, unit, sparse["efsdp"])
        for unit in model.fsdp_units():
            _shard(model, unit, dense["fsdp"])
        _shard(model, model, dense["fsdp"])
        return root
    mesh = meshes.full[fam]
    if fam == "hsdp":
        dp = mesh
    else:
        _tensor_parallel(model, mesh["tp"])
        dp = mesh["fsdp"] if fam == "fsdp_tp" else mesh["dp_replicate", "fsdp"]
    for unit in model.fsdp_units() + model.expert_modules():
        _shard(model, unit, dp)
    _shard(model, model, dp)
    return None if fam == "hsdp" else mesh


def _shard(model: FuzzModel, module: nn.Module, mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    dims = {id(getattr(getattr(model, md.name), pd.attr)): pd.shard_dim for md in model.case_modules
            for pd in md.params}
    ignored = {p for p in model.parameters() if p.ndim == 0}
    n = mesh.size(mesh.ndim - 1)

    def placement(p: nn.Parameter) -> Any:   # FSDP2 shards dims > 0 only evenly
        d = dims.get(id(p), 0)
        return Shard(d if d < p.ndim and p.shape[d] % n == 0 else 0)

    fully_shard(module, mesh=mesh, ignored_params=ignored or None, shard_placement_fn=placement)


def _tensor_parallel(model: FuzzModel, tp_mesh: Any) -> None:
    from torch.distributed.tensor.parallel import parallelize_module

    plan = model.tp_plan()
    if plan:
        parallelize_module(model, tp_mesh, plan)


def _expert_parallel(model: FuzzModel, ep_mesh: Any) -> None:
    """Stacked experts sharded on dim 0 over ``ep`` (torchtitan's recipe, as ``dryrun.apply_parallelism``)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    for module in model.expert_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(distribute_tensor(p.detach(), ep_mesh, [Shard(0)]),
                                               requires_grad=p.requires_grad))
