"""Run functions on N CPU gloo ranks with torchtitan imported once per test module, not N times per test.

Importing torch + torchtitan costs several CPU-seconds per process; four ranks per test on a
2-core machine pay it four times over, every test. Here one spawned "zygote" applies the CPU
workarounds and imports torchtitan once, then forks the ranks of each launch, which inherit the
imported modules. The pytest process never imports the patched torchtitan.

A rank that raises NotImplementedError (the core's answer to a placement it does not support
yet) is re-raised as NotImplementedError in the caller, so tests can be marked
``xfail(raises=NotImplementedError)``; any other failure raises AssertionError with every
failing rank's traceback. The zygote is started with "spawn", which re-imports the caller's
``__main__``: a script that uses TitanRanks needs an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.multiprocessing as mp

from tests.support.dist_utils import free_port

_RANK_TIMEOUT_S = 600
# torchtitan.trainer: the models' update_from_config imports it (and with it datasets, pandas)
_PRELOAD = ("torchtitan.trainer", "torchtitan.models.llama3", "torchtitan.models.qwen3", "torchtitan.components.checkpoint",
            "torchtitan.components.optimizer", "sharded_shampoo.integrations.torchtitan")


def _rank(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
        result: tuple = ("ok", fn(rank, world, *args), "")
    except NotImplementedError as exc:
        result = ("notimpl", traceback.format_exc(), str(exc))
    except BaseException:  # noqa: BLE001 - reported to the parent
        result = ("error", traceback.format_exc(), "")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def _fork_ranks(world: int, fn: Callable[..., Any], args: tuple, out_dir: str) -> None:
    ctx = mp.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, fn, args, out_dir)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=_RANK_TIMEOUT_S)
    for p in procs:
        if p.is_alive():  # a hang beyond gloo's own timeout: stop it, the missing result fails the test
            p.kill()
            p.join()


def _serve(conn: Any) -> None:
    """The zygote: patch and import once, then fork ranks for each (world, fn, args, out_dir) received."""
    import importlib

    from tests.support import titan_harness

    titan_harness.apply_cpu_workarounds()
    for name in _PRELOAD:
        importlib.import_module(name)
    conn.send("ready")
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            _fork_ranks(*job)
        finally:  # a missing rank result is reported by the caller
            conn.send("done")


class TitanRanks:
    """A zygote process serving launches of forked gloo ranks; one per test module (a fixture)."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,))  # not a daemon: it forks the ranks
        self._proc.start()
        if self._conn.recv() != "ready":
            raise RuntimeError("torchtitan zygote failed to start")

    def run(self, world: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """``fn(rank, world, *args)`` on ``world`` forked gloo ranks; their return values."""
        with tempfile.TemporaryDirectory() as out_dir:
            self._conn.send((world, fn, args, out_dir))
            self._conn.recv()
            results = []
            for r in range(world):
                path = os.path.join(out_dir, f"rank{r}.pkl")
                if not os.path.exists(path):
                    raise AssertionError(f"rank {r} left no result (killed, or crashed hard)")
                with open(path, "rb") as f:
                    results.append(pickle.load(f))
        failed = [(r, res) for r, res in enumerate(results) if res[0] != "ok"]
        if failed and all(res[0] == "notimpl" for _, res in failed):
            raise NotImplementedError(f"rank {failed[0][0]}: {failed[0][1][2]}")
        if failed:
            raise AssertionError("\n".join(f"rank {r} failed:\n{res[1]}" for r, res in failed))
        return [res[1] for res in results]

    def close(self) -> None:
        if self._proc.is_alive():
            self._conn.send(None)
            self._proc.join(timeout=30)
