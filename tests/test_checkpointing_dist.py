"""Multi-process DCP checkpoints: resharding across world sizes and meshes, async and killed saves.

Four launches (4, 2, 3 and 2 ranks) share one directory of checkpoints; every resumed run is
compared with the uninterrupted single-process run after 10 more steps (fp32: <= 1e-6).
"""

from __future__ import annotations

import glob
import os

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from tests.support import ckpt_scenarios as cs
from tests.support.dist_utils import run_ranks
from sharded_shampoo.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint

BOUND = 1e-6


@pytest.fixture(scope="module")
def refs() -> dict[str, dict]:
    out = {c: cs.reference(c, cs.END)[0] for c in ("root_inverse", "eigen_corrected", "kl", "eigendecomposed",
                                                   "eigendecomposed_kl", *cs.STATELESS_KINDS)}
    out["packing"] = cs.reference("root_inverse", cs.END, **cs.well_conditioned(True))[0]
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("ckpts"))


@pytest.fixture(scope="module")
def four(root: str, refs: dict) -> list[dict]:
    return run_ranks(4, cs.scenario_four, root, refs)


@pytest.fixture(scope="module")
def two(root: str, refs: dict, four: list[dict]) -> list[dict]:
    # D: written by a single process without any process group (1 -> 2)
    model, opt = cs.build("single", "eigen_corrected")
    cs.feed(model, opt, 0, cs.SAVE_AT)
    save_checkpoint(os.path.join(root, "D"), cs.SAVE_AT, model, opt, extra={"step": cs.SAVE_AT})
    # E: full (unpacked) matrices, the layout of every checkpoint written before packing (1 -> 2, packed)
    model, opt = cs.build("single", "root_inverse", **cs.well_conditioned(False))
    cs.feed(model, opt, 0, cs.SAVE_AT)
    save_checkpoint(os.path.join(root, "E"), cs.SAVE_AT, model, opt, extra={"step": cs.SAVE_AT})
    return run_ranks(2, cs.scenario_two, root, refs)


def test_hsdp_2x2_to_fsdp_4(four: list[dict]) -> None:
    diffs = [r["hsdp2x2->fsdp4"] for r in four]
    assert max(diffs) <= BOUND, diffs


def test_each_rank_writes_only_its_blocks_and_shards(root: str, four: list[dict]) -> None:
    owners = four[0]["owners_A"]
    assert all(r["owners_A"] == owners for r in four)  # the plan is the same on every rank
    md = FileSystemReader(latest_checkpoint(os.path.join(root, "A"))).read_metadata()
    files: dict[str, set[str]] = {}
    for index, info in md.storage_data.items():
        files.setdefault(index.fqn, set()).add(info.relative_path)
    block_keys = [k for k in md.state_dict_metadata if ".block_" in k]
    assert block_keys and not any("rank" in k or "world" in k for k in md.state_dict_metadata)
    for key in block_keys:
        block_id = key.split("app.optim.state.", 1)[1].rsplit(".", 1)[0]
        assert files[key] == {f"__{owners[block_id]}_0.distcp"}, (key, files[key])
    # every owned block appears exactly once in the checkpoint
    assert {k.split("app.optim.state.", 1)[1].rsplit(".", 1)[0] for k in block_keys} == set(owners)
    # momentum is one global tensor assembled from 4 row shards written by their holders
    mom = md.state_dict_metadata["app.optim.state.inp.weight.momentum"]
    assert tuple(mom.size) == (33, 12) and len(mom.chunks) == 4
    assert files["app.optim.state.inp.weight.momentum"] == {f"__{r}_0.distcp" for r in range(4)}
    # HSDP: the replicated shards of momentum are written once, not once per replica
    md_b = FileSystemReader(latest_checkpoint(os.path.join(root, "B"))).read_metadata()
    assert len(md_b.state_dict_metadata["app.optim.state.inp.weight.momentum"].chunks) == 2


def test_rank_without_blocks_get_state_dict_and_init_step(four: list[dict]) -> None:
    owned = [r["owned_blocks"] for r in four]
    assert sum(owned) == 1 and owned.count(0) == 3, owned
    assert all(r["small_roundtrip_unchanged"] for r in four)
    assert all(r["init_step_flag"] and r["init_step_unchanged"] for r in four)


@pytest.mark.parametrize("how", ["pair", "raw_nested", "raw_flat"])
def test_fsdp_4_to_2(two: list[dict], how: str) -> None:
    diffs = [r[f"fsdp4->fsdp2 {how}"] for r in two]
    assert max(diffs) <= BOUND, diffs


def test_single_process_to_fsdp_2(two: list[dict]) -> None:
    diffs = [r["single->fsdp2"] for r in two]
    assert max(diffs) <= BOUND, diffs


def test_full_matrices_single_process_to_packed_fsdp_2(two: list[dict]) -> None:
    """A checkpoint with full (d, d) factors and roots (symmetric_packing=False: the layout before packing)
    resumes on 2 ranks with packed storage, equal to the uninterrupted packed single-process run."""
    diffs = [r["single full->fsdp2 packed"] for r in two]
    assert max(diffs) <= BOUND, diffs


def test_async_save_stages_then_publishes_on_wait(two: list[dict]) -> None:
    for r in two:
        assert r["latest_before_wait"] is None
        assert r["latest_after_wait"] == "step_10"
        assert r["async_snapshot_equal"]


def test_incompatible_load_fails_on_every_rank_before_touching_state(two: list[dict]) -> None:
    for r in two:
        e = r["errors"]
        assert e["max_dim"] is not None and "max_preconditioner_dim differs (checkpoint 16, optimizer 8)" in e["max_dim"]
        assert e["kind"] is not None and "preconditioner differs" in e["kind"] and "EigenvalueCorrected" in e["kind"]
        for case in ("max_dim", "kind"):
            assert e[case + " dcp"] is not None and "shampoo_plan_" in e[case + " dcp"]
            assert e[case + " unchanged"]


def test_fsdp_2_to_3_from_async_checkpoint(root: str, refs: dict, two: list[dict]) -> None:
    three = run_ranks(3, cs.scenario_three, root, refs)
    for key in ("fsdp2->fsdp3", "eigendecomposed fsdp2->fsdp3"):
        diffs = [r[key] for r in three]
        assert max(diffs) <= BOUND, (key, diffs)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_eigendecomposed_fsdp_2_to_single_process(root: str, refs: dict, two: list[dict]) -> None:
    """Eigendecomposed Shampoo's eigenvectors and eigenvalues saved by 2 FSDP ranks resume on one process."""
    assert cs.resume_diff("single", "eigendecomposed", (1,), os.path.join(root, "EIG"), refs["eigendecomposed"]) \
        <= BOUND


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_eigendecomposed_kl_fsdp_2_to_single_process(root: str, refs: dict, two: list[dict]) -> None:
    """Eigendecomposed KL-Shampoo saved by 2 FSDP ranks resumes on one process and continues exactly."""
    assert cs.resume_diff("single", "eigendecomposed_kl", (1,), os.path.join(root, "EIGKL"),
                          refs["eigendecomposed_kl"]) <= BOUND


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_fsdp_4_to_single_process(root: str, refs: dict, four: list[dict]) -> None:
    assert cs.resume_diff("single", "root_inverse", (1,), os.path.join(root, "A"), refs["root_inverse"]) <= BOUND
    assert cs.resume_diff("single", "root_inverse", (1,), os.path.join(root, "A_raw_nested"), refs["root_inverse"],
                          how="raw_nested") <= BOUND


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_kl_shampoo_fsdp_2_to_single_process(root: str, refs: dict, two: list[dict]) -> None:
    """KL-Shampoo saved by 2 FSDP ranks resumes on one process and continues like the uninterrupted run."""
    assert cs.resume_diff("single", "kl", (1,), os.path.join(root, "K"), refs["kl"]) <= BOUND


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("config", cs.STATELESS_KINDS)
def test_spectral_and_sign_fsdp_2_to_single_process(root: str, refs: dict, two: list[dict], config: str) -> None:
    # spectral descent (Newton-Schulz, biases on AdaGrad grafting) and sign descent (with momentum):
    # filtered gradient, grafting and momentum saved by 2 FSDP ranks, resumed by one process
    path = os.path.join(root, f"KIND_{config}")
    assert cs.resume_diff("single", config, (1,), path, refs[config]) <= BOUND


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("config,mode,how", cs.AVERAGING_CASES)
def test_iterate_averaging_fsdp_2_to_single_process(root: str, two: list[dict], config: str, mode: str,
                                                    how: str) -> None:
    # saved by 2 FSDP ranks in train or eval mode (z is a DTensor, train_mode / lr_sum ride in the param groups)
    ref = cs.averaging_reference(config, mode)
    assert cs.resume_averaging("single", (1,), root, config, mode, how, ref) <= BOUND


def test_killed_save_leaves_previous_checkpoint_and_pointer(tmp_path) -> None:
    root = str(tmp_path)
    with pytest.raises(torch.multiprocessing.ProcessExitedException, match="exit code 17"):   # rank 1's os._exit(17)
        run_ranks(2, cs.scenario_killed_save, root)
    assert open(os.path.join(root, "latest")).read().strip() == "step_5"
    (partial,) = glob.glob(os.path.join(root, "step_10.tmp-*"))      # the interrupted save ...
    assert not os.path.exists(os.path.join(root, "step_10"))         # ... was never published
    assert not os.path.exists(os.path.join(partial, ".metadata"))
    # the previous checkpoint loads (here on 1 process) and is exactly the 5-step state
    ref_params, ref_opt = cs.reference("root_inverse", 5)
    model, opt = cs.build("single", "root_inverse")
    assert load_checkpoint(root, model, opt, extra={"step": -1}) == {"step": 5}
    # 2 ranks vs 1 process: float rounding only (the step is world-size invariant up to it)
    assert cs.close(cs.opt_snapshot(opt), cs.opt_snapshot(ref_opt), tol=1e-4)
    assert cs.close(cs.full_params(model), ref_params, tol=1e-5)
    # saving step 10 again removes the dead save's partial directory (its writer's lock died with
    # it) and moves the pointer
    cs.feed(model, opt, 5, 10)
    save_checkpoint(root, 10, model, opt, extra={"step": 10})
    assert open(os.path.join(root, "latest")).read().strip() == "step_10"
    assert not glob.glob(os.path.join(root, "step_10.tmp*"))
