"""Regions of the global tensor per rank: the closed-form shard arithmetic equals torch's own.

``_compute_local_shape_and_global_offset`` is what DTensor uses to place local shards; it
materialises index tensors, so the planner computes the same regions in closed form. Here both
are compared on random layouts: uneven and empty shards, several mesh dims on one tensor dim,
FSDP2's ``_StridedShard`` in front of tensor parallelism, 1-D to 3-D meshes.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

from sharded_shampoo._torch_compat import StridedShard, local_shape_and_offset_at

from sharded_shampoo.planning.layout import (Layout, MeshSpec, ParamSpec, SubMesh, box_numel, param_geometry,
                                             pick_source)


def _coords(shape):
    return tuple(itertools.product(*(range(s) for s in shape)))


def _random_layout(rng: random.Random, ndim: int):
    mesh_shape = tuple(rng.choice([1, 2, 3, 4]) for _ in range(rng.choice([1, 2, 3])))
    shape = tuple(rng.choice([1, 2, 3, 5, 7, 8, 12, 33]) for _ in range(ndim))
    placements = []
    later = {}      # tensor dim -> product of the mesh sizes that shard it later (the split factor)
    kinds = [rng.choice(["R", "S", "S"]) for _ in mesh_shape]
    dims = [rng.randrange(ndim) for _ in mesh_shape]
    for i in reversed(range(len(mesh_shape))):
        if kinds[i] == "R":
            placements.append(Replicate())
            continue
        d = dims[i]
        sf = later.get(d, 1)
        placements.append(StridedShard(d, split_factor=sf) if sf > 1 else Shard(d))
        later[d] = sf * mesh_shape[i]
    return shape, mesh_shape, tuple(reversed(placements))


@pytest.mark.parametrize("seed", range(40))
def test_regions_equal_torch_offsets(seed):
    rng = random.Random(seed)
    shape, mesh_shape, placements = _random_layout(rng, rng.choice([1, 2, 3]))
    coords = _coords(mesh_shape)
    spec = ParamSpec("p", shape, layout=Layout(SubMesh(mesh_shape, coords), placements))
    geom = param_geometry(spec, MeshSpec((len(coords),)))
    for r, c in enumerate(coords):
        local, offset = local_shape_and_offset_at(shape, mesh_shape, c, placements)
        held = geom.held(r)
        if 0 in local:
            assert held is None, (placements, c)
            continue
        assert held == tuple((o, o + n) for o, n in zip(offset, local)), (shape, mesh_shape, placements, c)
    # the distinct regions tile the tensor
    assert sum(box_numel(geom.region(rid)) for rid in geom.holders) == torch.Size(shape).numel()


def test_strided_after_plain_shard_is_rejected():
    mesh = (2, 2)
    layout = Layout(SubMesh(mesh, _coords(mesh)), (Shard(0), StridedShard(0, split_factor=2)))
    with pytest.raises(ValueError, match=r"'w'.*non-contiguous"):
        param_geometry(ParamSpec("w", (8, 4), layout=layout), MeshSpec((4,)))


def test_fsdp_tp_colwise_regions_by_hand():
    # (StridedShard(0, sf=2), Shard(0)) on (fsdp=2, tp=2), 10 rows: tp chunks rows 0-4 / 5-9, fsdp chunks
    # each into 3 + 2 rows, so rank (f, t) holds rows [5t + 3f, 5t + 3f + (3 if f == 0 else 2)).
    coords = _coords((2, 2))
    layout = Layout(SubMesh((2, 2), coords), (StridedShard(0, split_factor=2), Shard(0)))
    geom = param_geometry(ParamSpec("w", (10, 6), layout=layout), MeshSpec((2, 2)))
    assert [geom.held(r) for r in range(4)] == [((0, 3), (0, 6)), ((5, 8), (0, 6)), ((3, 5), (0, 6)),
                                                ((8, 10), (0, 6))]


def test_pick_source_prefers_the_owners_replica():
    # HSDP 4 x 3: region of shard 1 is held by 1, 4, 7, 10; an owner in replica 2 takes it from 7
    assert pick_source((1, 4, 7, 10), 8, 12) == 7
    assert pick_source((1, 4, 7, 10), 6, 12) == 7
    assert pick_source((5,), 0, 12) == 5
    # holders that do not split the ranks into zones: the nearest holder, ties to the lower rank
    assert pick_source((0, 1), 3, 4) == 1
