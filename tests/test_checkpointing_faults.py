"""Checkpoint faults on 2 gloo ranks: a damaged checkpoint fails on every rank and changes nothing;
a local failure on one rank during a save or load becomes an error on every rank within seconds.

Two launches (scenarios in ckpt_fault_scenarios.py). The agreement launch runs with a 30 s
process-group timeout and a 150 s deadline: a rank left waiting in a collective would take the
timeout (or hang) instead of the few seconds asserted here.
"""

from __future__ import annotations

import os

import pytest

from tests.support import ckpt_fault_scenarios as fs
from tests.support import ckpt_scenarios as cs
from tests.support.dist_utils import run_ranks
from sharded_shampoo.checkpointing import UnverifiedCheckpointWarning, load_checkpoint

FAST_S = 10.0


@pytest.fixture(scope="module")
def atomic_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("atomic"))


@pytest.fixture(scope="module")
def atomic(atomic_root: str) -> list[dict]:
    return run_ranks(2, fs.scenario_atomic_load, atomic_root, deadline_s=400)


@pytest.mark.parametrize("case", list(fs.DAMAGE))
def test_damaged_checkpoint_fails_on_every_rank_and_changes_nothing(atomic: list[dict], case: str) -> None:
    assert all(r["differs_from_checkpoint"] for r in atomic)   # so "unchanged" is a real check
    for rank, r in enumerate(atomic):
        got = r[case]
        assert got["error"] is not None, (rank, case)
        assert "CheckpointLoadError" in got["error"] and "Exception" in got["error"], got["error"]
        expected_class = "CheckpointCorruptError" if case != "unreadable_last_item" else "CheckpointLoadError"
        assert got["error"][0] == expected_class, (rank, got["error"], got["message"])
        assert got["path_expected"] in got["message"] and got["path"] == got["path_expected"], got["message"]
        assert got["unchanged"], (rank, case)
        assert got["seconds"] < FAST_S, got


def test_damage_is_named(atomic: list[dict]) -> None:
    messages = {case: atomic[1][case]["message"] for case in fs.DAMAGE}
    assert "__1_0.distcp" in messages["delete_rank1"] and "missing" in messages["delete_rank1"]
    assert "__1_0.distcp" in messages["truncate_rank1"] and "truncated" in messages["truncate_rank1"]
    assert "__0_0.distcp" in messages["truncate_rank0"]
    assert "__1_0.distcp" in messages["flip_rank1"] and "CRC-32" in messages["flip_rank1"]
    assert "holding app." in messages["flip_rank1"]                     # and the tensor
    assert "truncated" in messages["truncate_rank1 (no checksums)"]


def test_undamaged_checkpoints_still_load_exactly(atomic: list[dict]) -> None:
    for r in atomic:
        assert r["good ok"] == {"step": 4} and r["good ok equal"]
        assert r["good plain"] == {"step": 4} and r["good plain equal"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_plain_dcp_checkpoint_of_two_ranks_loads_on_one_process_unverified(atomic_root: str, atomic: list[dict]) -> None:
    model, opt = cs.build("single", "root_inverse")
    with pytest.warns(UnverifiedCheckpointWarning, match="without verification"):
        assert load_checkpoint(os.path.join(atomic_root, "plain_dcp"), model, opt, extra={"step": -1}) == {"step": 4}
    ref_params, ref_opt = cs.reference("root_inverse", 4)
    # 2 ranks vs 1 process: float rounding of the step only (world-size invariance, test_distributed.py)
    assert cs.close(cs.opt_snapshot(opt), cs.opt_snapshot(ref_opt), tol=1e-4)
    assert cs.close(cs.full_params(model), ref_params, tol=1e-5)


@pytest.fixture(scope="module")
def agreement(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_ranks(2, fs.scenario_agreement, str(tmp_path_factory.mktemp("agree")), timeout_s=30, deadline_s=150)


EXPECTED = {
    "save: binary latest (rank 0 fails)": ("CheckpointPointerError", "binary data"),
    "load: binary latest": ("CheckpointPointerError", "binary data"),
    "save: nested extra on rank 1 only": ("CheckpointArgumentError", "extra['cfg'] is a dict"),
    "save: ranks disagree on the step": ("CheckpointSaveError", "rank 0: step_3, rank 1: step_4"),
    "load: rank 1 passes a missing path": ("CheckpointNotFoundError", "nope"),
    "save: checksums fail on rank 1": ("CheckpointSaveError", "No space left on device"),
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_local_failure_on_one_rank_raises_on_every_rank_fast(agreement: list[dict], case: str) -> None:
    cls, text = EXPECTED[case]
    for rank, r in enumerate(agreement):
        got = r[case]
        assert got["error"] is not None, (rank, case)
        assert "CheckpointError" in got["error"] and "Exception" in got["error"], got["error"]
        assert got["seconds"] < FAST_S, (rank, case, got["seconds"])
        assert text in got["message"], (rank, got["message"])
        assert got["tmp_after"] == [], (rank, case)    # a failed save's directory is gone when it raises
    # the rank that failed raises its own error; the others the same class when it is a load or
    # save error, naming the failed rank
    assert cls in agreement[0][case]["error"] + agreement[1][case]["error"]


def test_failed_saves_left_no_tmp_and_latest_unmoved(agreement: list[dict]) -> None:
    for r in agreement:
        assert r["tmp_dirs"] == [] and r["latest"] == "step_2"
    assert "rank 1 failed" in agreement[0]["save: checksums fail on rank 1"]["message"]
    assert "rank 0 failed" in agreement[1]["save: binary latest (rank 0 fails)"]["message"]
