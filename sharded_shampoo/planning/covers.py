"""Covers: which regions hold which part of every block, and which holders the block prefers. Pure.

A block's *cover* is the list of regions of its parameter that hold parts of it, with the elements
each holds. It depends on the block's box and the parameter's geometry only, and the layers of a
model share both, so covers are computed once per (block grid kind, geometry) and kept on the
geometry (``ParamGeometry.memo``): every plan and every pipeline stage that uses the geometry
reuses them. A plan numbers them into a :class:`CoverTable` of flat arrays for the balancer
(preferences per holder group) and the tallies (pieces per region).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .blocking import BlockGrid
from .layout import ParamGeometry, box_numel
from .regions import RegionTable


@dataclass(frozen=True)
class GridCovers:
    """The covers of one grid kind on one geometry (region numbers local to the geometry)."""

    cover_of_block: np.ndarray        # per block of the grid: its cover
    piece_offset: np.ndarray          # per cover: first piece (+ the total)
    piece_region: np.ndarray          # per piece: region, numbered in ``geometry.holders`` order
    piece_elems: np.ndarray           # per piece: elements of the block in that region
    held: list[tuple[tuple[tuple[int, ...], int], ...]]   # per cover: ((holder ranks, elements), ...)


def grid_kind(grid: BlockGrid) -> tuple:
    """What fixes a grid's blocks except its name (layers of a model share kinds)."""
    return (grid.param_shape, grid.batch_shape, grid.groups, grid.max_dim, grid.exponents)


def grid_covers(g: ParamGeometry, grid: BlockGrid) -> GridCovers:
    """The covers of ``grid``'s blocks on ``g`` (memoized on ``g``). A region every rank holds is left
    out of the holder preference (it prefers no one)."""
    kind = ("covers", grid_kind(grid))
    hit = g.memo.get(kind)
    if hit is not None:
        return hit
    local = {rid: i for i, rid in enumerate(g.holders)}
    world = len(g.rank_region)
    ids = np.empty(grid.num_blocks, dtype=np.int64)
    offset: list[int] = [0]
    regions: list[int] = []
    elems: list[int] = []
    held: list[tuple[tuple[tuple[int, ...], int], ...]] = []
    for i in range(grid.num_blocks):             # every block of a grid has its own box
        ids[i] = len(held)
        pref: dict[tuple[int, ...], int] = {}
        for rid, piece in g.pieces(grid.box(i)):
            e = box_numel(piece)
            regions.append(local[rid])
            elems.append(e)
            holders = g.holders[rid]
            if len(holders) < world:
                pref[holders] = pref.get(holders, 0) + e
        offset.append(len(regions))
        held.append(tuple(pref.items()))
    hit = g.memo[kind] = GridCovers(ids, np.array(offset, dtype=np.int64), np.array(regions, dtype=np.int64),
                                    np.array(elems, dtype=np.int64), held)
    return hit


@dataclass
class CoverTable:
    """A plan's covers as flat arrays, with the holder groups and preferences the balancer reads."""

    geometry: np.ndarray              # per cover: geometry number in the plan's RegionTable
    piece_offset: np.ndarray          # per cover: first piece; piece_offset[-1] = number of pieces
    piece_code: np.ndarray            # per piece: global region code
    piece_elems: np.ndarray
    preference: np.ndarray            # per cover: index into ``prefs`` (-1: no preference)
    prefs: list[dict[int, int]]       # holder group -> elements held
    groups: list[tuple[int, ...]]     # holder group -> its ranks

    @property
    def piece_count(self) -> np.ndarray:
        return np.diff(self.piece_offset)


def cover_table(grids: list[BlockGrid], geoms: list[ParamGeometry], table: RegionTable) -> tuple[np.ndarray, CoverTable]:
    """Per block the index of its cover, and the plan's :class:`CoverTable`."""
    done: dict[tuple, np.ndarray] = {}
    parts = []
    geometry, offsets, codes, elems, preference = [], [np.zeros(1, dtype=np.int64)], [], [], []
    groups: dict[tuple[int, ...], int] = {}
    pref_index: dict[tuple, int] = {}
    prefs: list[dict[int, int]] = []
    count = pieces = 0
    for grid, g in zip(grids, geoms):
        key = (grid_kind(grid), id(g))
        if key not in done:
            covers = grid_covers(g, grid)
            gi = table.geometry(g)
            done[key] = covers.cover_of_block + count
            geometry.append(np.full(len(covers.held), gi, dtype=np.int64))
            offsets.append(covers.piece_offset[1:] + pieces)
            codes.append(covers.piece_region + table.base[gi])
            elems.append(covers.piece_elems)
            for held in covers.held:
                pref = tuple(sorted((groups.setdefault(h, len(groups)), e) for h, e in held))
                if pref and pref not in pref_index:
                    pref_index[pref] = len(prefs)
                    prefs.append(dict(pref))
                preference.append(pref_index[pref] if pref else -1)
            count += len(covers.held)
            pieces += len(covers.piece_region)
        parts.append(done[key])

    def cat(xs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)

    cover_id = cat(parts)
    return cover_id, CoverTable(cat(geometry), cat(offsets), cat(codes), cat(elems),
                                np.array(preference, dtype=np.int64), prefs, list(groups))


__all__ = ["CoverTable", "GridCovers", "cover_table", "grid_covers", "grid_kind"]
