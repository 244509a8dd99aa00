"""ShardedShampoo as the dense optimizer of a torchrec DMP model, on 2 CPU/gloo ranks (two launches).

One two-rank launch trains a tiny DLRM (sharded tables on torchrec's fused optimizer, dense part
on ShardedShampoo through CombinedOptimizer), checkpoints it with DCP midway and reloads it; one
single-rank launch resumes that checkpoint on the other world size. Skipped without torchrec.
"""

from __future__ import annotations

import os

import pytest

from tests.support.torchrec_required import require_torchrec

require_torchrec()

from tests.support.dist_utils import run_ranks  # noqa: E402
from tests.support import torchrec_scenarios  # noqa: E402


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], str, str]:
    root = tmp_path_factory.mktemp("dmp")
    ckpt, snaps = str(root / "ckpt"), str(root / "snaps")
    os.makedirs(snaps)
    return run_ranks(2, torchrec_scenarios.scenario_two_ranks, ckpt, snaps), ckpt, snaps


@pytest.fixture(scope="module")
def one_rank_run(two_rank_run: tuple) -> dict:
    """The two-rank checkpoint resumed on one rank (and the training script on one rank)."""
    _, ckpt, snaps = two_rank_run
    (one,) = run_ranks(1, torchrec_scenarios.scenario_resume, ckpt, snaps, 2)
    return one


def test_split_dense_shampoo_equals_one_process(two_rank_run: tuple) -> None:
    results, _, _ = two_rank_run
    for r in results:
        # same dense gradients -> same parameters as a one-process ShardedShampoo after 24 steps
        # (4 of them preconditioned, with roots from step 20); measured 0.0
        assert r["ref_diff"] <= 1e-6, r["ref_diff"]
        assert r["step_after_init_state"] == 0, "ShampooDenseOptimizer.init_state must not step"
    owned = [r["owned_blocks"] for r in results]
    total = results[0]["total_blocks"]
    # the work is split, not repeated: every block has exactly one owner and both ranks own some
    assert sum(owned) == total and min(owned) > 0, (owned, total)
    assert results[0]["losses"] != results[1]["losses"], "each rank trains on its own batches"


def test_planner_estimate_equals_real_allocation(two_rank_run: tuple) -> None:
    results, _, _ = two_rank_run
    for rank, r in enumerate(results):
        assert r["real_bytes"] == r["estimate_bytes"], (rank, r["real_bytes"], r["estimate_bytes"])
    assert results[0]["real_bytes"] != results[1]["real_bytes"], "owners differ, so do the per-rank bytes"


def test_combined_state_dict_round_trip(two_rank_run: tuple) -> None:
    results, _, _ = two_rank_run
    for r in results:
        keys = r["state_keys"]
        assert any(".embedding_bags." in k for k in keys) and any("dense_arch" in k for k in keys)
        # a fresh model (other seed) + CombinedOptimizer.init_state + load retraces steps 16..24 exactly,
        # preconditioning from step 20 on, so the restored group step counter matters
        assert r["reload_extra"] == {"step": torchrec_scenarios.SAVE_AT} and r["reload_group_step"] == torchrec_scenarios.SAVE_AT
        assert r["reload_loss_diff"] == 0.0 and r["reload_dense_diff"] == 0.0
        # one LR scheduler drives both optimizers: factor 0 freezes the tables and the dense part
        assert r["lrs"] == [0.0]
        assert r["frozen_dense_diff"] == 0.0 and r["frozen_table_diff"] == 0.0


def test_resume_on_one_rank(two_rank_run: tuple, one_rank_run: dict) -> None:
    results, one = two_rank_run[0], one_rank_run
    assert one["extra"] == {"step": torchrec_scenarios.SAVE_AT} and one["group_step"] == torchrec_scenarios.SAVE_AT
    # every block (9) now lives on the single rank, read from the blocks both ranks wrote
    assert one["dense_state_keys"][1] == results[0]["total_blocks"]
    assert one["dense_state_diff"] == 0.0, "dense Shampoo state must reshard exactly"
    assert one["sparse_state_diff"] == 0.0, "tables and fused optimizer state must reshard exactly"
    # the continuation on the global batches follows the two-rank run (float rounding only:
    # measured 3.9e-7 on the losses)
    two_rank = [(a + b) / 2 for a, b in zip(results[0]["losses"], results[1]["losses"])][torchrec_scenarios.SAVE_AT:]
    worst = max(abs(a - b) / abs(b) for a, b in zip(one["losses"], two_rank))
    assert worst <= 1e-5, worst
    # the dense parameters after the first roots (step 20) amplify that rounding (epsilon 1e-8):
    # measured 2.3e-4; a lost step counter or state would be off by orders of magnitude more
    assert torchrec_scenarios.max_rel_diff(one["final_dense"], results[0]["final_dense"]) <= 1e-3
    message, touched = one["incompatible"]
    assert "max_preconditioner_dim" in message and touched == 0.0, message
    assert "no extra values ['epoch']" in one["missing_extra"] and "['step']" in one["missing_extra"]


def test_train_dlrm_script_same_on_one_and_two_ranks(two_rank_run: tuple, one_rank_run: dict) -> None:
    """scripts/train_dlrm.py splits the global batch and initialises tables from global rows."""
    results, one = two_rank_run[0], one_rank_run
    two = results[0]["script"]
    assert results[1]["script"] == two, "every rank reports the global loss"
    worst = max(abs(a - b) / b for a, b in zip(one["script"]["loss"], two["loss"]))
    assert len(two["loss"]) == 7 and worst <= 1e-5, worst   # measured 9.6e-8 (roots at steps 3 and 6)
    assert abs(one["script"]["auc"][-1][1] - two["auc"][-1][1]) <= 1e-3


# ----------------------------------------------------------------------------- hardening (issue 18)


@pytest.mark.parametrize("case", ["flip in an embedding table", "truncated shard file", "crafted .metadata",
                                  "crafted extra"])
def test_damaged_or_crafted_dmp_checkpoint_fails_on_every_rank_and_changes_nothing(two_rank_run: tuple,
                                                                                   case: str) -> None:
    """A flipped byte in a table's item is caught by its checksum; a truncated shard file fails before
    anything is written (not a BaseException half-way through); crafted pickles run nothing."""
    results, _, _ = two_rank_run
    expected = {"flip in an embedding table": ("CheckpointCorruptError", "CRC-32"),
                "truncated shard file": ("CheckpointCorruptError", "__1_0.distcp"),
                "crafted .metadata": ("UnsafeCheckpointError", "DCP metadata is never made of"),
                "crafted extra": ("UnsafeCheckpointError", "app.extra.step")}[case]
    for rank, r in enumerate(results):
        got = r["hardening"][case]
        assert got["error"] is not None, (rank, case, "loaded without an error")
        assert got["error"][0] == expected[0] or f"{expected[0]}" in got["message"], (rank, got)
        assert "CheckpointLoadError" in got["error"] and "Exception" in got["error"], got["error"]
        assert expected[1] in got["message"] or rank != 0, (rank, got["message"])
        assert got["unchanged"], (rank, case, "tables, fused state or dense state changed")
        assert not got["marker"], "code from the checkpoint ran"
    if case == "flip in an embedding table":
        assert "t_c0.weight" in results[0]["hardening"][case]["message"]


def test_dmp_checkpoint_has_checksums_and_verifies(two_rank_run: tuple) -> None:
    results, ckpt, _ = two_rank_run
    for r in results:
        assert r["hardening"]["verify"]["error"] is None, r["hardening"]["verify"]
        totals = r["hardening"]["verify"]["value"]
        assert totals["files"] == 2 and totals["items"] > 40 and totals["objects"] >= 3, totals
        assert r["hardening"]["good"]["value"] == {"step": torchrec_scenarios.SAVE_AT}
    assert os.path.isfile(os.path.join(ckpt, "checksums.json")) and os.path.isfile(os.path.join(ckpt, "commit.json"))
    assert not [n for n in os.listdir(os.path.dirname(ckpt)) if ".tmp" in n]


def test_save_dmp_refuses_an_extra_that_cannot_be_loaded(two_rank_run: tuple) -> None:
    results, _, _ = two_rank_run
    for r in results:
        got = r["hardening"]["nested extra"]
        assert got["error"] is not None and got["error"][0] == "CheckpointArgumentError", got
        assert "extra['cfg'] is a dict" in got["message"] and "json.dumps" in got["message"]
        assert not got["written"]


def test_dense_optimizer_over_all_parameters_names_the_fused_tables(two_rank_run: tuple) -> None:
    results, _, _ = two_rank_run
    for r in results:
        got = r["hardening"]["all parameters"]
        assert got["error"] is not None and got["error"][0] == "ValueError", got
        assert "t_c0.weight" in got["message"] and "fused" in got["message"], got["message"]
        assert "dense_parameters(model)" in got["message"] and "cross-rank" not in got["message"]
