"""ShardedShampoo vs the reference Distributed Shampoo, same parameters, config and gradients, one run.

The reference is facebookresearch/optimizers (``DistributedShampoo``), read from a local checkout
given with ``--reference`` and imported from there at run time only (it is never vendored and never
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

    OMP_NUM_THREADS=1 python -m scripts.benchmarks.bench_vs_reference --reference /work/reference
    ... --root warm --elementwise compile --root-storage bfloat16   # our faster options vs the same reference
"""

from __future__ import annotations

import argparse
import importlib.util
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
    p.add_argument("--reference", default=None, help="path of a facebookresearch/optimizers checkout (required "
                   "except with --memory-only, which then uses stored reference numbers)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per optimizer and round")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (include the first refresh)")
    p.add_argument("--rounds", type=int, default=1, help="ABBA rounds (each round runs both optimizers twice)")
    p.add_argument("--precondition-frequency", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scale", type=float, default=1.0, help="shrink every dim by this factor (quick checks)")
    p.add_argument("--root", choices=("eigh", "warm"), default="eigh", help="our inverse-root method")
    p.add_argument("--elementwise", choices=("eager", "compile"), default="eager", help="our element-wise path")
    p.add_argument("--root-storage", choices=("float32", "bfloat16"), default="float32",
                   help="our root storage (bfloat16: bf16 preconditioning GEMMs, fp32 accumulation)")
    p.add_argument("--factor-storage", choices=("float32", "bfloat16"), default="float32",
                   help="our factor storage (bfloat16: bf16 factor GEMMs, fp32 EMA, stochastic rounding)")
    p.add_argument("--memory-only", action="store_true",
                   help="only compare optimizer state bytes with the reference's: both parameter sets (the issue's 7 "
                        "and these 9), packed / full / bf16 storage (ours: planned == allocated, asserted)")
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

    root = EighRootConfig() if args.root == "eigh" else WarmStartRootConfig()
    pre = RootInverseShampoo(root=root, factor_storage_dtype=getattr(torch, args.factor_storage),
                             root_storage_dtype=getattr(torch, args.root_storage))
    return ShardedShampoo([(n, p) for (n, _), p in zip(shapes(args.scale), params)], lr=1e-3, betas=(0.9, 0.999),
                          epsilon=1e-12, max_preconditioner_dim=1024, precondition_frequency=args.precondition_frequency,
                          start_preconditioning_step=args.precondition_frequency, grafting=AdaGradGrafting(1e-10),
                          preconditioner=pre, elementwise=args.elementwise)


def import_reference(checkout: str) -> None:
    """Import the checkout's ``distributed_shampoo`` package under its own name (``sys.path`` untouched).

    ``checkout`` is the repository (holding ``distributed_shampoo/``) or the package folder itself; the
    package's absolute imports (``from distributed_shampoo.utils ...``) resolve through its ``__path__``.
    """
    package = os.path.abspath(checkout)
    if not os.path.isfile(os.path.join(package, "__init__.py")):
        package = os.path.join(package, "distributed_shampoo")
    init = os.path.join(package, "__init__.py")
    if not os.path.isfile(init):
        raise SystemExit(f"--reference {checkout!r}: no distributed_shampoo package there (expected {init})")
    spec = importlib.util.spec_from_file_location("distributed_shampoo", init, submodule_search_locations=[package])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["distributed_shampoo"] = module
    spec.loader.exec_module(module)


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
    if args.reference:
        import_reference(args.reference)
    if args.memory_only:
        print("\n".join(memory_table(args)))
        return 0
    if not args.reference:
        raise SystemExit("--reference is needed for the timing comparison (only --memory-only runs without it)")
    runs = [Run("ours", ours, args), Run("reference", reference, args)]
    for r in runs:
        r.advance(args.warmup, timed=False)
    for k in range(args.rounds):
        order = runs if k % 2 == 0 else runs[::-1]
        for r in order + order[::-1]:
            r.advance(args.steps // 2 or 1, timed=True)
    # the two runs stepped the same number of times with the same gradients: compare the results
    with torch.no_grad():
        diffs = [float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(runs[0].params, runs[1].params)]
    two_d = max(d for d, (_, sh) in zip(diffs, shapes(args.scale)) if len(sh) == 2)
    one_d = max((d for d, (_, sh) in zip(diffs, shapes(args.scale)) if len(sh) < 2), default=0.0)
    s = {r.name: r.summary() for r in runs}
    o, ref = s["ours"], s["reference"]
    floor = floor_seconds(runs[0].opt)
    print(f"shapes {[sh for _, sh in shapes(args.scale)]}; blocks {len(runs[0].opt.plan.blocks)}; "
          f"precondition_frequency {args.precondition_frequency}; torch threads {torch.get_num_threads()}; "
          f"ours: root={args.root} elementwise={args.elementwise} storage factors={args.factor_storage} "
          f"roots={args.root_storage}")
    print(f"timed steps per optimizer: {o['n_plain']} plain + {o['n_refresh']} refresh; max relative parameter "
          f"difference after {runs[0].step_index} steps: {two_d:.1e} (2-d), {one_d:.1e} (1-d: rank-deficient factor, "
          "epsilon handled differently)")
    print(f"GEMM floor of a plain step (4mn(m+n) FLOPs at the best fp32 bmm rate of this run): {floor * 1e3:.0f} ms; "
          f"our plain step = {o['plain'] / floor:.2f}x the floor, the reference's = {ref['plain'] / floor:.2f}x")
    print()
    print("| step | ours | reference | ours / reference |")
    print("|---|---|---|---|")
    for key, label in (("mean", "mean step (refreshes included)"), ("plain", "plain step (median)"),
                       ("refresh", "refresh step (median)")):
        print(f"| {label} | {o[key] * 1e3:.0f} ms | {ref[key] * 1e3:.0f} ms | {o[key] / ref[key]:.2f} |")
    return 0


#: The issue's 7 parameters ("from 1024^2 to 4096x1024"): PARAMS without the two projections.
PARAMETER_SETS = {7: [n for n, _ in PARAMS if not n.startswith("proj.")], 9: [n for n, _ in PARAMS]}
#: The reference's optimizer state (bytes, every tensor of ``opt.state`` once, after one step) on these sets,
#: measured at commit f60660661194 with packing on / off; used when ``--reference`` is not given.
REFERENCE_STATE_BYTES = {(7, True): 205_631_496, (7, False): 310_386_696,
                         (9, True): 272_773_128, (9, False): 411_049_992}
#: (label, symmetric_packing, factor storage, root storage, moment storage, compared with the reference's
#: packing on/off)
MEMORY_SETTINGS = [("fp32, packed (default)", True, "float32", "float32", "float32", True),
                   ("fp32, full matrices", False, "float32", "float32", "float32", False),
                   ("packed, bf16 roots", True, "float32", "bfloat16", "float32", True),
                   ("packed, bf16 factors + roots", True, "bfloat16", "bfloat16", "float32", True),
                   ("lean: packed, bf16 roots + moments", True, "float32", "bfloat16", "bfloat16", True)]


def tensor_bytes(obj: Any, seen: dict[int, int]) -> None:
    """Add every tensor reachable from ``obj`` (dicts, lists, attributes of state objects) to ``seen``, by storage."""
    import torch

    if isinstance(obj, torch.Tensor):
        seen[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    elif isinstance(obj, dict):
        for v in obj.values():
            tensor_bytes(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            tensor_bytes(v, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        tensor_bytes(vars(obj), seen)


def stepped_state_bytes(opt: Any, params: list[Any]) -> int:
    """Bytes of every tensor in ``opt.state`` after one step (each storage once)."""
    set_grads(params, 0)
    opt.step()
    seen: dict[int, int] = {}
    tensor_bytes(dict(opt.state), seen)
    return sum(seen.values())


def reference_state_bytes(args: argparse.Namespace, names: list[str], packed: bool) -> int:
    """The reference's state on the parameters ``names`` with packing on/off, measured now."""
    from distributed_shampoo import (AdaGradPreconditionerConfig, DistributedShampoo,
                                     RootInvShampooPreconditionerConfig, SingleDeviceDistributedConfig)

    params = [p for (n, _), p in zip(shapes(args.scale), make_params(args)) if n in names]
    opt = DistributedShampoo(params, lr=1e-3, betas=(0.9, 0.999), epsilon=1e-12, max_preconditioner_dim=1024,
                             precondition_frequency=10, start_preconditioning_step=10,
                             grafting_config=AdaGradPreconditionerConfig(epsilon=1e-10),
                             preconditioner_config=RootInvShampooPreconditionerConfig(use_symmetric_packing=packed),
                             distributed_config=SingleDeviceDistributedConfig())
    return stepped_state_bytes(opt, params)


def our_state_bytes(args: argparse.Namespace, names: list[str], packing: bool) -> tuple[int, int]:
    """(state bytes, parameter bytes) of ours on the parameters ``names``; planned bytes must equal allocated."""
    import torch
    from sharded_shampoo import AdaGradGrafting, RootInverseShampoo, ShardedShampoo

    named = [(n, p) for (n, _), p in zip(shapes(args.scale), make_params(args)) if n in names]
    pre = RootInverseShampoo(symmetric_packing=packing, factor_storage_dtype=getattr(torch, args.factor_storage),
                             root_storage_dtype=getattr(torch, args.root_storage),
                             moment_storage_dtype=getattr(torch, args.moment_storage))
    opt = ShardedShampoo(named, lr=1e-3, betas=(0.9, 0.999), epsilon=1e-12, max_preconditioner_dim=1024,
                         precondition_frequency=10, start_preconditioning_step=10, grafting=AdaGradGrafting(1e-10),
                         preconditioner=pre)
    allocated = stepped_state_bytes(opt, [p for _, p in named])
    planned = opt.plan.ranks[0].optimizer_state_bytes
    if allocated != planned:
        raise AssertionError(f"allocated {allocated} != planned {planned} bytes")
    return allocated, sum(p.numel() * p.element_size() for _, p in named)


def memory_table(args: argparse.Namespace) -> list[str]:
    """Our optimizer state vs the reference's, per parameter set and storage setting (ours: planned == allocated)."""
    lines = ["| parameters | our setting | ours | x param bytes | reference (packing) | ours / reference | "
             "ours - reference |", "|---|---|---|---|---|---|---|"]
    for key, names in PARAMETER_SETS.items():
        for label, packing, factors, roots, moments, ref_packed in MEMORY_SETTINGS:
            args.factor_storage, args.root_storage, args.moment_storage = factors, roots, moments
            ours_bytes, param_bytes = our_state_bytes(args, names, packing)
            ref = (reference_state_bytes(args, names, ref_packed) if args.reference
                   else REFERENCE_STATE_BYTES[(key, ref_packed)])
            lines.append(f"| set of {key} | {label} | {ours_bytes:,} B ({ours_bytes / 2 ** 20:.2f} MiB) | "
                         f"{ours_bytes / param_bytes:.3f} | {ref:,} B ({'on' if ref_packed else 'off'}) | "
                         f"**{ours_bytes / ref:.4f}** | {ours_bytes - ref:+,} B |")
    source = f"measured now from {args.reference}" if args.reference else "stored (REFERENCE_STATE_BYTES)"
    lines.append(f"\nreference numbers: {source}")
    return lines


def floor_seconds(opt: Any) -> float:
    """``4 m n (m + n)`` FLOPs of every 2-d block at the best fp32 batched-GEMM rate measured now."""
    import torch

    d = max(max(b.shape) for b in opt.plan.blocks)
    a, b = torch.randn(4, d, d), torch.randn(4, d, d)
    out = torch.empty(4, d, d)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.bmm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    rate = 2 * 4 * d ** 3 / best
    flops = sum(4 * x.shape[0] * x.shape[1] * (x.shape[0] + x.shape[1]) for x in opt.plan.blocks if len(x.shape) == 2)
    return flops / rate


if __name__ == "__main__":
    sys.exit(main())
