"""Train a small GPT-style byte-level model with FSDP2 and ShardedShampoo (or AdamW).

The text is the Python standard library's own source, so the run needs no download.
Launch with torchrun (CPU/gloo by default, NCCL when CUDA is available):

    torchrun --nproc-per-node 2 scripts/train.py --steps 60 --optimizer shampoo

The global batch is fixed and split evenly across ranks, and FSDP averages the gradients, so
the loss curve is the same on any number of processes (up to float rounding).

Checkpoints (``sharded_shampoo.checkpointing``, DCP) can be saved with one number of processes
and resumed with another; the batch of a step is a function of the step index, so a resumed
run continues exactly where the saved one stopped:

    torchrun --nproc-per-node 2 scripts/train.py --steps 40 --save-every 20 --checkpoint-dir ckpt
    python scripts/train.py --steps 60 --resume ckpt        # 1 process, steps 40..59
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------- data


def load_corpus(max_bytes: int) -> torch.Tensor:
    """Bytes of the standard library's .py files (sorted, so every rank reads the same text)."""
    root = os.path.dirname(os.__file__)
    chunks: list[bytes] = []
    total = 0
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


def global_batch(corpus: torch.Tensor, step: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    """The step's global batch of ``batch`` windows of ``seq + 1`` bytes (same on every rank)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, corpus.numel() - seq - 1, (batch,), generator=g)
    return torch.stack([corpus[s:s + seq + 1] for s in starts.tolist()])


# ----------------------------------------------------------------------------- model


def build_model(args: argparse.Namespace) -> nn.Module:
    """A small byte-level GPT-2 (the planner's gpt2 preset architecture, 256-token vocabulary)."""
    from sharded_shampoo.dryrun.models import GPT2

    return GPT2(n_layers=args.layers, width=args.dim, heads=args.heads, context=args.seq, vocab_size=256)


# ----------------------------------------------------------------------------- training


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimizer", choices=("shampoo", "adamw"), default="shampoo")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32, help="global batch (split across ranks)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="default: 3e-3 (shampoo), 1e-3 (adamw)")
    p.add_argument("--max-preconditioner-dim", type=int, default=512)
    p.add_argument("--precondition-frequency", type=int, default=10)
    p.add_argument("--epsilon", type=float, default=1e-10, help="Shampoo's epsilon (root regulariser)")
    p.add_argument("--preconditioner", choices=PRECONDITIONER_CHOICES, default="shampoo",
                   help="shampoo (root inverse), eigen (eigenvalue-corrected, SOAP-like), kl-shampoo, "
                        "eigendecomposed (roots kept as eigenpairs; see --tolerance), spectral (Newton-Schulz "
                        "orthogonalisation, the Muon update; 1-D parameters take the grafting direction) or sign")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="adaptive refresh tolerance of eigen / eigendecomposed (0: refresh every time)")
    p.add_argument("--root", choices=("eigh", "warm"), default="eigh", help="inverse-root refresh (shampoo)")
    p.add_argument("--eigenbasis", choices=("eigh", "qr"), default="eigh", help="eigenbasis refresh (eigen)")
    p.add_argument("--factor-storage", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--root-storage", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--moment-storage", choices=("float32", "bfloat16"), default="float32",
                   help="storage of the filtered gradient and grafting state (bfloat16: stochastic rounding)")
    p.add_argument("--full-matrices", action="store_true",
                   help="symmetric_packing=False: store factors and roots as full d x d matrices (default: packed)")
    p.add_argument("--elementwise", choices=("eager", "compile"), default="eager")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus-bytes", type=int, default=2_000_000)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--plot", default=None, help="write the loss curve to this PNG (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="disable the tqdm progress bar (shown only when stderr is a terminal)")
    p.add_argument("--no-timings", action="store_true", help="leave the elapsed seconds out of the loss lines")
    p.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="save a checkpoint every N steps (and after the last step) into --checkpoint-dir")
    p.add_argument("--checkpoint-dir", default="checkpoints", metavar="DIR",
                   help="where --save-every writes step_N/ directories and the 'latest' pointer")
    p.add_argument("--resume", default=None, metavar="PATH",
                   help="resume from a checkpoint directory (its 'latest') or one step_N directory; "
                        "works with any number of processes")
    p.add_argument("--async-save", action="store_true",
                   help="save with dcp.async_save; training continues while the checkpoint is written")
    p.add_argument("--keep-last", type=int, default=None, metavar="K",
                   help="keep only the K newest checkpoints")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "seq", "dim", "layers", "heads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.save_every < 0:
        p.error("--save-every must be >= 0 (0: no checkpoints)")
    if args.keep_last is not None and args.keep_last < 1:
        p.error("--keep-last must be >= 1")
    if args.dim % args.heads:
        p.error("--dim must be divisible by --heads")
    return args


#: --preconditioner choices: the kinds a user can pick on the training example
PRECONDITIONER_CHOICES = ("shampoo", "eigen", "kl-shampoo", "eigendecomposed", "spectral", "sign")
#: choices without factors: 2-D blocks only, so 1-D parameters (norms, biases) take the grafting direction
NO_FACTOR_CHOICES = ("spectral", "sign")


def preconditioner_config(args: argparse.Namespace):
    """The preconditioner config object the command line names."""
    from sharded_shampoo import (EigendecomposedShampoo, EigenvalueCorrectedShampoo, KLShampoo, RootInverseShampoo,
                                 SignDescent, SpectralDescent)
    from sharded_shampoo.config import QREigenbasisConfig, WarmStartRootConfig

    kind = getattr(args, "preconditioner", "shampoo")
    if kind == "spectral":
        return SpectralDescent()
    if kind == "sign":
        return SignDescent()
    storage = dict(factor_storage_dtype=getattr(torch, getattr(args, "factor_storage", "float32")),
                   root_storage_dtype=getattr(torch, getattr(args, "root_storage", "float32")),
                   symmetric_packing=not getattr(args, "full_matrices", False))
    moments = getattr(args, "moment_storage", "float32")
    if moments != "float32":
        storage["moment_storage_dtype"] = getattr(torch, moments)
    tolerance = getattr(args, "tolerance", 0.0)
    if kind == "eigen":
        basis = QREigenbasisConfig() if getattr(args, "eigenbasis", "eigh") == "qr" else None
        return EigenvalueCorrectedShampoo(**storage, tolerance=tolerance, **({"eigenbasis": basis} if basis else {}))
    if kind == "eigendecomposed":
        return EigendecomposedShampoo(**storage, tolerance=tolerance)
    root = WarmStartRootConfig() if getattr(args, "root", "eigh") == "warm" else None
    config_class = KLShampoo if kind == "kl-shampoo" else RootInverseShampoo
    return config_class(**storage, **({"root": root} if root else {}))


def build_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    from sharded_shampoo import AdamGrafting, BlockingConfig, ShardedShampoo

    if args.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.lr or 1e-3, weight_decay=0.01)
    no_factors = getattr(args, "preconditioner", "shampoo") in NO_FACTOR_CHOICES
    return ShardedShampoo(model.named_parameters(), lr=args.lr or 3e-3, betas=(0.9, 0.95), epsilon=args.epsilon,
                          weight_decay=0.01, max_preconditioner_dim=args.max_preconditioner_dim,
                          precondition_frequency=args.precondition_frequency,
                          grafting=AdamGrafting(beta2=0.95, epsilon=1e-8), preconditioner=preconditioner_config(args),
                          blocking=BlockingConfig(precondition_1d=not no_factors),
                          elementwise=getattr(args, "elementwise", "eager"))


def setup_distributed() -> tuple[int, int, torch.device]:
    """Initialise the process group if launched by torchrun; return rank, world size, device."""
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return rank, world, torch.device("cuda")
    return rank, world, torch.device("cpu")


def train(args: argparse.Namespace) -> list[float]:
    """Run the training loop; return the global mean loss of every step it ran (on every rank).

    With ``--resume`` the loop starts at the checkpoint's step, so the list covers steps
    ``[start, --steps)``.
    """
    rank, world, device = setup_distributed()
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} must be divisible by the number of processes ({world}).")
    torch.manual_seed(args.seed)
    model = build_model(args).to(device)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for block in model.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = build_optimizer(args, model)
    start = 0
    if args.resume:
        from sharded_shampoo.checkpointing import load_checkpoint

        run = load_checkpoint(args.resume, model, opt, extra=run_identity(args, 0))
        if {k: v for k, v in run.items() if k != "step"} != {k: v for k, v in run_identity(args, 0).items()
                                                             if k != "step"}:
            raise ValueError(f"--resume {args.resume}: the checkpoint was written with other data settings "
                             f"{run}; pass the same --seed/--batch/--seq/--corpus-bytes to resume exactly.")
        start = int(run["step"])
        if rank == 0:
            print(f"resumed from {args.resume} at step {start} on {world} process(es)")
    corpus = load_corpus(args.corpus_bytes)
    local = args.batch // world
    losses: list[float] = []
    bar = None
    if rank == 0 and not args.no_progress and sys.stderr.isatty():   # no bar in a piped log
        from tqdm import tqdm

        bar = tqdm(total=args.steps, initial=start, desc=f"{args.optimizer} x{world}", unit="step")
    t0 = time.perf_counter()
    handle = None
    for step in range(start, args.steps):
        batch = global_batch(corpus, step, args.batch, args.seq, args.seed)[rank * local:(rank + 1) * local]
        batch = batch.to(device)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean, op=dist.ReduceOp.AVG if device.type == "cuda" else dist.ReduceOp.SUM)
            if device.type != "cuda":
                mean /= world
        losses.append(float(mean))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
            msg = f"step {step:4d}  loss {losses[-1]:.4f}"
            if not args.no_timings:
                msg += f"  ({time.perf_counter() - t0:.1f}s)"
            (bar.write if bar is not None else print)(msg)
        if args.save_every and ((step + 1) % args.save_every == 0 or step + 1 == args.steps):
            handle = save_step(args, step + 1, model, opt)
    check = getattr(opt, "check", None)
    if check is not None:
        check()         # the last step's outcome: ShardedShampoo reports a step's error one step late
    if handle is not None:
        handle.wait()   # an async save publishes its checkpoint ('latest') here
    if bar is not None:
        bar.close()
    if rank == 0 and args.plot:
        save_plot(losses, args)
    return losses


def run_identity(args: argparse.Namespace, step: int) -> dict[str, int]:
    """What a checkpoint records next to model and optimizer: the step index and the data settings."""
    return {"step": step, "seed": args.seed, "batch": args.batch, "seq": args.seq, "corpus_bytes": args.corpus_bytes}


def save_step(args: argparse.Namespace, step: int, model: nn.Module, opt: torch.optim.Optimizer):
    """Save the state after ``step`` steps as ``--checkpoint-dir/step_{step}`` (collective)."""
    from sharded_shampoo.checkpointing import save_checkpoint

    handle = save_checkpoint(args.checkpoint_dir, step, model, opt, extra=run_identity(args, step),
                             async_=args.async_save, keep_last=args.keep_last)
    if (not dist.is_initialized() or dist.get_rank() == 0) and not args.async_save:
        print(f"saved {handle.path}")
    return handle


def save_plot(losses: list[float], args: argparse.Namespace) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install 'sharded-shampoo[plot]'", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(len(losses)), losses, label=args.optimizer)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title(f"byte-level GPT on stdlib source, {args.optimizer}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    print(f"wrote {args.plot} (final loss {losses[-1]:.4f}, {math.exp(losses[-1]):.2f} perplexity)")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    finally:
        if dist.is_initialized():
            dist.barrier()  # let in-flight gloo work finish before teardown
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
