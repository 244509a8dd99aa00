"""Randomized checkpoint-storage fuzzing (tests/fuzz_storage.py): a fixed set of damage seeds, and the
harness's own invariants. ``scripts/tools/fuzz.py --storage --seeds N`` runs many more, with racing writers
(whose fixed-seed share is tests/test_checkpointing_race.py).

The seeds are the first ones (of 0..2999) that draw each combination of damage kind, writer
(``save_checkpoint`` / torchrec ``save_dmp``) and checksums on/off: 7 x 2 x 2 = 28.
"""

from __future__ import annotations

import pytest

from tests.support import fuzz_storage as fz

pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
              pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")]

SEEDS = [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 12, 13, 14, 15, 24, 27, 31, 35, 36, 58, 62, 65, 66, 75, 139, 141, 272, 621]


def test_fixed_storage_seeds_hold_every_claim() -> None:
    pytest.importorskip("torchrec")
    failures = fz.run_damages(SEEDS)
    lines = [f"{fz.draw_damage(s).summary()}: {p}" for s, ps in sorted(failures.items()) for p in ps]
    assert not failures, "\n".join(lines)


def test_fixed_storage_seeds_cover_every_combination() -> None:
    cases = [fz.draw_damage(s) for s in SEEDS]
    assert {(c.damage, c.writer, c.checksums) for c in cases} == \
        {(d, w, k) for d in fz.DAMAGES for w in ("save_checkpoint", "save_dmp") for k in (True, False)}
    assert {c.file for c in cases if c.damage in ("flip", "truncate", "delete")} == set(fz.FILES)


def test_a_seed_determines_its_damage_case() -> None:
    assert fz.draw_damage(17) == fz.draw_damage(17)
    assert len({fz.draw_damage(s).summary() for s in range(100)}) == 100


def test_the_harness_flags_a_loader_that_accepts_damage(monkeypatch) -> None:
    """A check that cannot fail proves nothing: with a loader that swallows every error, the
    must-raise cases among the seeds are reported."""
    import sharded_shampoo.checkpointing as ckpt

    real = ckpt.load_checkpoint

    def lenient(*args, **kwargs):
        try:
            return real(*args, **kwargs)
        except ckpt.CheckpointLoadError:
            return {}

    monkeypatch.setattr(ckpt, "load_checkpoint", lenient)
    seeds = [s for s in SEEDS if fz.draw_damage(s).writer == "save_checkpoint" and fz.draw_damage(s).checksums][:4]
    failures = fz.run_damages(seeds)
    assert sorted(failures) == seeds and all("loaded without an error" in p[0] for p in failures.values()), failures
