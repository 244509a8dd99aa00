"""Root / eigenbasis refresh methods side by side: time per refresh, accuracy, training loss.

Part 1 times one refresh of a stack of factors with each method and measures what it computed:

* inverse roots (exponent 1/4): ``eigh`` (the default) and the warm-started series
  (``WarmStartRootConfig``) from the previous refresh's root; accuracy = relative Frobenius error
  against an fp64 eigendecomposition, and the whitening residual ``||X^2 A X^2 - I||_F / sqrt(d)``
  (fp64, 64 probes); "fallback" = share of matrices the warm method handed to eigh;
* eigenbases: ``eigh`` and one warm-started QR iteration (``QREigenbasisConfig``) from the previous
  basis; accuracy = ``||Q^T A Q - diag||_F / ||A||_F``.

on two kinds of factors: ``random`` (the bench_vs_reference config: Gaussian gradients on 1024 x 1024
blocks, 10 steps between refreshes, beta2 = 0.999), at the refresh of step 20 (early: the factor
still changes a lot) and of step ``--late`` (200), and ``train`` (the factors of scripts/train.py's
byte-level GPT at a refresh, with the previous refresh's roots: real, ill-conditioned factors).

Part 2 (``--train-steps N``) runs scripts/train.py on 1 process with each method and reports the final
loss (mean of the last 20 steps) relative to eigh's.

    OMP_NUM_THREADS=1 python -m scripts.benchmarks.bench_roots [--dim 1024 --blocks 4] [--train-steps 300]
    OMP_NUM_THREADS=1 python -m scripts.benchmarks.bench_roots --train-only --train-steps 300 --train-runs storage
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from sharded_shampoo.compute.matrix_functions import eigenbasis, inverse_root_eigh
from sharded_shampoo.compute.warm_refresh import (eigenbasis_qr, eigenbasis_residual, inverse_root_warm,
                                                  whitening_residual)
from sharded_shampoo.config import QREigenbasisConfig, WarmStartRootConfig



def best_time(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def random_factors(blocks: int, d: int, beta2: float = 0.999, last: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """(F_hat at step ``last - 10``, F_hat at step ``last``) of ``blocks`` d x d blocks, Gaussian gradients."""
    g = torch.Generator().manual_seed(0)
    F = torch.zeros(blocks, d, d)
    out = []
    for t in range(1, last + 1):
        G = torch.randn(blocks, d, d, generator=g) * 1e-2
        F.mul_(beta2).baddbmm_(G, G.mT, alpha=1 - beta2)
        if t in (last - 10, last):
            out.append(F / (1 - beta2 ** t))
    return out[0], out[1]


def train_factors(steps: int = 30) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(F_hat at the last refresh, F_hat at the one before, exponent) for every 2-d factor stack of train.py."""
    from scripts import train

    args = train.parse_args(["--steps", str(steps), "--no-progress"])
    torch.manual_seed(args.seed)
    model = train.build_model(args)
    opt = train.build_optimizer(args, model)
    corpus = train.load_corpus(args.corpus_bytes)
    snaps: dict[int, list] = {}
    for step in range(steps):
        batch = train.global_batch(corpus, step, args.batch, args.seq, args.seed)
        logits = model(batch[:, :-1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
        if step + 1 in (steps - args.precondition_frequency, steps):
            snaps[step + 1] = [(b, [b.matrices(f"factor_{i}") for i in b.kind.dims], int(b.step[0]))
                              for b in opt.runtime.buckets]
    beta2 = 0.95
    out = []
    (_, prev), (_, last) = sorted(snaps.items())
    for (b, F0, t0), (_, F1, t1) in zip(prev, last):
        if len(b.shape) != 2:
            continue
        for n, i in enumerate(b.kind.dims):
            out.append((F0[n] / (1 - beta2 ** t0), F1[n] / (1 - beta2 ** t1), b.exponents[i]))
    return out


def measure(pairs: list[tuple[torch.Tensor, torch.Tensor, float]], eps: float, repeats: int) -> dict[str, float]:
    """Time and accuracy of each method over (previous, current, exponent) factor stacks."""
    t = dict.fromkeys(("eigh", "warm", "basis_eigh", "basis_qr"), 0.0)
    err = {k: [] for k in ("eigh", "warm", "res_eigh", "res_warm", "basis_eigh", "basis_qr", "basis_prev")}
    fell, total = 0, 0
    for A0, A1, e in pairs:
        q = round(0.5 / e)
        R0, _ = inverse_root_eigh(A0, e, eps)
        Q0, _ = eigenbasis(A0, eps)
        t["eigh"] += best_time(lambda: inverse_root_eigh(A1, e, eps), repeats)
        t["warm"] += best_time(lambda: inverse_root_warm(A1, R0, e, eps, WarmStartRootConfig()), repeats)
        t["basis_eigh"] += best_time(lambda: eigenbasis(A1, eps), repeats)
        t["basis_qr"] += best_time(lambda: eigenbasis_qr(A1, Q0, eps, QREigenbasisConfig()), repeats)
        Xe, _ = inverse_root_eigh(A1, e, eps)
        Xw, _, rep = inverse_root_warm(A1, R0, e, eps, WarmStartRootConfig())
        fell += int(rep.fell_back.sum())
        total += A1.shape[0]
        A64 = A1.double() + eps * torch.eye(A1.shape[-1], dtype=torch.float64)
        L, Q = torch.linalg.eigh(A64)
        truth = (Q * L.clamp_min(eps).pow(-e).unsqueeze(-2)) @ Q.mT
        rel = lambda X: ((X.double() - truth).flatten(1).norm(dim=1) / truth.flatten(1).norm(dim=1))  # noqa: E731
        err["eigh"] += rel(Xe).tolist()
        err["warm"] += rel(Xw).tolist()
        err["res_eigh"] += whitening_residual(Xe.double(), A64, q, 64).tolist()
        err["res_warm"] += whitening_residual(Xw.double(), A64, q, 64).tolist()
        Qq, *_ = eigenbasis_qr(A1, Q0, eps, QREigenbasisConfig())
        err["basis_eigh"] += eigenbasis_residual(A1, eigenbasis(A1, eps)[0]).tolist()
        err["basis_qr"] += eigenbasis_residual(A1, Qq).tolist()
        err["basis_prev"] += eigenbasis_residual(A1, Q0).tolist()
    out = {f"t_{k}": v for k, v in t.items()}
    out.update({k: statistics.median(v) for k, v in err.items()})
    out["fallback"] = fell / total
    return out


def report(name: str, r: dict[str, float]) -> list[str]:
    return [
        f"| {name} | inverse root: eigh | {r['t_eigh'] * 1e3:.0f} ms | 1.00 | {r['eigh']:.1e} | {r['res_eigh']:.1e} | |",
        f"| {name} | inverse root: warm series | {r['t_warm'] * 1e3:.0f} ms | {r['t_warm'] / r['t_eigh']:.2f} | "
        f"{r['warm']:.1e} | {r['res_warm']:.1e} | {r['fallback']:.0%} |",
        f"| {name} | eigenbasis: eigh | {r['t_basis_eigh'] * 1e3:.0f} ms | 1.00 | {r['basis_eigh']:.1e} | | |",
        f"| {name} | eigenbasis: 1 QR iteration | {r['t_basis_qr'] * 1e3:.0f} ms | "
        f"{r['t_basis_qr'] / r['t_basis_eigh']:.2f} | {r['basis_qr']:.1e} (previous basis: {r['basis_prev']:.1e}) "
        "| | |",
    ]


#: --train-runs: which trainings Part 2 compares (the first of each kind is the baseline of its rows)
TRAIN_RUNS = {
    "methods": [("root-inverse, eigh", []), ("root-inverse, warm series", ["--root", "warm"]),
                ("root-inverse, eigh, compiled element-wise", ["--elementwise", "compile"]),
                ("root-inverse, eigh, bf16 roots", ["--root-storage", "bfloat16"]),
                ("root-inverse, eigh, bf16 factors + roots", ["--root-storage", "bfloat16", "--factor-storage",
                                                              "bfloat16"]),
                ("eigenvalue-corrected, eigh", ["--preconditioner", "eigen"]),
                ("eigenvalue-corrected, QR", ["--preconditioner", "eigen", "--eigenbasis", "qr"])],
    "storage": [("root-inverse, packed fp32 (default)", []),
                ("root-inverse, full fp32 matrices", ["--full-matrices"]),
                ("root-inverse, packed, bf16 roots", ["--root-storage", "bfloat16"]),
                ("root-inverse, packed, bf16 factors + roots", ["--root-storage", "bfloat16",
                                                                 "--factor-storage", "bfloat16"]),
                ("root-inverse, packed, bf16 roots + moments (lean)", ["--root-storage", "bfloat16",
                                                                       "--moment-storage", "bfloat16"])],
    # the memory-lean setting against the default only (issue 16: final loss within 1% of the fp32 run)
    "lean": [("root-inverse, packed fp32 (default)", []),
             ("root-inverse, packed, bf16 roots + moments (lean)", ["--root-storage", "bfloat16",
                                                                    "--moment-storage", "bfloat16"])],
}


def train_losses(steps: int, which: str = "methods") -> list[str]:
    from scripts import train

    runs = TRAIN_RUNS[which]
    lines = ["| run | final loss (mean of last 20 steps) | vs its eigh run | wall time |", "|---|---|---|---|"]
    base: dict[str, float] = {}
    for name, extra in runs:
        t0 = time.perf_counter()
        losses = train.train(train.parse_args(["--steps", str(steps), "--no-progress", "--log-every", "100000"] + extra))
        final = statistics.mean(losses[-20:])
        key = name.split(",")[0]
        base.setdefault(key, final)
        lines.append(f"| {name} | {final:.4f} | {final / base[key] - 1:+.2%} | {time.perf_counter() - t0:.0f} s |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--late", type=int, default=200, help="the later refresh step of the random factors")
    p.add_argument("--train-steps", type=int, default=0, help="also train with each method (0: skip)")
    p.add_argument("--train-runs", choices=sorted(TRAIN_RUNS), default="methods",
                   help="methods: each refresh method and storage dtype; storage: packed / full / bf16 storage; "
                        "lean: the memory-lean setting against the default")
    p.add_argument("--train-only", action="store_true", help="skip Part 1 (the refresh timings)")
    args = p.parse_args()
    if args.train_only:
        print("\n" + "\n".join(train_losses(args.train_steps or 300, args.train_runs)))
        return
    lines = [f"torch threads {torch.get_num_threads()}", "",
             "| factors | method | time per refresh | vs eigh | error (median) | whitening residual | fallback |",
             "|---|---|---|---|---|---|---|"]
    for last in (20, args.late):
        r = measure([(*random_factors(args.blocks, args.dim, last=last), 0.25)], 1e-12, args.repeats)
        lines += report(f"random, {args.blocks} x {args.dim}^2, step {last}", r)
        print("\n".join(lines), flush=True)
    pairs = train_factors()
    r = measure(pairs, 1e-10, args.repeats)
    lines += report(f"train.py, {len(pairs)} stacks", r)
    print("\n".join(lines[-4:]), flush=True)
    if args.train_steps:
        lines += [""] + train_losses(args.train_steps, args.train_runs)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
