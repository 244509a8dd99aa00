"""Which variant should a user pick? AdamW and every preconditioner kind on the training example.

Trains scripts/train.py's byte-level GPT (same data, seed and model) once per optimizer on one
process, timing every full training step (forward, backward, optimizer step). Writes one PNG with
loss vs step and loss vs wall-clock seconds, and prints, per optimizer, the final loss (mean of the
last 20 steps) and the steps and wall-clock it needed to reach AdamW's final loss (20-step moving
average), each as a ratio to AdamW's own. Every Shampoo-family run uses train.py's settings (Adam
grafting, lr 3e-3, refresh every 10 steps); spectral descent grafts its orthogonalised update onto
Adam's norm per block, and its 1-D parameters take the Adam direction.

    OMP_NUM_THREADS=1 python scripts/compare_optimizers.py --steps 300 --plot docs/img/compare_optimizers.png
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Optional

import torch
import torch.nn.functional as F

if __package__:               # imported as scripts.compare_optimizers (tests) or run with -m
    from scripts import train
else:                         # python scripts/compare_optimizers.py: Python put scripts/ first on sys.path
    import train

#: label -> extra train.py arguments
OPTIMIZERS = {
    "AdamW": ["--optimizer", "adamw"],
    "Shampoo (eigh roots)": ["--optimizer", "shampoo"],
    "SOAP (eigenvalue-corrected, QR eigenbases)": ["--optimizer", "shampoo", "--preconditioner", "eigen",
                                                   "--eigenbasis", "qr"],
    "KL-Shampoo": ["--optimizer", "shampoo", "--preconditioner", "kl-shampoo"],
    "Eigendecomposed Shampoo, tolerance 0.1": ["--optimizer", "shampoo", "--preconditioner", "eigendecomposed",
                                               "--tolerance", "0.1"],
    "Spectral descent (Newton-Schulz, Muon)": ["--optimizer", "shampoo", "--preconditioner", "spectral"],
}
WINDOW = 20


def run(argv: list[str]) -> tuple[list[float], list[float]]:
    """Losses and cumulative wall-clock seconds after each step of one training run."""
    args = train.parse_args(argv)
    torch.manual_seed(args.seed)
    model = train.build_model(args)
    opt = train.build_optimizer(args, model)
    corpus = train.load_corpus(args.corpus_bytes)
    losses, times, elapsed = [], [], 0.0
    for step in range(args.steps):
        batch = train.global_batch(corpus, step, args.batch, args.seq, args.seed)
        t0 = time.perf_counter()
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed += time.perf_counter() - t0
        losses.append(float(loss.detach()))
        times.append(elapsed)
    return losses, times


def smoothed(losses: list[float]) -> list[float]:
    return [statistics.mean(losses[max(0, i - WINDOW + 1):i + 1]) for i in range(len(losses))]


def time_to_reach(losses: list[float], times: list[float], target: float) -> Optional[float]:
    """Wall-clock seconds until the moving average first reaches ``target`` (None: never)."""
    step = steps_to_reach(losses, target)
    return None if step is None else times[step - 1]


def steps_to_reach(losses: list[float], target: float) -> Optional[int]:
    """Steps until the moving average first reaches ``target`` (None: never)."""
    for i, s in enumerate(smoothed(losses)):
        if s <= target:
            return i + 1
    return None


def plot(results: dict[str, tuple[list[float], list[float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (losses, times) in results.items():
        a.plot(range(1, len(losses) + 1), smoothed(losses), label=name)
        b.plot(times, smoothed(losses), label=name)
    a.set_xlabel("step")
    b.set_xlabel("wall-clock seconds (1 process, CPU)")
    for ax in (a, b):
        ax.set_ylabel(f"loss, {WINDOW}-step moving average (nats/byte)")
        ax.grid(alpha=0.3)
    a.legend()
    fig.suptitle("byte-level GPT on stdlib source: AdamW vs the preconditioner kinds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--plot", default=None, help="write the curves to this PNG")
    p.add_argument("--extra", default="", help="more train.py arguments for every run (e.g. '--dim 192')")
    args = p.parse_args()
    common = ["--steps", str(args.steps), "--no-progress"] + args.extra.split()
    results = {}
    for name, extra in OPTIMIZERS.items():
        results[name] = run(common + extra)
        print(f"{name}: final loss {statistics.mean(results[name][0][-WINDOW:]):.4f} in {results[name][1][-1]:.1f} s",
              flush=True)
    adam_losses, adam_times = results["AdamW"]
    target = statistics.mean(adam_losses[-WINDOW:])
    print(f"\ntorch threads {torch.get_num_threads()}; {args.steps} steps; target = AdamW's final loss {target:.4f}\n")
    print("| optimizer | final loss | wall-clock | steps to AdamW's final loss | time to it | "
          "ratio to AdamW (steps) | ratio to AdamW (time) |")
    print("|---|---|---|---|---|---|---|")
    for name, (losses, times) in results.items():
        steps = steps_to_reach(losses, target)
        reach = time_to_reach(losses, times, target)
        step_ratio = "not reached" if steps is None else f"{steps / len(adam_losses):.2f}"
        time_ratio = "not reached" if reach is None else f"{reach / adam_times[-1]:.2f}"
        print(f"| {name} | {statistics.mean(losses[-WINDOW:]):.4f} | {times[-1]:.1f} s | "
              f"{'-' if steps is None else steps} | {'-' if reach is None else f'{reach:.1f} s'} | "
              f"{step_ratio} | {time_ratio} |")
    if args.plot:
        plot(results, args.plot)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
