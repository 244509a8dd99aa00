"""The deciding stages of a plan: blocks -> prices -> geometry -> locality -> owners. Pure.

Split from ``plan.py`` (which adds the per-rank report) so the memory-cap advice can re-run
exactly these stages under candidate settings without building reports.

Everything is per parameter grid and per distinct value, with arrays per block: a block's
price depends only on its shape (a grid has at most ``2 ** order`` of them), and what its
owner-to-be finds where (its *cover*: the regions holding parts of it, ``covers.py``) only on its
box and the parameter's geometry, which the layers of a transformer share. So a 405B model's
391,120 blocks cost 3 prices and ~4,000 covers of Python work, and the rest is numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..config import PlanSettings
from .blocking import BlockGrid, block_grid, check_blocking_inputs
from .balance import BlockDoesNotFitError, check_cap_and_tolerance
from .class_balance import ClassBalanceError, Preferences, balance_classes
from ..compute.kinds.state import index_bytes
from .costs import SALT_BYTES_PER_BLOCK, BlockCost, CostModel, block_cost
from .covers import CoverTable, cover_table, grid_kind
from .layout import MeshSpec, ParamGeometry, ParamSpec, dtype_itemsize, param_geometry
from .regions import RegionTable

@dataclass
class Balanced:
    """Everything decided about a plan before reporting: blocks, prices, geometry, owners (arrays per block)."""

    grids: list[BlockGrid]           # per parameter
    offsets: np.ndarray              # per parameter: index of its first block (+ the total)
    block_param: np.ndarray          # per block: parameter index
    cost_id: np.ndarray              # per block: index into ``costs``
    costs: list[BlockCost]
    cost_loads: np.ndarray           # per cost: balance weight
    cost_work_bytes: np.ndarray      # per cost: block elements x factor itemsize (a working copy)
    cost_keeps_buffers: np.ndarray   # per cost: its owner keeps index tables and salts between steps
    geometries: list[ParamGeometry]  # per parameter
    cover_id: np.ndarray             # per block: index into ``covers``
    covers: CoverTable
    regions: RegionTable
    owners: np.ndarray               # per block: owner rank
    param_bytes: np.ndarray          # per rank: parameter bytes held (= gradient bytes)
    momentum_bytes: np.ndarray       # per rank: momentum bytes (local shards)
    averaging_bytes: np.ndarray      # per rank: GPA / Schedule-Free z bytes (local shards)

    @property
    def loads(self) -> np.ndarray:
        """Balance weight of every block."""
        return self.cost_loads[self.cost_id]


def plan_grids(params: list[ParamSpec], per_param: list[PlanSettings]) -> tuple[list[BlockGrid], np.ndarray]:
    """The block grid of every parameter and the running block offsets (``len(params) + 1``)."""
    for s in {id(s): s for s in per_param}.values():
        check_blocking_inputs([], s.max_preconditioner_dim)
    grids = [block_grid(p.name, p.shape, s.max_preconditioner_dim, s.preconditioner, s.blocking)
             for p, s in zip(params, per_param)]
    offsets = np.zeros(len(grids) + 1, dtype=np.int64)
    np.cumsum([g.num_blocks for g in grids], out=offsets[1:])
    return grids, offsets


def per_grid(grids: list[BlockGrid], tags: list[object], compute: Callable[[BlockGrid, object], np.ndarray]
             ) -> np.ndarray:
    """``compute(grid, tag)`` (one value per block) concatenated over the grids, computed once per
    (grid kind, tag): the layers of a model repeat a few kinds."""
    done: dict[tuple, np.ndarray] = {}
    parts = []
    for grid, tag in zip(grids, tags):
        kind = (grid_kind(grid), id(tag))
        if kind not in done:
            done[kind] = compute(grid, tag)
        parts.append(done[kind])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def price_grids(grids: list[BlockGrid], per_param: list[PlanSettings],
                cost_model: CostModel) -> tuple[np.ndarray, list[BlockCost], np.ndarray, np.ndarray, np.ndarray]:
    """Per block the index of its :class:`BlockCost`; the distinct costs, their balance weights,
    working-copy bytes and whether their owner keeps buffers between steps."""
    index: dict[tuple, int] = {}
    costs: list[BlockCost] = []
    loads: list[float] = []
    work: list[int] = []
    keeps: list[bool] = []

    def price(grid: BlockGrid, s: object) -> np.ndarray:
        assert isinstance(s, PlanSettings)
        firsts, classes = grid.shape_classes()
        per_class = []
        for first in firsts:
            b = grid.block(first)
            key = (b.shape, b.exponents, id(s))
            if key not in index:
                index[key] = len(costs)
                costs.append(block_cost(b, s.preconditioner, s.grafting, s.beta1, cost_model))
                loads.append(costs[-1].balance_cost(s.precondition_frequency))
                work.append(b.numel * dtype_itemsize(s.preconditioner.factor_dtype))
                keeps.append(not s.release_buffers_between_steps)
            per_class.append(index[key])
        return np.array(per_class, dtype=np.int64)[classes] if len(classes) else classes

    cost_id = per_grid(grids, list(per_param), price)
    return (cost_id, costs, np.array(loads, dtype=np.float64), np.array(work, dtype=np.int64),
            np.array(keeps, dtype=bool))


def kept_index_bytes(costs: list[BlockCost], keeps: np.ndarray) -> int:
    """The index tables of every packed size of the plan's kept costs: a bound on any rank's."""
    return sum(index_bytes(d) for d in {d for c, k in zip(costs, keeps.tolist()) if k for d in c.packed_dims})


def base_memory(params: list[ParamSpec], per_param: list[PlanSettings], geoms: list[ParamGeometry],
                table: RegionTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per rank: bytes of parameters held (= gradients), of momentum and of z (local shards, param dtype)."""
    per_geometry = np.zeros((len(table.codes), 3), dtype=np.int64)   # bytes/elem of params, momentum, z
    for p, s, g in zip(params, per_param, geoms):
        gi = table.geometry(g)
        per_geometry[gi, 0] += p.itemsize
        if s.momentum > 0:
            per_geometry[gi, 1] += p.itemsize
        if s.primal_averaging:
            per_geometry[gi, 2] += p.itemsize
    param_bytes = np.zeros(table.world_size, dtype=np.int64)
    momentum = np.zeros(table.world_size, dtype=np.int64)
    averaging = np.zeros(table.world_size, dtype=np.int64)
    numel = np.append(table.numel, 0)                   # code -1 (holds nothing) -> 0 elements
    for gi, (pb, mb, zb) in enumerate(per_geometry.tolist()):
        held = numel[table.rank_region[gi]]
        param_bytes += held * pb
        momentum += held * mb
        averaging += held * zb
    return param_bytes, momentum, averaging


def resident_bytes(param_bytes: np.ndarray, momentum: np.ndarray, averaging: np.ndarray) -> np.ndarray:
    """Per rank, what it holds before any Shampoo state: parameters, their gradients, momentum, z."""
    return 2 * param_bytes + momentum + averaging


def canonical_order(params: list[ParamSpec], offsets: np.ndarray) -> np.ndarray:
    """Block indices ordered by (parameter name, block index): independent of the input order."""
    by_name = sorted(range(len(params)), key=lambda k: params[k].name)
    parts = [np.arange(offsets[k], offsets[k + 1], dtype=np.int64) for k in by_name]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def balance_blocks(params: list[ParamSpec], mesh: MeshSpec, per_param: list[PlanSettings], cap: int | None,
                   cost_model: CostModel, tolerance: float) -> Balanced:
    """Run the deciding stages; raises ``BlockDoesNotFitError`` when a block fits no rank under ``cap``."""
    check_cap_and_tolerance(cap, tolerance)
    grids, offsets = plan_grids(params, per_param)
    cost_id, costs, cost_loads, cost_work, keeps = price_grids(grids, per_param, cost_model)
    geoms = [param_geometry(p, mesh) for p in params]
    table = RegionTable(geoms, mesh.world_size)
    param_bytes, momentum, averaging = base_memory(params, per_param, geoms, table)
    cover_id, covers = cover_table(grids, geoms, table)
    # the cap counts what stays allocated: state, each block's salt, and (a bound) every index table
    memory = np.array([c.total_state_bytes for c in costs], dtype=np.int64) + keeps * SALT_BYTES_PER_BLOCK
    groups = [list(h) for h in covers.groups]
    try:
        owners = balance_classes(cost_loads[cost_id], memory[cost_id], canonical_order(params, offsets),
                                 covers.preference[cover_id], Preferences(covers.prefs, groups), mesh.world_size,
                                 resident_bytes(param_bytes, momentum, averaging) + kept_index_bytes(costs, keeps),
                                 cap, tolerance)
    except ClassBalanceError as err:
        assert cap is not None
        k = int(np.searchsorted(offsets, err.block_index, side="right")) - 1
        block_id = grids[k].block(err.block_index - int(offsets[k])).block_id
        raise BlockDoesNotFitError(err.block_index, block_id, err.block_bytes, err.largest_free_bytes, cap) from None
    block_param = np.repeat(np.arange(len(params), dtype=np.int64), np.diff(offsets))
    return Balanced(grids, offsets, block_param, cost_id, costs, cost_loads, cost_work, keeps, geoms, cover_id, covers,
                    table, owners, param_bytes, momentum, averaging)
