"""The regions of the plan's parameter geometries as arrays, for tallies over every rank at once.

:class:`RegionTable` numbers the regions of several :class:`~.layout.ParamGeometry` objects with
one global code each, and keeps per geometry the region code of every rank and per region its
size and holders (flattened), so the per-rank tallies of ``tally.py`` are array operations
instead of Python loops over ranks and blocks. :func:`pick_sources` is
:func:`~.layout.pick_source` for many (region, owner) pairs at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .layout import ParamGeometry, box_numel, pick_source


class RegionTable:
    """Global region codes of distinct geometries (by identity), their sizes and holders."""

    def __init__(self, geometries: Sequence[ParamGeometry], world_size: int) -> None:
        self.world_size = world_size
        self.index: dict[int, int] = {}             # id(geometry) -> geometry number
        self.codes: list[dict[tuple[int, ...], int]] = []
        self.base: list[int] = []                    # per geometry: its first code (codes follow ``holders``)
        rank_region: list[np.ndarray] = []
        numel: list[int] = []
        holders: list[tuple[int, ...]] = []
        for g in geometries:
            if id(g) in self.index:
                continue
            self.index[id(g)] = len(self.codes)
            self.base.append(len(numel))
            codes = {rid: len(numel) + i for i, rid in enumerate(g.holders)}
            self.codes.append(codes)
            numel.extend(box_numel(g.region(rid)) for rid in g.holders)
            holders.extend(g.holders.values())
            rank_region.append(np.array([-1 if rid is None else codes[rid] for rid in g.rank_region], dtype=np.int64))
        self.rank_region = np.stack(rank_region) if rank_region else np.zeros((0, world_size), dtype=np.int64)
        self.numel = np.array(numel, dtype=np.int64)
        self.holder_count = np.array([len(h) for h in holders], dtype=np.int64)
        self.holder_offset = np.concatenate([[0], np.cumsum(self.holder_count)]).astype(np.int64)
        self.holders_flat = np.array([r for h in holders for r in h], dtype=np.int64)
        self.holder_tuples = holders

    def geometry(self, g: ParamGeometry) -> int:
        return self.index[id(g)]

    def code(self, g: ParamGeometry, rid: tuple[int, ...]) -> int:
        return self.codes[self.index[id(g)]][rid]


def pick_sources(table: RegionTable, region: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """:func:`~.layout.pick_source` of every ``(region[i], owner[i])`` pair, vectorized.

    The regular case (one holder in the owner's zone, at the zone's position) is array arithmetic;
    the rest (irregular holder sets) go through ``pick_source`` once per distinct pair.
    """
    n = table.world_size
    k = table.holder_count[region]
    zone = owner * k // n
    h = table.holders_flat[table.holder_offset[region] + zone]
    src = np.where(h * k // n == zone, h, -1)
    odd = np.nonzero(src < 0)[0]
    if len(odd):
        pairs, inverse = np.unique(region[odd] * n + owner[odd], return_inverse=True)
        picked = np.array([pick_source(table.holder_tuples[key // n], key % n, n) for key in pairs.tolist()],
                          dtype=np.int64)
        src[odd] = picked[inverse.ravel()]
    return src


__all__ = ["RegionTable", "pick_sources"]
