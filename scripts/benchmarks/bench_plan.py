"""Benchmark the dry-run planner: wall time and peak RSS of the CLI, and modeled balance per preset.

1. Runs ``python -m sharded_shampoo.dryrun.cli plan --model llama3-405b --mesh 32x64`` (by default) in a
   fresh subprocess and reads its peak RSS from ``os.wait4`` (exact, no polling).
2. Plans every preset in-process on ``--ranks`` FSDP ranks with ``max_preconditioner_dim``
   1024 and reports max/mean, max / lower bound and what whole-parameter round-robin gives.

    python -m scripts.benchmarks.bench_plan                       # print markdown
    python -m scripts.benchmarks.bench_plan --append docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

from sharded_shampoo.dryrun import plan_model
from sharded_shampoo.dryrun.presets import preset_names
from sharded_shampoo.planning.plan import PlanSettings

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(argv: list[str]) -> tuple[float, int, int, str]:
    """(wall seconds, peak RSS bytes, exit status, stdout) of one CLI run in a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sharded_shampoo.dryrun.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=REPO)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss * 1024, proc.returncode, out      # ru_maxrss is in KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama3-405b")
    parser.add_argument("--mesh", default="32x64")
    parser.add_argument("--ranks", type=int, default=64, help="FSDP ranks for the per-preset balance table")
    parser.add_argument("--repeats", type=int, default=3, help="CLI runs (the best is reported, all are listed)")
    parser.add_argument("--append", metavar="FILE", help="append the markdown section to FILE")
    args = parser.parse_args(argv)

    cli_args = ["plan", "--model", args.model, "--mesh", args.mesh]
    runs = [run_cli(cli_args) for _ in range(args.repeats)]
    for _, _, rc, out in runs:
        if rc != 0:
            print(out, file=sys.stderr)
            return rc
    summary_lines = [line for line in runs[0][3].splitlines() if line.startswith(("imbalance", "whole", "max per"))]
    load = os.getloadavg()[0]

    rows = []
    for name in preset_names():
        t0 = time.perf_counter()
        plan = plan_model(name, (args.ranks,), PlanSettings(max_preconditioner_dim=1024))
        dt = time.perf_counter() - t0
        s = plan.summary
        rows.append((name, s.num_params, s.num_blocks, s.imbalance, s.max_over_lower_bound,
                     s.max_over_tight_lower_bound, s.round_robin_param_imbalance,
                     s.round_robin_param_max_over_lower_bound, s.persistent_bytes_imbalance, dt))

    cmd = f"python -m scripts.benchmarks.bench_plan {' '.join(argv if argv is not None else sys.argv[1:])}"
    lines = [
        "## Dry-run planner",
        "",
        f"Command: `{cmd.strip()}` (torch {torch.__version__}, {os.cpu_count()} CPU cores, "
        f"1-minute load average {load:.2f} when measured; other jobs may share the cores).",
        "",
        f"### `sharded-shampoo plan --model {args.model} --mesh {args.mesh}`",
        "",
        "Fresh process each run (import, meta-device build, `fully_shard` over a fake process group, plan, "
        "report); peak RSS from `os.wait4`. Targets: < 30 s, < 2 GB.",
        "",
        "| run | wall s | peak RSS MiB |",
        "|---:|---:|---:|",
    ]
    for i, (wall, rss, _, _) in enumerate(runs):
        lines.append(f"| {i + 1} | {wall:.1f} | {rss / 2 ** 20:.0f} |")
    lines += ["", "```", *summary_lines, "```", "",
              f"### Modeled balance, {args.ranks} FSDP ranks, max_preconditioner_dim 1024",
              "",
              "Load per rank = step FLOPs + amortized FLOPs / precondition_frequency (default settings: "
              "root-inverse Shampoo, AdaGrad grafting, precondition_frequency 100). Lower bound = "
              "max(total / N, largest block); the pigeonhole bound (`balance.pigeonhole_lower_bound`) is tighter "
              "when ranks get few blocks: 1.0000 there means LPT is optimal. Target: max / lower bound <= 1.03 "
              "for llama3-8b and llama3-70b.",
              "",
              "| preset | params | blocks | max/mean | max / lower bound | max / pigeonhole bound | "
              "round-robin max/mean | round-robin max / lower bound | memory max/mean | plan s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, n_p, n_b, imb, mlb, lbm, rr, rrlb, mem, dt in rows:
        lines.append(f"| {name} | {n_p} | {n_b} | {imb:.4f} | {mlb:.4f} | {lbm:.4f} | {rr:.3f} | {rrlb:.3f} | "
                     f"{mem:.4f} | {dt:.1f} |")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.append:
        with open(args.append, "a") as fh:
            fh.write(("\n" if os.path.exists(args.append) and os.path.getsize(args.append) else "") + text)
        print(f"appended to {args.append}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
