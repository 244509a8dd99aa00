"""Run a function on N CPU ranks (gloo) and collect what each rank returns.

Spawning costs a few seconds of imports per rank, so tests group many checks into one launch.
Each rank's return value (or its exception text) comes back through a file, so a failure on
any rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, out_dir: str,
            timeout_s: float = 90.0) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result: Any
    try:
        # a bounded timeout turns a mismatched collective into an error instead of a hang
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - reported to the parent
        result = ("error", traceback.format_exc())
    finally:
        if dist.is_initialized():
            try:
                dist.barrier()  # let in-flight gloo work finish before teardown
            finally:
                dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def _join(ctx: Any, deadline_s: Optional[float]) -> None:
    """Join spawned ranks; past ``deadline_s`` terminate them (a hang becomes a test failure)."""
    end = None if deadline_s is None else time.monotonic() + deadline_s
    while not ctx.join(timeout=None if end is None else max(end - time.monotonic(), 0.1)):
        if end is not None and time.monotonic() >= end:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.terminate()
            raise AssertionError(f"ranks did not finish within {deadline_s} s (a collective hangs)")


def run_ranks(world_size: int, fn: Callable[..., Any], *args: Any, timeout_s: float = 90.0,
              deadline_s: Optional[float] = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return per-rank results.

    ``timeout_s``: the process group's timeout; ``deadline_s``: fail (and terminate the ranks) if
    the launch takes longer.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.spawn(_worker, args=(world_size, free_port(), fn, args, out_dir, timeout_s), nprocs=world_size,
                       join=False)
        _join(ctx, deadline_s)
        results = []
        for r in range(world_size):
            with open(os.path.join(out_dir, f"rank{r}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise AssertionError(f"rank {r} failed:\n{value}")
            results.append(value)
    return results
