"""Multi-rank scenarios for the distributed tests (imported by spawned ranks).

Every scenario feeds the same deterministic gradients to a single-process optimizer (the
reference, computed in the parent) and to the distributed one, and returns the max relative
difference of the final full parameters, so the test asserts world-size invariance.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tests.support.resident import grad_bytes, resident_buffer_bytes, step_policy_bytes
from sharded_shampoo import (AdamGrafting, AdaGradGrafting, BlockingConfig, EigendecomposedKLShampoo,
                             EigendecomposedShampoo,
                             EigenvalueCorrectedShampoo, EighRootConfig, GeneralizedPrimalAveraging, KLShampoo,
                             NewtonSchulz, PseudoInverse, RootInverseShampoo, ScheduleFree, ShardedShampoo, SignDescent,
                             SpectralDescent)

STEPS = 20


class Toy(nn.Module):
    """Shapes that exercise uneven shards (33 rows), empty shards (3 rows), 1-d, 3-d and frozen params."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 33)
        self.out = nn.Linear(33, 3)
        self.cube = nn.Parameter(torch.randn(5, 4, 6) * 0.1)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inp(x))) + self.cube.sum()


class Wide(nn.Module):
    """Two wider layers: gradients large against the optimizer's fixed-size buffers (resident-bytes checks)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(128, 256)
        self.out = nn.Linear(256, 128)


def make_model(kind: str = "toy") -> nn.Module:
    """``toy``: :class:`Toy`; ``one_block``: a single 3x4 weight, so all but one rank own nothing; ``wide``:
    :class:`Wide`."""
    torch.manual_seed(0)
    if kind == "wide":
        return Wide()
    return Toy() if kind == "toy" else nn.Sequential(nn.Linear(4, 3, bias=False))


def model_kind(layout: str) -> str:
    """The model of a layout: ``fsdp_one_block`` -> one_block, ``hsdp_wide`` -> wide, else toy."""
    for kind in ("one_block", "wide"):
        if layout.endswith(kind):
            return kind
    return "toy"


def grad_for(name: str, shape: torch.Size, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + sum(map(ord, name)))
    return torch.randn(shape, generator=g)


CONFIGS: dict[str, dict[str, Any]] = {
    "root_inverse": dict(lr=0.05, betas=(0.9, 0.99), epsilon=1e-8, weight_decay=0.01, momentum=0.5,
                         max_preconditioner_dim=16, precondition_frequency=3, start_preconditioning_step=2,
                         grafting=AdaGradGrafting(epsilon=1e-8), preconditioner=RootInverseShampoo()),
    "eigen_corrected": dict(lr=0.02, betas=(0.9, 0.95), epsilon=1e-8, weight_decay=0.01,
                            use_decoupled_weight_decay=False, max_preconditioner_dim=16, precondition_frequency=3,
                            start_preconditioning_step=2, grafting=AdamGrafting(beta2=0.95, epsilon=1e-8),
                            preconditioner=EigenvalueCorrectedShampoo()),
}
# bf16 communication perturbs gradients by ~2^-8 relative; with a tiny epsilon, directions in the
# (near) null space of rank-deficient factors amplify that, so the bf16 bound is stated for eps=1e-4.
CONFIGS["root_inverse_eps1e-4"] = dict(CONFIGS["root_inverse"], epsilon=1e-4)
# iterate averaging: GPA with decoupled weight decay (shrinks z), Schedule-Free with independent decay
CONFIGS["gpa"] = dict({k: v for k, v in CONFIGS["root_inverse"].items() if k != "momentum"},
                      iterate_averaging=GeneralizedPrimalAveraging(eval_interp_coeff=0.9, train_interp_coeff=0.8))
CONFIGS["schedule_free"] = dict(CONFIGS["gpa"], weight_decay=1e-3, weight_decay_type="INDEPENDENT",
                                iterate_averaging=ScheduleFree(train_interp_coeff=0.7, eval_coeff_lr_power=2))
# KL-Shampoo: the factor update reads the other dims' roots (packed, unpacked a chunk at a time)
CONFIGS["kl"] = dict(CONFIGS["root_inverse"], preconditioner=KLShampoo())
# spectral / sign descent: 2-D blocks orthogonalised by their owner (the 33-row weight splits into a 1-row
# block on 32), the cube merged to 2-D (5, 24), biases on AdaGrad grafting (precondition_1d=False)
CONFIGS["spectral"] = dict(lr=0.02, betas=(0.9, 0.99), weight_decay=0.01, max_preconditioner_dim=32,
                           blocking=BlockingConfig(precondition_1d=False), grafting=AdaGradGrafting(epsilon=1e-8),
                           preconditioner=SpectralDescent(NewtonSchulz(scale_by_dims_fn="muon")),
                           precondition_frequency=3)
CONFIGS["sign"] = dict(lr=1e-3, betas=(0.9, 0.99), momentum=0.5, max_preconditioner_dim=16, grafting=None,
                       preconditioner=SignDescent(scale_fn="l1_norm"), precondition_frequency=3)
# issue 16's Shampoo-family options: eigendecomposed Shampoo with the adaptive refresh and beta3; root-inverse
# Shampoo with a pseudo-inverse root (epsilon 0), trace scaling and drop_weighting_factor_on_gsquare
CONFIGS["eigendecomposed"] = dict(CONFIGS["root_inverse"], beta3=0.95,
                                  preconditioner=EigendecomposedShampoo(tolerance=0.1))
# eigendecomposed KL-Shampoo: the factor update forms the other dims' roots from the eigenpairs; with the tolerance
CONFIGS["eigendecomposed_kl"] = dict(CONFIGS["root_inverse"], preconditioner=EigendecomposedKLShampoo(tolerance=0.1))
CONFIGS["root_family_options"] = dict(CONFIGS["root_inverse"], epsilon=0.0, grafting=None, lr=0.01, preconditioner=(
    RootInverseShampoo(root=EighRootConfig(rank_handling=PseudoInverse(rank_rtol=1e-5)), trace_scaling_exponent=0.5,
                       drop_weighting_factor_on_gsquare=True)))


def with_eval_sequence(opt: ShardedShampoo, params: dict[str, torch.Tensor],
                       collect: Any) -> dict[str, torch.Tensor]:
    """``params`` plus, for GPA / Schedule-Free, the evaluation sequence (``name@eval``) via eval()/train()."""
    if not opt.averaging.groups:
        return params
    opt.eval()
    out = dict(params, **{f"{n}@eval": v for n, v in collect().items()})
    opt.train()
    return out


def run_steps(model: nn.Module, opt: ShardedShampoo, set_grad: Any, skip_every: int = 0) -> None:
    for step in range(STEPS):
        for name, p in model.named_parameters():
            if not p.requires_grad or (skip_every and name == "cube" and step % skip_every == 1):
                p.grad = None
                continue
            set_grad(name, p, grad_for(name, p.shape, step))
        opt.step()


def reference(config: str, skip_every: int = 0, kind: str = "toy") -> dict[str, torch.Tensor]:
    """Single-process trajectory (no process group)."""
    model = make_model(kind)
    opt = ShardedShampoo(model.named_parameters(), **CONFIGS[config])

    def set_grad(name: str, p: torch.Tensor, g: torch.Tensor) -> None:
        p.grad = g

    run_steps(model, opt, set_grad, skip_every)

    def collect() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters()}
    return with_eval_sequence(opt, collect(), collect)


def full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p.detach()


def max_rel_diff(params: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for n, r in ref.items():
        d = (params[n] - r).abs().max() / r.abs().max().clamp_min(1e-12)
        worst = max(worst, float(d))
    return worst


def distributed_run(layout: str, config: str, mesh_shape: tuple[int, ...], comm_dtype: torch.dtype = torch.float32,
                    skip_every: int = 0) -> tuple[dict[str, torch.Tensor], ShardedShampoo]:
    """Train the toy model under ``layout`` ('fsdp', 'hsdp', 'ddp', 'mixed') with the shared gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    model = make_model(model_kind(layout))
    names = ("replicate", "shard") if len(mesh_shape) == 2 else ("shard",)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    if layout in ("fsdp", "hsdp", "hsdp_wide"):
        fully_shard(model.inp, mesh=mesh)
        fully_shard(model.out, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif layout == "mixed":
        fully_shard(model.inp, mesh=mesh)
    elif layout == "fsdp_one_block":
        fully_shard(model, mesh=mesh)
    opt = ShardedShampoo(model.named_parameters(), comm_dtype=comm_dtype,
                         mesh=mesh if layout != "ddp" else None, **CONFIGS[config])

    def set_grad(name: str, p: torch.Tensor, g: torch.Tensor) -> None:
        p.grad = distribute_tensor(g, p.device_mesh, p.placements) if hasattr(p, "device_mesh") else g

    run_steps(model, opt, set_grad, skip_every)

    def collect() -> dict[str, torch.Tensor]:
        return {n: full(p.detach()).clone() for n, p in model.named_parameters()}
    return with_eval_sequence(opt, collect(), collect), opt


def owned_state_bytes(opt: ShardedShampoo) -> int:
    """Bytes of optimizer state this rank really allocated (unique storages of state tensors)."""
    seen: dict[int, int] = {}
    for s in opt.state.values():
        stack = list(s.values())
        while stack:
            v = stack.pop()
            if isinstance(v, dict):
                stack.extend(v.values())
            elif isinstance(v, torch.Tensor):
                st = v.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def scenario_invariance(rank: int, world: int, cases: list[tuple], refs: dict[tuple, dict]) -> dict[str, float]:
    """Run every (layout, config, mesh_shape, comm_dtype, skip_every) case; return max rel diffs."""
    out = {}
    for case in cases:
        layout, config, mesh_shape, comm_dtype, skip_every = case
        params, opt = distributed_run(layout, config, mesh_shape, comm_dtype, skip_every)
        out[repr(case)] = max_rel_diff(params, refs[(model_kind(layout), config, skip_every)])
        out[repr(case) + ".bytes"] = (owned_state_bytes(opt), opt.plan.ranks[rank].optimizer_state_bytes)
        # what stays allocated besides the state, measured by walking the optimizer, vs the plan's claim
        # (besides the sync-free step policy's O(parameters + blocks) constants, which the planner does not model)
        out[repr(case) + ".resident"] = (resident_buffer_bytes(opt) - step_policy_bytes(opt, rank),
                                         opt.plan.ranks[rank].resident_buffer_bytes,
                                         grad_bytes(opt))
        dist.barrier()
    return out


def scenario_train(rank: int, world: int, argv: list[str]) -> list[float]:
    """scripts/train.py's loop on this rank (FSDP2 over the world)."""
    from scripts import train

    return train.train(train.parse_args(argv))


def dryrun_state_bytes(config: str, mesh_shape: tuple[int, ...], kind: str = "toy") -> list[int]:
    """Per-rank optimizer-state bytes predicted by the dry-run (meta device + fake process group)."""
    from sharded_shampoo.dryrun import plan_model
    from sharded_shampoo.planning.plan import PlanSettings

    c = CONFIGS[config]
    settings = PlanSettings(max_preconditioner_dim=c["max_preconditioner_dim"], preconditioner=c["preconditioner"],
                            blocking=c.get("blocking", BlockingConfig()), grafting=c["grafting"],
                            beta1=c["betas"][0], momentum=c.get("momentum", 0.0),
                            precondition_frequency=c["precondition_frequency"],
                            primal_averaging=c.get("iterate_averaging") is not None)
    plan = plan_model(lambda: make_model(kind), mesh_shape, settings)
    return [r.optimizer_state_bytes for r in plan.ranks]
