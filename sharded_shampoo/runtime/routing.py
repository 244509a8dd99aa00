"""Static routing schedule: which rank sends which piece of which block, built once. Pure.

A *piece* is the part of one block that one region holds: the intersection of the block's box
with a region of the parameter (``planning/layout.py``), in the parameter's original dims. A rank
holds one region per parameter, so it holds at most one piece of any block. Per step the
optimizer runs two exchanges with this schedule:

1. gradients: for every region that holds part of a block but is not the owner's own region,
   one holder (``layout.pick_source``) sends its piece to the block's owner; pieces of the
   owner's own region are copied locally (replicated parameters: the owner holds everything);
2. updates: the owner sends every other holder of every piece (all replicas included) that
   piece of the update.

Every rank derives matching send and receive lists (block order, then region order) without
talking to the others: from a given peer, a rank receives at most one piece per block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..planning.layout import Region, box_numel, intersect, pick_source
from ..planning.plan import ShampooPlan


@dataclass(frozen=True)
class Piece:
    """The part ``box`` (global, original dims) of plan block ``block_index`` of plan parameter ``param_index``."""

    block_index: int
    param_index: int
    box: Region
    numel: int


@dataclass
class RankSchedule:
    """What one rank sends and receives in each exchange, in a canonical order (per peer rank)."""

    rank: int
    grad_local: list[Piece] = field(default_factory=list)
    grad_send: list[list[Piece]] = field(default_factory=list)
    grad_recv: list[list[Piece]] = field(default_factory=list)
    update_local: list[Piece] = field(default_factory=list)
    update_send: list[list[Piece]] = field(default_factory=list)
    update_recv: list[list[Piece]] = field(default_factory=list)

    @staticmethod
    def split_sizes(lists: list[list[Piece]]) -> list[int]:
        return [sum(p.numel for p in pieces) for pieces in lists]


def _owned_block(sched: RankSchedule, plan: ShampooPlan, b: int) -> None:
    """The owner's side of block ``b``: local pieces, pieces to receive, updates to send."""
    k = plan.block_param[b]
    g = plan.geometries[k]
    mine = g.rank_region[sched.rank]
    world = plan.mesh.world_size
    for rid, box in g.pieces(plan.blocks[b].box):
        piece = Piece(b, k, box, box_numel(box))
        holders = g.holders[rid]
        if rid == mine:
            sched.grad_local.append(piece)
            sched.update_local.append(piece)
        else:
            sched.grad_recv[pick_source(holders, sched.rank, world)].append(piece)
        for h in holders:
            if h != sched.rank:
                sched.update_send[h].append(piece)


def _held_block(sched: RankSchedule, plan: ShampooPlan, b: int, owner: int) -> None:
    """A holder's side of block ``b`` owned by another rank: maybe send its piece, receive its update."""
    k = plan.block_param[b]
    g = plan.geometries[k]
    rid = g.rank_region[sched.rank]
    if rid is None:
        return
    box = intersect(g.region(rid), plan.blocks[b].box)
    if box is None:
        return
    piece = Piece(b, k, box, box_numel(box))
    sched.update_recv[owner].append(piece)
    if rid != g.rank_region[owner] and pick_source(g.holders[rid], owner, plan.mesh.world_size) == sched.rank:
        sched.grad_send[owner].append(piece)


def build_schedule(plan: ShampooPlan, rank: int) -> RankSchedule:
    """The schedule of ``rank`` for every block of the plan."""
    world = plan.mesh.world_size
    sched = RankSchedule(rank, grad_send=[[] for _ in range(world)], grad_recv=[[] for _ in range(world)],
                         update_send=[[] for _ in range(world)], update_recv=[[] for _ in range(world)])
    for b, owner in enumerate(plan.owners):
        if owner == rank:
            _owned_block(sched, plan, b)
        else:
            _held_block(sched, plan, b, owner)
    return sched


def block_waves(plan: ShampooPlan, chunks: int) -> list[int]:
    """The wave (0 .. chunks-1) of every plan block, for overlapping communication with computation.

    Each owner's blocks, in plan order, are cut into ``chunks`` runs of about equal elements; an
    owner stacks and processes its blocks wave by wave (the wave is part of the bucket key, so a
    large class of equal-shape blocks splits into ``chunks`` buckets). A pure function of the plan,
    so every rank knows in which wave every owner needs every piece: senders and receivers split
    their messages the same way.
    """
    totals: dict[int, int] = {}
    for b, owner in enumerate(plan.owners):
        totals[owner] = totals.get(owner, 0) + plan.blocks[b].numel
    done: dict[int, int] = {}
    waves = []
    for b, owner in enumerate(plan.owners):
        before = done.get(owner, 0)
        waves.append(min(chunks - 1, before * chunks // totals[owner]) if totals[owner] else 0)
        done[owner] = before + plan.blocks[b].numel
    return waves


def split_waves(sched: RankSchedule, waves: list[int], chunks: int) -> list[RankSchedule]:
    """``sched`` as one schedule per wave (each list keeps its canonical order)."""
    def pick(pieces: list[Piece], w: int) -> list[Piece]:
        return [p for p in pieces if waves[p.block_index] == w]

    return [RankSchedule(sched.rank, pick(sched.grad_local, w), [pick(x, w) for x in sched.grad_send],
                         [pick(x, w) for x in sched.grad_recv], pick(sched.update_local, w),
                         [pick(x, w) for x in sched.update_send], [pick(x, w) for x in sched.update_recv])
            for w in range(chunks)]


__all__ = ["Piece", "RankSchedule", "block_waves", "build_schedule", "split_waves"]
