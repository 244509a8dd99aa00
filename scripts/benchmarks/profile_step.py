"""Where a step's time goes: the ``ShardedShampoo::<phase>`` profiler ranges of the training example, on CPU.

Builds ``scripts/train.py``'s model and optimizer (its defaults: a 2-layer transformer, dim 128,
``precondition_frequency=10``), runs ``--warmup`` training steps, then profiles ``--steps`` steps
(one of every ``precondition_frequency`` refreshes roots) with ``torch.profiler`` and prints, per
phase, the number of ranges, their total CPU time and the share of ``ShardedShampoo.step``. The
phases nest (``factor_update``, ``refresh``, ``precondition`` and ``graft`` run inside the bucket
math between ``gather`` and ``scatter``), so the shares need not add up to 100%.

    OMP_NUM_THREADS=1 python -m scripts.benchmarks.profile_step [--warmup 3] [--steps 20]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from sharded_shampoo import profiling
from scripts.train import build_model, build_optimizer, global_batch, load_corpus, parse_args

STEP_KEY = "Optimizer.step#ShardedShampoo.step"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    train_args = parse_args([])
    torch.manual_seed(train_args.seed)
    model = build_model(train_args)
    opt = build_optimizer(train_args, model)
    corpus = load_corpus(train_args.corpus_bytes)

    def train_step(step: int) -> None:
        batch = global_batch(corpus, step, train_args.batch, train_args.seq, train_args.seed)
        logits = model(batch[:, :-1])
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for step in range(args.warmup):
        train_step(step)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for step in range(args.warmup, args.warmup + args.steps):
            train_step(step)
    opt.check()
    events = {e.key: e for e in prof.key_averages()}
    total_ms = events[STEP_KEY].cpu_time_total / 1e3
    print(f"{args.steps} steps of scripts/train.py's model (CPU, 1 thread, precondition_frequency="
          f"{train_args.precondition_frequency}); ShardedShampoo.step: {total_ms / args.steps:.1f} ms per step\n")
    print("| phase | ranges | CPU ms per step | share of step |")
    print("|---|---:|---:|---:|")
    for name in profiling.PHASES:
        e = events.get(name)
        count, ms = (e.count, e.cpu_time_total / 1e3) if e is not None else (0, 0.0)
        print(f"| `{name}` | {count} | {ms / args.steps:.2f} | {100 * ms / total_ms:.0f}% |")


if __name__ == "__main__":
    main()
