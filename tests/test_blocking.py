"""Blocking rules: squeeze, merge from the last dim backwards (the reference rule), split."""

from __future__ import annotations

import math

import pytest

from sharded_shampoo import RootInverseShampoo, plan_blocks
from sharded_shampoo.planning.blocking import merged_shape
from sharded_shampoo.planning.layout import MeshSpec, ParamSpec, held_merged_rows


@pytest.mark.parametrize("shape, limit, expected", [
    ((8, 64, 16), 1024, (8, 1024)),          # merging starts at the last dim
    ((32, 3, 64, 64), 1024, (32, 192, 64)),
    ((32, 3, 64, 64), 8192, (96, 4096)),
    ((4, 3, 5), 15, (4, 15)),
    ((2, 1, 3, 4), 6, (6, 4)),               # squeeze first
    ((1, 1), 8, (1,)),
    ((), 8, (1,)),
    ((2048,), 1024, (2048,)),                # too large to merge: split later
])
def test_merged_shape(shape, limit, expected):
    assert merged_shape(shape, limit) == expected


def test_split_into_row_major_blocks():
    blocks = plan_blocks([("w", (10, 6))], 4, RootInverseShampoo())
    assert [b.block_id for b in blocks] == [f"w.block_{i}" for i in range(6)]
    assert [b.ranges for b in blocks][:3] == [((0, 4), (0, 4)), ((0, 4), (4, 6)), ((4, 8), (0, 4))]
    assert sum(b.numel for b in blocks) == 60


@pytest.mark.parametrize("shape", [(33, 12), (5, 4, 6), (7, 1, 3, 3), (3, 40), (64, 8, 2)])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_fsdp_shards_are_whole_merged_rows(shape, world):
    """Every Shard(0) shard maps to a contiguous, whole range of merged-dim-0 rows."""
    spec = ParamSpec("p", shape, sharded=True)
    merged = merged_shape(shape, 16)
    mesh = MeshSpec((world,))
    covered = 0
    for r in range(world):
        a, b = held_merged_rows(spec, merged, r, mesh)
        assert a == covered
        covered = b
    assert covered == merged[0] and math.prod(merged) == math.prod(shape)
