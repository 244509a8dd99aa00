"""What the device-side activity mask costs on a plain bucket step, and what packed storage costs.

One bucket of ``--blocks`` blocks of ``--dim x --dim`` (root-inverse Shampoo, Adam grafting, beta1 = 0.9,
real roots from a first refresh), timed on plain steps, interleaved over ``--rounds``:

* packed (default) without a mask, with an all-active mask, with half the blocks active;
* full matrices (``symmetric_packing=False``) without a mask and with an all-active mask.

Reported: the median step (wall and process CPU time; one torch thread) and ratios to the packed
step without a mask. The mask's cost is per-block coefficients and two ``masked_fill`` passes over
the gradient stack, never a GEMM.

    OMP_NUM_THREADS=1 python -m scripts.benchmarks.bench_bucket_mask [--blocks 16] [--dim 512] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sharded_shampoo.compute.preconditioner import BlockBucket, BucketConfig, BucketHyperparams, BucketStep
from sharded_shampoo.config import AdamGrafting, RootInverseShampoo
from sharded_shampoo.planning.blocking import Block


def make_bucket(blocks: int, dim: int, packing: bool) -> BlockBucket:
    shape = (dim, dim)
    items = [Block(block_id=f"w{i}.block_0", param_name=f"w{i}", param_shape=shape, merged_shape=shape,
                   ranges=((0, dim), (0, dim)), exponents=(0.25, 0.25)) for i in range(blocks)]
    config = BucketConfig(RootInverseShampoo(symmetric_packing=packing), AdamGrafting(), has_filtered_grad=True)
    return BlockBucket(items, config, torch.device("cpu"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per case and round")
    args = p.parse_args()
    torch.set_num_threads(1)
    hp = BucketHyperparams(beta1=0.9, beta2=0.999, epsilon=1e-8, use_bias_correction=True)
    g = torch.Generator().manual_seed(0)
    G = torch.randn(args.blocks, args.dim, args.dim, generator=g) * 1e-2
    half = torch.arange(args.blocks) % 2 == 0
    everything = torch.ones(args.blocks, dtype=torch.bool)
    buckets = {True: make_bucket(args.blocks, args.dim, True), False: make_bucket(args.blocks, args.dim, False)}
    for b in buckets.values():
        b.step_blocks(G.clone(), BucketStep(hp, refresh_roots=True, precondition=True))
    cases = [("packed, no mask", True, None), ("packed, all-active mask", True, everything),
             ("packed, half active", True, half), ("full, no mask", False, None),
             ("full, all-active mask", False, everything)]
    times: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in cases}
    for r in range(args.rounds):
        for name, packing, active in (cases if r % 2 == 0 else cases[::-1]):
            for _ in range(args.steps):
                x = G.clone()
                t0, c0 = time.perf_counter(), time.process_time()
                buckets[packing].step_blocks(x, BucketStep(hp, refresh_roots=False, precondition=True, active=active))
                times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    base = [statistics.median(t[i] for t in times[cases[0][0]]) for i in (0, 1)]
    print(f"{args.blocks} blocks of {args.dim}x{args.dim}, root-inverse, Adam grafting, beta1 0.9; median of "
          f"{args.rounds * args.steps} plain steps; torch threads {torch.get_num_threads()}")
    print()
    print("| case | wall | x packed, no mask | CPU time | x packed, no mask |")
    print("|---|---|---|---|---|")
    for name, _, _ in cases:
        wall, cpu = (statistics.median(t[i] for t in times[name]) for i in (0, 1))
        print(f"| {name} | {wall * 1e3:.1f} ms | {wall / base[0]:.3f} | {cpu * 1e3:.1f} ms | {cpu / base[1]:.3f} |")


if __name__ == "__main__":
    main()
