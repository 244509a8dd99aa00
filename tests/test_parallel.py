"""Tensor parallel, expert parallel and multi-mesh layouts on 4 gloo ranks: the math does not change.

torch's ``parallelize_module`` + ``fully_shard`` (and torchtitan's unflattened expert meshes) lay out
a tiny model with every kind of weight; each run is fed the same full gradients as one process and
must end at the same parameters (<= 1e-6 relative: preconditioning starts at step 4, once every
factor is full rank), with every rank allocating exactly the optimizer state the plan predicts and
the dry-run (meta device, fake process group, the same parallelization) prints.
"""

from __future__ import annotations

import pytest

import parallel_scenarios as ps
from dist_utils import run_ranks

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
    return run_ranks(4, ps.scenario_invariance, list(ps.LAYOUTS), ps.reference())


@pytest.mark.parametrize("layout", ps.LAYOUTS)
def test_layout_matches_one_process_and_the_plan(results, layout):
    dry = ps.dryrun_state_bytes(layout)
    for rank, r in enumerate(results):
        out = r[layout]
        assert out["diff"] <= 1e-6, f"{layout} rank {rank}: max relative difference {out['diff']:.3g}"
        real, planned = out["bytes"]
        assert real == planned, f"{layout} rank {rank}: allocated {real} B of state, the plan says {planned} B"
        assert real == dry[rank], f"{layout} rank {rank}: allocated {real} B, the dry-run says {dry[rank]} B"
        assert out["owners"] == [0, 1, 2, 3], "every rank owns blocks"
    for name, placement in EXPECTED.get(layout, {}).items():
        assert results[0][layout]["placements"][name] == placement
    # 4 experts x (8 x 6) are 4 blocks of their own, never one block of the flattened [4, 8, 6] tensor
    assert results[0][layout]["num_blocks"] == 14
