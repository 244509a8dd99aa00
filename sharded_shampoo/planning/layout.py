"""Where each parameter's data lives: the region of the global tensor every rank holds. Pure.

* :class:`MeshSpec` -- the ranks the optimizer plans over: the root device mesh, flattened
  row-major (plan rank ``r`` is position ``r`` of ``root_mesh.mesh.flatten()``).
* :class:`SubMesh` -- a device mesh a parameter lives on (the root itself or a sub-mesh of it,
  e.g. ``("fsdp", "tp")`` for dense weights and ``("efsdp", "ep")`` for experts), described by its
  shape and the coordinate every plan rank has in it.
* :class:`Layout` -- DTensor placements (``Shard(d)``, ``_StridedShard``, ``Replicate``) on a sub-mesh.
* :class:`ParamSpec` -- a parameter's global shape, dtype and layout.
* :class:`ParamGeometry` -- the regions (boxes of the global tensor) the ranks hold and who holds each.

A rank's view of a parameter is a *region*: one half-open ``(start, end)`` range per dim, computed
from the placements with DTensor's shard arithmetic in closed form (``_shard_runs``; tested against
torch's own ``_compute_local_shape_and_global_offset``, which materialises index tensors and is too
slow for 2048-rank plans), so uneven and empty shards, nested ``Shard`` on one dim and FSDP2's
``_StridedShard`` on top of tensor parallelism come out exactly as torch lays them out. A new
placement is data here, not a code path. Layouts whose pieces are not boxes (e.g.
``(Shard(0), _StridedShard(0))``, where a rank holds every other row) are rejected, naming the
parameter.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from torch.distributed.tensor import Replicate, Shard
from .._torch_compat import StridedShard

#: Placements that split a tensor dim (``_StridedShard`` is FSDP-over-TP's; not a ``Shard`` subclass).
SHARD_TYPES = (Shard, StridedShard)

#: A box of a tensor: one half-open ``(start, end)`` range per dim.
Region = tuple[tuple[int, int], ...]


@lru_cache(maxsize=None)
def dtype_itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype`` (without allocating memory)."""
    return torch.empty((), dtype=dtype, device="meta").element_size()


def box_numel(box: Region) -> int:
    return math.prod(b - a for a, b in box)


def intersect(a: Region, b: Region) -> Region | None:
    """The common box of ``a`` and ``b`` (None when it is empty)."""
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return None if any(e <= s for s, e in out) else out


@dataclass(frozen=True)
class MeshSpec:
    """The plan's ranks: the root mesh shape (any number of dims), flattened row-major.

    The legacy shorthand of :class:`ParamSpec` (``sharded=True``) means ``Shard(0)`` over the last
    mesh dim and ``Replicate`` over the others: FSDP on ``(S,)``, HSDP on ``(R, S)``.
    """

    shape: tuple[int, ...] = (1,)
    dim_names: tuple[str, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.shape, tuple) or not self.shape or \
                any((not isinstance(s, int)) or isinstance(s, bool) or s < 1 for s in self.shape):
            raise ValueError(f"mesh shape must be a non-empty tuple of positive integers; got {self.shape!r}.")
        if self.dim_names is not None and len(self.dim_names) != len(self.shape):
            raise ValueError(f"mesh dim_names {self.dim_names!r} must name each of the {len(self.shape)} dims.")

    @property
    def world_size(self) -> int:
        return math.prod(self.shape)

    @property
    def num_shards(self) -> int:
        """Size of the last dim (the FSDP shard dim of the shorthand layout)."""
        return self.shape[-1]

    def shard_index(self, rank: int) -> int:
        return rank % self.num_shards

    def replica_index(self, rank: int) -> int:
        return rank // self.num_shards

    def coordinate(self, rank: int) -> tuple[int, ...]:
        """Row-major coordinate of plan rank ``rank`` in the root mesh."""
        out = []
        for size in reversed(self.shape):
            out.append(rank % size)
            rank //= size
        return tuple(reversed(out))


@dataclass(frozen=True, eq=False)
class SubMesh:
    """A device mesh seen from the plan: its shape and the coordinate of every plan rank in it.

    ``coords[r]`` is rank ``r``'s coordinate in *its own* slice of the mesh (a sub-mesh such as
    ``root["tp"]`` has one slice per combination of the other root dims). Compared by identity:
    parameters on one mesh share one object, which keeps geometry caching cheap.
    """

    shape: tuple[int, ...]
    coords: tuple[tuple[int, ...], ...]
    dim_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for r, c in enumerate(self.coords):
            if len(c) != len(self.shape) or any(not 0 <= x < s for x, s in zip(c, self.shape)):
                raise ValueError(f"SubMesh coordinate {c!r} of rank {r} does not fit the mesh shape {self.shape}.")

    @classmethod
    def root(cls, mesh: MeshSpec) -> "SubMesh":
        """The root mesh itself (one shared object per MeshSpec)."""
        return _root_submesh(mesh)


@lru_cache(maxsize=64)
def _root_submesh(mesh: MeshSpec) -> SubMesh:
    return SubMesh(mesh.shape, tuple(mesh.coordinate(r) for r in range(mesh.world_size)), mesh.dim_names)


@dataclass(frozen=True)
class Layout:
    """DTensor placements of a parameter on a (sub-)mesh of the root."""

    mesh: SubMesh
    placements: tuple

    def __post_init__(self) -> None:
        if len(self.placements) != len(self.mesh.shape):
            raise ValueError(f"{len(self.placements)} placements {self.placements} for a {len(self.mesh.shape)}-D "
                             "mesh; give one placement per mesh dim.")


@dataclass(frozen=True)
class ParamSpec:
    """A parameter as the planner sees it: global shape, dtype and where its data lives.

    ``layout`` (explicit DTensor placements) wins; otherwise ``sharded=True`` is the FSDP/HSDP
    shorthand (``Shard(0)`` over the root's last dim) and ``sharded=False`` means every rank holds
    the whole tensor (DDP, plain tensors).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    sharded: bool = False
    layout: Layout | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return dtype_itemsize(self.dtype)

    def resolved_layout(self, mesh: MeshSpec) -> Layout | None:
        """The explicit layout, the shorthand's layout on ``mesh``, or None (held whole everywhere)."""
        if self.layout is not None:
            return self.layout
        if not self.sharded or not self.shape:
            return None
        placements = (Replicate(),) * (len(mesh.shape) - 1) + (Shard(0),)
        return Layout(SubMesh.root(mesh), placements)


@dataclass(frozen=True)
class ParamGeometry:
    """Who holds what of one parameter: per-dim partitions, each rank's region and each region's holders.

    Placements shard each tensor dim independently, so the distinct regions are the product of one
    1-D partition per dim (``intervals[d]``, sorted). A region is identified by its tuple of interval
    indices; ``rank_region[r]`` is rank ``r``'s (None where it holds nothing) and ``holders[rid]``
    the ranks holding region ``rid`` (several for replicated dims), ascending.
    """

    shape: tuple[int, ...]
    intervals: tuple[tuple[tuple[int, int], ...], ...]
    rank_region: tuple[tuple[int, ...] | None, ...]
    holders: dict[tuple[int, ...], tuple[int, ...]] = field(hash=False, compare=False)
    _ends: tuple[tuple[int, ...], ...] = field(init=False, repr=False, hash=False, compare=False)
    #: Results derived from this geometry alone (``covers.py``), kept with it: every plan and every
    #: pipeline stage that places a parameter this way reuses them.
    memo: dict = field(default_factory=dict, init=False, repr=False, hash=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ends", tuple(tuple(e for _, e in iv) for iv in self.intervals))

    def region(self, rid: tuple[int, ...]) -> Region:
        return tuple(self.intervals[d][i] for d, i in enumerate(rid))

    def held(self, rank: int) -> Region | None:
        """The region ``rank`` holds (None: nothing)."""
        rid = self.rank_region[rank]
        return None if rid is None else self.region(rid)

    def pieces(self, box: Region) -> list[tuple[tuple[int, ...], Region]]:
        """``[(region id, box ∩ region)]`` for every region that overlaps ``box``, in region order."""
        per_dim: list[list[tuple[int, tuple[int, int]]]] = []
        for d, (a, b) in enumerate(box):
            iv, ends = self.intervals[d], self._ends[d]
            hits = []
            i = bisect.bisect_right(ends, a)
            while i < len(iv) and iv[i][0] < b:
                s, e = max(a, iv[i][0]), min(b, iv[i][1])
                if e > s:
                    hits.append((i, (s, e)))
                i += 1
            per_dim.append(hits)
        return [(tuple(i for i, _ in combo), tuple(r for _, r in combo)) for combo in itertools.product(*per_dim)]


def _partition(dim: int, size: int, ranges: set[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """The sorted, non-empty ranges of one dim; raise unless they tile ``[0, size)`` exactly."""
    out = sorted(r for r in ranges if r[1] > r[0])
    pos = 0
    for s, e in out:
        if s != pos:
            raise ValueError(f"the shards of dim {dim} are not contiguous boxes ({out}).")
        pos = e
    if pos != size and size > 0:
        raise ValueError(f"the shards of dim {dim} cover [0, {pos}) of [0, {size}).")
    return tuple(out) if out else ((0, 0),)


def _take(runs: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """Positions ``[start, end)`` of the concatenation of ``runs``, as global runs."""
    out: list[tuple[int, int]] = []
    pos = 0
    for a, b in runs:
        lo, hi = max(start, pos), min(end, pos + b - a)
        if hi > lo:
            out.append((a + lo - pos, a + hi - pos))
        pos += b - a
    return out


def _shard_runs(runs: list[tuple[int, int]], placement: object, num_chunks: int, index: int) -> list[tuple[int, int]]:
    """What coordinate ``index`` of a mesh dim keeps of the indices ``runs`` under ``placement``.

    DTensor's rules, in closed form: ``Shard`` keeps chunk ``index`` of ``torch.chunk`` (chunk size
    ``ceil(n / num_chunks)``, trailing chunks short or empty); ``_StridedShard(sf)`` splits into ``sf``
    pieces the same way and keeps chunk ``index`` of every piece (FSDP2's view of a dim that tensor
    parallelism shards afterwards). ``tests/test_layout.py`` checks both against torch's own
    ``_compute_local_shape_and_global_offset``.
    """
    n = sum(b - a for a, b in runs)
    sf = getattr(placement, "split_factor", None)
    pieces = [(0, n)] if sf is None else [(min(i * -(-n // sf), n), min((i + 1) * -(-n // sf), n)) for i in range(sf)]
    out: list[tuple[int, int]] = []
    for p0, p1 in pieces:
        k = -(-(p1 - p0) // num_chunks)
        out.extend(_take(runs, p0 + min(index * k, p1 - p0), p0 + min((index + 1) * k, p1 - p0)))
    merged: list[tuple[int, int]] = []
    for a, b in out:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


def _dim_interval(size: int, steps: list[tuple[object, int, int]]) -> tuple[int, int]:
    """The interval of one tensor dim a rank holds after its ``(placement, mesh size, coordinate)`` steps."""
    runs = [(0, size)]
    for placement, num_chunks, index in steps:
        runs = _shard_runs(runs, placement, num_chunks, index)
    if not runs:
        return (0, 0)
    if len(runs) > 1:
        raise ValueError(f"a rank would hold the non-contiguous indices {runs} of a dim of size {size}; this placement "
                         "(a strided shard applied after a plain one) is not supported. Shard the dim in the other "
                         "order (as fully_shard does with tensor parallelism).")
    return runs[0]


def _indivisible_strided_shard(d: int, size: int, layout: Layout, mesh_dims: list[int]) -> str | None:
    """Why a strided layout of dim ``d`` is not a box, when the cause is a degree that does not divide it.

    FSDP2 over tensor parallelism gives ``(_StridedShard(d, sf), Shard(d))``: the dim is cut into
    ``sf`` (the TP degree) pieces first. When ``sf`` does not divide the size, the pieces differ in
    length and an FSDP rank's rows are not contiguous; the fix is the degree, not the shard order.
    """
    for n, i in enumerate(mesh_dims):
        sf = getattr(layout.placements[i], "split_factor", None)
        if sf is None or size % sf == 0:
            continue
        names = layout.mesh.dim_names
        later = [j for j in mesh_dims[n + 1:] if isinstance(layout.placements[j], Shard)]
        label = " x ".join(f"{names[j]}={layout.mesh.shape[j]}" if names else
                           f"mesh dim {j} (size {layout.mesh.shape[j]})" for j in later) or f"split factor {sf}"
        degree = f"{names[later[0]]} degree" if names and len(later) == 1 else "degree"
        return (f"dim {d} has size {size}, which {label} does not divide: the FSDP shard over it (a strided shard "
                f"of split factor {sf}) would give a rank non-contiguous indices, which is not supported. Use a "
                f"{degree} that divides {size}, or a size that {label} divides.")
    return None


def _row_keys(rows: np.ndarray, radix: list[int]) -> np.ndarray:
    """One integer per row of non-negative ints below ``radix`` (mixed radix), for 1-D grouping."""
    key = np.zeros(len(rows), dtype=np.int64)
    for d, r in enumerate(radix):
        key = key * r + rows[:, d]
    return key


def _rank_intervals(shape: tuple[int, ...], layout: Layout) -> tuple[list[list[tuple[int, int]]], np.ndarray]:
    """Per tensor dim the distinct intervals ranks hold, and per rank and dim the index of its interval.

    A dim's interval depends only on the rank's coordinates in the mesh dims that shard it, so it is
    computed once per distinct coordinate combination (a handful), and ranks are mapped with arrays.
    """
    coords = np.asarray(layout.mesh.coords, dtype=np.int64).reshape(len(layout.mesh.coords), len(layout.mesh.shape))
    which = np.zeros((len(coords), len(shape)), dtype=np.int64)
    per_dim: list[list[tuple[int, int]]] = []
    for d, size in enumerate(shape):
        cols = [i for i, p in enumerate(layout.placements) if isinstance(p, SHARD_TYPES) and p.dim == d]
        if not cols:
            per_dim.append([(0, size)])
            continue
        radix = [layout.mesh.shape[i] for i in cols]
        keys, inverse = np.unique(_row_keys(coords[:, cols], radix), return_inverse=True)
        try:
            per_dim.append([_dim_interval(size, [(layout.placements[i], layout.mesh.shape[i], c)
                                                 for i, c in zip(cols, map(int, np.unravel_index(key, radix)))])
                            for key in keys.tolist()])
        except ValueError as err:
            raise ValueError(_indivisible_strided_shard(d, size, layout, cols) or str(err)) from None
        which[:, d] = inverse.ravel()
    return per_dim, which


def _holders(rid: np.ndarray, held: np.ndarray) -> tuple[list[tuple[int, ...] | None], dict]:
    """``rank_region`` (None where nothing is held) and ``{region id: ranks}`` in order of first holder."""
    rows = [tuple(r) for r in rid.tolist()]
    rank_region: list[tuple[int, ...] | None] = [row if h else None for row, h in zip(rows, held.tolist())]
    ranks = np.nonzero(held)[0]
    if not len(ranks):
        return rank_region, {}
    if rid.shape[1] == 0:
        return rank_region, {(): tuple(ranks.tolist())}
    _, first, inverse = np.unique(_row_keys(rid[ranks], [int(rid[:, d].max()) + 1 for d in range(rid.shape[1])]),
                                  return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    order = np.argsort(first, kind="stable")
    grouped = np.argsort(inverse, kind="stable")
    cuts = np.cumsum(np.bincount(inverse, minlength=len(first)))
    holders = {}
    for u in order.tolist():
        members = ranks[grouped[(cuts[u - 1] if u else 0):cuts[u]]]
        holders[rows[int(members[0])]] = tuple(members.tolist())
    return rank_region, holders


@lru_cache(maxsize=4096)
def _geometry(shape: tuple[int, ...], layout: Layout | None, world: int) -> ParamGeometry:
    dims = shape
    if layout is None:
        every = tuple(range(world))
        return ParamGeometry(shape, tuple(((0, d),) for d in dims), ((0,) * len(dims),) * world,
                             {(0,) * len(dims): every})
    if len(layout.mesh.coords) != world:
        raise ValueError(f"its mesh describes {len(layout.mesh.coords)} ranks but the plan has {world}.")
    per_dim, which = _rank_intervals(dims, layout)
    intervals = tuple(_partition(d, size, set(per_dim[d])) for d, size in enumerate(dims))
    held = np.ones(world, dtype=bool)
    rid = np.zeros((world, len(dims)), dtype=np.int64)
    for d, ivs in enumerate(per_dim):
        index = {iv: i for i, iv in enumerate(intervals[d])}
        held &= np.array([e > s for s, e in ivs], dtype=bool)[which[:, d]]
        rid[:, d] = np.array([index.get(iv, -1) for iv in ivs], dtype=np.int64)[which[:, d]]
    rank_region, holders = _holders(rid, held)
    if math.prod(len(iv) for iv in intervals) != len(holders) and math.prod(dims) > 0:
        raise ValueError(f"its placements {layout.placements} leave parts of the tensor on no rank; this layout is "
                         "not supported.")
    return ParamGeometry(shape, intervals, tuple(rank_region), holders)


def param_geometry(spec: ParamSpec, mesh: MeshSpec) -> ParamGeometry:
    """Regions of ``spec`` on every plan rank of ``mesh`` (cached per shape and layout)."""
    try:
        return _geometry(tuple(spec.shape), spec.resolved_layout(mesh), mesh.world_size)
    except ValueError as err:
        layout = spec.resolved_layout(mesh)
        raise ValueError(f"parameter {spec.name!r} with placements {layout.placements if layout else ()}: "
                         f"{err}") from None


def held_region(spec: ParamSpec, mesh: MeshSpec, rank: int) -> Region | None:
    """The region of the global tensor ``rank`` holds (None if nothing)."""
    return param_geometry(spec, mesh).held(rank)


def pick_source(holders: Sequence[int], owner: int, world_size: int) -> int:
    """Which holder of a region sends it to ``owner`` (every rank derives the same answer).

    ``k`` holders (ascending) are replicas of one region. Split the ranks into ``k`` contiguous
    zones and take a holder in the owner's zone (for HSDP: the holder in the owner's replica group,
    often the same host), else the holder nearest in rank order (ties: the lower rank).
    """
    k = len(holders)
    if k == 1:
        return holders[0]
    zone = owner * k // world_size
    h = holders[zone]                 # the regular case: one holder per zone, in zone order
    if h * k // world_size == zone:
        return h
    lo = -(-zone * world_size // k)
    i = bisect.bisect_left(holders, lo)
    if i < k and holders[i] * k // world_size == zone:
        return holders[i]
    j = bisect.bisect_left(holders, owner)
    candidates = [holders[x] for x in (j - 1, j) if 0 <= x < k]
    return min(candidates, key=lambda c: (abs(c - owner), c))


__all__ = ["SHARD_TYPES", "Layout", "MeshSpec", "ParamGeometry", "ParamSpec", "Region", "SubMesh", "box_numel",
           "dtype_itemsize", "held_region", "intersect", "param_geometry", "pick_source"]
