"""Concurrent saves of the same step into one directory (two processes, one launch; race_writers.py).

A zombie job and its restart both save ``step_7``. Whatever the interleaving, in every round: each
save either succeeds or raises a clear ``ConcurrentSaveError`` (or, if the other save had already
published and moved ``latest``, the usual refusal to overwrite the latest checkpoint); at least one
succeeds; ``latest`` names a checkpoint that verifies and loads exactly the state of a writer that
reported success; no temporary directory is left (dead saves' leftovers included).
"""

from __future__ import annotations

import os

import pytest

from tests.support import ckpt_scenarios as cs
from tests.support import race_writers as rw

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

ROUNDS = 45


@pytest.fixture(scope="module")
def raced(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list, list]:
    root = str(tmp_path_factory.mktemp("race"))
    plan = rw.rounds(seed=0, count=ROUNDS)
    return root, plan, rw.race(root, plan)


def test_every_round_publishes_one_complete_checkpoint(raced) -> None:
    root, plan, outcomes = raced
    snapshots = {i: cs.snapshot(*rw.state(i)) for i in range(2)}
    problems = []
    for k, (variant, _, _) in enumerate(plan):
        for p in rw.check_round(os.path.join(root, f"r{k}"), (outcomes[0][k], outcomes[1][k]), snapshots):
            problems.append(f"round {k} ({variant}): {p}")
    assert not problems, "\n".join(problems)


def test_the_race_was_real_and_the_loser_is_told(raced) -> None:
    """The saves overlapped: in most rounds one writer lost, with a message that says what happened."""
    _, plan, outcomes = raced
    lost = [k for k in range(len(plan)) if "ConcurrentSaveError" in (outcomes[0][k][0], outcomes[1][k][0])]
    assert len(lost) >= len(plan) // 3, (len(lost), [(outcomes[0][k][0], outcomes[1][k][0]) for k in range(len(plan))])
    message = next(o[1] for w in outcomes for o in w if o[0] == "ConcurrentSaveError")
    assert "another save published" in message and "kept" in message and "only one job" in message
    assert {v for v, _, _ in plan} == set(rw.VARIANTS)


# ----------------------------------------------------------------------------- the pieces, one by one


def test_only_dead_saves_leftovers_are_removed(tmp_path) -> None:
    from sharded_shampoo.checkpointing.writers import create_tmp, remove_dead

    root = str(tmp_path)
    live, dead = create_tmp(root, "step_3"), create_tmp(root, "step_3")
    dead.unlock()                                   # what the kernel does when its process ends
    foreign = tmp_path / "step_3.tmp-0123456789abcdef"
    foreign.mkdir()                                 # no lock file: being created, or not ours
    assert remove_dead(root) == [dead.path]
    assert os.path.isdir(live.path) and foreign.is_dir()
    live.unlock()
    assert remove_dead(root) == [live.path]


def test_publish_never_replaces_a_checkpoint_published_meanwhile(tmp_path) -> None:
    from sharded_shampoo.checkpointing import ConcurrentSaveError
    from sharded_shampoo.checkpointing.writers import create_tmp, identity, publish

    root, final = str(tmp_path), str(tmp_path / "step_7")
    older = create_tmp(root, "step_7")
    (tmp_path / older.path / "data").write_text("older")
    publish(older, final, None)                     # nothing there: a plain rename
    seen = identity(final)
    ours, theirs = create_tmp(root, "step_7"), create_tmp(root, "step_7")
    (tmp_path / theirs.path / "data").write_text("theirs")
    (tmp_path / ours.path / "data").write_text("ours")
    publish(theirs, final, seen)                    # replaces the older save both saw at their start
    assert (tmp_path / "step_7" / "data").read_text() == "theirs"
    with pytest.raises(ConcurrentSaveError, match="another save published .*kept"):
        publish(ours, final, seen)                  # what is there now is not what we saw: we lose
    assert (tmp_path / "step_7" / "data").read_text() == "theirs"
    assert sorted(os.listdir(root)) == sorted(["step_7", os.path.basename(ours.path)])


def test_prune_keeps_the_checkpoint_latest_names(tmp_path) -> None:
    """Another job may have moved latest between this save's publish and its prune."""
    from sharded_shampoo.checkpointing import save_checkpoint
    from sharded_shampoo.checkpointing.directory import prune, write_pointer

    model, opt = rw.state(0)
    root = str(tmp_path)
    for step in (5, 6, 7):
        save_checkpoint(root, step, model, opt)
    write_pointer(root, "step_5")
    assert prune(root, 1, "step_7") == [os.path.join(root, "step_6")]
    assert sorted(os.listdir(root)) == ["latest", "step_5", "step_7"]
