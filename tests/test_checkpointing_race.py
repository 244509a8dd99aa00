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

import ckpt_scenarios as cs
import race_writers as rw

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
