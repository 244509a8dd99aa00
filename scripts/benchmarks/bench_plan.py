"""Benchmark the dry-run planner: wall time, CPU time and peak RSS of the CLI, and modeled balance per preset.

1. Runs ``python -m sharded_shampoo.dryrun.cli plan --model MODEL --mesh MESH --json-no-blocks`` in a
   fresh process per run, for every ``--mesh`` (default: issue 15's two targets), and reads wall
   time, user and system CPU time and peak RSS from ``os.wait4`` (what ``/usr/bin/time -v``
   reports). With ``--base DIR`` the same command also runs from another checkout (the code before a
   change), interleaved run by run with the current tree, so both see the same machine load; the
   machine is shared, so user CPU time is the steadier number.
2. Plans every preset in-process on ``--ranks`` FSDP ranks (``max_preconditioner_dim`` 1024) and
   reports balance, memory and communication: the table that says whether a balancer change made
   plans worse.

    python -m scripts.benchmarks.bench_plan                                   # print markdown
    python -m scripts.benchmarks.bench_plan --base /tmp/base --repeats 3 --skip-presets
    python -m scripts.benchmarks.bench_plan --base /tmp/base --skip-cli --skip-presets --compare-plans

3. With ``--compare-plans``: the load balance, peak memory, communication and transient peak of the
   plans of several presets and meshes, made by each tree (``PLAN_CASES``); ``--tolerance`` sets the
   current tree's balancer tolerance.
4. With ``--stages``: seconds per planner stage of one CLI run in each tree (wrappers around the
   stage functions of either version).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from sharded_shampoo._torch_compat import DYNAMO_MODULE
from sharded_shampoo.dryrun import plan_model
from sharded_shampoo.dryrun.presets import preset_names
from sharded_shampoo.planning.plan import PlanSettings

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGETS = ("dp=8,fsdp=32,tp=8", "pp=16,dp=32,fsdp=16,tp=8")

#: (model, mesh) pairs whose plans ``--compare-plans`` puts side by side for the two trees.
PLAN_CASES = (("llama3-8b", "64"), ("llama3-8b", "4x16"), ("llama3-70b", "64"), ("llama3-70b", "dp=8,fsdp=32,tp=4"),
              ("llama3-405b", "32x64"), ("llama3-405b", "dp=8,fsdp=32,tp=8"), ("mixtral-8x7b", "fsdp=64,ep=8"),
              ("gpt2-small", "64"), ("resnet50", "64"), ("moe-tiny", "4"), ("llama-tiny", "2x2"))

_PLAN_FIGURES = """
import json, sys
from sharded_shampoo.dryrun import plan_model
kwargs = {"tolerance": float(sys.argv[3])} if len(sys.argv) > 3 else {}
s = plan_model(sys.argv[1], sys.argv[2], **kwargs).summary
print(json.dumps([s.imbalance, s.max_persistent_bytes, s.total_comm_bytes_per_step, s.max_peak_transient_bytes]))
"""

#: Times the stages of one CLI run by wrapping the functions each tree has (both trees' names).
_STAGE_TIMES = """
import contextlib, functools, importlib, io, json, sys, time
t0 = time.perf_counter()
importlib.import_module(sys.argv[1])  # torch's compiler stack (DYNAMO_MODULE): counted with the imports
from sharded_shampoo.dryrun import build, cli
from sharded_shampoo.planning import accounting, plan, stages
times = {"imports": time.perf_counter() - t0}
def wrap(module, names, label):
    for name in names:
        if hasattr(module, name):
            f = getattr(module, name)
            def timed(*a, _f=f, **k):
                t = time.perf_counter()
                try:
                    return _f(*a, **k)
                finally:
                    times[label] = times.get(label, 0.0) + time.perf_counter() - t
            setattr(module, name, functools.wraps(f)(timed))
wrap(build, ["shard_model", "shard_stages"], "build + parallelize")
wrap(stages, ["plan_all_blocks", "plan_grids"], "blocks")
wrap(stages, ["price_blocks", "price_grids"], "prices")
wrap(stages, ["block_coverage", "holder_locality", "cover_table"], "covers / locality")
wrap(stages, ["assign_owners", "balance_classes"], "owners")
wrap(accounting, ["_communication", "communication"], "communication tally")
wrap(plan, ["rank_reports"], "per-rank report")
wrap(plan, ["plan_summary"], "summary")
t0 = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    cli.main(sys.argv[2:])
times["CLI main"] = time.perf_counter() - t0
print(json.dumps(times))
"""

STAGES = ("imports", "build + parallelize", "blocks", "prices", "covers / locality", "owners", "per-rank report",
          "communication tally", "summary", "CLI main")


@dataclass
class Run:
    tree: str
    wall: float
    user: float
    system: float
    rss: int
    status: int
    output: str


def run_cli(repo: str, tree: str, argv: list[str]) -> Run:
    """One CLI run in a fresh process from ``repo``: wall, CPU and peak RSS as ``/usr/bin/time`` sees them."""
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sharded_shampoo.dryrun.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, cwd=repo)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    return Run(tree, wall, usage.ru_utime, usage.ru_stime, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status),
               out)                                      # ru_maxrss is in KiB on Linux


def cli_section(model: str, mesh: str, runs: list[Run]) -> list[str]:
    lines = [f"`sharded-shampoo plan --model {model} --mesh {mesh} --json-no-blocks` (fresh process per run):", "",
             "| tree | run | wall s | user CPU s | sys CPU s | peak RSS MiB |", "|---|---:|---:|---:|---:|---:|"]
    for tree in dict.fromkeys(r.tree for r in runs):
        mine = [r for r in runs if r.tree == tree]
        for i, r in enumerate(mine):
            if r.status != 0:
                last = r.output.strip().splitlines()[-1] if r.output.strip() else "?"
                lines.append(f"| {tree} | {i + 1} | fails: {last[:90]} | | | |")
            else:
                lines.append(f"| {tree} | {i + 1} | {r.wall:.1f} | {r.user:.1f} | {r.system:.1f} | {r.rss / 2 ** 20:.0f} |")
        ok = [r for r in mine if r.status == 0]
        if len(ok) > 1:
            lines.append(f"| {tree} | median | {statistics.median(r.wall for r in ok):.1f} | "
                         f"{statistics.median(r.user for r in ok):.1f} | "
                         f"{statistics.median(r.system for r in ok):.1f} | "
                         f"{statistics.median(r.rss for r in ok) / 2 ** 20:.0f} |")
    current = next((r for r in runs if r.tree == "current" and r.status == 0), None)
    if current is not None:
        summary = [line for line in current.output.splitlines() if line.startswith(("imbalance", "max per", "worst"))]
        lines += ["", "```", *summary, "```"]
    return lines + [""]


def _snippet(repo: str, code: str, args: list[str]) -> object | None:
    """Run ``code`` with ``repo``'s package in a fresh process; its last output line as JSON (None on failure)."""
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=repo)
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None


def plan_figures(repo: str, model: str, mesh: str, tolerance: float | None = None) -> list[float] | None:
    """(max/mean load, max params+grads+state, comm/step total, max transient) of a plan made by ``repo``'s code."""
    out = _snippet(repo, _PLAN_FIGURES, [model, mesh] + ([str(tolerance)] if tolerance is not None else []))
    return out if isinstance(out, list) else None


def stages_section(trees: list[tuple[str, str]], model: str, mesh: str) -> list[str]:
    """Seconds per planner stage of one CLI run in each tree, back to back."""
    argv = [DYNAMO_MODULE, "plan", "--model", model, "--mesh", mesh, "--json-no-blocks"]
    runs = [(tree, _snippet(repo, _STAGE_TIMES, argv)) for tree, repo in trees]
    lines = [f"Seconds per stage of one `sharded-shampoo plan --model {model} --mesh {mesh} --json-no-blocks` per tree "
             "(imports include torch's compiler stack, which DTensor construction imports on first use):", "", "| stage | " + " | ".join(t for t, _ in runs) + " |",
             "|---|" + "---:|" * len(runs)]
    for stage in STAGES:
        cells = [f"{r[stage]:.2f}" if isinstance(r, dict) and stage in r else "" for _, r in runs]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return lines + [""]


def compare_section(base: str, tolerance: float | None = None) -> list[str]:
    now = "default settings" if tolerance is None else f"now with tolerance={tolerance}"
    lines = [f"Plans of the current tree against the base tree ({now}; a ratio < 1 is better now):", "",
             "| model | mesh | max/mean load base -> now | max params+grads+state now/base | comm/step now/base | "
             "max transient now/base |", "|---|---|---|---:|---:|---:|"]
    for model, mesh in PLAN_CASES:
        old, new = plan_figures(base, model, mesh), plan_figures(REPO, model, mesh, tolerance)
        if old is None or new is None:
            lines.append(f"| {model} | `{mesh}` | {'base fails' if old is None else 'fails'} | | | |")
            continue
        ratio = [f"{n / o:.4f}" if o else "-" for o, n in zip(old[1:], new[1:])]
        lines.append(f"| {model} | `{mesh}` | {old[0]:.4f} -> {new[0]:.4f} | {ratio[0]} | {ratio[1]} | {ratio[2]} |")
    return lines + [""]


def preset_section(ranks: int, names: list[str] | None = None) -> list[str]:
    lines = [f"Modeled plans of every preset on {ranks} FSDP ranks, max_preconditioner_dim 1024 (default settings):",
             "", "| preset | blocks | max/mean load | max / lower bound | max / pigeonhole bound | round-robin max/mean | "
             "max params+grads+state | comm/step total | plan s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names or preset_names():
        t0 = time.perf_counter()
        plan = plan_model(name, (ranks,), PlanSettings(max_preconditioner_dim=1024))
        dt = time.perf_counter() - t0
        s = plan.summary
        lines.append(f"| {name} | {s.num_blocks} | {s.imbalance:.4f} | {s.max_over_lower_bound:.4f} | "
                     f"{s.max_over_tight_lower_bound:.4f} | {s.round_robin_param_imbalance:.3f} | "
                     f"{s.max_persistent_bytes / 2 ** 30:.4f} GiB | {s.total_comm_bytes_per_step / 2 ** 30:.3f} GiB | "
                     f"{dt:.1f} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama3-405b")
    parser.add_argument("--mesh", action="append", help=f"mesh to time (repeatable; default: {', '.join(TARGETS)})")
    parser.add_argument("--base", metavar="DIR", help="also time the CLI of this checkout, interleaved")
    parser.add_argument("--repeats", type=int, default=3, help="CLI runs per tree and mesh")
    parser.add_argument("--ranks", type=int, default=64, help="FSDP ranks for the per-preset table")
    parser.add_argument("--skip-presets", action="store_true", help="time the CLI only")
    parser.add_argument("--skip-cli", action="store_true", help="do not time the CLI")
    parser.add_argument("--compare-plans", action="store_true",
                        help="with --base: load balance, memory, communication of plans in both trees")
    parser.add_argument("--tolerance", type=float, default=None, help="the current tree's balancer tolerance in "
                        "--compare-plans (default: its default)")
    parser.add_argument("--stages", action="store_true", help="seconds per planner stage of one run per tree "
                        "(first --mesh)")
    parser.add_argument("--append", metavar="FILE", help="append the markdown to FILE")
    args = parser.parse_args(argv)

    trees = [("current", REPO)] + ([("base", os.path.abspath(args.base))] if args.base else [])
    cmd = f"python -m scripts.benchmarks.bench_plan {' '.join(argv if argv is not None else sys.argv[1:])}"
    lines = [f"Command: `{cmd.strip()}` (torch {torch.__version__}, {os.cpu_count()} CPU cores, 1-minute load "
             f"average {os.getloadavg()[0]:.2f} at the start).", ""]
    for mesh in [] if args.skip_cli else (args.mesh or TARGETS):
        cli_args = ["plan", "--model", args.model, "--mesh", mesh, "--json-no-blocks"]
        runs = [run_cli(repo, tree, cli_args) for _ in range(args.repeats) for tree, repo in trees]
        lines += cli_section(args.model, mesh, runs)
    if args.stages:
        lines += stages_section(trees, args.model, (args.mesh or TARGETS)[0])
    if args.compare_plans:
        if not args.base:
            parser.error("--compare-plans needs --base")
        lines += compare_section(os.path.abspath(args.base), args.tolerance)
    if not args.skip_presets:
        lines += preset_section(args.ranks)
    lines.append(f"1-minute load average at the end: {os.getloadavg()[0]:.2f}.")
    text = "\n".join(lines)
    print(text)
    if args.append:
        with open(args.append, "a") as fh:
            fh.write(("\n" if os.path.exists(args.append) and os.path.getsize(args.append) else "") + text + "\n")
        print(f"appended to {args.append}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
