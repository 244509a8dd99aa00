"""Per-rank tallies of a decided plan: owned state, FLOPs and the communication of one step.

Array operations over *pairs*, not blocks: what a rank owns only depends on how many blocks of
each cost it owns, so owned sums go over distinct ``(owner, cost)`` pairs; what a block's owner
exchanges only depends on the block's cover (regions and elements), its owner and the comm
dtype, so the communication goes over distinct ``(cover, owner, comm bytes)`` pairs and their
pieces. Byte sums are accumulated as float64 of integers, exact below 2**53 (asserted), and
returned as int64.

Communication model of one step (bytes in each parameter's ``comm_dtype``): gather -- the owner
receives every piece of its block held in a region it does not hold, each from one holder
(``layout.pick_source``); update -- the owner sends every other holder of every piece the update
of that piece.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..config import PlanSettings
from ..compute.kinds.state import index_bytes
from .costs import BLOCK_STATE_KINDS, SALT_BYTES_PER_BLOCK
from .layout import dtype_itemsize
from .regions import pick_sources

if TYPE_CHECKING:
    from .stages import Balanced

#: Integers up to this bound are exact in float64 sums.
EXACT_FLOAT_INTEGERS = 2 ** 53


def _exact(values: np.ndarray) -> np.ndarray:
    """Float sums of integers -> int64, refusing sums too large to be exact."""
    if len(values) and float(np.abs(values).max()) >= EXACT_FLOAT_INTEGERS:
        raise OverflowError("a per-rank byte count exceeds 2**53 and cannot be tallied exactly.")
    return np.rint(values).astype(np.int64)


@dataclass
class OwnedSums:
    """Per rank: owned blocks, state bytes by kind, FLOPs, load, working copies and refresh workspace."""

    num_blocks: np.ndarray
    state: dict[str, np.ndarray]
    step_flops: np.ndarray
    amortized_flops: np.ndarray
    load: np.ndarray
    work_bytes: np.ndarray            # owned elements x factor itemsize x 2 (assembled gradient + direction)
    workspace_bytes: np.ndarray       # largest refresh workspace among owned blocks
    resident_buffer_bytes: np.ndarray  # kept between steps besides the state: index tables + salts


def owned_sums(b: "Balanced", num_ranks: int) -> OwnedSums:
    """Sums over the blocks each rank owns, per distinct (owner, cost) pair."""
    ncost = max(len(b.costs), 1)
    pairs, counts = np.unique(b.owners * ncost + b.cost_id, return_counts=True)
    owner, cost = pairs // ncost, pairs % ncost

    def total(per_cost: Sequence[float] | np.ndarray) -> np.ndarray:   # per rank: owned blocks x per-cost value
        values = np.asarray(per_cost, dtype=np.float64)
        return np.bincount(owner, weights=counts * values[cost] if len(values) else None, minlength=num_ranks)

    state = {kind: _exact(total([c.state_bytes[kind] for c in b.costs])) for kind in BLOCK_STATE_KINDS}
    workspace = np.zeros(num_ranks, dtype=np.int64)
    np.maximum.at(workspace, owner, np.array([c.amortized_workspace_bytes for c in b.costs], dtype=np.int64)[cost]
                  if len(b.costs) else np.zeros(0, dtype=np.int64))
    return OwnedSums(num_blocks=np.bincount(b.owners, minlength=num_ranks).astype(np.int64), state=state,
                     step_flops=total([c.step_flops for c in b.costs]),
                     amortized_flops=total([c.amortized_flops for c in b.costs]),
                     load=total(b.cost_loads), work_bytes=_exact(2 * total(b.cost_work_bytes)),
                     workspace_bytes=workspace, resident_buffer_bytes=_resident(b, owner, cost, total, num_ranks))


def _resident(b: "Balanced", owner: np.ndarray, cost: np.ndarray, total: Callable[[np.ndarray], np.ndarray],
              num_ranks: int) -> np.ndarray:
    """Per rank, what its runtime keeps between steps besides the state (``runtime/records.py``): the
    salt of every owned block and one pair of packing index tables per packed size among its owned
    blocks, for blocks whose settings keep buffers (``release_buffers_between_steps=False``)."""
    keeps = b.cost_keeps_buffers
    out = total(keeps * float(SALT_BYTES_PER_BLOCK))
    kept = keeps[cost] if len(cost) else np.zeros(0, dtype=bool)
    for d in sorted({d for c in b.costs for d in c.packed_dims}):
        has = np.array([d in c.packed_dims for c in b.costs], dtype=bool)
        out[np.unique(owner[has[cost] & kept])] += index_bytes(d)
    return _exact(out)


@dataclass
class CommSums:
    """Per rank: bytes sent and received by the gradient gather and by the update scatter of one step."""

    send_gather: np.ndarray
    recv_gather: np.ndarray
    send_update: np.ndarray
    recv_update: np.ndarray


def communication(b: "Balanced", per_param: Sequence[PlanSettings], num_ranks: int) -> CommSums:
    """Per-rank bytes of one step's exchanges (see the module doc), per (cover, owner, comm bytes) pair.

    What the holders of a region receive as updates does not depend on the owner, so it is summed per
    piece of every cover; only the gather's sender (``pick_source``) and what the owner itself holds
    need the pieces of every (cover, owner) pair.
    """
    n = num_ranks
    comm_size = np.array([dtype_itemsize(s.comm_dtype) for s in per_param], dtype=np.int64)
    pairs, counts = np.unique((b.cover_id * n + b.owners) * 16 + comm_size[b.block_param], return_counts=True)
    weight = (counts * (pairs % 16)).astype(np.float64)            # blocks x bytes per element
    owner, cover = (pairs // 16) % n, pairs // 16 // n
    covers, regions = b.covers, b.regions
    offset, count, codes, elems = covers.piece_offset[:-1], covers.piece_count, covers.piece_code, covers.piece_elems
    totals = np.add.reduceat(elems, offset) if len(offset) else offset
    fan_out = np.add.reduceat(regions.holder_count[codes] * elems, offset) if len(offset) else offset
    npieces = count[cover]
    starts = np.cumsum(npieces) - npieces
    row_piece = np.repeat(offset[cover] - starts, npieces) + np.arange(int(npieces.sum()))
    code, row_elems = codes[row_piece], elems[row_piece]
    row_owner = np.repeat(owner, npieces)
    mine = np.repeat(regions.rank_region.ravel()[covers.geometry[cover] * n + owner], npieces) == code
    away = ~mine
    send_gather = np.bincount(pick_sources(regions, code[away], row_owner[away]),
                              weights=np.repeat(weight, npieces)[away] * row_elems[away], minlength=n)
    own = np.add.reduceat(row_elems * mine, starts) if len(starts) else starts
    recv_gather = np.bincount(owner, weights=weight * (totals[cover] - own), minlength=n)
    send_update = np.bincount(owner, weights=weight * (fan_out[cover] - own), minlength=n)
    per_cover = np.bincount(cover, weights=weight, minlength=len(offset))
    per_region = np.bincount(codes, weights=np.repeat(per_cover, count) * elems, minlength=len(regions.numel))
    recv_update = np.bincount(regions.holders_flat, weights=np.repeat(per_region, regions.holder_count),
                              minlength=n) - np.bincount(owner, weights=weight * own, minlength=n)
    return CommSums(*(_exact(x) for x in (send_gather, recv_gather, send_update, recv_update)))


__all__ = ["CommSums", "EXACT_FLOAT_INTEGERS", "OwnedSums", "communication", "owned_sums"]
