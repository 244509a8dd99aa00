"""Tensor-parallel, expert-parallel and multi-mesh scenarios (imported by spawned gloo ranks).

A tiny model with every kind of weight large models have: a token embedding and an output head
(sharded on dim 0 over tp), colwise and rowwise linears, a norm (replicated over tp with sequence
parallelism), and 3-D expert weights ``[E, d_in, d_out]`` (expert parallel over ep, FSDP over
efsdp) preconditioned per expert (``BlockingConfig(batch_dims=1)``). torch's own
``parallelize_module`` and ``fully_shard`` lay it out; every rank is fed the same full gradients
as a single-process reference, so the N-rank trajectory must equal the 1-process one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tests.support.dist_scenarios import owned_state_bytes
from sharded_shampoo import (AdaGradGrafting, BlockingConfig, EigendecomposedShampoo, KLShampoo, NewtonSchulz,
                             ScheduleFree, ShardedShampoo, SignDescent, SpectralDescent)
from sharded_shampoo._torch_compat import unflatten_mesh

STEPS = 12
LAYOUTS = ("fsdp_tp", "hsdp_tp", "ep2", "ep4", "fsdp")
#: other preconditioners on some layouts, ``"<layout>:<variant>"`` (:data:`VARIANTS`; the same launch as LAYOUTS)
VARIANT_LAYOUTS = ("fsdp_tp:kl", "hsdp_tp:kl", "ep2:kl", "fsdp_tp:eigendecomposed", "ep2:eigendecomposed",
                   "fsdp_tp:spectral", "hsdp_tp:spectral", "ep4:spectral", "ep2:sign")


class Experts(nn.Module):
    def __init__(self, num_experts: int = 4, d_in: int = 8, d_out: int = 6) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(num_experts, d_in, d_out) * 0.3)


class Tiny(nn.Module):
    """Shapes chosen so blocks (max dim 8) cross shard boundaries and shards are uneven."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(18, 8)
        self.w_in = nn.Linear(8, 12, bias=False)
        self.w_out = nn.Linear(12, 8, bias=False)
        self.norm = nn.RMSNorm(8)
        self.head = nn.Linear(8, 10, bias=False)
        self.moe = Experts()

    # how a job parallelizes it (read by sharded_shampoo.dryrun.apply_parallelism)
    def fsdp_units(self) -> list[nn.Module]:
        return []

    def tp_plan(self) -> dict[str, Any]:
        return _tp_plan()

    def expert_modules(self) -> list[nn.Module]:
        return [self.moe]


def make_model() -> Tiny:
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        model.norm.weight.add_(torch.randn(8) * 0.1)
    return model


CONFIG: dict[str, Any] = dict(lr=0.05, betas=(0.9, 0.99), epsilon=1e-8, weight_decay=0.01, momentum=0.5,
                              max_preconditioner_dim=8, precondition_frequency=3, start_preconditioning_step=4,
                              grafting=AdaGradGrafting(epsilon=1e-8))
#: per variant: constructor overrides and the blocking of the dense group (the experts add batch_dims=1).
#: Spectral descent: every 2-D block and each expert orthogonalised by its owner, the norm on AdaGrad grafting.
VARIANTS: dict[str, tuple[dict[str, Any], BlockingConfig]] = {
    "shampoo": ({}, BlockingConfig()),
    # KL-Shampoo: the factor update reads the other dims' roots (every param group: the experts' too)
    "kl": (dict(preconditioner=KLShampoo()), BlockingConfig()),
    # eigendecomposed Shampoo with the adaptive refresh, trace scaling and beta3
    "eigendecomposed": (dict(preconditioner=EigendecomposedShampoo(tolerance=0.1, trace_scaling_exponent=0.5),
                             beta3=0.95), BlockingConfig()),
    "spectral": (dict(preconditioner=SpectralDescent(NewtonSchulz(scale_by_dims_fn="muon")),
                      start_preconditioning_step=None), BlockingConfig(precondition_1d=False)),
    "sign": (dict(preconditioner=SignDescent(scale_fn="l1_norm"), lr=1e-3, start_preconditioning_step=None),
             BlockingConfig()),
}


def split_layout(layout: str) -> tuple[str, str]:
    """``"ep4:spectral"`` -> ``("ep4", "spectral")``; a bare layout runs Shampoo."""
    base, _, variant = layout.partition(":")
    return base, variant or "shampoo"


def param_groups(model: nn.Module, variant: str = "shampoo") -> list[dict[str, Any]]:
    dense = [(n, p) for n, p in model.named_parameters() if not n.startswith("moe.")]
    experts = [(n, p) for n, p in model.named_parameters() if n.startswith("moe.")]
    blocking = VARIANTS[variant][1]
    # the experts average their iterates (Schedule-Free; the group's own setting replaces the
    # constructor's momentum), so z is sharded over EP / efsdp and checkpointed across layouts too
    return [{"params": dense, "blocking": blocking},
            {"params": experts, "blocking": BlockingConfig(batch_dims=1, precondition_1d=blocking.precondition_1d),
             "iterate_averaging": ScheduleFree(train_interp_coeff=0.8)}]


def make_optimizer(model: nn.Module, variant: str = "shampoo", **kwargs: Any) -> ShardedShampoo:
    return ShardedShampoo(param_groups(model, variant), **(CONFIG | VARIANTS[variant][0] | kwargs))


def grad_for(name: str, shape: torch.Size, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + sum(map(ord, name)))
    return torch.randn(shape, generator=g)


def run(model: nn.Module, opt: ShardedShampoo, set_grad: Any, start: int = 0, stop: int = STEPS) -> None:
    for step in range(start, stop):
        for name, p in model.named_parameters():
            set_grad(p, grad_for(name, p.shape, step))
        opt.step()


def reference(stop: int = STEPS, variant: str = "shampoo") -> dict[str, torch.Tensor]:
    """The single-process trajectory (of ``VARIANTS[variant]``)."""
    model = make_model()
    opt = make_optimizer(model, variant)

    def set_grad(p: torch.Tensor, g: torch.Tensor) -> None:
        p.grad = g

    run(model, opt, set_grad, 0, stop)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- layouts


def _tp_plan() -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    return {"tok": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "w_in": ColwiseParallel(), "w_out": RowwiseParallel(), "norm": SequenceParallel(),
            "head": ColwiseParallel(input_layouts=Shard(1))}


def build(layout: str, world: int, **kwargs: Any) -> tuple[nn.Module, ShardedShampoo]:
    """The model laid out as torch's parallelize_module + fully_shard do, and its optimizer."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    layout, variant = split_layout(layout)
    model = make_model()
    if layout == "fsdp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
        fully_shard(model.moe, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif layout in ("fsdp_tp", "hsdp_tp"):
        shape, names = ((2, world // 2), ("fsdp", "tp")) if layout == "fsdp_tp" else \
            ((2, 1, world // 2), ("dp_replicate", "fsdp", "tp"))
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        parallelize_module(model, mesh["tp"], _tp_plan())
        dp = mesh["fsdp"] if layout == "fsdp_tp" else mesh["dp_replicate", "fsdp"]
        fully_shard(model.moe, mesh=dp)
        fully_shard(model, mesh=dp)
    else:   # expert parallel: the meshes torchtitan builds, unflattened from a 1-D world
        from sharded_shampoo.dryrun import apply_parallelism

        ep = 2 if layout == "ep2" else 4
        world_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("world",))
        dense = unflatten_mesh(world_mesh, 0, (2, world // 2), ("fsdp", "tp"))
        sparse = unflatten_mesh(world_mesh, 0, (world // ep, ep), ("efsdp", "ep"))
        apply_parallelism(model, dense["fsdp"], tp_mesh=dense["tp"], ep_mesh=sparse["ep"],
                          expert_dp_mesh=sparse["efsdp"])
    return model, make_optimizer(model, variant, **kwargs)


def local_part(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of a full tensor laid out like DTensor ``p`` (torch's own offset arithmetic)."""
    from sharded_shampoo._torch_compat import local_shape_and_offset

    shape, offset = local_shape_and_offset(p.shape, p.device_mesh, p.placements)
    for d, (n, o) in enumerate(zip(shape, offset)):
        full = full.narrow(d, o, n)
    return full.contiguous()


def set_dtensor_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    """``p.grad = g`` laid out like ``p`` (distribute_tensor does not take a leading _StridedShard)."""
    from torch.distributed.tensor import DTensor

    if hasattr(p, "device_mesh"):
        p.grad = DTensor.from_local(local_part(p, g), p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                    stride=p.stride())
    else:
        p.grad = g


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def placements(model: nn.Module) -> dict[str, str]:
    return {n: f"{tuple(p.placements)} on {tuple(p.device_mesh.mesh_dim_names or ())}"
            for n, p in model.named_parameters() if hasattr(p, "placements")}


def max_rel_diff(params: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    return max(float((params[n] - r).abs().max() / r.abs().max().clamp_min(1e-12)) for n, r in ref.items())


def scenario_invariance(rank: int, world: int, layouts: list[str],
                        refs: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Each layout: placements seen, max relative difference to the reference of its variant (``refs``, keyed by
    variant), real vs planned bytes."""
    out: dict[str, Any] = {}
    for layout in layouts:
        model, opt = build(layout, world)
        init = make_model()
        for (n, p), q in zip(model.named_parameters(), init.parameters()):   # torch laid out what we expect
            if hasattr(p, "device_mesh"):
                assert torch.equal(p.to_local(), local_part(p, q.detach())), (layout, n)
        run(model, opt, set_dtensor_grad)
        out[layout] = {"diff": max_rel_diff(full_params(model), refs[split_layout(layout)[1]]),
                       "placements": placements(model),
                       "bytes": (owned_state_bytes(opt), opt.plan.ranks[rank].optimizer_state_bytes),
                       "owners": sorted(set(opt.plan.owners)), "num_blocks": len(opt.plan.blocks),
                       "comm": opt.plan.ranks[rank].comm_bytes_per_step}
        if "ep" in layout:   # model.named_parameters() passed directly: experts sharded over ep get per-expert blocks
            direct = ShardedShampoo(model.named_parameters(), **CONFIG)
            out[layout]["blocks"] = ([b.block_id for b in opt.plan.blocks], [b.block_id for b in direct.plan.blocks])
        dist.barrier()
    return out


#: the dry-run axes of each layout (``sharded_shampoo.dryrun.MeshAxes`` fields)
DRYRUN_AXES = {"fsdp": dict(fsdp=4), "fsdp_tp": dict(fsdp=2, tp=2), "hsdp_tp": dict(dp=2, fsdp=1, tp=2),
               "ep2": dict(fsdp=2, tp=2, ep=2), "ep4": dict(fsdp=2, tp=2, ep=4)}


def dryrun_state_bytes(layout: str) -> list[int]:
    """Per-rank optimizer-state bytes the dry-run predicts for a layout (meta device, fake process group)."""
    from sharded_shampoo.config import PlanSettings
    from sharded_shampoo.dryrun import MeshAxes, plan_model

    layout, variant = split_layout(layout)
    c = CONFIG | VARIANTS[variant][0]
    settings = PlanSettings(max_preconditioner_dim=c["max_preconditioner_dim"], grafting=c["grafting"],
                            beta1=c["betas"][0], momentum=c["momentum"],
                            precondition_frequency=c["precondition_frequency"],
                            preconditioner=c.get("preconditioner", PlanSettings().preconditioner),
                            blocking=VARIANTS[variant][1])
    plan = plan_model(make_model, MeshAxes(**DRYRUN_AXES[layout]), settings)
    return [r.optimizer_state_bytes for r in plan.ranks]


def scenario_overlap(rank: int, world: int) -> dict[str, Any]:
    """The same run with 1 exchange each way and with 1, 3 and 8 overlapped waves: bitwise equal."""
    out: dict[str, Any] = {}
    for chunks in (1, 3, 8):
        model, opt = build("ep2", world, overlap_chunks=chunks)
        run(model, opt, set_dtensor_grad)
        out[chunks] = (full_params(model), len(opt.executor.waves), opt.executor.last_exposed_comm_seconds)
    return out


SAVE_AT = 6


def scenario_save_tp(rank: int, world: int, root: str) -> dict[str, torch.Tensor]:
    """FSDP x TP 2x2: train to SAVE_AT, save, continue to STEPS; the uninterrupted result."""
    from sharded_shampoo.checkpointing import save_checkpoint

    model, opt = build("fsdp_tp", world)
    run(model, opt, set_dtensor_grad, 0, SAVE_AT)
    save_checkpoint(root, SAVE_AT, model, opt, extra={"step": SAVE_AT})
    run(model, opt, set_dtensor_grad, SAVE_AT, STEPS)
    return full_params(model)


def scenario_resume(rank: int, world: int, root: str, layout: str) -> dict[str, torch.Tensor]:
    """Load the checkpoint into ``layout``, continue to STEPS."""
    from sharded_shampoo.checkpointing import load_checkpoint

    model, opt = build(layout, world)
    step = load_checkpoint(root, model, opt, extra={"step": 0})["step"]
    run(model, opt, set_dtensor_grad, step, STEPS)
    return full_params(model)


def resume_one_process(root: str) -> dict[str, torch.Tensor]:
    """Load the checkpoint into a plain single-process model and continue to STEPS."""
    from sharded_shampoo.checkpointing import load_checkpoint

    model = make_model()
    opt = make_optimizer(model)
    step = load_checkpoint(root, model, opt, extra={"step": 0})["step"]

    def set_grad(p: torch.Tensor, g: torch.Tensor) -> None:
        p.grad = g

    run(model, opt, set_grad, step, STEPS)
    return {n: p.detach().clone() for n, p in model.named_parameters()}
