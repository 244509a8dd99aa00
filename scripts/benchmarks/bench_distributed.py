"""Distributed step benchmark: optimizer step time on 1 vs N ranks, and bytes on the wire.

Run under torchrun (one torch thread per rank, so N ranks use N cores and 1 rank uses one):

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m scripts.benchmarks.bench_distributed

In one launch: (1) rank 0 alone steps a single-process ShardedShampoo on the unsharded model
(the other ranks wait); (2) all ranks step ShardedShampoo on the FSDP2-sharded model, without
overlap (``overlap_chunks=1``: one exchange each way) and with it (``--chunks`` waves), recording
the exposed communication time (seconds the rank waited in ``work.wait()``); (3) AdamW on the same
sharded model for reference. The model is a stack of Linear layers where the optimizer dominates.
Gradients are set directly (no forward/backward), so only the optimizer step is timed. Bytes sent
per rank per step come from the static routing schedule.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from sharded_shampoo import AdamGrafting, ShardedShampoo


def build(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])


def set_grads(model: nn.Module) -> None:
    for p in model.parameters():
        full = torch.full(p.shape, 1e-3)
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            p.grad = distribute_tensor(full, p.device_mesh, p.placements)
        else:
            p.grad = full


def time_steps(opt: torch.optim.Optimizer, steps: int, sync: bool) -> tuple[float, float]:
    """Median step time and median exposed communication time (ShardedShampoo only)."""
    opt.step()  # warm-up (and the first root)
    times, exposed = [], []
    for _ in range(steps):
        if sync:
            dist.barrier()
        t0 = time.perf_counter()
        opt.step()
        if sync:
            dist.barrier()
        times.append(time.perf_counter() - t0)
        executor = getattr(opt, "executor", None)
        exposed.append(executor.last_exposed_comm_seconds if executor is not None else 0.0)
    return statistics.median(times), statistics.median(exposed)


def shampoo(model: nn.Module, args: argparse.Namespace, mesh: object = None, chunks: int = 1) -> ShardedShampoo:
    return ShardedShampoo(model.named_parameters(), mesh=mesh, lr=1e-4, max_preconditioner_dim=args.max_preconditioner_dim,
                          precondition_frequency=1000, start_preconditioning_step=1, epsilon=1e-8,
                          grafting=AdamGrafting(), overlap_chunks=chunks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--max-preconditioner-dim", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--chunks", type=int, default=4, help="overlap_chunks of the overlapped run")
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    t_single = 0.0
    if rank == 0:
        model = build(args.width, args.depth)
        set_grads(model)
        t_single = time_steps(shampoo(model, args, mesh="local"), args.steps, sync=False)[0]
    dist.barrier()

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = build(args.width, args.depth)
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    set_grads(model)
    opt = shampoo(model, args)
    t_dist, exposed = time_steps(opt, args.steps, sync=True)
    overlapped = shampoo(model, args, chunks=args.chunks)
    t_overlap, exposed_overlap = time_steps(overlapped, args.steps, sync=True)
    waves = opt.executor.waves
    itemsize = torch.empty((), dtype=opt.comm_dtype).element_size()
    sent = sum(sum(w.gather.send_sizes) + sum(w.update.send_sizes) for w in waves) * itemsize
    grad_bytes = sum(q.numel() * q.element_size() for q in model.parameters())
    sent_all = torch.tensor([float(sent)])
    dist.all_reduce(sent_all, op=dist.ReduceOp.MAX)

    adamw = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    t_adamw = time_steps(adamw, args.steps, sync=True)[0]
    worst = torch.tensor([exposed, exposed_overlap], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if rank == 0:
        n = sum(q.numel() for q in model.parameters())
        print(f"model: {args.depth} x Linear({args.width}, {args.width}) = {n / 1e6:.1f}M params, "
              f"max_preconditioner_dim={args.max_preconditioner_dim}, {len(opt.plan.blocks)} blocks, "
              f"{world} ranks x 1 thread, fp32 communication")
        print()
        print("| measurement | value |")
        print("|---|---|")
        print(f"| ShardedShampoo step, 1 rank (unsharded) | {t_single * 1e3:.1f} ms |")
        print(f"| ShardedShampoo step, {world} ranks (FSDP2), no overlap | {t_dist * 1e3:.1f} ms |")
        print(f"| ShardedShampoo step, {world} ranks (FSDP2), overlap_chunks={args.chunks} | {t_overlap * 1e3:.1f} ms |")
        print(f"| speedup over 1 rank (overlapped) | {t_single / t_overlap:.2f}x |")
        print(f"| exposed communication per step (max over ranks), no overlap | {worst[0].item() * 1e3:.1f} ms |")
        print(f"| exposed communication per step (max over ranks), overlap_chunks={args.chunks} | "
              f"{worst[1].item() * 1e3:.1f} ms |")
        print(f"| AdamW(foreach) step, {world} ranks (FSDP2) | {t_adamw * 1e3:.1f} ms |")
        print(f"| max bytes sent per rank per step | {sent_all.item() / 2**20:.2f} MiB |")
        print(f"| gradient bytes / N | {grad_bytes / world / 2**20:.2f} MiB |")
        print(f"| ratio (target <= 2.10) | {sent_all.item() / (grad_bytes / world):.2f} |")
        print(f"| modeled imbalance (max/mean load) | {opt.plan.summary.imbalance:.3f} |")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
