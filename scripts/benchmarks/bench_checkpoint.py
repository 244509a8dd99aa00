"""Checkpoint benchmark: save/load time and size of the benchmark model + ShardedShampoo with DCP.

The model is ``bench_step.build_model()`` (the ~20M-parameter Linear stack of the step
benchmark) with the step benchmark's optimizer settings. Run it on one process or sharded with
FSDP2 under torchrun; it reports, in one run:

- sync save time (median of ``--repeats``; ``save_checkpoint``: DCP write + fsync + publish),
  async save time until ``save_checkpoint`` returns (staging copy) and until ``wait()``;
- load time into freshly built model + optimizer (``load_checkpoint``);
- the cost of integrity checks: save with ``checksums=True`` (default: read back and CRC-32 every
  stored item) vs ``checksums=False``, load with ``verify=True`` (default: CRC-32 of every item
  read, staged all-or-nothing, small objects unpickled with ``weights_only=True``) vs the same with
  small objects unpickled without restriction (the behaviour before issue 18, for comparison only)
  vs ``verify=False`` (staged, not verified) vs a plain in-place ``dcp.load`` of a ``TrainState``
  (no staging, no verification); interleaved repeats, medians;
  and CRC-32 vs BLAKE2b throughput over rank 0's data file (why CRC-32);
- checkpoint size on disk, split into model, optimizer state and small objects, and the
  optimizer-state tensor bytes per rank file against the planner's analytic per-rank
  ``optimizer_state_bytes`` (they must be equal: each rank writes exactly the blocks it owns
  and its momentum shards; the on-disk excess is torch.save's per-tensor framing).

    python -m scripts.benchmarks.bench_checkpoint [--dir /tmp/bench_ckpt] [--repeats 3] [--markdown]
    torchrun --nproc-per-node 2 -m scripts.benchmarks.bench_checkpoint --markdown
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import hashlib
import statistics
import sys
import time
import zlib
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

from sharded_shampoo import AdamGrafting, ShardedShampoo
from sharded_shampoo.checkpointing import TrainState, load_checkpoint, save_checkpoint

from scripts.benchmarks.models import build_model


def build(args: argparse.Namespace, world: int) -> tuple[torch.nn.Module, ShardedShampoo]:
    model = build_model()
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = ShardedShampoo(model.named_parameters(), lr=1e-4, betas=(0.9, 0.999), epsilon=1e-8,
                         momentum=args.momentum, max_preconditioner_dim=args.max_preconditioner_dim,
                         precondition_frequency=100, grafting=AdamGrafting())
    return model, opt


def one_step(model: torch.nn.Module, opt: ShardedShampoo) -> None:
    from torch.distributed.tensor import distribute_tensor

    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        grad = torch.randn(p.shape, generator=g) * 1e-2
        p.grad = distribute_tensor(grad, p.device_mesh, p.placements) if hasattr(p, "device_mesh") else grad
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed(fn: Any) -> float:
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    fn()
    if dist.is_initialized():
        dist.barrier()
    return time.perf_counter() - t0


def hash_rates(path: str) -> dict[str, float]:
    """GiB/s of CRC-32 and BLAKE2b over a data file (read into memory first: hashing only)."""
    with open(path, "rb") as f:
        data = memoryview(f.read())
    rates = {}
    for name, fn in (("CRC-32 (zlib.crc32)", zlib.crc32),
                     ("BLAKE2b (hashlib.blake2b)", lambda b: hashlib.blake2b(b, digest_size=16).digest())):
        t0 = time.perf_counter()
        fn(data)
        rates[name] = len(data) / (time.perf_counter() - t0) / 2 ** 30
    return rates


def timed_cpu(fn: Any) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of ``fn``: CPU time is what the checks add, and
    it is less disturbed than wall time by other jobs on a shared machine."""
    c0 = time.process_time()
    wall = timed(fn)
    return wall, time.process_time() - c0


def unrestricted(load: Any) -> None:
    """Run ``load`` with small objects unpickled by ``torch.load(weights_only=False)`` (what loads did
    before issue 18): the baseline for the cost of the restricted unpickling. Benchmark only."""
    from sharded_shampoo.checkpointing import staged_load

    safe = staged_load.load_object
    staged_load.load_object = lambda raw, where, ckpt: torch.load(io.BytesIO(raw), weights_only=False)
    try:
        load()
    finally:
        staged_load.load_object = safe


def integrity_costs(args: argparse.Namespace, world: int, model: torch.nn.Module, opt: ShardedShampoo,
                    path: str) -> dict[str, list[tuple[float, float]]]:
    """Save/load times with and without checksums, interleaved (and the order rotated every repeat)
    so that drifts in machine load hit every variant alike."""
    import torch.distributed.checkpoint as dcp

    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    model2, opt2 = build(args, world)
    variants = {
        "save_on": lambda r: save_checkpoint(args.dir + "_on", r, model, opt, keep_last=1),
        "save_off": lambda r: save_checkpoint(args.dir + "_off", r, model, opt, keep_last=1, checksums=False),
        "load_on": lambda r: load_checkpoint(path, model2, opt2),
        "load_unrestricted": lambda r: unrestricted(lambda: load_checkpoint(path, model2, opt2)),
        "load_off": lambda r: load_checkpoint(path, model2, opt2, verify=False),
        "load_dcp": lambda r: dcp.load({"app": TrainState(model2, opt2)}, checkpoint_id=path),
    }
    names = list(variants)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            out[name].append(timed_cpu(lambda: variants[name](r)))
    return out


def sizes(path: str) -> dict[str, Any]:
    """Bytes on disk by kind, from DCP's metadata (tensor payload and stored length per item)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(path).read_metadata()
    payload: dict[str, int] = defaultdict(int)
    stored: dict[str, int] = defaultdict(int)
    optim_payload_by_file: dict[str, int] = defaultdict(int)
    for index, info in md.storage_data.items():
        key = index.fqn
        kind = "optim" if key.startswith("app.optim.state.") else "model" if key.startswith("app.model.") else "other"
        stored[kind] += info.length
        meta = md.state_dict_metadata[key]
        if isinstance(meta, TensorStorageMetadata):
            itemsize = torch.empty((), dtype=meta.properties.dtype).element_size()
            chunk = next(c for c in meta.chunks if tuple(c.offsets) == tuple(index.offset or ()))
            numel = 1
            for s in chunk.sizes:
                numel *= s
            payload[kind] += numel * itemsize
            if kind == "optim":
                optim_payload_by_file[info.relative_path] += numel * itemsize
    files = {name: os.path.getsize(os.path.join(path, name)) for name in os.listdir(path)}
    return {"payload": dict(payload), "stored": dict(stored), "files": files,
            "optim_by_file": dict(optim_payload_by_file), "total": sum(files.values())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/bench_checkpoint")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-preconditioner-dim", type=int, default=512)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--markdown", action="store_true", help="print a markdown section for docs/benchmarks.md")
    args = p.parse_args()
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)
    if rank == 0:
        for suffix in ("", "_async", "_on", "_off"):
            shutil.rmtree(args.dir + suffix, ignore_errors=True)
    model, opt = build(args, world)
    one_step(model, opt)

    saves = [timed(lambda s=s: save_checkpoint(args.dir, s, model, opt, keep_last=1)) for s in range(args.repeats)]
    path = os.path.join(args.dir, f"step_{args.repeats - 1}")
    handle_box: list[Any] = []
    t_async_return = timed(lambda: handle_box.append(save_checkpoint(args.dir + "_async", 0, model, opt,
                                                                     async_=True)))
    t_async_total = t_async_return + timed(lambda: handle_box[0].wait())
    model2, opt2 = build(args, world)
    loads = [timed(lambda: load_checkpoint(path, model2, opt2)) for _ in range(args.repeats)]
    costs = integrity_costs(args, world, model, opt, path)
    rates = hash_rates(os.path.join(path, "__0_0.distcp")) if rank == 0 else {}
    info = sizes(path)
    analytic = [r.optimizer_state_bytes for r in opt.plan.ranks]
    if rank == 0:
        n_params = sum(q.numel() for q in model.parameters())
        cmd = ("torchrun --nproc-per-node %d " % world if world > 1 else "python ") + "scripts/benchmarks/bench_checkpoint.py " + \
            " ".join(sys.argv[1:])
        mb = 1 / 2 ** 20
        lines = [
            f"### {world} process{'es' if world > 1 else ''} ({'FSDP2' if world > 1 else 'no process group'})",
            "",
            f"`{cmd.strip()}` -- model {n_params / 1e6:.1f}M parameters, {len(opt.plan.blocks)} blocks, "
            f"max_preconditioner_dim={args.max_preconditioner_dim}, momentum={args.momentum}, "
            f"torch threads {torch.get_num_threads()}",
            "",
            "| measurement | value |",
            "|---|---|",
            f"| save (sync, median of {args.repeats}) | {statistics.median(saves):.2f} s |",
            f"| async save: blocking part (staging copy) | {t_async_return:.2f} s |",
            f"| async save: until `wait()` published it | {t_async_total:.2f} s |",
            f"| load (median of {args.repeats}) | {statistics.median(loads):.2f} s |",
            f"| checkpoint on disk (all files) | {info['total'] * mb:.1f} MiB |",
            f"| model tensors: payload / stored | {info['payload'].get('model', 0) * mb:.1f} / "
            f"{info['stored'].get('model', 0) * mb:.1f} MiB |",
            f"| optimizer state tensors: payload / stored | {info['payload'].get('optim', 0) * mb:.1f} / "
            f"{info['stored'].get('optim', 0) * mb:.1f} MiB |",
            f"| planner's analytic optimizer state (sum over ranks) | {sum(analytic) * mb:.1f} MiB |",
            f"| other objects (param groups, plan description) stored | {info['stored'].get('other', 0) / 1024:.1f} "
            "KiB |",
            "",
            f"Integrity checks ({args.repeats} interleaved repeats, medians; CPU = rank 0's process time):",
            "",
            "| variant | wall | CPU |",
            "|---|---|---|",
        ]
        rows = (("save_on", "save, checksums on (default)"), ("save_off", "save, `checksums=False`"),
                ("load_on", "load, verified + staged (default)"),
                ("load_unrestricted", "load, verified + staged, small objects unpickled without restriction"),
                ("load_off", "load, `verify=False` (staged only)"),
                ("load_dcp", "load, plain in-place `dcp.load` of `TrainState`"))
        med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in costs.items()}
        lines += [f"| {label} | {med[k][0]:.2f} s | {med[k][1]:.2f} s |" for k, label in rows]
        for a, b, label in (("save_on", "save_off", "save: cost of checksums"),
                            ("load_on", "load_off", "load: cost of verification"),
                            ("load_on", "load_unrestricted", "load: cost of the restricted unpickling"),
                            ("load_on", "load_dcp", "load: verification + staging vs plain `dcp.load`")):
            lines.append(f"| {label} | {med[a][0] - med[b][0]:+.2f} s ({(med[a][0] / med[b][0] - 1) * 100:+.0f}%) | "
                         f"{med[a][1] - med[b][1]:+.2f} s ({(med[a][1] / med[b][1] - 1) * 100:+.0f}%) |")
        lines += [f"| {name} over rank 0's data file | {rate:.2f} GiB/s | |" for name, rate in rates.items()]
        lines += [
            "",
            "| rank | optimizer-state bytes in its file | planner's analytic bytes | equal |",
            "|---|---|---|---|",
        ]
        for r in range(world):
            written = info["optim_by_file"].get(f"__{r}_0.distcp", 0)
            lines.append(f"| {r} | {written:,} | {analytic[r]:,} | {'yes' if written == analytic[r] else 'NO'} |")
        text = "\n".join(lines)
        print(text if args.markdown else text.replace("`", ""))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
