"""Blocking rules: squeeze, merge from the last dim backwards (the reference rule), split."""

from __future__ import annotations

import math

import pytest

from sharded_shampoo import RootInverseShampoo, plan_blocks
from sharded_shampoo.planning.blocking import merged_shape
from sharded_shampoo.planning.layout import MeshSpec, ParamSpec, box_numel, held_region, intersect


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
def test_fsdp_shards_are_whole_rows_and_blocks_tile_them(shape, world):
    """Shard(0) regions tile dim 0 (torch.chunk sizes, empty tails allowed) and take every other dim whole;
    every block is a box, the boxes tile the parameter, and each block's elements are split exactly
    among the regions."""
    spec = ParamSpec("p", shape, sharded=True)
    mesh = MeshSpec((world,))
    covered = 0
    regions = []
    for r in range(world):
        region = held_region(spec, mesh, r)
        if region is None:
            continue
        assert region[0][0] == covered and region[1:] == tuple((0, d) for d in shape[1:])
        covered = region[0][1]
        regions.append(region)
    assert covered == shape[0]
    blocks = plan_blocks([("p", shape)], 16, RootInverseShampoo())
    assert sum(box_numel(b.box) for b in blocks) == math.prod(shape)
    for b in blocks:
        assert box_numel(b.box) == b.numel == math.prod(b.box_shape)
        assert sum(box_numel(c) for reg in regions if (c := intersect(b.box, reg)) is not None) == b.numel


def test_batch_dims_give_each_expert_its_own_blocks():
    from sharded_shampoo import BlockingConfig

    blocks = plan_blocks([("experts.w1", (4, 6, 10))], 8, RootInverseShampoo(), BlockingConfig(batch_dims=1))
    # per expert: 6 x 10 -> rows 6, cols split 8 + 2: 2 blocks each, 8 in all, never the flattened tensor
    assert len(blocks) == 8
    assert [b.shape for b in blocks[:2]] == [(6, 8), (6, 2)]
    assert [b.box for b in blocks[:3]] == [((0, 1), (0, 6), (0, 8)), ((0, 1), (0, 6), (8, 10)),
                                           ((1, 2), (0, 6), (0, 8))]
    assert all(b.exponents == (0.25, 0.25) for b in blocks)
    with pytest.raises(ValueError, match="batch_dims"):
        plan_blocks([("b", (7,))], 8, RootInverseShampoo(), BlockingConfig(batch_dims=1))
    with pytest.raises(ValueError, match="batch_dims"):
        BlockingConfig(batch_dims=-1)


@pytest.mark.parametrize("shape, limit, batch", [((10, 6), 4, 0), ((33, 12), 8, 0), ((5, 4, 6), 4, 0), ((7, 1, 3, 3), 2, 0),
                                                  ((3, 40, 5), 16, 1), ((4, 6, 10), 8, 1), ((2, 3, 9, 9), 4, 2), ((), 8, 0),
                                                  ((0, 3), 4, 0)])
def test_grid_is_the_block_list(shape, limit, batch):
    """A BlockGrid builds exactly plan_blocks' blocks, and its shape classes group equal block shapes."""
    from sharded_shampoo import BlockingConfig
    from sharded_shampoo.planning.blocking import block_grid
    from sharded_shampoo.planning.sequences import IndexedList, LazyBlocks

    cfg = BlockingConfig(batch_dims=batch)
    blocks = plan_blocks([("p", shape)], limit, RootInverseShampoo(), cfg)
    grid = block_grid("p", shape, limit, RootInverseShampoo(), cfg)
    assert grid.num_blocks == len(blocks)
    assert [grid.block(i) for i in range(grid.num_blocks)] == blocks
    firsts, classes = grid.shape_classes()
    assert [int(classes[f]) for f in firsts] == list(range(len(firsts)))
    assert len({b.shape for b in blocks}) == len(firsts)
    assert all(blocks[i].shape == blocks[firsts[c]].shape for i, c in enumerate(classes.tolist()))
    lazy = LazyBlocks([grid, grid], [0, len(blocks), 2 * len(blocks)])
    assert len(lazy) == 2 * len(blocks) and list(lazy)[:len(blocks)] == blocks and lazy[-1:] == blocks[-1:]
    if blocks:
        assert lazy[len(blocks)] is lazy[len(blocks)]             # built once, then kept
    with pytest.raises(IndexError):
        lazy[2 * len(blocks)]
    indexed = IndexedList(["a", "b"], classes % 2)
    assert list(indexed) == [["a", "b"][c % 2] for c in classes.tolist()] and indexed == list(indexed)
