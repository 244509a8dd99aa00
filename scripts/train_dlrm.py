"""Train torchrec's DLRM on synthetic Criteo-shaped clicks: sparse tables on torchrec, dense part on Shampoo.

13 dense and 26 categorical features per example (Criteo's shape). Clicks come from a hidden
logistic "teacher" (a dense linear term plus one effect per category id, ids Zipf-skewed), so
there is a signal to learn and AUC rises above 0.5; no download. The embedding tables are
sharded by torchrec's planner (given ShardedShampoo's exact dense memory) and trained by the
fused row-wise AdaGrad; the dense MLPs get ShardedShampoo split across the ranks
(``--optimizer shampoo``) or torch's AdaGrad (``--optimizer adagrad``), combined in one
``CombinedOptimizer``. CPU/gloo:

    torchrun --nproc-per-node 2 scripts/train_dlrm.py --optimizer shampoo --plot dlrm_shampoo.png
    torchrun --nproc-per-node 2 scripts/train_dlrm.py --optimizer adagrad --plot dlrm_adagrad.png

The global batch of a step is split across ranks and the tables are initialised from their global
rows, so 1 and 2 processes train the same model. ``--save-every``/``--resume`` checkpoint with DCP
(``sharded_shampoo.integrations.torchrec.save_dmp``/``load_dmp``); resuming works on another
number of processes.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist

DENSE, SPARSE = 13, 26
KEYS = [f"cat_{i}" for i in range(SPARSE)]


# ----------------------------------------------------------------------------- data


def teacher(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The hidden click model (the same on every rank): dense weights and one effect per (feature, id)."""
    g = torch.Generator().manual_seed(args.seed)
    return {"dense": torch.randn(DENSE, generator=g) / math.sqrt(DENSE),
            "ids": torch.randn(SPARSE, args.num_embeddings, generator=g) * 1.5 / math.sqrt(SPARSE)}


def global_batch(t: dict[str, torch.Tensor], step: int, size: int, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Examples of ``step`` (negative steps: the held-out set); the same on every rank."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step + 7)
    dense = torch.randn(size, DENSE, generator=g)
    ids = (args.num_embeddings * torch.rand(SPARSE, size, generator=g) ** 3).long()   # Zipf-like skew
    logit = dense @ t["dense"] + t["ids"].gather(1, ids).sum(0) - 1.0
    labels = torch.bernoulli(torch.sigmoid(logit), generator=g)
    return {"dense": dense, "ids": ids, "labels": labels}


def local_part(raw: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    n = raw["labels"].numel() // world
    part = slice(rank * n, (rank + 1) * n)
    return {"dense": raw["dense"][part], "ids": raw["ids"][:, part], "labels": raw["labels"][part]}


def to_batch(raw: dict[str, torch.Tensor]) -> Any:
    from torchrec import KeyedJaggedTensor
    from torchrec.datasets.utils import Batch

    kjt = KeyedJaggedTensor.from_lengths_sync(keys=KEYS, values=raw["ids"].flatten(),
                                              lengths=torch.ones(raw["ids"].numel(), dtype=torch.int32))
    return Batch(dense_features=raw["dense"], sparse_features=kjt, labels=raw["labels"])


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney: the chance a positive outranks a negative)."""
    ranks = torch.empty_like(scores, dtype=torch.float64)
    ranks[scores.argsort()] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    pos = labels.bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# ----------------------------------------------------------------------------- model and optimizers


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """DLRM with 26 tables (on the meta device: DMP materialises only each rank's shards)."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.models.dlrm import DLRM, DLRMTrain

    torch.manual_seed(args.seed)
    tables = [EmbeddingBagConfig(name=f"t_{k}", embedding_dim=args.embedding_dim,
                                 num_embeddings=args.num_embeddings, feature_names=[k]) for k in KEYS]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    return DLRMTrain(DLRM(embedding_bag_collection=ebc, dense_in_features=DENSE,
                          dense_arch_layer_sizes=[args.dense_width, args.embedding_dim],
                          over_arch_layer_sizes=[args.over_width, args.over_width // 2, 1]))


def shampoo_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from sharded_shampoo import AdaGradGrafting

    return dict(lr=args.lr or 0.01, betas=(0.9, 0.999), epsilon=args.epsilon, weight_decay=1e-5,
                max_preconditioner_dim=args.max_preconditioner_dim,
                precondition_frequency=args.precondition_frequency, grafting=AdaGradGrafting(epsilon=1e-8))


def shard(args: argparse.Namespace, model: torch.nn.Module, world: int) -> Any:
    """torchrec's planner (table- or row-wise, fused kernels) with the dense memory reserved, then DMP."""
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    from sharded_shampoo.integrations.torchrec import dense_named_parameters, dense_tensor_estimate, storage_reservation

    apply_optimizer_in_backward(RowWiseAdagrad, model.model.sparse_arch.parameters(), {"lr": args.sparse_lr})
    if args.optimizer == "shampoo":
        # the one call: the planner reserves exactly what ShardedShampoo will allocate per rank
        reservation = storage_reservation(model, world, percentage=0.15, **shampoo_kwargs(args))
        if dist.get_rank() == 0:
            params, buffer_bytes = dense_named_parameters(model)
            guess = 6 * sum(p.numel() * p.element_size() for _, p in params) + buffer_bytes
            exact = dense_tensor_estimate(model, world, **shampoo_kwargs(args))
            print(f"dense memory per rank for the planner: {exact:,} bytes (torchrec's 6x guess: {guess:,})")
    else:
        reservation = HeuristicalStorageReservation(percentage=0.15)
    constraints = {f"t_{k}": ParameterConstraints(sharding_types=["table_wise", "row_wise"], compute_kernels=["fused"])
                   for k in KEYS}
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu", local_world_size=world),
                                       batch_size=args.batch // world, storage_reservation=reservation,
                                       constraints=constraints)
    plan = planner.collective_plan(model, [EmbeddingBagCollectionSharder()], dist.GroupMember.WORLD)
    return DistributedModelParallel(module=model, device=torch.device("cpu"), plan=plan)


def init_tables(dmp: torch.nn.Module, args: argparse.Namespace) -> None:
    """Fill every local table shard from its global rows, so the model does not depend on the sharding."""
    bound = 1.0 / math.sqrt(args.num_embeddings)
    with torch.no_grad():
        for name, value in dmp.state_dict().items():
            if not hasattr(value, "local_shards"):
                continue
            g = torch.Generator().manual_seed(args.seed * 7919 + sum(map(ord, name)))
            full = (torch.rand(value.size(), generator=g) * 2 - 1) * bound
            for s in value.local_shards():
                region = tuple(slice(o, o + n) for o, n in zip(s.metadata.shard_offsets, s.tensor.shape))
                s.tensor.copy_(full[region])


def build_optimizer(args: argparse.Namespace, dmp: torch.nn.Module) -> Any:
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

    from sharded_shampoo.integrations.torchrec import ShampooDenseOptimizer, dense_parameters

    if args.optimizer == "shampoo":
        dense = ShampooDenseOptimizer(dense_parameters(dmp), **shampoo_kwargs(args))
    else:
        dense = KeyedOptimizerWrapper(dense_parameters(dmp), lambda ps: torch.optim.Adagrad(ps, lr=args.lr or 0.05))
    return CombinedOptimizer([dmp.fused_optimizer, dense])


# ----------------------------------------------------------------------------- training


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimizer", choices=("shampoo", "adagrad"), default="shampoo", help="dense optimizer")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=512, help="global batch (split across ranks)")
    p.add_argument("--num-embeddings", type=int, default=2000, help="rows per table (hash size)")
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--dense-width", type=int, default=128)
    p.add_argument("--over-width", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="dense lr; default 0.01 (shampoo), 0.05 (adagrad)")
    p.add_argument("--sparse-lr", type=float, default=0.05, help="fused row-wise AdaGrad lr of the tables")
    p.add_argument("--max-preconditioner-dim", type=int, default=256)
    p.add_argument("--precondition-frequency", type=int, default=20)
    p.add_argument("--epsilon", type=float, default=1e-8, help="Shampoo's epsilon (root regulariser)")
    p.add_argument("--eval-size", type=int, default=4096, help="held-out examples for the AUC")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="write the loss curve (and eval AUC) to this PNG")
    p.add_argument("--no-progress", action="store_true", help="disable the tqdm progress bar (shown only when stderr is a terminal)")
    p.add_argument("--save-every", type=int, default=0, metavar="N", help="save a checkpoint every N steps")
    p.add_argument("--checkpoint-dir", default="dlrm_ckpt", metavar="DIR", help="where step_N/ checkpoints go")
    p.add_argument("--resume", default=None, metavar="PATH", help="a step_N directory written by --save-every")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "num_embeddings", "embedding_dim", "dense_width", "over_width", "eval_size",
                 "eval_every", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.over_width < 2:
        p.error("--over-width must be >= 2")
    return args


def setup_distributed() -> tuple[int, int]:
    """The gloo process group (torchrun's, or a one-process group): DMP needs one."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get(
                "MASTER_PORT", "29511"))
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def evaluate(dmp: torch.nn.Module, t: dict[str, torch.Tensor], args: argparse.Namespace, rank: int,
             world: int) -> float:
    """AUC of the held-out set (split across ranks, scores gathered)."""
    raw = local_part(global_batch(t, -1, args.eval_size - args.eval_size % world, args), rank, world)
    with torch.no_grad():
        _, (_, logits, labels) = dmp(to_batch(raw))
    out = [torch.empty_like(logits) for _ in range(world)], [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(out[0], logits.contiguous())
    dist.all_gather(out[1], labels.contiguous())
    return auc(torch.cat(out[0]).flatten(), torch.cat(out[1]).flatten())


def train(args: argparse.Namespace) -> dict[str, list]:
    """The training loop; returns the global mean loss of every step and the (step, AUC) evaluations."""
    from sharded_shampoo.integrations.torchrec import load_dmp, save_dmp

    rank, world = setup_distributed()
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} must be divisible by the number of processes ({world}).")
    dmp = shard(args, build_model(args), world)
    init_tables(dmp, args)
    opt = build_optimizer(args, dmp)
    start = 0
    if args.resume:
        start = int(load_dmp(args.resume, dmp, opt, extra={"step": 0})["step"])
        if rank == 0:
            print(f"resumed from {args.resume} at step {start} on {world} process(es)")
    t = teacher(args)
    history: dict[str, list] = {"loss": [], "auc": []}
    bar = None
    if rank == 0 and not args.no_progress and sys.stderr.isatty():   # no bar in a piped log
        from tqdm import tqdm

        bar = tqdm(total=args.steps, initial=start, desc=f"{args.optimizer} x{world}", unit="step")
    say = print if bar is None else bar.write
    t0 = time.perf_counter()
    for step in range(start, args.steps):
        opt.zero_grad()
        loss, _ = dmp(to_batch(local_part(global_batch(t, step, args.batch, args), rank, world)))
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        history["loss"].append(float(mean) / world)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{history['loss'][-1]:.4f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            history["auc"].append((step + 1, evaluate(dmp, t, args, rank, world)))
        if rank == 0 and (step % args.log_every == 0 or step + 1 == args.steps):
            last_auc = f"  auc {history['auc'][-1][1]:.4f}" if history["auc"] else ""
            say(f"step {step:4d}  loss {history['loss'][-1]:.4f}{last_auc}  ({time.perf_counter() - t0:.1f}s)")
        if args.save_every and (step + 1) % args.save_every == 0:
            path = os.path.join(args.checkpoint_dir, f"step_{step + 1}")
            save_dmp(path, dmp, opt, extra={"step": step + 1})
            if rank == 0:
                say(f"saved {path}")
    if bar is not None:
        bar.close()
    if rank == 0 and args.plot and history["loss"]:
        save_plot(history, args, start)
    return history


def save_plot(history: dict[str, list], args: argparse.Namespace, start: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install 'sharded-shampoo[plot]'", file=sys.stderr)
        return
    losses = torch.tensor(history["loss"])
    window = min(20, len(losses))
    smooth = losses.unfold(0, window, 1).mean(1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = range(start, start + len(losses))
    ax.plot(steps, losses, alpha=0.3, label=f"{args.optimizer} (per step)")
    ax.plot(range(start + window - 1, start + len(losses)), smooth, label=f"{args.optimizer} ({window}-step mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("log loss")
    ax.grid(alpha=0.3)
    if history["auc"]:
        ax2 = ax.twinx()
        ax2.plot(*zip(*history["auc"]), "o-", color="tab:green", label="eval AUC")
        ax2.set_ylabel("AUC")
        ax2.legend(loc="upper right")
    ax.legend(loc="lower left")
    ax.set_title(f"DLRM, synthetic Criteo-shaped clicks, dense: {args.optimizer}")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    auc_text = f", eval AUC {history['auc'][-1][1]:.4f}" if history["auc"] else ""
    print(f"wrote {args.plot} (final loss {history['loss'][-1]:.4f}{auc_text})")


def quiet() -> None:
    """torchrec's planner and DMP warn a lot about deprecations that do not concern this script."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in ("torchrec", "torch.distributed", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    quiet()
    try:
        train(args)
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
