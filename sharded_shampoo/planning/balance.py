"""Greedy load balancer: blocks -> owner ranks. Pure, deterministic, no process group.

Longest-processing-time first (LPT, Graham 1969): blocks are taken by decreasing cost and each
goes to the least-loaded rank. LPT's makespan is within ``4/3 - 1/(3N)`` of optimal and, with
the many similar blocks Shampoo produces, within a fraction of a block of ``total / N``.

Determinism: every rank runs this on the same inputs and must get the same answer without
talking to the others. Blocks are sorted by ``(-cost, block_id)`` (a total order on unique
ids, so the input order does not matter), loads are accumulated in that fixed order, rank ties
go to the lowest rank, and the locality threshold uses ``math.fsum`` (order-independent).

Preferences inside a window: every rank whose load is at most
``min_load + tolerance * (total_cost / num_ranks)`` is an acceptable owner for load purposes;
a rank holding part of the block is also acceptable while its load after taking the block stays
within ``max(total / N, largest block)`` (the makespan lower bound), so blocks
aligned with FSDP shards stay on their holders and need no communication.
Among them the balancer prefers, in order,
1. locality: the rank holding the most of the block's elements (a block whose data a rank
   already holds costs less communication there), ties by less memory, less load, lower rank;
2. memory: otherwise the rank with the least memory (base + owned state), so blocks that are
   light in FLOPs but heavy in bytes (1-d factors of norm weights) spread out instead of piling
   onto whichever rank is least loaded;
3. otherwise plain LPT: the least-loaded rank, then the lowest rank.
The tolerance is a fraction of the *mean* load, so it bounds the damage to balance: the final
maximum load exceeds plain LPT's bound by at most ``tolerance * mean``. With ``tolerance=0``
the window holds only the least-loaded ranks and the schedule is classical LPT.

Holder groups: with HSDP every replica of a shard holds the same data, so locality is stated
per *holder group* (a set of equivalent ranks, e.g. ``{r * S + s for r in replicas}``) and the
balancer keeps a lazy heap per group to find its least-loaded member in O(log N). Without
groups every rank is its own group.

Memory cap: when ``memory_cap_bytes`` is given, a rank is eligible only if its memory
(``base_memory_bytes[rank]`` + state of the blocks it already owns + this block) stays within
the cap; a block no rank can take raises :class:`BlockDoesNotFitError`.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence

#: Default locality tolerance, as a fraction of the mean per-rank load (1%).
DEFAULT_LOCALITY_TOLERANCE = 0.01

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
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0 (a fraction of the mean load); got {tolerance!r}.")
    if memory_cap_bytes is not None:
        if not isinstance(memory_cap_bytes, int) or memory_cap_bytes <= 0:
            raise ValueError(f"memory_cap_bytes must be a positive integer or None; got {memory_cap_bytes!r}.")
        if memory_bytes is None:
            raise ValueError("memory_cap_bytes needs memory_bytes (the state bytes of each block).")
    if memory_bytes is not None and len(memory_bytes) != len(costs):
        raise ValueError(f"memory_bytes must have one entry per block ({len(costs)}); got {len(memory_bytes)}.")
    if base_memory_bytes is not None and len(base_memory_bytes) != num_ranks:
        raise ValueError(f"base_memory_bytes must have one entry per rank ({num_ranks}); got {len(base_memory_bytes)}.")


def lpt_order(costs: Sequence[float], block_ids: Sequence[str]) -> list[int]:
    """Block indices by decreasing cost, ties by block id: the order the greedy visits them."""
    return sorted(range(len(costs)), key=lambda i: (-costs[i], block_ids[i]))


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
    """Owner rank of every block (same order as ``costs``) by LPT with a locality preference.

    Args:
        costs: balance weight of each block (the planner uses step FLOPs + amortized FLOPs /
            precondition_frequency).
        block_ids: unique ids; the tie-break between equal costs.
        num_ranks: every rank ``0..num_ranks-1`` may own blocks (for HSDP the replicate axis too).
        locality: see :data:`LocalityFn`; None disables the preference.
        memory_bytes: state bytes of each block on its owner (needed with a cap).
        memory_cap_bytes: per-rank cap on ``base_memory_bytes[rank]`` + owned state bytes.
        base_memory_bytes: memory each rank uses before owning anything (params, grads, ...).
        tolerance: preference window as a fraction of the mean load (0 = classical LPT; the
            preferences then only break ties between equally loaded ranks).
        holder_groups: disjoint sets of ranks holding identical data (HSDP: the replicas of
            each shard); ``locality`` keys are then group indices. None: one group per rank.

    Raises:
        BlockDoesNotFitError: a block no rank can take under the cap.
        ValueError: malformed inputs (named in the message).
    """
    _validate(costs, block_ids, num_ranks, memory_bytes, memory_cap_bytes, base_memory_bytes, tolerance)
    n = len(costs)
    owners = [-1] * n
    if n == 0:
        return owners
    cap = memory_cap_bytes
    loads = [0.0] * num_ranks
    mem = [int(b) for b in base_memory_bytes] if base_memory_bytes is not None else [0] * num_ranks
    window = tolerance * math.fsum(costs) / num_ranks
    # a holder may also take a block while it stays within the makespan lower bound: this keeps
    # shard-aligned blocks on their holders (no traffic) without costing balance beyond the bound
    bound = max(math.fsum(costs) / num_ranks, max(costs))
    # Lazy min-heaps: an entry (key, rank) is current iff key equals loads[rank] (or mem[rank]).
    load_heap = [(0.0, r) for r in range(num_ranks)]
    mem_heap = sorted((m, r) for r, m in enumerate(mem))
    group_heaps: list[list[tuple[float, int]]] | None = None
    group_of: list[int] = []
    if holder_groups is not None:
        group_of = _group_index(holder_groups, num_ranks)
        group_heaps = [sorted((0.0, r) for r in g) for g in holder_groups]

    for i in lpt_order(costs, block_ids):
        cost = costs[i]
        need = memory_bytes[i] if memory_bytes is not None else 0
        while load_heap[0][0] != loads[load_heap[0][1]]:
            heapq.heappop(load_heap)
        limit = load_heap[0][0] + window
        chosen = -1
        # 1. locality: the holder with the most of the block's elements within the window.
        holders = locality(i) if locality is not None else None
        if holders:
            best: tuple[int, int, float, int] | None = None
            for g, held in holders.items():
                if held <= 0:
                    continue
                if group_heaps is None:
                    r = g
                    if cap is not None and mem[r] + need > cap:
                        continue
                else:
                    r = _least_loaded_fitting(group_heaps[g], loads, mem, need, cap)
                    if r < 0:
                        continue
                if loads[r] <= limit or loads[r] + cost <= bound:
                    key = (-held, mem[r], loads[r], r)
                    if best is None or key < best:
                        best = key
            if best is not None:
                chosen = best[3]
        # 2. memory: the emptiest rank within the window (a bounded look at the memory heap).
        if chosen < 0:
            chosen = _least_memory_within(mem_heap, loads, mem, limit, need, cap)
        # 3. plain LPT: the least-loaded rank that fits.
        if chosen < 0:
            chosen = _least_loaded_fitting(load_heap, loads, mem, need, cap)
            if chosen < 0:
                assert cap is not None
                raise BlockDoesNotFitError(i, block_ids[i], need, max(cap - m for m in mem), cap)
        owners[i] = chosen
        if need:
            mem[chosen] += need
            heapq.heappush(mem_heap, (mem[chosen], chosen))
        if cost > 0:
            loads[chosen] += cost
            heapq.heappush(load_heap, (loads[chosen], chosen))
            if group_heaps is not None and group_of[chosen] >= 0:
                heapq.heappush(group_heaps[group_of[chosen]], (loads[chosen], chosen))
    return owners


#: How many current entries of the memory heap the memory preference examines per block.
MEMORY_SCAN_LIMIT = 64


def _least_memory_within(mem_heap: list[tuple[int, int]], loads: list[float], mem: list[int], limit: float,
                         need: int, cap: int | None) -> int:
    """The rank with the least memory whose load is within ``limit`` (and that fits); -1 if none.

    Looks at no more than :data:`MEMORY_SCAN_LIMIT` ranks in (memory, rank) order, so a block
    costs O(log N) in the common case where the emptiest ranks are also lightly loaded.
    """
    skipped: list[tuple[int, int]] = []
    chosen = -1
    while mem_heap and len(skipped) < MEMORY_SCAN_LIMIT:
        m, r = mem_heap[0]
        if m != mem[r]:
            heapq.heappop(mem_heap)
            continue
        if cap is not None and m + need > cap:
            break                      # every later entry has at least as much memory
        if loads[r] <= limit:
            chosen = r
            break
        skipped.append(heapq.heappop(mem_heap))
    for entry in skipped:
        heapq.heappush(mem_heap, entry)
    return chosen


def _group_index(holder_groups: Sequence[Sequence[int]], num_ranks: int) -> list[int]:
    """Group of each rank (-1: none); rejects ranks out of range or in two groups."""
    group_of = [-1] * num_ranks
    for g, ranks in enumerate(holder_groups):
        for r in ranks:
            if not isinstance(r, int) or not 0 <= r < num_ranks:
                raise ValueError(f"holder_groups[{g}] contains {r!r}; ranks must be integers in [0, {num_ranks}).")
            if group_of[r] >= 0:
                raise ValueError(f"rank {r} is in holder_groups[{group_of[r]}] and [{g}]; groups must be disjoint.")
            group_of[r] = g
    return group_of


def _least_loaded_fitting(heap: list[tuple[float, int]], loads: list[float], mem: list[int], need: int,
                          cap: int | None) -> int:
    """Least-loaded (then lowest) rank of a lazy heap whose memory can take ``need`` more bytes.

    Stale entries are dropped on the way. Without a cap that is the current top. With one,
    current entries that do not fit are popped and pushed back afterwards, so the heap stays
    intact. Returns -1 if no rank fits.
    """
    if cap is None:
        while heap[0][0] != loads[heap[0][1]]:
            heapq.heappop(heap)
        return heap[0][1]
    skipped: list[tuple[float, int]] = []
    chosen = -1
    while heap:
        load, r = heap[0]
        if load != loads[r]:
            heapq.heappop(heap)
            continue
        if mem[r] + need <= cap:
            chosen = r
            break
        skipped.append(heapq.heappop(heap))
    for entry in skipped:
        heapq.heappush(heap, entry)
    return chosen


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


def pigeonhole_lower_bound(costs: Sequence[float], num_ranks: int) -> float:
    """A tighter bound for coarse problems: ``max(lower_bound, max_k sum(p[kN-k .. kN]))``.

    With costs sorted in decreasing order ``p_1 >= p_2 >= ...``, any assignment puts ``k + 1`` of
    the ``kN + 1`` largest blocks on one rank (pigeonhole), so its load is at least the sum of
    the ``k + 1`` smallest of them, ``p_(kN-k+1) + ... + p_(kN+1)``. With few blocks per rank
    (GPT-2 on 64 ranks) this is far above ``total / N`` and shows when LPT is already optimal.
    """
    base = lower_bound(costs, num_ranks)
    p = sorted(costs, reverse=True)
    best = base
    k = 1
    while k * num_ranks < len(p):
        best = max(best, math.fsum(p[k * num_ranks - k: k * num_ranks + 1]))
        k += 1
    return best


def imbalance(loads: Sequence[float]) -> float:
    """max / mean of the per-rank loads (1.0 is perfect; 1.0 for an all-zero load)."""
    mean = math.fsum(loads) / len(loads) if loads else 0.0
    return max(loads) / mean if mean > 0 else 1.0


def round_robin_param_owners(param_of_block: Sequence[int], num_ranks: int) -> list[int]:
    """The naive baseline: parameter ``p`` (and all its blocks) goes to rank ``p mod N``."""
    return [p % num_ranks for p in param_of_block]


__all__ = [
    "DEFAULT_LOCALITY_TOLERANCE", "LocalityFn", "BlockDoesNotFitError", "assign_owners", "lpt_order",
    "rank_loads", "lower_bound", "pigeonhole_lower_bound", "imbalance", "round_robin_param_owners",
]
