"""Multi-rank torchrec scenarios (imported by spawned ranks): a tiny DLRM under DistributedModelParallel.

Four tables (two table-wise, two row-wise, fused row-wise AdaGrad) and an 8-parameter dense part
(the bottom and over MLPs) trained by ShardedShampoo through ``CombinedOptimizer``. Batches are
deterministic functions of (step, rank), so a run on another world size can rebuild exactly the
global batch that the two ranks saw together.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.types import ShardingPlan
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from sharded_shampoo import AdaGradGrafting, ShardedShampoo
from sharded_shampoo.integrations.torchrec import (ShampooDenseOptimizer, dense_bytes_per_rank, dense_parameters,
                                                   load_dmp, save_dmp)

KEYS = [f"c{i}" for i in range(4)]
ROWS, DIM, DENSE_IN, BATCH, HOTS = 40, 8, 13, 8, 2
EBC = "model.sparse_arch.embedding_bag_collection"
# Well-conditioned regime: the first root comes at step 20, when every factor (the 16-element
# vectors get one rank-1 term per step) is full rank, so float rounding is not amplified.
CONFIG: dict[str, Any] = dict(lr=0.05, betas=(0.9, 0.99), epsilon=1e-8, weight_decay=1e-4, momentum=0.5,
                              max_preconditioner_dim=16, precondition_frequency=5, start_preconditioning_step=20,
                              grafting=AdaGradGrafting(epsilon=1e-8))
SPARSE_LR = 0.05
SAVE_AT, STEPS = 16, 24          # checkpoint after 16 steps; the trajectory continues to 24 (root at 20)
# scripts/train_dlrm.py at toy size (roots every 3 steps): its losses must not depend on the world size
SCRIPT_ARGS = ["--steps", "7", "--batch", "32", "--num-embeddings", "50", "--embedding-dim", "8", "--dense-width", "16",
               "--over-width", "16", "--max-preconditioner-dim", "16", "--precondition-frequency", "3",
               "--epsilon", "1e-4", "--eval-size", "64", "--eval-every", "7", "--no-progress"]


def build_model(seed: int = 0) -> DLRMTrain:
    """The unsharded model: tables on the meta device (DMP materialises its shards), dense on CPU."""
    torch.manual_seed(seed)
    tables = [EmbeddingBagConfig(name=f"t_{k}", embedding_dim=DIM, num_embeddings=ROWS, feature_names=[k])
              for k in KEYS]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    return DLRMTrain(DLRM(embedding_bag_collection=ebc, dense_in_features=DENSE_IN, dense_arch_layer_sizes=[16, DIM],
                          over_arch_layer_sizes=[16, 1]))


def shard(model: DLRMTrain, world: int) -> DistributedModelParallel:
    """Fused row-wise AdaGrad on the tables; t_c0/t_c1 table-wise, t_c2/t_c3 row-wise."""
    apply_optimizer_in_backward(RowWiseAdagrad, model.model.sparse_arch.parameters(), {"lr": SPARSE_LR})
    gens = {f"t_{k}": (table_wise(rank=i % world) if i < 2 else row_wise()) for i, k in enumerate(KEYS)}
    plan = construct_module_sharding_plan(model.model.sparse_arch.embedding_bag_collection, gens,
                                          local_size=world, world_size=world, device_type="cpu")
    return DistributedModelParallel(module=model, device=torch.device("cpu"), plan=ShardingPlan({EBC: plan}))


def build(world: int, seed: int = 0) -> tuple[DistributedModelParallel, ShampooDenseOptimizer, CombinedOptimizer]:
    dmp = shard(build_model(seed), world)
    dense = ShampooDenseOptimizer(dense_parameters(dmp), **CONFIG)
    return dmp, dense, CombinedOptimizer([dmp.fused_optimizer, dense])


def raw_batch(step: int, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * step + rank)
    return {"dense": torch.randn(BATCH, DENSE_IN, generator=g),
            "ids": torch.randint(0, ROWS, (len(KEYS), BATCH, HOTS), generator=g),
            "labels": torch.randint(0, 2, (BATCH,), generator=g).float()}


def concat(raws: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"dense": torch.cat([r["dense"] for r in raws]), "ids": torch.cat([r["ids"] for r in raws], dim=1),
            "labels": torch.cat([r["labels"] for r in raws])}


def to_batch(raw: dict[str, torch.Tensor]) -> Batch:
    ids = raw["ids"]
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=KEYS, values=ids.flatten(),
                                              lengths=torch.full((ids.shape[0] * ids.shape[1],), ids.shape[2]))
    return Batch(dense_features=raw["dense"], sparse_features=kjt, labels=raw["labels"])


def train_step(dmp: nn.Module, opt: CombinedOptimizer, raw: dict[str, torch.Tensor]) -> float:
    opt.zero_grad()
    loss, _ = dmp(to_batch(raw))
    loss.backward()
    opt.step()
    return float(loss)


def unique_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages behind ``tensors`` (nested dicts allowed): what is really allocated."""
    seen: dict[int, int] = {}
    stack = [tensors]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, torch.Tensor):
            seen[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    return sum(seen.values())


def flat_state(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(flat_state(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v.detach().clone()
    return out


def sparse_snapshot(dmp: nn.Module, opt: CombinedOptimizer) -> dict[str, dict[tuple[int, ...], torch.Tensor]]:
    """This rank's shards of every table and its fused-optimizer state, keyed by global offsets."""
    out: dict[str, dict[tuple[int, ...], torch.Tensor]] = {}
    items = [(k, v) for k, v in dmp.state_dict().items() if k.startswith(EBC)]
    for fqn, entry in opt.state_dict()["state"].items():
        items += [(f"{fqn}/{k}", v) for k, v in entry.items() if hasattr(v, "local_shards")]
    for key, st in items:
        out[key] = {tuple(s.metadata.shard_offsets): s.tensor.detach().clone() for s in st.local_shards()}
    return out


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)


def dense_values(dense: ShampooDenseOptimizer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in dense.params.items()}


def scenario_two_ranks(rank: int, world: int, ckpt: str, snap_dir: str) -> dict[str, Any]:
    """Split dense Shampoo == one-process Shampoo on the same gradients; memory == estimate; save/load."""
    out: dict[str, Any] = {}
    dmp, dense, opt = build(world)
    dense.init_state()  # the torchrec hook: must not step (a real step would advance the counters)
    out["step_after_init_state"] = dense.shampoo.param_groups[0]["step"]
    ref_params = {n: p.detach().clone().requires_grad_() for n, p in dense.params.items()}
    ref = ShardedShampoo(list(ref_params.items()), mesh="local", **CONFIG)
    losses = []
    for step in range(STEPS):
        if step == SAVE_AT:
            save_dmp(ckpt, dmp, opt, extra={"step": step})
            torch.save({"dense": flat_state(dense.shampoo.state), "sparse": sparse_snapshot(dmp, opt)},
                       os.path.join(snap_dir, f"rank{rank}.pt"))
        losses.append(train_step(dmp, opt, raw_batch(step, rank)))
        for n, p in dense.params.items():
            ref_params[n].grad = p.grad.detach().clone()
        ref.step()
        if step == 0:
            grads = {n: p.grad for n, p in dense.params.items()}
            params_bytes = sum(p.numel() * p.element_size() for p in dense.params.values())
            buffers = [b for n, b in dmp.named_buffers() if not n.startswith(EBC)]   # InteractionArch's indices
            out["real_bytes"] = (params_bytes + unique_bytes(grads) + unique_bytes(dense.shampoo.state)
                                 + unique_bytes(buffers))
            out["estimate_bytes"] = dense_bytes_per_rank(build_model(), world, **CONFIG)[rank]
    out["losses"] = losses
    out["final_dense"] = dense_values(dense)
    out["ref_diff"] = max_rel_diff(out["final_dense"], {n: p.detach() for n, p in ref_params.items()})
    out["owned_blocks"] = len(dense.shampoo.plan.owned_blocks(rank))
    out["total_blocks"] = len(dense.shampoo.plan.blocks)
    out["state_keys"] = sorted(opt.state_dict()["state"])
    out.update(_reload_same_world(rank, world, ckpt, out["losses"], out["final_dense"]))
    from tests.support import torchrec_hardening

    out["hardening"] = torchrec_hardening.run(rank, world, ckpt)
    out["script"] = run_script()
    return out


def run_script() -> dict[str, list]:
    """scripts/train_dlrm.py's training loop on this launch's ranks."""

    from scripts import train_dlrm

    return train_dlrm.train(train_dlrm.parse_args(SCRIPT_ARGS))


def _reload_same_world(rank: int, world: int, ckpt: str, losses: list[float],
                       final: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A fresh model (other seed) + torchrec's init_state, loaded from the checkpoint, retraces the run."""
    dmp, dense, opt = build(world, seed=1)
    opt.init_state()   # CombinedOptimizer's: a zero-gradient step on every sub-optimizer, undone by the load
    extra = load_dmp(ckpt, dmp, opt, extra={"step": -1})
    out: dict[str, Any] = {"reload_extra": extra, "reload_group_step": dense.shampoo.param_groups[0]["step"]}
    again = [train_step(dmp, opt, raw_batch(step, rank)) for step in range(SAVE_AT, STEPS)]
    out["reload_loss_diff"] = max(abs(a - b) for a, b in zip(again, losses[SAVE_AT:]))
    out["reload_dense_diff"] = max_rel_diff(dense_values(dense), final)
    # one LR scheduler drives both optimizers: lr factor 0 freezes tables and dense parameters
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.0)
    out["lrs"] = sorted({float(g["lr"]) for g in opt.param_groups})
    before_dense, before_sparse = dense_values(dense), sparse_snapshot(dmp, opt)
    train_step(dmp, opt, raw_batch(STEPS, rank))
    sched.step()
    after_sparse = sparse_snapshot(dmp, opt)
    out["frozen_dense_diff"] = max_rel_diff(dense_values(dense), before_dense)
    out["frozen_table_diff"] = max(float((after_sparse[k][o] - v).abs().max())
                                   for k, shards in before_sparse.items() if "momentum" not in k
                                   for o, v in shards.items())
    dist.barrier()
    return out


def scenario_resume(rank: int, world: int, ckpt: str, snap_dir: str, saved_world: int) -> dict[str, Any]:
    """Load the two-rank checkpoint on ``world`` ranks; compare state exactly and the continuation."""
    dmp, dense, opt = build(world, seed=2)
    extra = load_dmp(ckpt, dmp, opt, extra={"step": -1})
    out: dict[str, Any] = {"extra": extra, "group_step": dense.shampoo.param_groups[0]["step"]}
    snaps = [torch.load(os.path.join(snap_dir, f"rank{r}.pt")) for r in range(saved_world)]
    saved_dense = {k: v for s in snaps for k, v in s["dense"].items()}
    live_dense = flat_state(dense.shampoo.state)
    out["dense_state_keys"] = (len(live_dense), sum(k.endswith(".step") for k in live_dense))
    out["dense_state_diff"] = max(float((v - saved_dense[k]).abs().max()) for k, v in live_dense.items())
    saved_sparse: dict[str, dict[tuple[int, ...], torch.Tensor]] = {}
    for s in snaps:
        for key, shards in s["sparse"].items():
            saved_sparse.setdefault(key, {}).update(shards)
    out["sparse_state_diff"] = _sparse_diff(sparse_snapshot(dmp, opt), saved_sparse)
    # the same global batches: the mean loss over them has the gradients that DDP (dense) and
    # torchrec's embedding backward (sparse) produce from the per-rank mean losses
    per = saved_world // world
    out["losses"] = [train_step(dmp, opt, concat([raw_batch(step, r) for r in range(rank * per, (rank + 1) * per)]))
                     for step in range(SAVE_AT, STEPS)]
    out["final_dense"] = dense_values(dense)
    out["incompatible"] = _load_incompatible(world, ckpt)
    out["missing_extra"] = load_missing_extra(world, ckpt)
    out["script"] = run_script()
    return out


def _load_incompatible(world: int, ckpt: str) -> tuple[str, float]:
    """Another max_preconditioner_dim: the load must raise before touching any tensor."""
    from sharded_shampoo.checkpointing import IncompatibleCheckpointError

    dmp = shard(build_model(seed=3), world)
    dense = ShampooDenseOptimizer(dense_parameters(dmp), **dict(CONFIG, max_preconditioner_dim=8))
    opt = CombinedOptimizer([dmp.fused_optimizer, dense])
    before = dense_values(dense)
    try:
        load_dmp(ckpt, dmp, opt)
    except IncompatibleCheckpointError as err:
        return str(err), max_rel_diff(dense_values(dense), before)
    return "no error", 0.0


def load_missing_extra(world: int, ckpt: str) -> str:
    dmp, _, opt = build(world, seed=3)
    try:
        load_dmp(ckpt, dmp, opt, extra={"epoch": 0})
    except KeyError as err:
        return str(err)
    return "no error"


def _sparse_diff(live: dict[str, dict[tuple[int, ...], torch.Tensor]],
                 saved: dict[str, dict[tuple[int, ...], torch.Tensor]]) -> float:
    """Max abs difference of every live shard against the same rows of the saved shards."""
    worst = 0.0
    for key, shards in live.items():
        full = _assemble(saved[key])
        for offsets, t in shards.items():
            region = full[tuple(slice(o, o + s) for o, s in zip(offsets, t.shape))]
            worst = max(worst, float((region - t).abs().max()))
    return worst


def _assemble(shards: dict[tuple[int, ...], torch.Tensor]) -> torch.Tensor:
    shape = [max(o[d] + t.shape[d] for o, t in shards.items()) for d in range(len(next(iter(shards))))]
    full = torch.full(shape, float("nan"))
    for offsets, t in shards.items():
        full[tuple(slice(o, o + s) for o, s in zip(offsets, t.shape))] = t
    return full
