"""The class-wise balancer engine: slot arithmetic, LPT levels per class, targets, errors, determinism."""

from __future__ import annotations

import heapq
import math
import random

import numpy as np
import pytest

from sharded_shampoo.planning.balance import BlockDoesNotFitError, assign_owners, lower_bound, rank_loads
from sharded_shampoo.planning.class_balance import (
    Preferences,
    balance_classes,
    class_order,
    float_bisect,
    slots_upto,
    spread,
)


def ids(n):
    return [f"b{i:05d}" for i in range(n)]


def classic_lpt(costs, n):
    """Per-block LPT (heap), ties to the lowest rank: the schedule the classes reproduce."""
    heap = [(0.0, r) for r in range(n)]
    loads = [0.0] * n
    for c in sorted(costs, reverse=True):
        load, r = heapq.heappop(heap)
        loads[r] = load + c
        heapq.heappush(heap, (loads[r], r))
    return loads


@pytest.mark.parametrize("seed", range(20))
def test_slots_upto_counts_exactly(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 12)
    loads = np.array([rng.choice([0.0, rng.uniform(0, 100), 1e12 + rng.random()]) for _ in range(n)])
    c = rng.choice([0.0, 1e-9, 0.1, 1.0, 7.3, 1e3])
    lo = np.array([rng.randint(0, 3) for _ in range(n)], dtype=np.int64)
    hi = lo + np.array([rng.randint(0, 50) for _ in range(n)], dtype=np.int64)
    for t in [0.0, 1.0, 50.0, 1e12, 1e12 + 30, float(loads.max() + 3 * c)]:
        got = slots_upto(loads, c, t, lo, hi)
        want = [sum(1 for i in range(a, b) if L + i * c <= t) for L, a, b in zip(loads, lo, hi)]
        assert got.tolist() == want


def test_float_bisect_finds_the_smallest_float():
    target = 0.1 + 0.2
    assert float_bisect(0.0, 1.0, lambda t: t >= target) == target
    assert float_bisect(3.0, 3.0, lambda t: True) == 3.0


def test_spread_takes_from_the_most_remaining_first():
    avail = np.array([5, 1, 3, 3])
    tie = np.array([3, 2, 1, 0])                 # prefer index 3 on ties
    assert spread(avail, 2, tie).tolist() == [2, 0, 0, 0]
    assert spread(avail, 5, tie).tolist() == [3, 0, 1, 1]
    assert spread(avail, 6, tie).tolist() == [3, 0, 1, 2]
    assert spread(avail, 12, tie).tolist() == [5, 1, 3, 3]


@pytest.mark.parametrize("seed", range(10))
def test_equal_costs_give_classic_lpt_loads(seed):
    # One class of equal blocks on top of nothing, then a second class: the same per-rank loads
    # (as a multiset) as placing the blocks one at a time on the least-loaded rank.
    rng = random.Random(seed)
    n = rng.randint(2, 9)
    costs = [3.0] * rng.randint(1, 40) + [1.0] * rng.randint(0, 40)
    owners = assign_owners(costs, ids(len(costs)), n, tolerance=0.0)
    assert sorted(rank_loads(costs, owners, n)) == sorted(classic_lpt(costs, n))


@pytest.mark.parametrize("seed", range(10))
def test_no_class_raises_the_makespan_beyond_lpt(seed):
    # With tolerance 0 the maximum load is at most what per-block LPT bounds: total/N + p_max (1 - 1/N),
    # and the locality and memory preferences never pass it.
    rng = random.Random(500 + seed)
    n = rng.choice([3, 8, 16])
    m = rng.randint(n, 12 * n)
    costs = [float(rng.choice([1, 2, 2, 5, 8, 8, 13])) for _ in range(m)]
    mem = [int(c * 10) + rng.randint(0, 3) for c in costs]
    holders = [{rng.randrange(n): rng.randint(1, 9)} for _ in range(m)]
    owners = assign_owners(costs, ids(m), n, locality=lambda i: holders[i], memory_bytes=mem, tolerance=0.0)
    loads = rank_loads(costs, owners, n)
    assert max(loads) <= sum(costs) / n + max(costs) * (1 - 1 / n) + 1e-9
    assert max(loads) <= max(classic_lpt(costs, n)) + max(costs) * (1 - 1 / n) + 1e-9


def test_tolerance_adds_at_most_its_room():
    rng = random.Random(3)
    costs = [rng.uniform(1, 10) for _ in range(300)]
    base = max(rank_loads(costs, assign_owners(costs, ids(300), 16, tolerance=0.0), 16))
    for tol in (0.001, 0.01, 0.05):
        loads = rank_loads(costs, assign_owners(costs, ids(300), 16, tolerance=tol), 16)
        assert max(loads) <= base + tol * sum(costs) / 16 + max(costs) + 1e-9


def test_targets_spread_heavy_memory_light_blocks_by_memory():
    # 8 ranks: 7 heavy blocks leave rank 7 empty; 80 light blocks with big state. LPT alone would put
    # all of them on rank 7 (the only rank with load room); within the tolerance room they spread by
    # memory instead, and the load rises by at most that room.
    costs = [100.0] * 7 + [0.01] * 80
    mem = [10] * 7 + [1000] * 80
    strict = assign_owners(costs, ids(87), 8, memory_bytes=mem, tolerance=0.0)
    assert [strict[7:].count(r) for r in range(8)] == [0] * 7 + [80]
    loose = assign_owners(costs, ids(87), 8, memory_bytes=mem, tolerance=0.01)
    per_rank = [sum(m for m, r in zip(mem, loose) if r == k) for k in range(8)]
    assert max(per_rank) - min(per_rank) <= 1000 + 10
    assert max(rank_loads(costs, loose, 8)) <= 100 + 0.01 * sum(costs) / 8 + 1e-9


def test_locality_fills_the_counts_lpt_leaves_free():
    # 4 ranks, 8 equal blocks: LPT fixes 2 per rank, locality decides which: each rank gets the two
    # blocks it holds, whatever the input order.
    held = {i: {(3 * i) % 4: 10} for i in range(8)}
    for perm in ([*range(8)], [7, 3, 5, 1, 0, 2, 6, 4]):
        owners = assign_owners([1.0] * 8, [f"x{i}" for i in perm], 4, locality=lambda j: held[perm[j]])
        assert {perm[j]: o for j, o in enumerate(owners)} == {i: (3 * i) % 4 for i in range(8)}


def test_class_order_is_by_cost_then_memory_and_keeps_the_canonical_order():
    w = np.array([1.0, 5.0, 1.0, 5.0, 1.0])
    m = np.array([7, 3, 9, 3, 7])
    order = np.array([4, 3, 2, 1, 0])
    classes = class_order(w, m, order)
    assert [(c, mm, b.tolist()) for c, mm, b in classes] == [(5.0, 3, [3, 1]), (1.0, 9, [2]), (1.0, 7, [4, 0])]


def test_memory_cap_error_names_the_first_block_of_the_class_that_does_not_fit():
    # 6 equal blocks of 40 bytes, 2 ranks with 100 bytes free each: 4 fit, the first two of the
    # canonical (id) order that got no room are named.
    costs = [1.0] * 6
    with pytest.raises(BlockDoesNotFitError) as info:
        assign_owners(costs, ["f", "e", "d", "c", "b", "a"], 2, memory_bytes=[40] * 6, memory_cap_bytes=100,
                      base_memory_bytes=[0, 0])
    assert info.value.block_id in {"e", "f"} and info.value.block_bytes == 40
    assert info.value.largest_free_bytes == 20


def test_engine_rejects_nothing_and_handles_empty_and_zero_cost():
    empty = balance_classes(np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64),
                            np.zeros(0, dtype=np.int64), Preferences([], None), 3, np.zeros(3, dtype=np.int64),
                            None, 0.0)
    assert empty.tolist() == []
    owners = assign_owners([0.0] * 5, ids(5), 3, memory_bytes=[10] * 5)
    assert sorted(owners.count(r) for r in range(3)) == [1, 2, 2]           # zero load: spread by memory
    assert lower_bound([0.0] * 5, 3) == 0.0


def test_degenerate_float_costs_stay_exact():
    # A cost below the resolution of a huge load: the slot arithmetic must not lose or invent blocks.
    costs = [1e16] * 3 + [1e-3] * 50
    owners = assign_owners(costs, ids(53), 3, tolerance=0.0)
    assert len(owners) == 53 and all(0 <= o < 3 for o in owners)
    assert sorted(owners[:3]) == [0, 1, 2]
    assert math.isclose(sum(rank_loads(costs, owners, 3)), sum(costs))
