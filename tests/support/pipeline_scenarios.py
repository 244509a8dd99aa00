"""Pipeline-parallel scenarios on 4 CPU gloo ranks (imported by forked ranks; no torchtitan at import).

``stage_local_exactness``: a small MLP split into 2 pipeline stages (pp=2), each stage fully
sharded over 2 ranks (fsdp=2), trained with ``torch.distributed.pipelining``'s GPipe schedule and
one stage-local ShardedShampoo per stage (built from the stage's own parameters, so it plans over
the stage's FSDP mesh). Every rank also trains the whole model in-process (``mesh="local"``) on the
whole batch: a stage's parameters after N steps must equal the reference's parameters of the same
names, because blocks depend only on global shapes and a stage's optimizer sees exactly the
gradients a 1-process run sees for those parameters.

The regime is well conditioned (see docs/testing.md on exactness): float64, batch 32 over 8 x 8
weights without biases (every gradient has full rank; a bias's factor gains rank 1 per step and
would be rank-deficient at the first root), roots first computed at step 2, epsilon 1e-8.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sharded_shampoo import AdaGradGrafting, ShardedShampoo

PP, FSDP = 2, 2
LAYERS, WIDTH, BATCH, MICROBATCHES, STEPS = 4, 8, 32, 2, 6
SHAMPOO_KW: dict[str, Any] = dict(lr=0.05, betas=(0.9, 0.99), epsilon=1e-8, weight_decay=0.01,
                                  max_preconditioner_dim=WIDTH, precondition_frequency=2,
                                  start_preconditioning_step=2, grafting=AdaGradGrafting(epsilon=1e-10))


class Mlp(nn.Module):
    """``layers.{i}`` of Linear + tanh; a pipeline stage is this module with other layers removed.

    Removing layers (not renumbering them) keeps each parameter's FQN, as torchtitan's split does.
    """

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(i): nn.Linear(WIDTH, WIDTH, bias=False, dtype=torch.float64) for i in range(LAYERS)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            x = torch.tanh(layer(x))
        return x


def whole_model() -> Mlp:
    torch.manual_seed(0)
    return Mlp()


def stage_of(model: Mlp, stage: int) -> Mlp:
    """Stage ``stage`` of ``PP``: a deep copy keeping layers ``[stage * L/PP, (stage + 1) * L/PP)``."""
    part = copy.deepcopy(model)
    per = LAYERS // PP
    for name in list(part.layers):
        if not stage * per <= int(name) < (stage + 1) * per:
            del part.layers[name]
    return part


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of step ``step`` (every layout sees the same one)."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, WIDTH, generator=g, dtype=torch.float64)
    return x, torch.sin(2.0 * x) * 0.5


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def reference_run(steps: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One process, the whole model, the whole batch: the first step's gradients and the parameters
    after ``steps`` steps, which every stage must reproduce."""
    model = whole_model()
    opt = ShardedShampoo(model.named_parameters(), mesh="local", **SHAMPOO_KW)
    first_grads: dict[str, torch.Tensor] = {}
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        mse(model(x), y).backward()
        first_grads = first_grads or {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
    return first_grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def stage_local_exactness(rank: int, world: int) -> dict[str, Any]:
    """GPipe over pp=2 x fsdp=2 with stage-local ShardedShampoo; max diff to 1 process per stage parameter."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    mesh = init_device_mesh("cpu", (PP, FSDP), mesh_dim_names=("pp", "fsdp"))
    stage_index, dp_rank = mesh.get_coordinate()
    part = stage_of(whole_model(), stage_index)
    fully_shard(part, mesh=mesh["fsdp"]).set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    opt = ShardedShampoo(part.named_parameters(), **SHAMPOO_KW)  # mesh inferred: the stage's fsdp=2 mesh
    stage = PipelineStage(part, stage_index, PP, torch.device("cpu"), group=mesh["pp"].get_group())
    schedule = ScheduleGPipe(stage, n_microbatches=MICROBATCHES, loss_fn=mse)
    per = BATCH // FSDP
    first_grads: dict[str, torch.Tensor] = {}
    for step in range(STEPS):
        x, y = (t[dp_rank * per:(dp_rank + 1) * per] for t in batch(step))
        opt.zero_grad()
        if stage_index == 0:
            schedule.step(x)
        else:
            schedule.step(target=y)
        first_grads = first_grads or {n: p.grad.full_tensor() for n, p in part.named_parameters()}
        opt.step()
    ref_grads, reference = reference_run(STEPS)
    # gradients too: Shampoo with grafting is invariant to a gradient's scale, parameters alone
    # would not show a pipeline that scales gradients
    grad_diffs = {n: _max_rel(g, ref_grads[n]) for n, g in first_grads.items()}
    diffs = {n: _max_rel(p.full_tensor().detach(), reference[n]) for n, p in part.named_parameters()}
    moved = {n: float((reference[n] - p0.detach()).abs().max()) for n, p0 in whole_model().named_parameters()}
    return {"stage": stage_index, "plan_ranks": opt.plan.mesh.world_size, "diffs": diffs, "grad_diffs": grad_diffs,
            "moved": moved, "blocks": sorted(b.block_id for b in opt.plan.blocks),
            "group_ranks": dist.get_process_group_ranks(mesh["fsdp"].get_group())}


def container_patterns_across_stages(rank: int, world: int) -> dict[str, Any]:
    """ShardedShampooContainer on 4 ranks whose stages hold different modules (no training).

    Stage 0 (ranks 0, 1) holds an embedding, stage 1 (ranks 2, 3) a linear head. A pattern that
    matches on one stage only is fine on every rank (the ranks agree by one all-reduce); a pattern
    that matches on no rank raises ``ValueError`` on every rank.
    """
    from torchtitan.components.optimizer import ParamGroupConfig

    from sharded_shampoo.integrations.torchtitan import SHAMPOO_NAME, ShardedShampooContainer

    part = nn.Module()
    if rank < world // 2:
        part.tok_embeddings = nn.Embedding(10, 4)
    else:
        part.head = nn.Linear(4, 6)

    def config(*extra: str) -> Any:
        entries = [ParamGroupConfig(pattern=r"tok_embeddings", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-3}),
                   *(ParamGroupConfig(pattern=p, optimizer_name=SHAMPOO_NAME, optimizer_kwargs={"lr": 0.1})
                     for p in extra),
                   ParamGroupConfig(pattern=r"head", optimizer_name=SHAMPOO_NAME, optimizer_kwargs={"lr": 0.1})]
        return ShardedShampooContainer.Config(param_groups=entries,
                                              optimizer_factory_kwargs_by_name={SHAMPOO_NAME: {"mesh": "local"}})

    kinds = [type(o).__name__ for o in config().build(model_parts=[part]).optimizers]
    try:
        config(r"experts").build(model_parts=[part])
        error = ""
    except ValueError as exc:
        error = str(exc)
    return {"kinds": kinds, "error": error}
