"""The balancer: classical LPT bounds, determinism, locality, holder groups, memory cap, and its class-wise
engine (slot arithmetic, LPT levels per class, memory/load targets, cap errors)."""

from __future__ import annotations

import heapq
import itertools
import math
import random

import numpy as np
import pytest

from sharded_shampoo.planning.class_balance import (
    Preferences,
    balance_classes,
    class_order,
    float_bisect,
    slots_upto,
    spread,
)
from sharded_shampoo.planning.balance import (
    BlockDoesNotFitError,
    assign_owners,
    imbalance,
    lower_bound,
    pigeonhole_lower_bound,
    rank_loads,
    round_robin_param_owners,
)


def ids(n):
    return [f"b{i:05d}" for i in range(n)]


def brute_force_opt(costs, n_ranks):
    """Optimal makespan by enumerating assignments (first job pinned to rank 0 by symmetry)."""
    best = math.inf
    for rest in itertools.product(range(n_ranks), repeat=len(costs) - 1):
        loads = [0.0] * n_ranks
        loads[0] += costs[0]
        for c, r in zip(costs[1:], rest):
            loads[r] += c
        best = min(best, max(loads))
    return best


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_graham_worst_case_is_tight(n):
    # Graham's instance: 2n+1 jobs 2n-1, 2n-1, 2n-2, 2n-2, ..., n+1, n+1, n, n, n.
    # OPT = 3n = lower bound (total / n); LPT = 4n - 1, i.e. exactly (4/3 - 1/(3n)) x OPT.
    costs = [float(c) for k in range(2 * n - 1, n, -1) for c in (k, k)] + [float(n)] * 3
    owners = assign_owners(costs, ids(len(costs)), n, tolerance=0.0)
    loads = rank_loads(costs, owners, n)
    assert lower_bound(costs, n) == 3 * n
    assert max(loads) == 4 * n - 1
    assert max(loads) == pytest.approx((4 / 3 - 1 / (3 * n)) * lower_bound(costs, n))


@pytest.mark.parametrize("seed", range(12))
def test_lpt_within_classical_bound_of_optimal(seed):
    rng = random.Random(seed)
    n = rng.choice([2, 3])
    costs = [float(rng.randint(1, 30)) for _ in range(rng.randint(n + 1, 8))]
    opt = brute_force_opt(costs, n)
    assert opt >= lower_bound(costs, n)
    for tol in (0.0, 0.01):
        loads = rank_loads(costs, assign_owners(costs, ids(len(costs)), n, tolerance=tol), n)
        # tolerance widens the window by tol x mean at most
        assert max(loads) <= (4 / 3 - 1 / (3 * n)) * opt + tol * sum(costs) / n + 1e-9


@pytest.mark.parametrize("seed", range(6))
def test_many_small_blocks_within_bound_of_lower_bound(seed):
    # When no block exceeds a third of the lower bound, LPT's max <= total/N + p_max (1 - 1/N)
    # <= (4/3 - 1/(3N)) x lower bound: checkable without knowing OPT.
    rng = random.Random(100 + seed)
    n = rng.choice([4, 16, 64])
    costs = [rng.uniform(1.0, 10.0) for _ in range(rng.randint(4 * n, 20 * n))]
    lb = lower_bound(costs, n)
    assert max(costs) <= lb / 3
    for tol in (0.0, 0.01):
        loads = rank_loads(costs, assign_owners(costs, ids(len(costs)), n, tolerance=tol), n)
        window = tol * sum(costs) / n
        assert max(loads) <= sum(costs) / n + max(costs) * (1 - 1 / n) + window + 1e-9
        assert max(loads) <= (4 / 3 - 1 / (3 * n)) * lb + window + 1e-9


@pytest.mark.parametrize("per_rank", [1, 3, 150])
@pytest.mark.parametrize("tol", [0.0, 0.01])
def test_equal_blocks_dividing_evenly_hit_the_lower_bound(per_rank, tol):
    n = 16
    costs = [7.5] * (n * per_rank)
    owners = assign_owners(costs, ids(len(costs)), n, memory_bytes=[100] * len(costs), tolerance=tol)
    loads = rank_loads(costs, owners, n)
    assert loads == [7.5 * per_rank] * n
    assert max(loads) == lower_bound(costs, n)
    assert imbalance(loads) == 1.0


def test_deterministic_under_input_permutation():
    rng = random.Random(7)
    n, m = 12, 300
    costs = [float(rng.choice([1, 2, 3, 5, 8, 8, 8])) for _ in range(m)]   # many exact ties
    block_ids = [f"p{rng.randint(0, 40)}.block_{i}" for i in range(m)]
    holders = [{rng.randrange(n): rng.randint(1, 9) for _ in range(rng.randint(0, 3))} for _ in range(m)]
    mem = [rng.randint(1, 50) for _ in range(m)]
    ref = assign_owners(costs, block_ids, n, locality=lambda i: holders[i], memory_bytes=mem)
    by_id = dict(zip(block_ids, ref))
    for seed in range(3):
        perm = list(range(m))
        random.Random(seed).shuffle(perm)
        got = assign_owners([costs[i] for i in perm], [block_ids[i] for i in perm], n,
                            locality=lambda j: holders[perm[j]], memory_bytes=[mem[i] for i in perm])
        assert {block_ids[i]: got[j] for j, i in enumerate(perm)} == by_id


def test_locality_prefers_the_holder_among_near_least_loaded():
    # Everyone starts empty: the block goes to the rank holding most of it, not to rank 0.
    owners = assign_owners([10.0], ["x"], 8, locality=lambda i: {5: 3, 6: 7})
    assert owners == [6]
    # Without locality: plain LPT picks the lowest least-loaded rank.
    assert assign_owners([10.0], ["x"], 8) == [0]


def test_locality_respects_the_makespan_bound():
    # 100 unit blocks on 4 ranks -> lower bound 25 (x1.01 tolerance). Rank 2 holds 30 of them: it
    # keeps as many as fit under the bound, the rest are balanced elsewhere, balance stays perfect.
    costs = [1.0] * 100
    held = {i: {2: 5} for i in range(30)}
    owners = assign_owners(costs, ids(100), 4, locality=lambda i: held.get(i, {}), tolerance=0.01)
    assert sum(owners[i] == 2 for i in range(30)) == 25
    assert [owners.count(r) for r in range(4)] == [25, 25, 25, 25]
    # Non-holders only take blocks inside the window: with tolerance 0 it is classical LPT.
    owners = assign_owners(costs, ids(100), 4, tolerance=0.0)
    assert [owners.count(r) for r in range(4)] == [25, 25, 25, 25]


def test_shard_aligned_blocks_stay_on_their_holders():
    # 8 equal blocks, rank r holds blocks 2r and 2r+1 (FSDP rows aligned with blocks): no traffic.
    held = {i: {i // 2: 100} for i in range(8)}
    owners = assign_owners([1.0] * 8, ids(8), 4, locality=lambda i: held[i])
    assert owners == [0, 0, 1, 1, 2, 2, 3, 3]


def test_holder_groups_pick_least_loaded_replica():
    # HSDP 2 x 2: ranks {0, 2} hold shard 0, {1, 3} hold shard 1. Two blocks held by shard 1
    # go to both replicas of shard 1 (1 first, then 3) instead of piling onto one rank.
    costs = [10.0, 10.0]
    groups = [[0, 2], [1, 3]]
    owners = assign_owners(costs, ["a", "b"], 4, locality=lambda i: {1: 100}, holder_groups=groups,
                           tolerance=0.0)
    assert owners == [1, 3]
    with pytest.raises(ValueError, match=r"holder_groups\[0\]"):
        assign_owners(costs, ["a", "b"], 4, holder_groups=[[0, 9]])


def test_overlapping_holder_groups():
    # Two parameters with different layouts: an HSDP-like shard held by {0, 2} and a tensor-parallel
    # replicated norm held by {0, 1}. Rank 0 is in both groups; its load must count in both.
    groups = [[0, 2], [0, 1]]
    prefs = {0: {0: 10}, 1: {0: 10}, 2: {1: 10}, 3: {1: 10}}
    owners = assign_owners([4.0, 4.0, 4.0, 4.0], ["a", "b", "c", "d"], 4, locality=prefs.__getitem__,
                           holder_groups=groups, tolerance=0.0)
    # a -> 0, b -> 2 (group 0's least loaded), c -> 1 (group 1's least loaded); d: both holders are
    # busy and over the makespan bound, so it goes to the idle non-holder 3
    assert owners == [0, 2, 1, 3]
    assert rank_loads([4.0] * 4, owners, 4) == [4.0] * 4


def test_memory_preference_spreads_light_but_big_blocks():
    # 8 heavy blocks fill 8 ranks evenly; 40 light blocks with big state must spread over the
    # window instead of piling onto the single least-loaded rank.
    costs = [100.0] * 8 + [0.01] * 40
    mem = [10] * 8 + [1000] * 40
    owners = assign_owners(costs, ids(48), 8, memory_bytes=mem)
    per_rank = [sum(m for m, r in zip(mem, owners) if r == k) for k in range(8)]
    assert max(per_rank) - min(per_rank) <= 1000
    assert max(rank_loads(costs, owners, 8)) <= 100 + 0.01 * 5 + 1e-9


def test_memory_cap_is_respected_and_errors_name_the_block():
    costs = [5.0, 4.0, 3.0, 2.0]
    mem = [60, 50, 40, 30]
    owners = assign_owners(costs, ["a", "b", "c", "d"], 2, memory_bytes=mem, memory_cap_bytes=100,
                           base_memory_bytes=[0, 0])
    used = [sum(m for m, r in zip(mem, owners) if r == k) for k in range(2)]
    assert max(used) <= 100
    with pytest.raises(BlockDoesNotFitError, match="'big'") as info:
        assign_owners([1.0, 9.0], ["small", "big"], 2, memory_bytes=[10, 95], memory_cap_bytes=100,
                      base_memory_bytes=[10, 20])
    assert info.value.block_id == "big" and info.value.block_index == 1
    assert info.value.block_bytes == 95 and info.value.largest_free_bytes == 90
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("kwargs,match", [
    (dict(costs=[1.0], block_ids=["a", "b"], num_ranks=2), "same length"),
    (dict(costs=[1.0, -1.0], block_ids=["a", "b"], num_ranks=2), r"costs\[1\]"),
    (dict(costs=[1.0, float("nan")], block_ids=["a", "b"], num_ranks=2), r"costs\[1\]"),
    (dict(costs=[1.0, 1.0], block_ids=["a", "a"], num_ranks=2), "unique"),
    (dict(costs=[1.0], block_ids=["a"], num_ranks=0), "num_ranks"),
    (dict(costs=[1.0], block_ids=["a"], num_ranks=2, tolerance=-0.1), "tolerance"),
    (dict(costs=[1.0], block_ids=["a"], num_ranks=2, memory_cap_bytes=10), "memory_bytes"),
    (dict(costs=[1.0], block_ids=["a"], num_ranks=2, memory_bytes=[1], base_memory_bytes=[0]),
     "base_memory_bytes"),
])
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        assign_owners(**kwargs)


@pytest.mark.parametrize("seed", range(10))
def test_pigeonhole_bound_is_a_valid_lower_bound(seed):
    rng = random.Random(300 + seed)
    n = rng.choice([2, 3])
    costs = [float(rng.randint(1, 20)) for _ in range(rng.randint(n + 1, 8))]
    assert lower_bound(costs, n) <= pigeonhole_lower_bound(costs, n) <= brute_force_opt(costs, n)


def test_pigeonhole_bound_shows_lpt_optimal_on_coarse_problems():
    # 146 equal big blocks + small ones on 64 ranks (GPT-2 small's shape): some rank must take 3.
    costs = [5.8] * 146 + [0.1] * 150
    lb, tight = lower_bound(costs, 64), pigeonhole_lower_bound(costs, 64)
    assert tight == pytest.approx(3 * 5.8) and lb < tight
    loads = rank_loads(costs, assign_owners(costs, ids(len(costs)), 64), 64)
    assert max(loads) == pytest.approx(tight)


def test_helpers():
    assert lower_bound([], 4) == 0.0
    assert lower_bound([1.0, 1.0, 10.0], 4) == 10.0
    assert lower_bound([3.0] * 8, 4) == 6.0
    assert imbalance([1.0, 3.0]) == 1.5
    assert imbalance([0.0, 0.0]) == 1.0
    assert round_robin_param_owners([0, 0, 1, 2, 3, 3], 3) == [0, 0, 1, 2, 0, 0]
    assert assign_owners([], [], 3) == []


# ----------------------------------------------------------------------------- the class-wise engine


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
