"""Load balancer: blocks -> owner ranks. Pure, deterministic, no process group.

Longest-processing-time first (LPT, Graham 1969): blocks are taken by decreasing cost and each
goes to the least-loaded rank. LPT's makespan is within ``4/3 - 1/(3N)`` of optimal and, with
the many similar blocks Shampoo produces, within a fraction of a block of ``total / N``.

Blocks of equal cost and equal state bytes are interchangeable, so LPT is run per *class* of
such blocks (``class_balance.py``): LPT fixes how much load each rank may take from a class
without raising the maximum beyond what LPT itself would give (never below the lower bound
``max(total / N, largest block)``), and preferences choose which blocks fill that room:
1. locality: a block goes to the holders of most of its elements (less to send), spread over
   the holders' room; holders may use ``tolerance x mean load`` of extra room;
2. memory: the other blocks fill the room of the ranks with the least memory (base + owned
   state), so blocks light in FLOPs but heavy in bytes spread out;
3. then least load, then lowest rank.
With ``tolerance=0`` no rank's load ever passes the makespan LPT would reach, class by class.

Determinism: every rank runs this on the same inputs and must get the same answer without
talking to the others. Blocks are ordered by ``block_id`` inside a class (a total order on unique
ids, so the input order does not matter), classes by ``(-cost, -bytes)``, and the arithmetic is
elementwise (``class_balance.py``), so every rank computes the same owners.

Holder groups: with HSDP every replica of a shard holds the same data, so locality is stated
per *holder group* (a set of equivalent ranks, e.g. ``{r * S + s for r in replicas}``, or the
tensor-parallel ranks a norm weight is replicated over). Groups may overlap: a rank holds data of
several parameters with different layouts. Without groups every rank is its own group.

Memory cap: when ``memory_cap_bytes`` is given, a rank is eligible only if its memory
(``base_memory_bytes[rank]`` + state of the blocks it already owns + this block) stays within
the cap; a block no rank can take raises :class:`BlockDoesNotFitError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .class_balance import ClassBalanceError, Preferences, balance_classes

#: Default locality tolerance, as a fraction of the mean per-rank load (1%).
DEFAULT_LOCALITY_TOLERANCE = 0.0

#: ``locality(block_index) -> {holder group: elements of the block each rank of that group
#: holds}`` (groups are ranks when ``holder_groups`` is None). Sparse: groups that hold nothing
#: are omitted; an empty mapping means "no preference" (e.g. a replicated parameter that every
#: rank holds in full).
LocalityFn = Callable[[int], Mapping[int, int]]


class BlockDoesNotFitError(ValueError):
    """A block whose state does not fit in the free memory of any rank under the cap."""

    def __init__(self, block_index: int, block_id: str, block_bytes: int, largest_free_bytes: int,
                 memory_cap_bytes: int) -> None:
        self.block_index = block_index
        self.block_id = block_id
        self.block_bytes = block_bytes
        self.largest_free_bytes = largest_free_bytes
        self.memory_cap_bytes = memory_cap_bytes
        super().__init__(
            f"block {block_id!r} needs {block_bytes} bytes of optimizer state but the rank with the most "
            f"free memory has {largest_free_bytes} bytes left under memory_cap_bytes={memory_cap_bytes}; "
            "lower max_preconditioner_dim or raise the cap.")


def check_cap_and_tolerance(memory_cap_bytes: int | None, tolerance: float) -> None:
    """The balancer's scalar arguments (checked by every entry point)."""
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0 (a fraction of the mean load); got {tolerance!r}.")
    if memory_cap_bytes is not None and (not isinstance(memory_cap_bytes, int) or memory_cap_bytes <= 0):
        raise ValueError(f"memory_cap_bytes must be a positive integer or None; got {memory_cap_bytes!r}.")


def _validate(costs: Sequence[float], block_ids: Sequence[str], num_ranks: int,
              memory_bytes: Sequence[int] | None, memory_cap_bytes: int | None,
              base_memory_bytes: Sequence[int] | None, tolerance: float) -> None:
    if not isinstance(num_ranks, int) or isinstance(num_ranks, bool) or num_ranks < 1:
        raise ValueError(f"num_ranks must be an integer >= 1; got {num_ranks!r}.")
    if len(costs) != len(block_ids):
        raise ValueError(f"costs and block_ids must have the same length; got {len(costs)} and {len(block_ids)}.")
    if len(set(block_ids)) != len(block_ids):
        raise ValueError("block_ids must be unique: they are the deterministic tie-break between equal costs.")
    for i, c in enumerate(costs):
        if not (isinstance(c, (int, float)) and math.isfinite(c) and c >= 0):
            raise ValueError(f"costs[{i}] (block {block_ids[i]!r}) must be a finite number >= 0; got {c!r}.")
    check_cap_and_tolerance(memory_cap_bytes, tolerance)
    if memory_cap_bytes is not None and memory_bytes is None:
        raise ValueError("memory_cap_bytes needs memory_bytes (the state bytes of each block).")
    if memory_bytes is not None and len(memory_bytes) != len(costs):
        raise ValueError(f"memory_bytes must have one entry per block ({len(costs)}); got {len(memory_bytes)}.")
    if base_memory_bytes is not None and len(base_memory_bytes) != num_ranks:
        raise ValueError(f"base_memory_bytes must have one entry per rank ({num_ranks}); got {len(base_memory_bytes)}.")


def assign_owners(
    costs: Sequence[float],
    block_ids: Sequence[str],
    num_ranks: int,
    *,
    locality: LocalityFn | None = None,
    memory_bytes: Sequence[int] | None = None,
    memory_cap_bytes: int | None = None,
    base_memory_bytes: Sequence[int] | None = None,
    tolerance: float = DEFAULT_LOCALITY_TOLERANCE,
    holder_groups: Sequence[Sequence[int]] | None = None,
) -> list[int]:
    """Owner rank of every block (same order as ``costs``) by class-wise LPT with preferences.

    Args:
        costs: balance weight of each block (the planner uses step FLOPs + amortized FLOPs /
            precondition_frequency).
        block_ids: unique ids; the order of blocks inside a class.
        num_ranks: every rank ``0..num_ranks-1`` may own blocks (for HSDP the replicate axis too).
        locality: see :data:`LocalityFn`; None disables the preference.
        memory_bytes: state bytes of each block on its owner (needed with a cap).
        memory_cap_bytes: per-rank cap on ``base_memory_bytes[rank]`` + owned state bytes.
        base_memory_bytes: memory each rank uses before owning anything (params, grads, ...).
        tolerance: extra room holders may use, as a fraction of the mean load (0: no rank passes
            the makespan LPT would reach).
        holder_groups: sets of ranks holding identical data (HSDP: the replicas of a shard; tensor
            parallel: the ranks a norm weight is replicated over); ``locality`` keys are then group
            indices. Groups may overlap. None: one group per rank.

    Raises:
        BlockDoesNotFitError: a block no rank can take under the cap.
        ValueError: malformed inputs (named in the message).
    """
    _validate(costs, block_ids, num_ranks, memory_bytes, memory_cap_bytes, base_memory_bytes, tolerance)
    groups = _checked_groups(holder_groups, num_ranks)
    n = len(costs)
    pref_index = np.full(n, -1, dtype=np.int64)
    prefs: list[dict[int, int]] = []
    if locality is not None:
        seen: dict[tuple, int] = {}
        for i in range(n):
            key = tuple(sorted((g, e) for g, e in locality(i).items() if e > 0))
            if key:
                pref_index[i] = seen.setdefault(key, len(seen))
                if pref_index[i] == len(prefs):
                    prefs.append(dict(key))
    order = np.array(sorted(range(n), key=block_ids.__getitem__), dtype=np.int64)
    memory = np.array(memory_bytes if memory_bytes is not None else [0] * n, dtype=np.int64)
    base = np.array(base_memory_bytes if base_memory_bytes is not None else [0] * num_ranks, dtype=np.int64)
    try:
        owners = balance_classes(np.array(costs, dtype=np.float64), memory, order, pref_index,
                                 Preferences(prefs, groups), num_ranks, base, memory_cap_bytes, tolerance)
    except ClassBalanceError as err:
        assert memory_cap_bytes is not None
        raise BlockDoesNotFitError(err.block_index, block_ids[err.block_index], err.block_bytes,
                                   err.largest_free_bytes, memory_cap_bytes) from None
    return owners.tolist()


def _checked_groups(holder_groups: Sequence[Sequence[int]] | None, num_ranks: int) -> list[list[int]] | None:
    if holder_groups is None:
        return None
    groups = [list(g) for g in holder_groups]
    for g, ranks in enumerate(groups):
        for r in ranks:
            if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or not 0 <= r < num_ranks:
                raise ValueError(f"holder_groups[{g}] contains {r!r}; ranks must be integers in [0, {num_ranks}).")
    return groups


def rank_loads(costs: Sequence[float], owners: Sequence[int], num_ranks: int) -> list[float]:
    """Per-rank sum of the costs of the blocks it owns (accumulated in block order)."""
    loads = [0.0] * num_ranks
    for c, r in zip(costs, owners):
        loads[r] += c
    return loads


def lower_bound(costs: Sequence[float], num_ranks: int) -> float:
    """No assignment can have a maximum load below ``max(total / N, largest block)``."""
    if not costs:
        return 0.0
    return max(math.fsum(costs) / num_ranks, max(costs))


def pigeonhole_lower_bound(costs: Sequence[float] | np.ndarray, num_ranks: int) -> float:
    """A tighter bound for coarse problems: ``max(lower_bound, max_k sum(p[kN-k .. kN]))``.

    With costs sorted in decreasing order ``p_1 >= p_2 >= ...``, any assignment puts ``k + 1`` of
    the ``kN + 1`` largest blocks on one rank (pigeonhole), so its load is at least the sum of
    the ``k + 1`` smallest of them, ``p_(kN-k+1) + ... + p_(kN+1)``. With few blocks per rank
    (GPT-2 on 64 ranks) this is far above ``total / N`` and shows when LPT is already optimal.
    The window sums come from one running sum (exact for integer costs).
    """
    values = np.asarray(costs, dtype=np.float64)
    base = lower_bound(values.tolist(), num_ranks)
    ks = np.arange(1, -(-len(values) // num_ranks), dtype=np.int64)     # k with k * N < len(costs)
    if not len(ks):
        return base
    running = np.concatenate([[0.0], np.cumsum(-np.sort(-values))])
    windows = running[ks * num_ranks + 1] - running[ks * num_ranks - ks]
    return max(base, float(windows.max()))


def imbalance(loads: Sequence[float]) -> float:
    """max / mean of the per-rank loads (1.0 is perfect; 1.0 for an all-zero load)."""
    mean = math.fsum(loads) / len(loads) if loads else 0.0
    return max(loads) / mean if mean > 0 else 1.0


def round_robin_param_owners(param_of_block: Sequence[int], num_ranks: int) -> list[int]:
    """The naive baseline: parameter ``p`` (and all its blocks) goes to rank ``p mod N``."""
    return [p % num_ranks for p in param_of_block]


__all__ = [
    "DEFAULT_LOCALITY_TOLERANCE", "LocalityFn", "BlockDoesNotFitError", "assign_owners",
    "rank_loads", "lower_bound", "pigeonhole_lower_bound", "imbalance", "round_robin_param_owners",
]
