"""What the optimizer keeps allocated between steps besides its state, and what freeing it costs.

Three measurements, each of this tree and (``--base DIR``, e.g. ``git archive main | tar -x -C DIR``)
of another source tree, every one in a fresh subprocess that imports ``sharded_shampoo`` from the tree
under test:

1. **Resident ratio**: after 3 steps of ``bench_step_ab``'s model (19.9M parameters, 112 blocks at
   ``max_preconditioner_dim=512``, Adam grafting), the bytes the optimizer object references besides
   its state, parameters and gradients (``tests/support/resident.py``'s walker, the same for both
   trees), over the rank's own gradient bytes; on one process and on HSDP (2 x 2 gloo ranks, the
   largest rank), beside the planner's ``resident_buffer_bytes`` where the tree has it.
2. **Step time** on one process: the default against ``release_buffers_between_steps=True`` (and the
   base tree's default), interleaved A B C C B A ... over ``--rounds``; median plain step, wall and
   process CPU time (one torch thread; the CPU time is the steadier number on a shared machine).
3. **The llama3-405b plan** on ``dp=8,fsdp=32,tp=8``: per rank (the largest), the buffers kept between
   steps (before this change everything the planner called transient stayed allocated: the exchange
   buffers, the gathered stacks and the scratch), the optimizer state and the gradients.

    python -m scripts.benchmarks.bench_resident --base /tmp/base [--rounds 3] [--steps 5] [--skip-plan]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository root
WALKER = os.path.join(HERE, "tests", "support", "resident.py")

COMMON = r"""
import importlib.util, json, os, statistics, sys, time, torch
from torch import nn
torch.set_num_threads(1)
from sharded_shampoo import AdamGrafting, ShardedShampoo
spec = importlib.util.spec_from_file_location("resident_walker", WALKER)
walker = importlib.util.module_from_spec(spec); spec.loader.exec_module(walker)
SHAPES = [(1024, 1024)] * 6 + [(2048, 1024)] * 2 + [(1024, 3072)] * 2 + [(512, 512)] * 8 + [(768, 1280)]

def build(mesh=None, **extra):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(i, o, bias=True) for o, i in SHAPES])
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = ShardedShampoo(model.named_parameters(), lr=1e-4, betas=(0.9, 0.999), epsilon=1e-8,
                         max_preconditioner_dim=512, precondition_frequency=100, start_preconditioning_step=1,
                         grafting=AdamGrafting(), mesh=mesh, **extra)
    return model, opt

def set_grads(model, step):
    g = torch.Generator().manual_seed(step)
    for p in model.parameters():
        full = torch.randn(p.shape, generator=g) * 1e-2
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor
            full = distribute_tensor(full, p.device_mesh, p.placements)
        p.grad = full

def measure(model, opt, rank):
    for step in range(3):
        set_grads(model, step)
        opt.step()
    planned = getattr(opt.plan.ranks[rank], "resident_buffer_bytes", None)
    return {"resident": walker.resident_buffer_bytes(opt), "grads": walker.grad_bytes(opt), "planned": planned}
"""

ONE_PROCESS = COMMON + r"""
model, opt = build()
print(json.dumps(measure(model, opt, 0)))
"""

HSDP = COMMON + r"""
import torch.distributed as dist
import torch.multiprocessing as mp

def rank_main(rank, world, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model, opt = build(mesh)
    queue.put(measure(model, opt, rank))
    dist.barrier()
    dist.destroy_process_group()

if __name__ == "__main__":
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, 4, port, queue)) for r in range(4)]
    for p in procs: p.start()
    results = [queue.get() for _ in procs]
    for p in procs: p.join()
    print(json.dumps(max(results, key=lambda r: r["resident"])))
"""

STEP_TIME = COMMON + r"""
model, opt = build(**json.loads(sys.argv[1]))
set_grads(model, 0)
opt.step(); opt.step()          # amortized start, then a warm-up step
wall, cpu = [], []
for _ in range(STEPS):
    t0, c0 = time.perf_counter(), time.process_time()
    opt.step()
    wall.append(time.perf_counter() - t0); cpu.append(time.process_time() - c0)
print(json.dumps({"wall": statistics.median(wall), "cpu": statistics.median(cpu)}))
"""

PLAN = r"""
import json
from sharded_shampoo.dryrun import plan_model
p = plan_model("llama3-405b", "dp=8,fsdp=32,tp=8")
kept = lambda r: getattr(r, "resident_buffer_bytes", None)
r = max(p.ranks, key=lambda r: kept(r) if kept(r) is not None else r.peak_transient_bytes)
print(json.dumps({"resident": kept(r), "transient": r.peak_transient_bytes, "comm_buffers": r.comm_buffer_bytes,
                  "state": r.optimizer_state_bytes, "grads": r.grad_bytes}))
"""


def run(tree: str, code: str, args: list[str] | None = None, steps: int = 5) -> dict:
    """``code`` in a fresh process importing ``tree``'s package; its last printed line as JSON.

    The code is a script file, not ``-c``: spawned ranks re-import the parent's main module by path."""
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
    prelude = f"WALKER = {WALKER!r}\nSTEPS = {steps}\n"
    with tempfile.NamedTemporaryFile("w", suffix=".py", prefix="bench_resident_") as script:
        script.write(prelude + code)
        script.flush()
        proc = subprocess.run([sys.executable, script.name, *(args or [])], capture_output=True, text=True,
                              env=env, cwd=tree, check=False, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: the measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2 ** 20:.2f} MiB"


def resident_section(trees: list[tuple[str, str]]) -> list[str]:
    lines = ["| tree | layout | resident buffers | planned resident | own gradients | resident / gradients |",
             "|---|---|---:|---:|---:|---:|"]
    for name, tree in trees:
        for layout, code in (("1 process", ONE_PROCESS), ("HSDP 2x2 (largest rank)", HSDP)):
            r = run(tree, code)
            lines.append(f"| {name} | {layout} | {_mib(r['resident'])} | {_mib(r['planned'])} | {_mib(r['grads'])} | "
                         f"{r['resident'] / r['grads']:.3f}x |")
    return lines


def step_time_section(trees: list[tuple[str, str]], rounds: int, steps: int) -> list[str]:
    cases = [("this tree", HERE, {}), ("this tree, release_buffers_between_steps=True", HERE,
                                       {"release_buffers_between_steps": True})]
    cases += [(f"{name}", tree, {}) for name, tree in trees if tree != HERE]
    times: dict[str, list[dict]] = {c[0]: [] for c in cases}
    for k in range(rounds):
        for name, tree, extra in (cases if k % 2 == 0 else cases[::-1]):
            times[name].append(run(tree, STEP_TIME, [json.dumps(extra)], steps))
    base = {m: statistics.median(t[m] for t in times[cases[0][0]]) for m in ("wall", "cpu")}
    lines = [f"Median plain step, one process, one thread ({rounds} rounds x {steps} steps):", "",
             "| run | wall ms | CPU ms | wall / default | CPU / default |", "|---|---:|---:|---:|---:|"]
    for name, _, _ in cases:
        w, c = (statistics.median(t[m] for t in times[name]) for m in ("wall", "cpu"))
        lines.append(f"| {name} | {1e3 * w:.1f} | {1e3 * c:.1f} | {w / base['wall']:.3f} | {c / base['cpu']:.3f} |")
    return lines


def plan_section(trees: list[tuple[str, str]]) -> list[str]:
    lines = ["llama3-405b on `dp=8,fsdp=32,tp=8`, the rank with the most buffers kept between steps:", "",
             "| tree | kept between steps | transient during the step | optimizer state | gradients |",
             "|---|---:|---:|---:|---:|"]
    for name, tree in trees:
        r = run(tree, PLAN)
        # before resident_buffer_bytes existed, every transient buffer (exchange, stacks, scratch) stayed allocated
        kept = r["resident"] if r["resident"] is not None else r["transient"]
        lines.append(f"| {name} | {kept / 2 ** 30:.3f} GiB | {r['transient'] / 2 ** 30:.2f} GiB | "
                     f"{r['state'] / 2 ** 30:.2f} GiB | {r['grads'] / 2 ** 30:.2f} GiB |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="another source tree to measure beside this one (e.g. the code before a change)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--skip-plan", action="store_true")
    ap.add_argument("--skip-resident", action="store_true")
    ap.add_argument("--skip-time", action="store_true")
    args = ap.parse_args(argv)
    trees = [("this tree", HERE)] + ([("base", os.path.abspath(args.base))] if args.base else [])
    out: list[str] = []
    if not args.skip_resident:
        out += resident_section(trees) + [""]
    if not args.skip_time:
        out += step_time_section(trees, args.rounds, args.steps) + [""]
    if not args.skip_plan:
        out += plan_section(trees) + [""]
    print("\n".join(out))


if __name__ == "__main__":
    main()
