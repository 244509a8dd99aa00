"""torchtitan 0.3.0 models on CPU gloo ranks, parallelized by torchtitan itself.

Imported by the torchtitan tests and by the ranks they spawn. Nothing here imports torchtitan
at module level: ``apply_cpu_workarounds()`` must run first in each rank (it patches torch's
device detection, which torchtitan reads at import), and the pytest process itself stays
unpatched. The four workarounds (all CPU/gloo-only; none is needed on GPUs):

1. torchtitan picks its device type at import as ``_get_available_device_type() or "cuda"``;
   without an accelerator that is "cuda", so it is forced to "cpu" first.
2. ``torchtitan/distributed/minimal_async_ep/kernels.py`` imports ``triton`` (absent from CPU
   torch builds) and is imported by every model package; it is replaced by a stub module whose
   kernels raise if ever called (only the MinimalAsyncEP GPU dispatcher uses them).
3. FlexAttention compiles a Triton kernel; every attention's inner op is swapped for causal
   SDPA (``ScaledDotProductAttention``) in the model config before the model is built.
4. gloo has no PREMUL_SUM reduction, which FSDP2 uses to average gradients; every FSDP module
   gets ``set_force_sum_reduction_for_comms(True)``.

Gradient scale: the FSDP modules torchtitan builds *sum* gradients over the data-parallel ranks
(measured: dp x the global-mean gradient, for dp = 2 and 4), because torchtitan's Trainer divides
each rank's summed loss by the global token count. So the harness backpropagates each rank's mean
loss divided by the number of data-parallel slots: every layout (pipelined or not) then computes
the global-mean gradient, which tests/test_torchtitan_dist.py checks against one process.
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from sharded_shampoo._torch_compat import pretend_no_accelerator
from sharded_shampoo.dryrun.titan_source import SPMD_BACKEND, install_triton_stub

#: SPMD_BACKEND (the dry-run's too): torchtitan's default "spmd_types" keeps parameters as plain local
#: tensors (its own fully_shard call then refuses them on CPU/torch 2.13, and ShardedShampoo needs
#: DTensors); "full_dtensor" needs DTensor inputs that only torchtitan's Trainer prepares.
#: "partial_dtensor" runs as is and gives the same placements as "full_dtensor" for the FSDP x TP
#: Llama3 (docs/parallelism.md).
VOCAB = 2048


def apply_cpu_workarounds() -> None:
    """Workarounds 1 and 2 (import time); call before anything imports torchtitan."""
    if "torchtitan.tools.utils" in sys.modules and sys.modules["torchtitan.tools.utils"].device_type != "cpu":
        raise RuntimeError("torchtitan was imported before apply_cpu_workarounds(); its device type is "
                           "already fixed to a non-CPU device.")
    pretend_no_accelerator()
    install_triton_stub()
    torch.autograd.set_multithreading_enabled(False)  # as torchtitan's init_distributed does


@dataclass(frozen=True)
class Layout:
    """Parallel degrees (torchtitan's ParallelismConfig); dp_shard=-1 fills the rest of the world."""

    tp: int = 1
    ep: int = 1
    dp_shard: int = -1
    dp_replicate: int = 1
    pp: int = 1
    pp_schedule: str = "GPipe"  # with pp > 1: torchtitan's schedule name (microbatches of 1 sequence)

    def describe(self) -> str:
        return f"pp={self.pp} dp_replicate={self.dp_replicate} dp_shard={self.dp_shard} tp={self.tp} ep={self.ep}"


def _swap_flex_for_sdpa(model_config: Any) -> None:
    """Workaround 3: causal SDPA instead of FlexAttention in every attention config."""
    from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention

    for _, _, parent, attr in list(model_config.traverse(FlexAttention.Config)):
        setattr(parent, attr, ScaledDotProductAttention.Config())


def llama3_spec(n_layers: Optional[int] = None) -> Any:
    """torchtitan's Llama3 debug model (6 layers, dim 256, vocab 2048) as registered, or its first ``n_layers``."""
    from torchtitan.models.llama3 import model_registry

    spec = model_registry("debugmodel")
    if n_layers is not None:
        spec.model.layers = spec.model.layers[:n_layers]
    return spec


def moe_spec(n_layers: int = 2, num_experts: int = 4, top_k: int = 2, hidden_dim: int = 64) -> Any:
    """torchtitan's qwen3 MoE debug model, shrunk: fewer layers, experts and a small expert FFN.

    The registered "debugmodel_moe" has 8 layers of 64 experts (top 8, hidden 768): ~1 min per
    step on 4 CPU ranks. Only the MoE sizes change; attention, norms and inits are torchtitan's.
    """
    from torchtitan.models.common.config_utils import (make_moe_config, make_routed_experts_config,
                                                       make_router_config)
    from torchtitan.models.qwen3 import model_registry

    spec = model_registry("debugmodel_moe")
    cfg = spec.model
    cfg.layers = cfg.layers[:n_layers]
    for layer in cfg.layers:
        old = layer.moe
        dim = old.router.gate.in_features
        layer.moe = make_moe_config(
            num_experts=num_experts,
            router=make_router_config(dim=dim, num_experts=num_experts, gate_param_init=old.router.gate.param_init,
                                      top_k=top_k, score_func="softmax", route_norm=True),
            routed_experts=make_routed_experts_config(
                dim=dim, hidden_dim=hidden_dim, num_experts=num_experts, top_k=top_k,
                param_init=old.routed_experts.inner_experts.param_init, comm_backend="standard"),
            load_balance_coeff=old.load_balance_coeff,
        )
    return spec


def _configs(layout: Layout, seq_len: int) -> tuple[Any, Any, Any]:
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig

    parallelism = ParallelismConfig(data_parallel_replicate_degree=layout.dp_replicate,
                                    data_parallel_shard_degree=layout.dp_shard, tensor_parallel_degree=layout.tp,
                                    expert_parallel_degree=layout.ep, spmd_backend=SPMD_BACKEND,
                                    pipeline_parallel_degree=layout.pp, pipeline_parallel_schedule=layout.pp_schedule,
                                    pipeline_parallel_microbatch_size=1)
    # fp32 parameters and reductions: the CPU has no fast bf16 and the tests compare numbers
    training = TrainingConfig(local_batch_size=2, seq_len=seq_len, mixed_precision_param="float32",
                              mixed_precision_reduce="float32")
    return parallelism, training, CompileConfig()


@dataclass
class Built:
    model: torch.nn.Module          # the whole model; with pp > 1 the first of this rank's stages
    parallel_dims: Any
    spec: Any
    batch_rank: int
    batch_degree: int
    parts: list[torch.nn.Module]    # this rank's model parts: [model], or its pipeline stages
    pipeline: Optional["Pipeline"] = None


@dataclass
class Pipeline:
    """torchtitan's pipeline schedule over this rank's stages (``pipelining_fn``'s results)."""

    schedule: Any
    has_first: bool
    has_last: bool


def build(spec: Any, layout: Layout, seq_len: int = 64, seed: int = 0) -> Built:
    """Build, parallelize (torchtitan's own parallelize_fn, and pipelining_fn when ``layout.pp > 1``)
    and initialise ``spec`` on this rank."""
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import utils as dist_utils

    parallelism, training, compile_config = _configs(layout, seq_len)
    dist_utils.set_spmd_backend(SPMD_BACKEND)
    parallel_dims = ParallelDims.from_config(parallelism, dist.get_world_size())
    parallel_dims.build_mesh()
    model_config = spec.model
    _swap_flex_for_sdpa(model_config)
    model_config.update_from_config(config=types.SimpleNamespace(parallelism=parallelism))
    with torch.device("meta"):
        model = model_config.build()
    kwargs = dict(parallel_dims=parallel_dims, training=training, parallelism=parallelism,
                  compile_config=compile_config, ac_config=None, dump_folder="")
    batch = parallel_dims.get_mesh("batch") if parallel_dims.dp_enabled else None
    rank, degree = (batch.get_local_rank(), batch.size()) if batch is not None else (0, 1)
    pipeline = None
    if layout.pp > 1:
        global_tokens = training.local_batch_size * seq_len * degree
        schedule, parts, has_first, has_last = spec.pipelining_fn(
            model, **kwargs, device=torch.device("cpu"), model_config=model_config,
            parallelize_fn=spec.parallelize_fn, loss_fn=_microbatch_loss(global_tokens))
        pipeline = Pipeline(schedule, has_first, has_last)
    else:
        parts = [spec.parallelize_fn(model, **kwargs)]
    for part in parts:
        _initialise(part, seed)
    return Built(parts[0], parallel_dims, spec, rank, degree, parts, pipeline)


def _initialise(part: torch.nn.Module, seed: int) -> None:
    """Materialise on CPU, torchtitan's init_weights (same seed on every rank), workaround 4."""
    from torch.distributed.fsdp import FSDPModule

    part.to_empty(device="cpu")
    torch.manual_seed(seed)  # same init on every rank, whatever the layout
    with torch.no_grad():
        part.init_weights(buffer_device=None)
    part.train()
    for module in part.modules():  # workaround 4
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)


def _microbatch_loss(global_tokens: int) -> Any:
    """The pipeline's loss per microbatch: summed cross-entropy over the global batch's token count,
    as torchtitan's Trainer computes it. The microbatch losses of all last-stage ranks add up to the
    global mean (torchtitan's schedule does not rescale: ``scale_grads=False``) and FSDP's sum of
    their gradients is the global-mean gradient, as in the unpipelined ``loss_step``."""

    def loss_fn(pred: torch.Tensor, labels: torch.Tensor, **_: Any) -> tuple[torch.Tensor, None]:
        loss = torch.nn.functional.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(), reduction="sum")
        return loss / global_tokens, None

    return loss_fn


def placements_table(model: torch.nn.Module) -> list[tuple[str, tuple, str, str, tuple]]:
    """(name, global shape, mesh 'dim=size,...', placements, local shape) per parameter."""
    rows = []
    for name, p in model.named_parameters():
        mesh = getattr(p, "device_mesh", None)
        mesh_s = ",".join(f"{n}={s}" for n, s in zip(mesh.mesh_dim_names, mesh.mesh.shape)) if mesh is not None else "-"
        placements = ", ".join(map(repr, p.placements)) if mesh is not None else "plain tensor"
        local = tuple(p.to_local().shape) if mesh is not None else tuple(p.shape)
        rows.append((name, tuple(p.shape), mesh_s, placements, local))
    return rows


def held_regions(model: torch.nn.Module) -> dict[str, str]:
    """Per parameter kind (first layer): the box of the global tensor this rank holds, "[r0:r1, c0:c1]".

    Computed by distributing a tensor of global indices with the parameter's own mesh and
    placements, and checked against the parameter's values; raises if a region is not a box.
    """
    from torch.distributed.tensor import distribute_tensor

    out: dict[str, str] = {}
    for name, p in model.named_parameters():
        kind = param_kind(name)
        if kind in out or not hasattr(p, "device_mesh"):
            continue
        index = torch.arange(p.numel(), dtype=torch.float64).reshape(p.shape)
        held = distribute_tensor(index, p.device_mesh, p.placements).to_local().flatten().long()
        full = p.full_tensor().detach()
        if not torch.equal(full.flatten()[held], p.to_local().detach().flatten()):
            raise AssertionError(f"{name}: the computed region does not hold this rank's values")
        spans = []
        for coords in torch.unravel_index(held, tuple(p.shape)):
            lo, hi = int(coords.min()), int(coords.max()) + 1
            if hi - lo != coords.unique().numel():
                raise AssertionError(f"{name}: this rank's part is not a box of the global tensor")
            spans.append(f"{lo}:{hi}")
        out[kind] = "[" + ", ".join(spans) + "]"
    return out


def part_modules(part: torch.nn.Module) -> list[str]:
    """The top-level modules (``layers.N`` per layer) holding a model part's parameters, sorted."""
    names = set()
    for name, _ in part.named_parameters():
        pieces = name.split(".")
        names.add(".".join(pieces[:2]) if pieces[0] == "layers" else pieces[0])
    return sorted(names)


def param_kind(name: str) -> str:
    """A parameter's name with layer indices folded ("layers.*.attention.wo.weight")."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def kinds_table(rows: list[tuple]) -> dict[str, tuple]:
    """placements_table rows folded per parameter kind; raises if one kind has two layouts."""
    out: dict[str, tuple] = {}
    for name, shape, mesh, placements, local in rows:
        entry = (shape, mesh, placements, local)
        if out.setdefault(param_kind(name), entry) != entry:
            raise AssertionError(f"{name}: {entry} differs from other {param_kind(name)} {out[param_kind(name)]}")
    return out


GLOBAL_BATCH = 4


def batch_for(built: Built, step: int, seq_len: int = 64) -> torch.Tensor:
    """This rank's slice of a fixed global batch of GLOBAL_BATCH sequences.

    The global batch is the same for every layout and every step (so the loss must fall if the
    optimizer works, and losses of two layouts are comparable); data-parallel slot ``r`` of
    ``d`` takes sequences ``[r * 4/d, (r+1) * 4/d)``, the ranks of a TP group take the same slice.
    """
    del step  # a fixed batch: steps differ only by the optimizer
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, seq_len + 1), generator=torch.Generator().manual_seed(1234))
    per = GLOBAL_BATCH // built.batch_degree
    return tokens[built.batch_rank * per:(built.batch_rank + 1) * per]


def loss_step(built: Built, tokens: torch.Tensor) -> float:
    """Forward + backward on ``tokens``; returns the loss averaged over data-parallel slots."""
    if built.pipeline is not None:
        return _pipeline_loss_step(built.pipeline, tokens)
    out = built.model(tokens[:, :-1])
    if hasattr(out, "full_tensor"):
        out = out.full_tensor()
    loss = torch.nn.functional.cross_entropy(out.flatten(0, 1).float(), tokens[:, 1:].flatten())
    (loss / built.batch_degree).backward()  # FSDP sums over the slots: the global-mean gradient
    value = loss.detach().clone()
    # equal slices per slot and equal losses within a TP group: the world mean is the global mean
    dist.all_reduce(value)
    return float(value) / dist.get_world_size()


def _pipeline_loss_step(pipeline: Pipeline, tokens: torch.Tensor) -> float:
    """One step of the pipeline schedule (microbatches of one sequence); the loss on every rank.

    Only the last stage's ranks compute losses (their slices' shares of the global mean); their
    world sum is the global mean.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    losses: list[torch.Tensor] = []
    args = (inputs,) if pipeline.has_first else ()
    pipeline.schedule.step(*args, target=targets if pipeline.has_last else None, losses=losses,
                           return_outputs=False)
    value = torch.stack([x.detach().float() for x in losses]).sum() if losses else torch.zeros(())
    dist.all_reduce(value)
    return float(value)


def train(built: Built, optimizers: Any, steps: int, lr_schedulers: Any = None,
          start: int = 0) -> list[float]:
    """``steps`` optimizer steps on the fixed batch; the loss before each step."""
    losses = []
    for step in range(start, start + steps):
        optimizers.zero_grad()
        losses.append(loss_step(built, batch_for(built, step)))
        optimizers.step()
        if lr_schedulers is not None:
            lr_schedulers.step()
    return losses


def checkpoint_manager(folder: str, built: Built, optimizers: Any, lr_schedulers: Any,
                       train_state: Any, load_optimizer: bool = True) -> Any:
    """torchtitan's CheckpointManager over this model, optimizer and LR schedulers (no dataloader).

    ``load_optimizer=False`` leaves the optimizer out of loading (to show what losing its state does).
    """
    from torchtitan.components.checkpoint import CheckpointManager

    exclude = ["dataloader"] + ([] if load_optimizer else ["optimizer"])
    config = CheckpointManager.Config(enable=True, folder=os.path.basename(folder), interval=1, keep_latest_k=0,
                                      last_save_model_only=False, exclude_from_loading=exclude)
    return config.build(dataloader=None, model_parts=built.parts, optimizers=optimizers,
                        lr_schedulers=lr_schedulers, states={"train_state": train_state},
                        sd_adapter=None, base_folder=os.path.dirname(folder))


class TrainState:
    """The step counter, as a DCP Stateful (torchtitan saves its Trainer under "train_state")."""

    def __init__(self, step: int = 0) -> None:
        self.step = step

    def state_dict(self) -> dict[str, Any]:
        return {"step": torch.tensor(self.step)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])


def lr_schedulers(optimizers: Any, steps: int) -> Any:
    """torchtitan's LR schedulers (linear warmup over 1 step, then constant) on the container."""
    from torchtitan.components.optimizer import LRSchedulersContainer

    config = LRSchedulersContainer.Config(warmup_steps=1, decay_ratio=None)
    return config.build(optimizers=optimizers, training_steps=steps)
