"""Where each parameter's data lives on the mesh: pure descriptions, no process group.

A :class:`MeshSpec` is the logical mesh the optimizer plans over: ``(S,)`` for FSDP/DDP or
``(R, S)`` for HSDP (replicate, shard). Ranks are numbered row-major, as in DeviceMesh.
A :class:`ParamSpec` says whether a parameter is ``Shard(0)`` over the shard axis (FSDP2)
or replicated on every rank (DDP, or unsharded parameters).

FSDP2 shards dim 0 with ``torch.chunk`` semantics: chunk size ``ceil(d0 / S)``, so trailing
ranks may get short or empty shards. :func:`shard_range` reproduces that exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MeshSpec:
    """Logical mesh shape: ``(S,)`` or ``(R, S)``; the last axis is the shard axis."""

    shape: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        if not 1 <= len(self.shape) <= 2 or any((not isinstance(s, int)) or s < 1 for s in self.shape):
            raise ValueError(f"mesh shape must be (S,) or (R, S) with positive integers; got {self.shape!r}.")

    @property
    def world_size(self) -> int:
        return math.prod(self.shape)

    @property
    def num_shards(self) -> int:
        return self.shape[-1]

    @property
    def num_replicas(self) -> int:
        return self.shape[0] if len(self.shape) == 2 else 1

    def shard_index(self, rank: int) -> int:
        return rank % self.num_shards

    def replica_index(self, rank: int) -> int:
        return rank // self.num_shards


@dataclass(frozen=True)
class ParamSpec:
    """A parameter as the planner sees it: global shape, dtype and whether it is Shard(0)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    sharded: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype, device="meta").element_size()


def shard_range(dim0: int, num_shards: int, index: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of dim 0 held by shard ``index`` under ``torch.chunk`` semantics."""
    chunk = -(-dim0 // num_shards) if dim0 else 0
    start = min(index * chunk, dim0)
    return start, min(start + chunk, dim0)


def held_rows(spec: ParamSpec, rank: int, mesh: MeshSpec) -> tuple[int, int]:
    """Rows of the parameter's original dim 0 that ``rank`` holds (all rows if replicated)."""
    dim0 = spec.shape[0] if spec.shape else 1
    if not spec.sharded:
        return 0, dim0
    return shard_range(dim0, mesh.num_shards, mesh.shard_index(rank))


def rows_to_merged(spec: ParamSpec, rows: tuple[int, int], merged_shape: tuple[int, ...]) -> tuple[int, int]:
    """Map a dim-0 row range of the original shape to a merged-dim-0 row range.

    Merging keeps the original dim 0 inside merged dim 0, so the flat range
    ``[a * s0, b * s0)`` is always a whole number of merged rows.
    """
    inner = math.prod(spec.shape[1:]) if len(spec.shape) > 1 else 1
    merged_inner = math.prod(merged_shape[1:]) if len(merged_shape) > 1 else 1
    start, end = rows[0] * inner, rows[1] * inner
    if start % merged_inner or end % merged_inner:
        raise AssertionError(f"shard of {spec.name} does not align with its merged view {merged_shape}")
    return start // merged_inner, end // merged_inner


def held_merged_rows(spec: ParamSpec, merged_shape: tuple[int, ...], rank: int, mesh: MeshSpec) -> tuple[int, int]:
    """Rows of the merged view's dim 0 that ``rank`` holds."""
    return rows_to_merged(spec, held_rows(spec, rank, mesh), merged_shape)
