"""Randomized fuzzing of checkpoint storage: damaged and crafted checkpoints, and concurrent writers.

A seed fully determines a :class:`DamageCase` (``draw_damage(seed)``): which save wrote the checkpoint
(``save_checkpoint`` of a small ShardedShampoo model, flattened or nested, or the torchrec
``save_dmp`` of a keyed optimizer), with or without checksums, and one damage -- a bit flip, a
truncation, a zeroed range or a deletion in ``.metadata``, ``checksums.json`` or a data file; a
pickle that would run a command in ``.metadata`` or in any stored item (checksums rewritten to
match); an item placed outside the directory. The claims (:func:`run_damage`):

- a damage the checksums cover (every one, when the checkpoint has them) makes the load raise a
  ``CheckpointLoadError`` subclass -- an ``Exception`` -- with model and optimizer bit-identical;
- without checksums, a damage may load (a flipped number is what checksums are for) but one that
  raises changes nothing; structural damage (deleted or truncated files) and crafted pickles
  always raise;
- a crafted pickle never runs (its marker file never appears);
- the undamaged checkpoint then loads exactly what was saved.

Concurrency is fuzzed by :mod:`race_writers` (``rounds(seed, n)`` draws each round's starting
directory and timing). ``python -m scripts.tools.fuzz --storage`` runs both.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from tests.support import ckpt_craft as cc
from tests.support import ckpt_scenarios as cs

DAMAGES = ("flip", "truncate", "zero_range", "delete", "crafted_item", "crafted_metadata", "escape_path")
FILES = (".metadata", "checksums.json", "data")
STRUCTURAL = ("truncate", "delete", "crafted_item", "crafted_metadata", "escape_path")
UNCHANGED = "(nothing: the bytes were already so)"


@dataclass(frozen=True)
class DamageCase:
    seed: int
    writer: str                 # "save_checkpoint" | "save_dmp"
    shapes: tuple[tuple[int, ...], ...]
    flatten: bool
    checksums: bool
    damage: str
    file: str                   # one of FILES (flip / truncate / zero_range / delete)
    pick: int                   # which item (crafted_item), resolved modulo the count
    position: float             # where in the file, as a fraction of its size
    bit: int
    payload: str                # "os.system" | "exec"

    def summary(self) -> str:
        where = {"crafted_item": f"item #{self.pick}", "crafted_metadata": ".metadata",
                 "escape_path": ".metadata"}.get(self.damage, f"{self.file} @{self.position:.3f}")
        return (f"seed {self.seed}: {self.writer}{'' if self.flatten else ' nested'}"
                f"{'' if self.checksums else ' no-checksums'} shapes={list(self.shapes)} | {self.damage} {where}")


def draw_damage(seed: int) -> DamageCase:
    rng = random.Random(seed)
    shapes = tuple(tuple(rng.choice((1, 2, 3, 5, 8)) for _ in range(rng.randint(1, 3)))
                   for _ in range(rng.randint(1, 3)))
    damage = rng.choice(DAMAGES)
    return DamageCase(seed, rng.choice(("save_checkpoint", "save_checkpoint", "save_dmp")), shapes,
                      rng.random() < 0.7, rng.random() < 0.8, damage,
                      "data" if damage == "zero_range" else rng.choice(FILES), rng.randrange(1 << 16), rng.random(),
                      rng.randrange(8), rng.choice(("os.system", "exec")))


# ----------------------------------------------------------------------------- one case


def _save(case: DamageCase, path: str) -> tuple[Callable[[str], Any], Callable[[], Any], Any]:
    """Write the case's checkpoint; (load into a fresh state, snapshot of that state, saved snapshot)."""
    if case.writer == "save_dmp":
        from tests.support import keyed_helpers as th
        from sharded_shampoo.integrations.torchrec import load_dmp, save_dmp

        model, opt = th.keyed_model(seed=case.seed % 7)
        save_dmp(path, model, opt, extra={"step": 3}, checksums=case.checksums)
        model2, opt2 = th.keyed_model(seed=case.seed % 7 + 1)
        return (lambda p: load_dmp(p, model2, opt2, extra={"step": 0}), lambda: th.snapshot(model2, opt2),
                th.snapshot(model, opt))
    from sharded_shampoo.checkpointing import load_checkpoint, save_checkpoint

    shapes = {f"p{i}": s for i, s in enumerate(case.shapes)}
    model, opt = cs.build("single", "root_inverse", model=cs.Net(shapes, seed=case.seed))
    cs.feed(model, opt, 0, 3)
    save_checkpoint(os.path.dirname(path), 3, model, opt, extra={"step": 3}, checksums=case.checksums,
                    flatten_optimizer_state_dict=case.flatten)
    model2, opt2 = cs.build("single", "root_inverse", model=cs.Net(shapes, seed=case.seed + 1))
    return (lambda p: load_checkpoint(p, model2, opt2, extra={"step": 0}), lambda: cs.snapshot(model2, opt2),
            cs.snapshot(model, opt))


def _file(case: DamageCase, ckpt: str) -> str:
    if case.file != "data":
        return os.path.join(ckpt, case.file)
    data = sorted(n for n in os.listdir(ckpt) if n.endswith(".distcp"))
    return os.path.join(ckpt, data[case.pick % len(data)])


def apply_damage(case: DamageCase, ckpt: str, marker: str) -> str:
    """Damage ``ckpt`` as drawn; returns what was damaged (for messages)."""
    payload = cc.payloads(marker)[case.payload]
    if case.damage == "crafted_item":
        items = cc.pickled_items(ckpt) + cc.tensor_items(ckpt)
        key = items[case.pick % len(items)]
        cc.replace_item(ckpt, key, cc.torch_blob(payload))
        return key
    if case.damage == "crafted_metadata":
        cc.replace_metadata(ckpt, cc.metadata_with(ckpt, payload) if case.bit % 2 else cc.pickle_bytes(payload))
        return ".metadata"
    if case.damage == "escape_path":
        md = cc.read_metadata(ckpt)
        infos = list(md.storage_data.values())
        infos[case.pick % len(infos)].relative_path = os.path.join("..", "..", infos[0].relative_path)
        cc.replace_metadata(ckpt, cc.pickle_bytes(md))
        return ".metadata"
    path = _file(case, ckpt)
    if not os.path.exists(path):          # checksums.json of a checkpoint saved without checksums
        path = _file(DamageCase(**{**case.__dict__, "file": "data"}), ckpt)
    size = os.path.getsize(path)
    offset = min(int(case.position * size), size - 1)
    if case.damage == "flip":
        cc.flip(path, offset, case.bit)
    elif case.damage == "truncate":
        os.truncate(path, offset)
    elif case.damage == "zero_range":
        with open(path, "r+b") as f:
            f.seek(offset)
            old = f.read(min(1 + case.pick % 64, size - offset))
            f.seek(offset)
            f.write(bytes(len(old)))
        if not any(old):
            return UNCHANGED            # the range held zeros already: nothing was damaged
    else:
        os.remove(path)
    return os.path.basename(path)


def run_damage(case: DamageCase, root: str) -> list[str]:
    """Every problem of one case (empty: the claims hold)."""
    from sharded_shampoo.checkpointing import CheckpointLoadError

    path = os.path.join(root, f"case{case.seed}", "step_3")
    os.makedirs(os.path.dirname(path))
    load, snapshot, saved = _save(case, path)
    ckpt = path + ".damaged"
    shutil.copytree(path, ckpt)
    marker = os.path.join(root, f"marker{case.seed}")
    what = apply_damage(case, ckpt, marker)
    before = snapshot()
    problems: list[str] = []
    try:
        load(ckpt)
        raised = None
    except CheckpointLoadError as err:
        raised = err
    except BaseException:  # noqa: BLE001 - anything else is a defect
        return [f"{case.damage} of {what}: not a CheckpointLoadError: {traceback.format_exc()[-600:]}"]
    if os.path.exists(marker):
        problems.append(f"{case.damage} of {what}: code from the checkpoint ran")
    must_raise = (case.checksums or case.damage in STRUCTURAL) and what != UNCHANGED
    if raised is None and must_raise:
        problems.append(f"{case.damage} of {what}: loaded without an error")
    if raised is not None and not cs.same(snapshot(), before):
        problems.append(f"{case.damage} of {what}: raised ({raised}) but changed the live state")
    try:
        load(path)
    except Exception as err:  # noqa: BLE001 - reported
        return problems + [f"the undamaged checkpoint no longer loads: {type(err).__name__}: {err}"]
    if not cs.same(snapshot(), saved):
        problems.append("the undamaged checkpoint loads other values than were saved")
    shutil.rmtree(os.path.dirname(path))
    return problems


def run_damages(seeds: list[int]) -> dict[int, list[str]]:
    """Run every seed's case; failures by seed (torchrec cases are skipped where torchrec is missing)."""
    try:
        import torchrec  # noqa: F401
        has_torchrec = True
    except ImportError:
        has_torchrec = False
    failures: dict[int, list[str]] = {}
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", category=UserWarning, message=".*without verification")
        for seed in seeds:
            case = draw_damage(seed)
            if case.writer == "save_dmp" and not has_torchrec:
                continue
            try:
                problems = run_damage(case, root)
            except Exception:  # noqa: BLE001 - the harness itself failed on this seed
                problems = [f"harness: {traceback.format_exc()[-600:]}"]
            if problems:
                failures[seed] = problems
    return failures


def run_race(seed: int, rounds: int) -> tuple[dict[int, list[str]], dict[str, int]]:
    """``rounds`` rounds of two racing writers (drawn from ``seed``); failures by round, and counts."""
    from tests.support import race_writers as rw

    plan = rw.rounds(seed, rounds)
    with tempfile.TemporaryDirectory() as root:
        outcomes = rw.race(root, plan)
        snapshots = {i: cs.snapshot(*rw.state(i)) for i in range(2)}
        failures = {}
        for k in range(len(plan)):
            problems = rw.check_round(os.path.join(root, f"r{k}"), (outcomes[0][k], outcomes[1][k]), snapshots)
            if problems:
                failures[k] = [f"{plan[k][0]} round: {p}" for p in problems]
    kinds = [(outcomes[0][k][0], outcomes[1][k][0]) for k in range(len(plan))]
    counts = {"rounds": len(plan), "one lost": sum("ConcurrentSaveError" in k for k in kinds),
              "both succeeded": sum(k == ("ok", "ok") for k in kinds)}
    counts.update({f"variant {v}": sum(p[0] == v for p in plan) for v in rw.VARIANTS})
    return failures, counts


def summary(seeds: list[int], failures: dict[int, list[str]]) -> str:
    cases = [draw_damage(s) for s in seeds]
    count = Counter(c.damage for c in cases)
    return (f"storage cases: {len(cases)} (seeds {min(seeds)}..{max(seeds)}): "
            + ", ".join(f"{k} {v}" for k, v in sorted(count.items()))
            + f"; save_dmp {sum(c.writer == 'save_dmp' for c in cases)}, without checksums "
            f"{sum(not c.checksums for c in cases)}; failures: {len(failures)}")
