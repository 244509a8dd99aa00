"""ShardedShampoo vs the reference Distributed Shampoo, same parameters, config and gradients, one run.

The reference is facebookresearch/optimizers (``DistributedShampoo``), read from a local checkout
given with ``--reference`` and put on ``sys.path`` at run time only (it is never vendored and never
a dependency). Both optimizers step copies of the same 9 parameters (up to 4096 x 1024; 17 blocks at
``max_preconditioner_dim=1024``) with the same seeded gradients, root-inverse Shampoo, eigh roots,
AdaGrad grafting, ``precondition_frequency=10``. After ``--warmup`` steps (the first root refresh
included) each optimizer runs ``--steps`` timed steps; the runs are interleaved ABBA over
``--rounds`` so load drift on a shared machine hits both alike. Reported per optimizer:

* mean step: all timed steps, root refreshes included (what training pays per step);
* plain step: median of the steps without a refresh;
* refresh step: median of the steps with a refresh (every ``precondition_frequency``-th);

and the ratios ours / reference. The parameters of both runs are compared at the end (same math:
the relative difference must be small, else the configs do not match and the timing means nothing).

    OMP_NUM_THREADS=1 python scripts/bench_vs_reference.py --reference /work/reference
    ... --root warm --fused compile --state-dtype bfloat16   # our faster options vs the same reference
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

#: name -> shape: attention (4 x 1024^2), MLP (4096 x 1024 both ways), 2048-row projections, a norm.
PARAMS: list[tuple[str, tuple[int, ...]]] = [
    ("attn.q", (1024, 1024)), ("attn.k", (1024, 1024)), ("attn.v", (1024, 1024)), ("attn.o", (1024, 1024)),
    ("mlp.up", (4096, 1024)), ("mlp.down", (1024, 4096)), ("proj.a", (2048, 1024)), ("proj.b", (1024, 2048)),
    ("norm", (1024,)),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", required=True, help="path of a facebookresearch/optimizers checkout")
    p.add_argument("--steps", type=int, default=20, help="timed steps per optimizer and round")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (include the first refresh)")
    p.add_argument("--rounds", type=int, default=1, help="ABBA rounds (each round runs both optimizers twice)")
    p.add_argument("--precondition-frequency", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scale", type=float, default=1.0, help="shrink every dim by this factor (quick checks)")
    p.add_argument("--root", choices=("eigh", "warm"), default="eigh", help="our inverse-root method")
    p.add_argument("--fused", choices=("eager", "compile"), default="eager", help="our element-wise path")
    p.add_argument("--state-dtype", choices=("float32", "bfloat16"), default="float32", help="our state storage")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1 or not 0 < args.scale <= 1:
        p.error("--steps and --rounds must be >= 1, --warmup >= 0, --scale in (0, 1]")
    return args


def shapes(scale: float) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(max(1, int(d * scale)) for d in s)) for n, s in PARAMS]


def make_params(args: argparse.Namespace) -> list[Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for _, s in shapes(args.scale)]


def set_grads(params: list[Any], step: int) -> None:
    import torch

    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-2


def ours(args: argparse.Namespace, params: list[Any]) -> Any:
    import torch
    from sharded_shampoo import AdaGradGrafting, EighRootConfig, RootInverseShampoo, ShardedShampoo
    from sharded_shampoo.config import WarmStartRootConfig

    dtype = getattr(torch, args.state_dtype)
    root = EighRootConfig() if args.root == "eigh" else WarmStartRootConfig()
    pre = RootInverseShampoo(root=root, state_dtype=dtype)
    return ShardedShampoo([(n, p) for (n, _), p in zip(shapes(args.scale), params)], lr=1e-3, betas=(0.9, 0.999),
                          epsilon=1e-12, max_preconditioner_dim=1024, precondition_frequency=args.precondition_frequency,
                          start_preconditioning_step=args.precondition_frequency, grafting=AdaGradGrafting(1e-10),
                          preconditioner=pre, fused=args.fused)


def reference(args: argparse.Namespace, params: list[Any]) -> Any:
    from distributed_shampoo import AdaGradPreconditionerConfig, DistributedShampoo

    return DistributedShampoo(params, lr=1e-3, betas=(0.9, 0.999), epsilon=1e-12, max_preconditioner_dim=1024,
                              precondition_frequency=args.precondition_frequency,
                              start_preconditioning_step=args.precondition_frequency,
                              grafting_config=AdaGradPreconditionerConfig(epsilon=1e-10))


class Run:
    """One optimizer on its own copy of the parameters; remembers its step times."""

    def __init__(self, name: str, factory: Callable[[argparse.Namespace, list[Any]], Any],
                 args: argparse.Namespace) -> None:
        self.name = name
        self.params = make_params(args)
        self.opt = factory(args, self.params)
        self.freq = args.precondition_frequency
        self.step_index = 0
        self.times: list[tuple[bool, float]] = []   # (refresh step?, seconds)

    def advance(self, n: int, timed: bool) -> None:
        for _ in range(n):
            set_grads(self.params, self.step_index)
            t0 = time.perf_counter()
            self.opt.step()
            dt = time.perf_counter() - t0
            self.step_index += 1
            if timed:
                self.times.append((self.step_index % self.freq == 0, dt))

    def summary(self) -> dict[str, float]:
        plain = [t for r, t in self.times if not r]
        refresh = [t for r, t in self.times if r]
        return {"mean": sum(t for _, t in self.times) / len(self.times),
                "plain": statistics.median(plain) if plain else float("nan"),
                "refresh": statistics.median(refresh) if refresh else float("nan"),
                "n_plain": len(plain), "n_refresh": len(refresh)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.abspath(args.reference))
    runs = [Run("ours", ours, args), Run("reference", reference, args)]
    for r in runs:
        r.advance(args.warmup, timed=False)
    for k in range(args.rounds):
        order = runs if k % 2 == 0 else runs[::-1]
        for r in order + order[::-1]:
            r.advance(args.steps // 2 or 1, timed=True)
    # the two runs stepped the same number of times with the same gradients: compare the results
    diff = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(runs[0].params, runs[1].params))
    s = {r.name: r.summary() for r in runs}
    o, ref = s["ours"], s["reference"]
    print(f"shapes {[sh for _, sh in shapes(args.scale)]}; blocks {len(runs[0].opt.plan.blocks)}; "
          f"precondition_frequency {args.precondition_frequency}; torch threads {torch.get_num_threads()}; "
          f"ours: root={args.root} fused={args.fused} state_dtype={args.state_dtype}")
    print(f"timed steps per optimizer: {o['n_plain']} plain + {o['n_refresh']} refresh; "
          f"max relative parameter difference after {runs[0].step_index} steps: {diff:.2e}")
    print()
    print("| step | ours | reference | ours / reference |")
    print("|---|---|---|---|")
    for key, label in (("mean", "mean step (refreshes included)"), ("plain", "plain step (median)"),
                       ("refresh", "refresh step (median)")):
        print(f"| {label} | {o[key] * 1e3:.0f} ms | {ref[key] * 1e3:.0f} ms | {o[key] / ref[key]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
