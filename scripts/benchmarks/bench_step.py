"""Single-device step benchmark: ShardedShampoo vs AdamW, against the physical floor.

Model: a ~20M-parameter stack of Linear layers with several shapes, some larger than
``max_preconditioner_dim`` (so they are split into blocks). Reports, in one run:

- median step time of AdamW(foreach=True), of ShardedShampoo on a non-amortized step, and of
  the amortized step (roots of every block); the amortized cost per step at
  ``precondition_frequency=100`` is ``(amortized - plain) / 100``;
- the floor: ``4 m n (m + n)`` FLOPs per ``m x n`` block (two factor updates, two
  preconditioning products) at the batched-GEMM rate measured in the same run;
- the amortized root computation of one bucket (>= 8 blocks of one shape) batched vs one
  call per block.

    python -m scripts.benchmarks.bench_step [--max-preconditioner-dim 512] [--steps 5] [--elementwise compile]
        [--threads 1] [--factor-storage bfloat16] [--root-storage bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from sharded_shampoo import AdamGrafting, RootInverseShampoo, ShardedShampoo
from sharded_shampoo.compute.matrix_functions import inverse_root_eigh

from scripts.benchmarks.models import build_model, set_grads

def step_times(fn: Callable[[], None], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_time(fn: Callable[[], None], repeats: int, warmup: int = 1) -> float:
    return statistics.median(step_times(fn, repeats, warmup))


def gemm_rate(d: int = 512, batch: int = 16, repeats: int = 7) -> float:
    """Best FLOP/s of fp32 batched matmul at the block size (the rate the floor is priced at).

    The best of several runs, not the median: the floor should be what the machine can do.
    """
    a = torch.randn(batch, d, d)
    b = torch.randn(batch, d, d)
    torch.bmm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.bmm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * batch * d ** 3 / best


def bench(args: argparse.Namespace) -> dict[str, float]:
    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    set_grads(model, 0)
    t_adamw = median_time(adamw.step, args.steps)

    pre = RootInverseShampoo(factor_storage_dtype=getattr(torch, args.factor_storage),
                             root_storage_dtype=getattr(torch, args.root_storage))
    opt = ShardedShampoo(model.named_parameters(), lr=1e-4, betas=(0.9, 0.999), epsilon=1e-8,
                         max_preconditioner_dim=args.max_preconditioner_dim, precondition_frequency=100,
                         start_preconditioning_step=1, grafting=AdamGrafting(), preconditioner=pre,
                         elementwise=args.elementwise)
    # step 1 is amortized (start), so the next plain steps precondition with real roots; step 2 warms
    # up (and compiles, with --elementwise compile)
    opt.step()
    plain_times = step_times(opt.step, args.steps, warmup=1)
    t_plain, t_plain_best = statistics.median(plain_times), min(plain_times)
    for g in opt.param_groups:  # make the next step an amortized one
        g["step"] = 99
    t0 = time.perf_counter()
    opt.step()
    t_amortized = time.perf_counter() - t0

    floor_flops = sum(4 * b.shape[0] * b.shape[1] * (b.shape[0] + b.shape[1])
                      for b in opt.plan.blocks if len(b.shape) == 2)
    rate = gemm_rate(args.max_preconditioner_dim)
    floor = floor_flops / rate
    per_step = t_plain + (t_amortized - t_plain) / 100

    # amortized roots of one bucket: batched vs one call per block
    d = args.max_preconditioner_dim
    bucket = max(opt.runtime.buckets, key=lambda b: len(b.blocks) if b.shape == (d, d) else 0)
    F = bucket.matrices("factor_0")
    B = F.shape[0]

    def batched() -> None:
        inverse_root_eigh(F, 0.25, 1e-8)

    def per_block() -> None:
        for i in range(B):
            inverse_root_eigh(F[i:i + 1], 0.25, 1e-8)

    t_batched = median_time(batched, 3)
    t_loop = median_time(per_block, 3)
    small = torch.randn(16, 64, 128)
    F_small = small @ small.mT
    t_small_batched = median_time(lambda: inverse_root_eigh(F_small, 0.25, 1e-8), 5)
    t_small_loop = median_time(lambda: [inverse_root_eigh(F_small[i:i + 1], 0.25, 1e-8) for i in range(16)], 5)
    return dict(params=n_params, blocks=len(opt.plan.blocks), adamw=t_adamw, plain=t_plain, plain_best=t_plain_best,
                refresh_roots=t_amortized,
                per_step=per_step, floor=floor, rate=rate, bucket_blocks=B, bucket_dim=d, roots_batched=t_batched,
                roots_loop=t_loop, small_batched=t_small_batched, small_loop=t_small_loop)


def report(r: dict[str, float], args: argparse.Namespace) -> str:
    lines = [
        f"model: {r['params'] / 1e6:.1f}M parameters, {r['blocks']} blocks (max_preconditioner_dim="
        f"{args.max_preconditioner_dim}); GEMM rate {r['rate'] / 1e9:.1f} GFLOP/s; torch threads "
        f"{torch.get_num_threads()}; elementwise={args.elementwise}; storage: factors {args.factor_storage}, "
        f"roots {args.root_storage}",
        "",
        "| measurement | time | x floor | x AdamW |",
        "|---|---|---|---|",
        f"| AdamW(foreach=True) step | {r['adamw'] * 1e3:.1f} ms | | 1.00 |",
        f"| floor: 4mn(m+n) FLOPs at the GEMM rate | {r['floor'] * 1e3:.1f} ms | 1.00 | {r['floor'] / r['adamw']:.2f} |",
        f"| ShardedShampoo plain step (median) | {r['plain'] * 1e3:.1f} ms | {r['plain'] / r['floor']:.2f} | "
        f"{r['plain'] / r['adamw']:.2f} |",
        f"| ShardedShampoo plain step (best of {args.steps}) | {r['plain_best'] * 1e3:.1f} ms | "
        f"{r['plain_best'] / r['floor']:.2f} | {r['plain_best'] / r['adamw']:.2f} |",
        f"| ShardedShampoo amortized step (all roots) | {r['amortized'] * 1e3:.1f} ms | "
        f"{r['amortized'] / r['floor']:.2f} | {r['amortized'] / r['adamw']:.2f} |",
        f"| ShardedShampoo per step incl. roots / 100 | {r['per_step'] * 1e3:.1f} ms | "
        f"{r['per_step'] / r['floor']:.2f} | {r['per_step'] / r['adamw']:.2f} |",
        "",
        "| amortized roots of one bucket | batched | one call per block | speedup |",
        "|---|---|---|---|",
        f"| {r['bucket_blocks']} blocks of {r['bucket_dim']}x{r['bucket_dim']} | {r['roots_batched'] * 1e3:.1f} ms | "
        f"{r['roots_loop'] * 1e3:.1f} ms | {r['roots_loop'] / r['roots_batched']:.2f}x |",
        f"| 16 blocks of 64x64 | {r['small_batched'] * 1e3:.2f} ms | {r['small_loop'] * 1e3:.2f} ms | "
        f"{r['small_loop'] / r['small_batched']:.2f}x |",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-preconditioner-dim", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--elementwise", choices=("eager", "compile"), default="eager")
    for kind in ("factor", "root"):
        p.add_argument(f"--{kind}-storage", choices=("float32", "bfloat16"), default="float32",
                       help=f"storage dtype of the {kind}s (bfloat16: bf16 GEMM operands, fp32 accumulation)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(report(bench(args), args))


if __name__ == "__main__":
    main()
