"""Tensor parallel, expert parallel and multi-mesh layouts on 4 gloo ranks: the math does not change.

torch's ``parallelize_module`` + ``fully_shard`` (and torchtitan's unflattened expert meshes) lay out
a tiny model with every kind of weight; each run is fed the same full gradients as one process and
must end at the same parameters (<= 1e-6 relative: preconditioning starts at step 4, once every
factor is full rank), with every rank allocating exactly the optimizer state the plan predicts and
the dry-run (meta device, fake process group, the same parallelization) prints.
"""

from __future__ import annotations

import pytest

from tests.support import parallel_scenarios as ps
from tests.support.dist_utils import run_ranks

EXPECTED = {
    "fsdp_tp": {"w_in.weight": "(_StridedShard(dim=0, sf=2), Shard(dim=0)) on ('fsdp', 'tp')",
                "w_out.weight": "(Shard(dim=0), Shard(dim=1)) on ('fsdp', 'tp')",
                "norm.weight": "(Shard(dim=0), Replicate()) on ('fsdp', 'tp')",
                "tok.weight": "(_StridedShard(dim=0, sf=2), Shard(dim=0)) on ('fsdp', 'tp')",
                "moe.w": "(Shard(dim=0),) on ('fsdp',)"},
    "hsdp_tp": {"w_out.weight": "(Replicate(), Shard(dim=0), Shard(dim=1)) on ('dp_replicate', 'fsdp', 'tp')"},
    "ep2": {"moe.w": "(_StridedShard(dim=0, sf=2), Shard(dim=0)) on ('efsdp', 'ep')",
            "w_in.weight": "(_StridedShard(dim=0, sf=2), Shard(dim=0)) on ('fsdp', 'tp')"},
    "ep4": {"moe.w": "(_StridedShard(dim=0, sf=4), Shard(dim=0)) on ('efsdp', 'ep')"},
}


@pytest.fixture(scope="module")
def results():
    refs = {variant: ps.reference(variant=variant) for variant in ps.VARIANTS}
    return run_ranks(4, ps.scenario_invariance, list(ps.LAYOUTS + ps.VARIANT_LAYOUTS), refs)


@pytest.mark.parametrize("layout", ps.LAYOUTS + ps.VARIANT_LAYOUTS)
def test_layout_matches_one_process_and_the_plan(results, layout):
    dry = ps.dryrun_state_bytes(layout)
    for rank, r in enumerate(results):
        out = r[layout]
        assert out["diff"] <= 1e-6, f"{layout} rank {rank}: max relative difference {out['diff']:.3g}"
        real, planned = out["bytes"]
        assert real == planned, f"{layout} rank {rank}: allocated {real} B of state, the plan says {planned} B"
        assert real == dry[rank], f"{layout} rank {rank}: allocated {real} B, the dry-run says {dry[rank]} B"
        assert out["owners"] == [0, 1, 2, 3], "every rank owns blocks"
    for name, placement in EXPECTED.get(ps.split_layout(layout)[0], {}).items():
        assert results[0][layout]["placements"][name] == placement
    # 4 experts x (8 x 6) are 4 blocks of their own, never one block of the flattened [4, 8, 6] tensor
    assert results[0][layout]["num_blocks"] == 14
    if "blocks" in results[0][layout]:    # the same blocks without the explicit expert group (direct use)
        grouped, direct = results[0][layout]["blocks"]
        assert sorted(direct) == sorted(grouped) and [b for b in direct if b.startswith("moe.w.")] == [
            f"moe.w.block_{i}" for i in range(4)]


def test_overlapped_waves_change_nothing_but_timing():
    import torch

    results = run_ranks(4, ps.scenario_overlap)
    for r in results:
        base = r[1][0]
        for chunks in (3, 8):
            params, waves, exposed = r[chunks]
            assert 1 < waves <= chunks and exposed >= 0.0   # waves with no block anywhere are dropped
            assert all(torch.equal(params[n], base[n]) for n in base), f"overlap_chunks={chunks} changed the result"


def test_block_waves_split_each_owners_blocks_evenly():
    from sharded_shampoo.config import PlanSettings
    from sharded_shampoo.planning.layout import MeshSpec, ParamSpec
    from sharded_shampoo.planning.plan import make_plan
    from sharded_shampoo.runtime.routing import block_waves

    import torch

    specs = [ParamSpec(f"w{i}", (64 + 8 * i, 32), torch.float32, True) for i in range(12)]
    plan = make_plan(specs, MeshSpec((2,)), PlanSettings(max_preconditioner_dim=32))
    waves = block_waves(plan, 4)
    for owner in (0, 1):
        mine = [b for b, o in enumerate(plan.owners) if o == owner]
        per_wave = [sum(plan.blocks[b].numel for b in mine if waves[b] == w) for w in range(4)]
        assert all(v > 0 for v in per_wave) and max(per_wave) <= 2.5 * min(per_wave), per_wave
    assert block_waves(plan, 1) == [0] * len(plan.blocks)
    with pytest.raises(ValueError, match="overlap_chunks"):
        from sharded_shampoo import ShardedShampoo
        ShardedShampoo([torch.nn.Parameter(torch.zeros(2))], overlap_chunks=0)


def test_save_on_fsdp_tp_resume_on_fsdp_and_one_process(tmp_path):
    """Resharding: a checkpoint of the FSDP x TP 2x2 run resumes on FSDP 4 and on one process, and
    both continue exactly like the uninterrupted run (<= 1e-6: the factors are full rank by then)."""
    root = str(tmp_path / "ckpt")
    uninterrupted = run_ranks(4, ps.scenario_save_tp, root)[0]
    on_fsdp = run_ranks(4, ps.scenario_resume, root, "fsdp")[0]
    alone = ps.resume_one_process(root)
    assert ps.max_rel_diff(on_fsdp, uninterrupted) <= 1e-6
    assert ps.max_rel_diff(alone, uninterrupted) <= 1e-6
    # and the uninterrupted run is the one-process trajectory
    assert ps.max_rel_diff(uninterrupted, ps.reference()) <= 1e-6
