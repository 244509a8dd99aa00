"""Plain-step time of this tree against another source tree (e.g. the commit before a change), interleaved.

Each measurement runs in a fresh subprocess (one torch thread) that imports ``sharded_shampoo`` from the
tree under test, builds ``scripts/benchmarks/bench_step.py``'s model (19.9M parameters, 112 blocks at
``max_preconditioner_dim=512``, Adam grafting, beta1 = 0.9), takes the amortized first step and one
warm-up step, then times ``--steps`` plain steps. Runs alternate A B B A ... over ``--rounds``, so load
drift on a shared machine hits both trees alike. Reported per tree: the median plain step in wall time
and in the process's CPU time (on a machine shared with other jobs the CPU time is the steadier
measure of the work done: it does not count time spent descheduled), and the ratio to the base.

    python -m scripts.benchmarks.bench_step_ab --base /tmp/base_tree [--rounds 4] [--steps 5] \\
        [--variant this:symmetric_packing=False]

``--variant NAME:KEY=VALUE,...`` adds a run of this tree with ``RootInverseShampoo`` keyword arguments
(Python literals), e.g. ``full:symmetric_packing=False``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository root

CHILD = r"""
import json, statistics, sys, time, torch
from torch import nn
torch.set_num_threads(1)
from sharded_shampoo import AdamGrafting, RootInverseShampoo, ShardedShampoo
SHAPES = [(1024, 1024)] * 6 + [(2048, 1024)] * 2 + [(1024, 3072)] * 2 + [(512, 512)] * 8 + [(768, 1280)]
torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(i, o, bias=True) for o, i in SHAPES])
opt = ShardedShampoo(model.named_parameters(), lr=1e-4, betas=(0.9, 0.999), epsilon=1e-8, max_preconditioner_dim=512,
                     precondition_frequency=100, start_preconditioning_step=1, grafting=AdamGrafting(),
                     preconditioner=RootInverseShampoo(**KWARGS))
g = torch.Generator().manual_seed(0)
for p in model.parameters():
    p.grad = torch.randn(p.shape, generator=g) * 1e-2
opt.step()          # amortized (start): real roots for the plain steps
opt.step()          # warm-up
wall, cpu = [], []
for _ in range(STEPS):
    t0, c0 = time.perf_counter(), time.process_time()
    opt.step()
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
print(json.dumps({"wall": statistics.median(wall), "cpu": statistics.median(cpu),
                  "path": sys.modules["sharded_shampoo"].__file__}))
"""


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, spec = text.partition(":")
    kwargs = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        kwargs[key.strip()] = ast.literal_eval(value.strip())
    return name, kwargs


def measure(tree: str, kwargs: dict, steps: int) -> dict:
    code = CHILD.replace("KWARGS", repr(kwargs)).replace("STEPS", str(steps))
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd="/tmp")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["path"].startswith(os.path.abspath(tree)):
        raise RuntimeError(f"imported sharded_shampoo from {result['path']}, not from {tree}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="source tree to compare with (its sharded_shampoo/ is imported)")
    p.add_argument("--tree", default=HERE, help="the tree under test (default: this checkout; pass a snapshot, e.g. "
                   "from git archive, to keep editing while it runs)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed plain steps per measurement")
    p.add_argument("--variant", action="append", default=[], help="NAME:KEY=VALUE,... (see the module doc)")
    args = p.parse_args()
    tree = os.path.abspath(args.tree)
    runs = [("base", os.path.abspath(args.base), {}), ("this", tree, {})]
    runs += [(name, tree, kw) for name, kw in map(parse_variant, args.variant)]
    results: dict[str, list[dict]] = {name: [] for name, _, _ in runs}
    for r in range(args.rounds):
        for name, tree, kw in (runs if r % 2 == 0 else runs[::-1]):
            results[name].append(measure(tree, kw, args.steps))
            print(f"round {r} {name}: {results[name][-1]['wall'] * 1e3:.0f} ms wall, "
                  f"{results[name][-1]['cpu'] * 1e3:.0f} ms cpu", file=sys.stderr)
    med = {n: {k: statistics.median(x[k] for x in v) for k in ("wall", "cpu")} for n, v in results.items()}
    print(f"plain step, median over {args.rounds} rounds of the median of {args.steps} steps (1 torch thread):")
    print()
    print("| tree | wall | x base | CPU time | x base |")
    print("|---|---|---|---|---|")
    for name, _tree, kw in runs:
        m = med[name]
        label = name + (f" ({', '.join(f'{k}={v!r}' for k, v in kw.items())})" if kw else "")
        print(f"| {label} | {m['wall'] * 1e3:.0f} ms | {m['wall'] / med['base']['wall']:.3f} | "
              f"{m['cpu'] * 1e3:.0f} ms | {m['cpu'] / med['base']['cpu']:.3f} |")


if __name__ == "__main__":
    main()
