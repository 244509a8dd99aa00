"""The deciding stages of a plan: blocks -> prices -> geometry -> locality -> owners. Pure.

Split from ``plan.py`` (which adds the per-rank report) so the memory-cap advice can re-run
exactly these stages under candidate settings without building reports.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PlanSettings
from .balance import assign_owners
from .blocking import Block, plan_blocks
from .costs import BlockCost, CostModel, block_cost
from .layout import MeshSpec, ParamGeometry, ParamSpec, box_numel, param_geometry

#: What a block's owner-to-be finds where: ``[(region id, elements of the block in that region)]``.
Coverage = tuple[tuple[tuple[int, ...], int], ...]


@dataclass
class Balanced:
    """Everything decided about a plan before reporting: blocks, prices, geometry, owners."""

    blocks: list[Block]
    block_param: list[int]
    costs: list[BlockCost]
    loads: list[float]
    geometries: list[ParamGeometry]
    coverage: list[Coverage]
    owners: list[int]
    param_bytes: list[int]           # per rank: parameter bytes held (= gradient bytes)
    momentum_bytes: list[int]        # per rank: momentum bytes (local shards)
    averaging_bytes: list[int]       # per rank: GPA / Schedule-Free z bytes (local shards)


def plan_all_blocks(params: list[ParamSpec], per_param: list[PlanSettings]) -> tuple[list[Block], list[int]]:
    """Blocks of every parameter via ``plan_blocks``, one call per run of equal settings."""
    blocks: list[Block] = []
    block_param: list[int] = []
    start = 0
    while start < len(params):
        end = start
        while end < len(params) and per_param[end] is per_param[start]:
            end += 1
        s = per_param[start]
        run = plan_blocks([(p.name, p.shape) for p in params[start:end]], s.max_preconditioner_dim,
                          s.preconditioner, s.blocking)
        name_to_index = {params[k].name: k for k in range(start, end)}
        blocks.extend(run)
        block_param.extend(name_to_index[b.param_name] for b in run)
        start = end
    return blocks, block_param


def price_blocks(blocks: list[Block], block_param: list[int], per_param: list[PlanSettings],
                 cost_model: CostModel) -> tuple[list[BlockCost], list[float]]:
    """Cost and balance weight of every block (cached: most blocks share a handful of shapes)."""
    cache: dict[tuple, tuple[BlockCost, float]] = {}
    costs: list[BlockCost] = []
    loads: list[float] = []
    for b, k in zip(blocks, block_param):
        s = per_param[k]
        key = (b.shape, b.exponents, id(s))
        hit = cache.get(key)
        if hit is None:
            c = block_cost(b, s.preconditioner, s.grafting, s.beta1, cost_model)
            hit = cache[key] = (c, c.balance_cost(s.precondition_frequency))
        costs.append(hit[0])
        loads.append(hit[1])
    return costs, loads


def base_memory(params: list[ParamSpec], per_param: list[PlanSettings], geoms: list[ParamGeometry],
                mesh: MeshSpec) -> tuple[list[int], list[int], list[int]]:
    """Per rank: bytes of parameters held (= gradients), of momentum and of z (local shards, param dtype)."""
    n = mesh.world_size
    weights: dict[int, list] = {}           # id(geometry) -> [geometry, bytes/elem of params, momentum, z]
    for p, s, g in zip(params, per_param, geoms):
        w = weights.setdefault(id(g), [g, 0, 0, 0])
        w[1] += p.itemsize
        if s.momentum > 0:
            w[2] += p.itemsize
        if s.primal_averaging:
            w[3] += p.itemsize
    param_bytes = [0] * n
    momentum = [0] * n
    averaging = [0] * n
    for g, pb, mb, zb in weights.values():
        sizes = {rid: box_numel(g.region(rid)) for rid in g.holders}
        for r, rid in enumerate(g.rank_region):
            if rid is not None:
                param_bytes[r] += sizes[rid] * pb
                momentum[r] += sizes[rid] * mb
                averaging[r] += sizes[rid] * zb
    return param_bytes, momentum, averaging


def resident_bytes(param_bytes: list[int], momentum: list[int], averaging: list[int]) -> list[int]:
    """Per rank, what it holds before any Shampoo state: parameters, their gradients, momentum, z."""
    return [2 * pb + mb + zb for pb, mb, zb in zip(param_bytes, momentum, averaging)]


def block_coverage(blocks: list[Block], block_param: list[int], geoms: list[ParamGeometry]) -> list[Coverage]:
    """For every block, the regions holding parts of it and how many elements each holds."""
    cache: dict[tuple[int, tuple], Coverage] = {}
    out: list[Coverage] = []
    for b, k in zip(blocks, block_param):
        g = geoms[k]
        key = (id(g), b.box)
        cov = cache.get(key)
        if cov is None:
            cov = cache[key] = tuple((rid, box_numel(piece)) for rid, piece in g.pieces(b.box))
        out.append(cov)
    return out


def holder_locality(coverage: list[Coverage], block_param: list[int], geoms: list[ParamGeometry],
                    world_size: int) -> tuple[list[tuple[int, ...]], list[dict[int, int]]]:
    """Holder groups (distinct sets of ranks holding one region) and, per block, elements per group.

    A region every rank holds (a replicated parameter) expresses no preference.
    """
    group_ids: dict[tuple[int, ...], int] = {}
    groups: list[tuple[int, ...]] = []
    cache: dict[tuple[int, int], dict[int, int]] = {}
    out: list[dict[int, int]] = []
    for cov, k in zip(coverage, block_param):
        g = geoms[k]
        key = (id(g), id(cov))
        pref = cache.get(key)
        if pref is None:
            pref = {}
            for rid, elems in cov:
                holders = g.holders[rid]
                if len(holders) == world_size:
                    continue
                gid = group_ids.get(holders)
                if gid is None:
                    gid = group_ids[holders] = len(groups)
                    groups.append(holders)
                pref[gid] = pref.get(gid, 0) + elems
            cache[key] = pref
        out.append(pref)
    return groups, out


def balance_blocks(params: list[ParamSpec], mesh: MeshSpec, per_param: list[PlanSettings], cap: int | None,
                   cost_model: CostModel, tolerance: float) -> Balanced:
    """Run the deciding stages; raises ``BlockDoesNotFitError`` when a block fits no rank under ``cap``."""
    blocks, block_param = plan_all_blocks(params, per_param)
    costs, loads = price_blocks(blocks, block_param, per_param, cost_model)
    geoms = [param_geometry(p, mesh) for p in params]
    param_bytes, momentum, averaging = base_memory(params, per_param, geoms, mesh)
    coverage = block_coverage(blocks, block_param, geoms)
    groups, prefs = holder_locality(coverage, block_param, geoms, mesh.world_size)
    base = resident_bytes(param_bytes, momentum, averaging)
    owners = assign_owners(loads, [b.block_id for b in blocks], mesh.world_size, locality=prefs.__getitem__,
                           memory_bytes=[c.total_state_bytes for c in costs], memory_cap_bytes=cap,
                           base_memory_bytes=base, tolerance=tolerance, holder_groups=groups)
    return Balanced(blocks, block_param, costs, loads, geoms, coverage, owners, param_bytes, momentum, averaging)
