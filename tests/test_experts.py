"""Which parameters are MoE expert weights (planning/experts.py): by name, and by expert-parallel layout."""

from __future__ import annotations

import dataclasses

import pytest
from torch.distributed.tensor import Replicate, Shard

from sharded_shampoo.config import BlockingConfig, PlanSettings
from sharded_shampoo.planning.blocking import plan_blocks
from sharded_shampoo.planning.experts import expert_parallel_sharded, with_expert_blocks
from sharded_shampoo.planning.layout import Layout, ParamSpec, SubMesh


def _spec(shape: tuple[int, ...], names: tuple[str, ...], placements: tuple) -> ParamSpec:
    mesh = SubMesh((2, 2), ((0, 0), (0, 1), (1, 0), (1, 1)), names)
    return ParamSpec("moe.w", shape, layout=Layout(mesh, placements))


@pytest.mark.parametrize("ndim, names, placements, expected", [
    (3, ("efsdp", "ep"), (Shard(0), Shard(0)), True),
    (3, ("efsdp", "ep"), (Shard(1), Shard(0)), True),       # torchtitan's Shard(1) under FSDP, experts over ep
    (3, ("efsdp", "ep"), (Shard(0), Replicate()), False),   # not sharded over ep
    (3, ("fsdp", "tp"), (Shard(0), Shard(0)), False),       # no expert-parallel dim
    (2, ("efsdp", "ep"), (Shard(0), Shard(0)), False),      # not a stack of matrices
    (3, None, (Shard(0), Shard(0)), False),
])
def test_expert_parallel_sharded(ndim: int, names: tuple | None, placements: tuple, expected: bool) -> None:
    assert expert_parallel_sharded(ndim, names, placements) is expected


def test_parameters_sharded_over_ep_get_per_expert_blocks_unless_the_group_says() -> None:
    """Default: one block set per expert; a group's own batch_dims is kept; other parameters unchanged."""
    base = PlanSettings(max_preconditioner_dim=8)
    experts = _spec((4, 8, 6), ("efsdp", "ep"), (Shard(0), Shard(0)))
    per_expert = with_expert_blocks(experts, base)
    assert per_expert.blocking.batch_dims == 1
    assert [b.block_id for b in plan_blocks([("moe.w", (4, 8, 6))], 8, base.preconditioner,
                                                         per_expert.blocking)] == [
        f"moe.w.block_{i}" for i in range(4)]                         # 4 experts, one 8 x 6 block each
    own = dataclasses.replace(base, blocking=BlockingConfig(batch_dims=2))
    assert with_expert_blocks(experts, own) is own
    dense = _spec((4, 8, 6), ("fsdp", "tp"), (Shard(0), Shard(0)))
    assert with_expert_blocks(dense, base) is base
    assert with_expert_blocks(ParamSpec("w", (4, 8, 6)), base) is base
