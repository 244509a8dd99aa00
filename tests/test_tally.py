"""Per-rank tallies: the array tallies equal a block-by-block reference on random DTensor layouts."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

from sharded_shampoo._torch_compat import StridedShard
from sharded_shampoo.config import PlanSettings
from sharded_shampoo.planning.costs import BLOCK_STATE_KINDS, block_cost
from sharded_shampoo.planning.layout import (Layout, MeshSpec, ParamSpec, SubMesh, box_numel, dtype_itemsize,
                                             param_geometry, pick_source)
from sharded_shampoo.planning.plan import make_plan
from sharded_shampoo.planning.regions import RegionTable, pick_sources


def _placements(rng, mesh_shape, ndim):
    """Random placements that the planner accepts: plain shards, replicas, a strided shard before a plain one."""
    out, later = [], {}
    for i in reversed(range(len(mesh_shape))):
        if rng.random() < 0.3:
            out.append(Replicate())
            continue
        d = rng.randrange(ndim)
        sf = later.get(d, 1)
        out.append(StridedShard(d, split_factor=sf) if sf > 1 else Shard(d))
        later[d] = sf * mesh_shape[i]
    return tuple(reversed(out))


def _random_params(rng, mesh_shape):
    coords = tuple(itertools.product(*(range(s) for s in mesh_shape)))
    root = SubMesh(mesh_shape, coords)
    params = []
    for i in range(rng.randint(2, 7)):
        shape = tuple(rng.choice([1, 3, 5, 8, 12, 33, 40]) for _ in range(rng.choice([1, 2, 3])))
        kind = rng.choice(["layout", "layout", "sharded", "replicated"])
        if kind == "layout":
            params.append(ParamSpec(f"p{i}", shape, layout=Layout(root, _placements(rng, mesh_shape, len(shape)))))
        else:
            params.append(ParamSpec(f"p{i}", shape, rng.choice([torch.float32, torch.bfloat16]), kind == "sharded"))
    return params


def reference(plan):
    """Block by block, straight from the definitions: owned state/FLOPs and the exchanges of a step."""
    n = plan.mesh.world_size
    send, recv = [0] * n, [0] * n
    state = [dict.fromkeys(BLOCK_STATE_KINDS, 0) for _ in range(n)]
    blocks, load = [0] * n, [0.0] * n
    for blk, k, o in zip(plan.blocks, plan.block_param, plan.owners):
        s = plan.settings[k]
        g = param_geometry(plan.params[k], plan.mesh)
        cb = dtype_itemsize(s.comm_dtype)
        cost = block_cost(blk, s.preconditioner, s.grafting, s.beta1)
        for kind, v in cost.state_bytes.items():
            state[o][kind] += v
        blocks[o] += 1
        load[o] += cost.balance_cost(s.precondition_frequency)
        for rid, box in g.pieces(blk.box):
            e = box_numel(box) * cb
            if rid != g.rank_region[o]:
                send[pick_source(g.holders[rid], o, n)] += e       # gather
                recv[o] += e
            for h in g.holders[rid]:
                if h != o:                                         # update scatter
                    send[o] += e
                    recv[h] += e
    return send, recv, state, blocks, load


@pytest.mark.parametrize("seed", range(12))
def test_tallies_equal_block_by_block_reference(seed):
    rng = random.Random(seed)
    mesh_shape = tuple(rng.choice([1, 2, 3]) for _ in range(rng.choice([1, 2, 3])))
    params = _random_params(rng, mesh_shape)
    settings = PlanSettings(max_preconditioner_dim=rng.choice([4, 8, 16]),
                            comm_dtype=rng.choice([torch.float32, torch.bfloat16]), momentum=rng.choice([0.0, 0.9]))
    plan = make_plan(params, MeshSpec(mesh_shape), settings)
    send, recv, state, blocks, load = reference(plan)
    for r in plan.ranks:
        assert (r.comm_send_bytes, r.comm_recv_bytes) == (send[r.rank], recv[r.rank])
        assert {k: r.state_bytes_by_kind[k] for k in BLOCK_STATE_KINDS} == state[r.rank]
        assert r.num_blocks == blocks[r.rank]
        assert r.load == pytest.approx(load[r.rank], rel=1e-12)
    assert sum(send) == sum(recv) == sum(r.comm_bytes_per_step for r in plan.ranks) // 2
    m = plan.mesh
    assert [(r.coordinate, r.replica, r.shard) for r in plan.ranks] == \
        [(m.coordinate(i), m.replica_index(i), m.shard_index(i)) for i in range(m.world_size)]


@pytest.mark.parametrize("seed", range(6))
def test_pick_sources_equals_pick_source(seed):
    rng = random.Random(seed)
    n = rng.choice([6, 12, 64])
    groups = [tuple(sorted(rng.sample(range(n), rng.randint(1, min(n, 9))))) for _ in range(20)]
    # holder sets of any shape (regular zones or not): a table of one geometry with its holders replaced
    table = RegionTable([param_geometry(ParamSpec("w", (2,), sharded=False), MeshSpec((n,)))], n)
    table.holder_tuples = groups
    table.holder_count = np.array([len(g) for g in groups], dtype=np.int64)
    table.holder_offset = np.concatenate([[0], np.cumsum(table.holder_count)]).astype(np.int64)
    table.holders_flat = np.array([r for g in groups for r in g], dtype=np.int64)
    region = np.array([rng.randrange(len(groups)) for _ in range(300)], dtype=np.int64)
    owner = np.array([rng.randrange(n) for _ in range(300)], dtype=np.int64)
    got = pick_sources(table, region, owner)
    assert got.tolist() == [pick_source(groups[g], o, n) for g, o in zip(region.tolist(), owner.tolist())]


def test_region_table_numbers_regions_of_shared_geometries_once():
    mesh = MeshSpec((2, 2))
    a = ParamSpec("a", (8, 4), sharded=True)
    b = ParamSpec("b", (8, 4), sharded=True)              # same shape and layout: the same geometry object
    ga, gb = param_geometry(a, mesh), param_geometry(b, mesh)
    assert ga is gb
    table = RegionTable([ga, gb], mesh.world_size)
    assert len(table.codes) == 1 and table.numel.tolist() == [16, 16]
    assert table.rank_region[0].tolist() == [0, 1, 0, 1]
    assert table.holder_tuples == [(0, 2), (1, 3)]
