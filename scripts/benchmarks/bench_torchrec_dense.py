"""Dense optimizer step of a torchrec DMP model: ShardedShampoo split across ranks vs repeated on each.

Run under torchrun (one torch thread per rank, so 2 ranks use 2 cores and 1 rank uses one):

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m scripts.benchmarks.bench_torchrec_dense

The model is torchrec's DLRM as built by ``scripts/train_dlrm.py`` (bottom MLP 13-512-64, over MLP
415-512-256-1 on the 415 interaction features: 0.38M dense parameters; embedding dim 64, 26 small tables sharded table-wise on
the fused row-wise AdaGrad). One forward/backward gives real DDP-averaged dense gradients; then
only the dense optimizer's ``step()`` is timed, repeatedly on those gradients, with the
amortized roots (every ``--precondition-frequency`` steps) included in the mean. In one launch:

1. 1 rank: rank 0 alone steps ShardedShampoo(mesh="local") (what a one-process DMP run does; the
   other rank waits), and torch's AdaGrad for reference;
2. 2 ranks, split: ``ShampooDenseOptimizer`` over the DMP world, each rank owns some blocks;
3. 2 ranks, repeated: ``ShampooDenseOptimizer(mesh="local")`` on each rank, i.e. every rank does
   all the preconditioner work (the configuration torchrec's own benchmark measured);
4. 2 ranks, torch AdaGrad through ``KeyedOptimizerWrapper``.

Modes are interleaved over ``--rounds`` rounds and the median round is reported, because the
machine may be shared. Step times are the slowest rank's (each step ends with a barrier).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


from scripts import train_dlrm


def dlrm_args(args: argparse.Namespace) -> argparse.Namespace:
    return train_dlrm.parse_args(["--embedding-dim", "64", "--num-embeddings", "100", "--dense-width", "512",
                                  "--over-width", "512", "--batch", "256", "--optimizer", "adagrad"])


def shampoo_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from sharded_shampoo import AdaGradGrafting

    return dict(lr=1e-4, betas=(0.9, 0.999), epsilon=1e-8, max_preconditioner_dim=args.max_preconditioner_dim,
                precondition_frequency=args.precondition_frequency, start_preconditioning_step=1,
                grafting=AdaGradGrafting(epsilon=1e-8))


def time_steps(step: Callable[[], Any], steps: int, sync: bool) -> float:
    """Mean seconds per step over ``steps`` steps (after one warm-up step that computes the first roots)."""
    step()
    total = 0.0
    for _ in range(steps):
        if sync:
            dist.barrier()
        t0 = time.perf_counter()
        step()
        if sync:
            dist.barrier()
        total += time.perf_counter() - t0
    return total / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precondition-frequency", type=int, default=10)
    p.add_argument("--max-preconditioner-dim", type=int, default=512)
    args = p.parse_args()
    train_dlrm.quiet()
    logging.getLogger().setLevel(logging.ERROR)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    from torchrec.optim.keyed import KeyedOptimizerWrapper

    from sharded_shampoo import ShardedShampoo
    from sharded_shampoo.integrations.torchrec import ShampooDenseOptimizer, dense_parameters

    d = dlrm_args(args)
    dmp = train_dlrm.shard(d, train_dlrm.build_model(d), world)
    raw = train_dlrm.local_part(train_dlrm.global_batch(train_dlrm.teacher(d), 0, d.batch, d), rank, world)
    loss, _ = dmp(train_dlrm.to_batch(raw))
    loss.backward()
    params = dense_parameters(dmp)
    kw = shampoo_kwargs(args)
    split = ShampooDenseOptimizer(params, **kw)
    repeated = ShampooDenseOptimizer(params, mesh="local", **kw)
    adagrad = KeyedOptimizerWrapper(params, lambda ps: torch.optim.Adagrad(ps, lr=1e-4, foreach=True))
    alone = ShardedShampoo(list(params.items()), mesh="local", **kw) if rank == 0 else None
    alone_adagrad = torch.optim.Adagrad(list(params.values()), lr=1e-4, foreach=True) if rank == 0 else None

    results: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, opt in (("1 rank: ShardedShampoo", alone), ("1 rank: AdaGrad", alone_adagrad)):
            if opt is not None:
                results.setdefault(name, []).append(time_steps(opt.step, args.steps, sync=False))
            dist.barrier()
        for name, opt in ((f"{world} ranks: ShardedShampoo split", split),
                          (f"{world} ranks: ShardedShampoo repeated (mesh=\"local\")", repeated),
                          (f"{world} ranks: AdaGrad", adagrad)):
            results.setdefault(name, []).append(time_steps(opt.step, args.steps, sync=True))

    state = torch.tensor([float(split.shampoo.plan.ranks[rank].optimizer_state_bytes)])
    dist.all_reduce(state, op=dist.ReduceOp.MAX)
    if rank == 0:
        report(args, d, results, split, repeated, int(state.item()), world)
    dist.barrier()
    dist.destroy_process_group()


def report(args: argparse.Namespace, d: argparse.Namespace, results: dict[str, list[float]], split: Any,
           repeated: Any, split_state: int, world: int) -> None:
    n = sum(p.numel() for p in split.params.values())
    print(f"DLRM dense part: {len(split.params)} tensors, {n / 1e6:.2f}M params; max_preconditioner_dim="
          f"{args.max_preconditioner_dim}, {len(split.shampoo.plan.blocks)} blocks, precondition_frequency="
          f"{args.precondition_frequency} (roots included), {args.steps} steps x {args.rounds} rounds "
          f"(median round), 1 thread per rank")
    print()
    print("| dense optimizer step | ms / step | vs 1 rank |")
    print("|---|---|---|")
    base = statistics.median(results["1 rank: ShardedShampoo"])
    for name, times in results.items():
        t = statistics.median(times)
        rel = f"{t / base:.2f}x" if "Shampoo" in name else ""
        print(f"| {name} | {t * 1e3:.1f} | {rel} |")
    full = repeated.shampoo.plan.ranks[0].optimizer_state_bytes
    print()
    loads = [r.load for r in split.shampoo.plan.ranks]
    print(f"Shampoo state per rank: {split_state / 2**20:.2f} MiB split (busiest rank) vs {full / 2**20:.2f} MiB "
          f"repeated; modeled load imbalance of the split (max/mean): {max(loads) * len(loads) / sum(loads):.3f}; "
          f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.filterwarnings("ignore")
    main()
