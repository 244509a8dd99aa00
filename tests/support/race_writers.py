"""Two processes saving the same step into one directory at the same moment, many rounds in a row.

The situation of a job that was thought dead (a zombie) and its restart: both call
``save_checkpoint(root, 7, ...)``, each with its own model state. Each round starts both saves at
a barrier, one of them after a small drawn delay, in a directory the parent prepared in one of
these states (:data:`VARIANTS`):

- ``empty``: no checkpoint yet;
- ``old``: a complete, older ``step_7`` of a third state, with ``latest`` naming ``step_5``;
- ``dead``: the leftovers of a save that died: ``step_7.tmp-<id>`` with a free lock, and an old
  version's ``step_7.tmp``.

Used by tests/test_checkpointing_race.py and the randomized fuzz (tests/fuzz_storage.py).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import time
import traceback
from typing import Any

import torch

from tests.support import ckpt_scenarios as cs

SHAPES = {"w": (16, 8), "v": (6, 4), "b": (9,)}
STEP = 7
VARIANTS = ("empty", "old", "dead")


def state(seed: int) -> tuple[Any, Any]:
    """Model and optimizer after a few steps; different seeds give different values everywhere."""
    model, opt = cs.build("single", "root_inverse", model=cs.Net(SHAPES, seed=seed))
    cs.feed(model, opt, seed, seed + 2)
    return model, opt


def rounds(seed: int, count: int) -> list[tuple[str, int, float]]:
    """(variant, writer that waits, its delay in seconds) per round, drawn from ``seed``."""
    rng = random.Random(seed)
    return [(rng.choice(VARIANTS), rng.randrange(2), rng.choice((0.0, 0.0, 0.002, 0.01, 0.03))) for _ in range(count)]


def prepare(root: str, variant: str) -> None:
    """The directory a round starts from (see the module doc)."""
    from sharded_shampoo.checkpointing import save_checkpoint
    from sharded_shampoo.checkpointing.writers import create_tmp

    os.makedirs(root)
    if variant == "old":
        model, opt = state(9)
        save_checkpoint(root, STEP, model, opt, extra={"writer": 9})
        save_checkpoint(root, 5, model, opt, extra={"writer": 9})
    elif variant == "dead":
        dead = create_tmp(root, f"step_{STEP}")
        with open(os.path.join(dead.path, "__0_0.distcp"), "wb") as f:
            f.write(b"half a file")
        dead.unlock()                       # its process died: the kernel dropped the lock
        os.makedirs(os.path.join(root, f"step_{STEP}.tmp"))


def writer(index: int, plan: list[tuple[str, int, float]], root: str, barrier: Any, out: str) -> None:
    """One racing job: save step 7 into ``root/r{k}`` in every round; record what happened."""
    torch.set_num_threads(1)
    from sharded_shampoo.checkpointing import CheckpointError, save_checkpoint

    model, opt = state(index)
    results = []
    for k, (_, waiter, delay) in enumerate(plan):
        barrier.wait()
        if waiter == index:
            time.sleep(delay)
        try:
            save_checkpoint(os.path.join(root, f"r{k}"), STEP, model, opt, extra={"writer": index})
            results.append(["ok", ""])
        except CheckpointError as err:
            results.append([type(err).__name__, str(err)])
        except BaseException:  # noqa: BLE001 - anything else is a defect the test reports
            results.append(["unexpected", traceback.format_exc()])
    with open(os.path.join(out, f"writer{index}.json"), "w") as f:
        json.dump(results, f)


def race(root: str, plan: list[tuple[str, int, float]], timeout_s: float = 120.0) -> list[list[list[str]]]:
    """Prepare every round's directory, run the two writers, return their outcomes per writer."""
    for k, (variant, _, _) in enumerate(plan):
        prepare(os.path.join(root, f"r{k}"), variant)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2, timeout=timeout_s)
    procs = [ctx.Process(target=writer, args=(i, plan, root, barrier, root)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
        if p.is_alive():
            p.terminate()
            raise AssertionError(f"a racing writer did not finish within {timeout_s} s")
    out = []
    for i in range(2):
        with open(os.path.join(root, f"writer{i}.json")) as f:
            out.append(json.load(f))
    return out


def check_round(root: str, outcomes: tuple[list[str], list[str]], snapshots: dict[int, Any]) -> list[str]:
    """Problems of one round (empty: the claims hold). ``snapshots``: writer -> its saved state."""
    from sharded_shampoo.checkpointing import latest_checkpoint, load_checkpoint, verify_checkpoint

    problems = []
    winners = [i for i, (kind, _) in enumerate(outcomes) if kind == "ok"]
    for i, (kind, message) in enumerate(outcomes):
        lost = kind == "ConcurrentSaveError" and "another save published" in message
        refused = kind == "CheckpointSaveError" and "already exists and is the latest one" in message
        if kind != "ok" and not (lost or refused):
            problems.append(f"writer {i}: {kind}: {message[-300:]}")
    if not winners:
        problems.append("no writer succeeded")
    if latest_checkpoint(root) != os.path.join(root, f"step_{STEP}"):
        return problems + [f"latest names {latest_checkpoint(root)!r}"]
    leftovers = sorted(n for n in os.listdir(root) if ".tmp" in n)
    if leftovers:
        problems.append(f"temporary directories left: {leftovers}")
    try:
        verify_checkpoint(os.path.join(root, f"step_{STEP}"))
        model, opt = state(5)
        got = load_checkpoint(root, model, opt, extra={"writer": -1})["writer"]
    except Exception as err:  # noqa: BLE001 - reported
        return problems + [f"latest checkpoint does not verify or load: {type(err).__name__}: {err}"]
    if got not in winners:
        problems.append(f"latest holds writer {got}'s checkpoint, but the winners were {winners}")
    elif not cs.same(cs.snapshot(model, opt), snapshots[got]):
        problems.append(f"latest holds writer {got}'s extra but not its state")
    return problems
