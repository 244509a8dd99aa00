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
per *holder group* (a set of equivalent ranks, e.g. ``{r * S + s for r in replicas}``, or the
tensor-parallel ranks a norm weight is replicated over) and the balancer keeps a lazy heap per
group to find its least-loaded member in O(log N). Groups may overlap: a rank holds data of
several parameters with different layouts. Without groups every rank is its own group.

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
        holder_groups: sets of ranks holding identical data (HSDP: the replicas of a shard; tensor
            parallel: the ranks a norm weight is replicated over); ``locality`` keys are then group
            indices. Groups may overlap (a rank holds data of several parameters with different
            layouts). None: one group per rank.

    Raises:
        BlockDoesNotFitError: a block no rank can take under the cap.
        ValueError: malformed inputs (named in the message).
    """
    _validate(costs, block_ids, num_ranks, memory_bytes, memory_cap_bytes, base_memory_bytes, tolerance)
    state = _BalanceState(costs, num_ranks, memory_cap_bytes, base_memory_bytes, tolerance, holder_groups)
    owners = [-1] * len(costs)
    for i in lpt_order(costs, block_ids):
        need = memory_bytes[i] if memory_bytes is not None else 0
        limit = state.min_load() + state.window
        chosen = state.holder_choice(locality(i) if locality is not None else None, costs[i], need, limit)
        if chosen < 0:
            chosen = _least_memory_within(state.mem_heap, state.loads, state.mem, limit, need, state.cap)
        if chosen < 0:
            chosen = _least_loaded_fitting(state.load_heap, state.loads, state.mem, need, state.cap)
            if chosen < 0:
                assert state.cap is not None
                raise BlockDoesNotFitError(i, block_ids[i], need, max(state.cap - m for m in state.mem), state.cap)
        owners[i] = chosen
        state.take(chosen, costs[i], need)
    return owners


class _BalanceState:
    """Loads, memory and the lazy heaps of one balancing run.

    Lazy min-heaps: an entry ``(key, rank)`` is current iff key equals ``loads[rank]`` (or
    ``mem[rank]``); stale entries are dropped when they surface.
    """

    def __init__(self, costs: Sequence[float], num_ranks: int, cap: int | None,
                 base_memory_bytes: Sequence[int] | None, tolerance: float,
                 holder_groups: Sequence[Sequence[int]] | None) -> None:
        self.cap = cap
        self.loads = [0.0] * num_ranks
        self.mem = [int(b) for b in base_memory_bytes] if base_memory_bytes is not None else [0] * num_ranks
        total = math.fsum(costs)
        self.window = tolerance * total / num_ranks
        # a holder may also take a block while it stays within the makespan lower bound: this keeps
        # shard-aligned blocks on their holders (no traffic) without costing balance beyond the bound
        self.bound = lower_bound(costs, num_ranks)
        self.load_heap = [(0.0, r) for r in range(num_ranks)]
        self.mem_heap = sorted((m, r) for r, m in enumerate(self.mem))
        self.groups = [list(g) for g in holder_groups] if holder_groups is not None else None
        self.group_heaps: list[list[tuple[float, int]]] = []
        self.groups_of_rank: list[list[int]] = [[] for _ in range(num_ranks)]
        if self.groups is not None:
            for g, ranks in enumerate(self.groups):
                for r in ranks:
                    if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < num_ranks:
                        raise ValueError(f"holder_groups[{g}] contains {r!r}; ranks must be integers in "
                                         f"[0, {num_ranks}).")
                    self.groups_of_rank[r].append(g)
                self.group_heaps.append(sorted((0.0, r) for r in ranks))

    def min_load(self) -> float:
        heap = self.load_heap
        while heap[0][0] != self.loads[heap[0][1]]:
            heapq.heappop(heap)
        return heap[0][0]

    def holder_choice(self, holders: Mapping[int, int] | None, cost: float, need: int, limit: float) -> int:
        """The holder with the most of the block's elements that is within the window; -1 if none."""
        if not holders:
            return -1
        best: tuple[int, int, float, int] | None = None
        for g, held in holders.items():
            if held <= 0 or (best is not None and held < -best[0]):
                continue            # cannot beat the best key, whose first entry is -held
            if self.groups is None:
                r = g
                if self.cap is not None and self.mem[r] + need > self.cap:
                    continue
            elif len(self.groups[g]) == 1:
                r = self.groups[g][0]
                if self.cap is not None and self.mem[r] + need > self.cap:
                    continue
            else:
                r = _least_loaded_fitting(self.group_heaps[g], self.loads, self.mem, need, self.cap)
                if r < 0:
                    continue
            if self.loads[r] <= limit or self.loads[r] + cost <= self.bound:
                key = (-held, self.mem[r], self.loads[r], r)
                if best is None or key < best:
                    best = key
        return -1 if best is None else best[3]

    def take(self, rank: int, cost: float, need: int) -> None:
        """Record that ``rank`` owns a block of ``cost`` and ``need`` bytes."""
        if need:
            self.mem[rank] += need
            heapq.heappush(self.mem_heap, (self.mem[rank], rank))
        if cost > 0:
            self.loads[rank] += cost
            heapq.heappush(self.load_heap, (self.loads[rank], rank))
            for g in self.groups_of_rank[rank]:
                if len(self.group_heaps[g]) > 1:
                    heapq.heappush(self.group_heaps[g], (self.loads[rank], rank))


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
