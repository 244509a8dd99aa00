"""Static routing schedule: which rank sends which slice of which block, built once.

A *piece* is the part of one block that one rank holds: a range of the block's merged-dim-0
rows (a ``Shard(0)`` shard is a contiguous range of merged rows, see blocking.py) times the
block's other ranges. Per step the optimizer runs two exchanges with this schedule:

1. gradients: every holder sends each piece of a block it does not own to the block's owner
   (for HSDP, only the holder in the owner's replica sends; replicated parameters are held
   whole by the owner and need no traffic);
2. updates: every owner sends each holder (all replicas included) the piece of the update
   it holds.

Everything here is a pure function of the plan, the parameter layouts and the rank, so all
ranks derive matching send/receive orders without talking to each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..planning.blocking import Block
from ..planning.layout import MeshSpec, ParamSpec, held_merged_rows


@dataclass(frozen=True)
class Piece:
    """Rows ``[row_start, row_end)`` (merged dim 0, absolute) of block ``block_index``."""

    block_index: int
    param_index: int
    row_start: int
    row_end: int
    numel: int


@dataclass
class RankSchedule:
    """What one rank sends and receives in each exchange, in a canonical order."""

    rank: int
    world_size: int
    grad_local: list[Piece] = field(default_factory=list)
    grad_send: list[list[Piece]] = field(default_factory=list)
    grad_recv: list[list[Piece]] = field(default_factory=list)
    update_local: list[Piece] = field(default_factory=list)
    update_send: list[list[Piece]] = field(default_factory=list)
    update_recv: list[list[Piece]] = field(default_factory=list)

    def split_sizes(self, lists: list[list[Piece]]) -> list[int]:
        return [sum(p.numel for p in pieces) for pieces in lists]


def _piece(block: Block, block_index: int, param_index: int, rows: tuple[int, int]) -> Piece | None:
    start = max(rows[0], block.ranges[0][0])
    end = min(rows[1], block.ranges[0][1])
    if end <= start:
        return None
    inner = block.numel // block.shape[0]
    return Piece(block_index, param_index, start, end, (end - start) * inner)


def build_schedule(blocks: list[Block], owners: list[int], block_params: list[int],
                   params: list[ParamSpec], mesh: MeshSpec, rank: int) -> RankSchedule:
    """The schedule of ``rank``. ``block_params[i]`` is the index in ``params`` of block i's parameter."""
    W = mesh.world_size
    sched = RankSchedule(rank, W, grad_send=[[] for _ in range(W)], grad_recv=[[] for _ in range(W)],
                         update_send=[[] for _ in range(W)], update_recv=[[] for _ in range(W)])
    held_cache: dict[tuple[int, int], tuple[int, int]] = {}

    def held(p: int, r: int, block: Block) -> tuple[int, int]:
        key = (p, r)
        if key not in held_cache:
            held_cache[key] = held_merged_rows(params[p], block.merged_shape, r, mesh)
        return held_cache[key]

    for b, (block, owner) in enumerate(zip(blocks, owners)):
        p = block_params[b]
        spec = params[p]
        # ---- gradient sources: one holder per piece, preferring the owner, then the owner's replica
        if spec.sharded:
            replica = mesh.replica_index(owner)
            for s in range(mesh.num_shards):
                src = owner if mesh.shard_index(owner) == s else replica * mesh.num_shards + s
                piece = _piece(block, b, p, held(p, src, block))
                if piece is None:
                    continue
                if src == owner:
                    if owner == rank:
                        sched.grad_local.append(piece)
                elif src == rank:
                    sched.grad_send[owner].append(piece)
                elif owner == rank:
                    sched.grad_recv[src].append(piece)
        else:
            if owner == rank:
                sched.grad_local.append(_piece(block, b, p, held(p, owner, block)))
        # ---- update destinations: every holder
        for h in range(W):
            piece = _piece(block, b, p, held(p, h, block))
            if piece is None:
                continue
            if h == owner:
                if owner == rank:
                    sched.update_local.append(piece)
            elif h == rank:
                sched.update_recv[owner].append(piece)
            elif owner == rank:
                sched.update_send[h].append(piece)
    return sched
