"""The balancer's engine: LPT over classes of interchangeable blocks, with arrays. Pure.

Blocks of equal balance weight and equal state bytes are interchangeable for load and memory:
placing a class of ``k`` such blocks one at a time on the least-loaded rank (LPT) fixes how
many each rank gets, whichever block goes where. So the balancer decides per class, not per
block (llama3-405b has 391,120 blocks in 3 classes):

1. **Room.** The class makespan ``M`` is what LPT reaches placing the class on top of the
   current loads: the ``k``-th smallest slot end ``L_r + j c`` (``j >= 1``), but never less than
   the makespan so far or the lower bound ``LB = max(total / N, largest block)`` that no
   assignment can beat. A rank may take blocks while its load stays within ``M`` (plus
   ``tolerance x mean load``; default 0) and its memory under the cap, so no class raises the
   maximum load above what LPT would give it; below that line every choice is free, which is what
   the preferences use.
2. **Counts.** How many blocks each rank takes: the ranks with the least memory fill their room
   first (then least load, then lowest rank), so light blocks with heavy state spread instead of
   piling up; slots equally good by memory and load are left open (:class:`Targets`).
3. **Locality.** Which blocks fill the counts: blocks whose data some ranks hold (a sub-class:
   blocks with the same holders, fewest candidate ranks first) go to the holders of most of their
   elements, spread over the holders' counts, and take their pick of the open slots; the other
   blocks fill what is left.

Determinism: classes go by decreasing weight (then memory); inside a class blocks keep the
caller's canonical order (a total order that does not depend on input order); arithmetic is
elementwise IEEE (a slot's start is always ``L + i * c``, and a rank's load after ``n`` blocks
is ``L + n * c``), comparisons and integer counts, never an order-dependent float reduction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


class ClassBalanceError(ValueError):
    """A block that fits no rank under the memory cap (converted by ``balance`` to its public error)."""

    def __init__(self, block_index: int, block_bytes: int, largest_free_bytes: int) -> None:
        self.block_index = block_index
        self.block_bytes = block_bytes
        self.largest_free_bytes = largest_free_bytes
        super().__init__(f"block {block_index} does not fit")


def slots_upto(loads: np.ndarray, c: float, t: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per rank, how many ``i`` in ``[lo, hi)`` have ``loads + i * c <= t`` (IEEE, elementwise).

    ``loads + i * c`` is non-decreasing in ``i``, so the answer is where it passes ``t``: estimated by
    division, corrected by one step each way, and bisected where rounding flattens the sequence
    (a cost below the resolution of a large load).
    """
    if c == 0:
        return np.where(loads <= t, hi - lo, 0)
    with np.errstate(over="ignore", invalid="ignore"):
        guess = np.floor((t - loads) / c)
    i = np.clip(np.nan_to_num(guess, nan=-1.0, posinf=float(hi.max(initial=0))), lo - 1, hi - 1).astype(np.int64)
    i += (i + 1 < hi) & (loads + (i + 1) * c <= t)          # one correction step each way absorbs rounding
    i -= (i >= lo) & (loads + i * c > t)
    bad = ((i >= lo) & (loads + i * c > t)) | ((i + 1 < hi) & (loads + (i + 1) * c <= t))
    if bad.any():
        i[bad] = _last_within(loads[bad], c, t, lo[bad], hi[bad])
    return np.clip(i + 1 - lo, 0, hi - lo)


def _last_within(loads: np.ndarray, c: float, t: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The largest ``i`` in ``[lo - 1, hi)`` with ``loads + i * c <= t`` (``lo - 1``: none), by bisection."""
    a, b = lo - 1, hi - 1                                   # invariant: answer in [a, b]
    while (a < b).any():
        mid = (a + b + 1) // 2
        ok = loads + mid * c <= t
        a = np.where((a < b) & ok, mid, a)
        b = np.where((a < b) & ~ok, mid - 1, b)
    return a


def float_bisect(lo: float, hi: float, enough: Callable[[float], bool]) -> float:
    """The smallest float in ``[lo, hi]`` (both >= 0) for which ``enough`` holds; ``enough(hi)`` must."""
    a = int(np.float64(lo).view(np.int64))
    b = int(np.float64(hi).view(np.int64))
    while a < b:
        mid = (a + b) // 2
        if enough(float(np.int64(mid).view(np.float64))):
            b = mid
        else:
            a = mid + 1
    return float(np.int64(b).view(np.float64))


def spread(avail: np.ndarray, take: int, tie_order: np.ndarray) -> np.ndarray:
    """``take`` units from ``avail``, most remaining first (a water level), ties in ``tie_order``."""
    def above(h: int) -> int:
        return int(np.maximum(avail - h, 0).sum())
    lo, hi = 0, int(avail.max(initial=0))
    while lo < hi:                   # smallest h with above(h) <= take
        mid = (lo + hi) // 2
        if above(mid) <= take:
            hi = mid
        else:
            lo = mid + 1
    alloc = np.maximum(avail - lo, 0)
    rest = take - int(alloc.sum())
    if rest:
        eligible = tie_order[avail[tie_order] >= lo]
        alloc[eligible[:rest]] += 1
    return alloc


class Preferences:
    """Locality maps turned into candidate ranks per level (most held elements first), cached."""

    def __init__(self, prefs: Sequence[Mapping[int, int]], groups: Sequence[Sequence[int]] | None) -> None:
        self.prefs = prefs
        self.groups = groups
        self.cache: dict[int, list[np.ndarray]] = {}

    def levels(self, index: int) -> list[np.ndarray]:
        hit = self.cache.get(index)
        if hit is None:
            by_held: dict[int, set[int]] = {}
            for g, held in self.prefs[index].items():
                if held > 0:
                    members = self.groups[g] if self.groups is not None else (g,)
                    by_held.setdefault(held, set()).update(members)
            hit = self.cache[index] = [np.array(sorted(by_held[h]), dtype=np.int64) for h in sorted(by_held,
                                                                                                  reverse=True)]
        return hit


@dataclass
class Targets:
    """How many blocks of a class each rank takes: its ``firm`` slots, plus ``need`` of the ``tied``
    slots (equally good by memory and load). Locality takes from both; what it leaves goes to the
    ranks in ``tie_order``. ``taken`` counts the slots locality used (firm and tied)."""

    firm: np.ndarray
    tied: np.ndarray
    need: int
    tie_order: np.ndarray
    taken: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.taken = np.zeros(len(self.firm), dtype=np.int64)


class ClassBalancer:
    """Loads and memory of one balancing run; :meth:`place` decides one class."""

    def __init__(self, num_ranks: int, bound: float, slack: float, base_memory: np.ndarray,
                 cap: int | None, prefs: Preferences) -> None:
        self.n = num_ranks
        self.loads = np.zeros(num_ranks, dtype=np.float64)
        self.mem = base_memory.astype(np.int64).copy()
        self.bound = bound
        self.slack = slack
        self.cap = cap
        self.prefs = prefs
        self.makespan = 0.0
        self.ranks = np.arange(num_ranks, dtype=np.int64)

    def fit(self, m: int, k: int) -> np.ndarray:
        """Blocks of ``m`` bytes each rank can still take under the cap (at most ``k``)."""
        if self.cap is None:
            return np.full(self.n, k, dtype=np.int64)
        if m == 0:
            return np.where(self.mem <= self.cap, k, 0).astype(np.int64)
        return np.clip((self.cap - self.mem) // m, 0, k).astype(np.int64)

    def room(self, c: float, k: int, fit: np.ndarray, slack: float) -> np.ndarray:
        """Blocks each rank may take while its load stays within the class makespan (+ ``slack``)."""
        if c == 0:
            return fit
        one = np.ones(self.n, dtype=np.int64)

        def ends_within(t: float) -> np.ndarray:
            return slots_upto(self.loads, c, t, one, fit + 1)

        level = max(self.makespan, self.bound)
        if int(ends_within(level).sum()) < k <= int(fit.sum()):
            live = fit > 0
            lo = float((self.loads[live] + c).min())
            hi = float(self.loads[live].max() + k * c)
            level = float_bisect(lo, hi, lambda t: int(ends_within(t).sum()) >= k)
        return ends_within(level + slack) if slack else ends_within(level)

    def place(self, blocks: np.ndarray, subclasses: list[tuple[int, np.ndarray]], c: float, m: int,
              owners: np.ndarray) -> None:
        """Owners of one class: ``blocks`` in canonical order, ``subclasses`` = (preference, blocks) pairs.

        How many blocks each rank takes is decided first (room, then memory, then load), up to slots
        that are equally good; locality decides which blocks fill the counts and takes its pick of
        the equally good slots.
        """
        k = len(blocks)
        room = self.room(c, k, self.fit(m, k), self.slack)
        x = min(k, int(room.sum()))
        target = self.targets(room, x, c, m)
        self.place_local(subclasses, target, owners)
        rest = blocks[owners[blocks] < 0]
        chosen = target.tie_order[np.repeat(np.arange(len(target.tie_order)), target.tied[target.tie_order])]
        ranks = np.concatenate([np.repeat(self.ranks, target.firm), chosen[:target.need]])
        owners[rest[:len(ranks)]] = ranks
        taken = target.firm + np.bincount(chosen[:target.need], minlength=self.n)
        self.commit(taken + target.taken, c, m)
        if x < k:
            raise ClassBalanceError(int(rest[len(ranks)]), m, int(self.cap - self.mem.min()) if self.cap else 0)

    def place_local(self, subclasses: list[tuple[int, np.ndarray]], target: "Targets", owners: np.ndarray) -> None:
        """Blocks placed on their holders within the targets (firm slots first, then tied ones)."""
        for pref, members in subclasses:
            pos = 0
            for cand in self.prefs.levels(pref):
                tie = np.lexsort((cand, self.mem[cand]))
                for pool in (target.firm, target.tied):
                    avail = pool[cand]
                    total = int(avail.sum())
                    limit = len(members) - pos if pool is target.firm else min(len(members) - pos, target.need)
                    if total == 0 or limit == 0:
                        continue
                    take = min(limit, total)
                    alloc = spread(avail, take, tie)
                    pool[cand] -= alloc
                    target.taken[cand] += alloc
                    if pool is target.tied:
                        target.need -= take
                    owners[members[pos:pos + take]] = np.repeat(cand, alloc)
                    pos += take
                if pos == len(members):
                    break

    def targets(self, avail: np.ndarray, x: int, c: float, m: int) -> "Targets":
        """``x`` slots of ``avail``: least memory, then least load, then lowest rank (see :class:`Targets`)."""
        none = np.zeros(self.n, dtype=np.int64)
        if x == 0:
            return Targets(none, none.copy(), 0, self.ranks[:0])
        if m == 0:
            firm = none.copy()
            for value in np.unique(self.mem[avail > 0]):          # memory does not grow: emptiest ranks first
                ranks = np.nonzero((self.mem == value) & (avail > 0))[0]
                y = x - int(firm.sum())
                if int(avail[ranks].sum()) <= y:
                    firm[ranks] = avail[ranks]
                    continue
                below, tied = self.fill_by_load(ranks, avail[ranks], y, c)
                firm[ranks] = below
                tied_all = none.copy()
                tied_all[ranks] = tied
                return Targets(firm, tied_all, y - int(below.sum()), ranks[tied > 0])
            return Targets(firm, none.copy(), 0, self.ranks[:0])
        return self.fill_by_memory(avail, x, c, m)

    def fill_by_memory(self, avail: np.ndarray, x: int, c: float, m: int) -> "Targets":
        """The memory water level holding ``x`` slots; slots exactly at it are tied (by load, then rank)."""
        mem = self.mem
        live = avail > 0

        def count(t: int) -> int:
            return int(np.minimum(avail, np.maximum((t - mem) // m + 1, 0)).sum())
        lo, hi = int(mem[live].min()), int((mem[live] + (avail[live] - 1) * m).max())
        while lo < hi:                                   # smallest memory level holding x slots
            mid = (lo + hi) // 2
            if count(mid) >= x:
                hi = mid
            else:
                lo = mid + 1
        firm = np.minimum(avail, np.maximum((lo - 1 - mem) // m + 1, 0))
        at = np.nonzero(live & (firm < avail) & (mem + firm * m == lo))[0]
        tied = np.zeros(self.n, dtype=np.int64)
        tied[at] = 1
        start = self.loads[at] + firm[at] * c
        return Targets(firm, tied, x - int(firm.sum()), at[np.lexsort((at, start))])

    def fill_by_load(self, ranks: np.ndarray, avail: np.ndarray, y: int,
                     c: float) -> tuple[np.ndarray, np.ndarray]:
        """The load level holding ``y`` slots of ``avail`` on ``ranks``: slots below it, slots exactly at it."""
        loads = self.loads[ranks]
        zero = np.zeros(len(ranks), dtype=np.int64)
        if y == 0:
            return zero, zero
        level = float_bisect(float(loads.min()), float((loads + (avail - 1) * c).max()),
                             lambda t: int(slots_upto(loads, c, t, zero, avail).sum()) >= y)
        below = slots_upto(loads, c, float(np.nextafter(level, -np.inf)), zero, avail)
        return below, slots_upto(loads, c, level, zero, avail) - below

    def commit(self, used: np.ndarray, c: float, m: int) -> None:
        """Loads and memory after the class (a load after ``n`` blocks is ``L + n * c``)."""
        if c:
            self.loads = self.loads + used * c
            self.makespan = max(self.makespan, float(self.loads.max()))
        self.mem += used * m


def class_order(weights: np.ndarray, memory: np.ndarray, order: np.ndarray) -> list[tuple[float, int, np.ndarray]]:
    """``[(weight, memory, blocks in canonical order)]`` by decreasing weight, then memory."""
    o = order[np.argsort(-memory[order], kind="stable")]
    o = o[np.argsort(-weights[o], kind="stable")]
    w, mm = weights[o], memory[o]
    cuts = np.nonzero((w[1:] != w[:-1]) | (mm[1:] != mm[:-1]))[0] + 1
    return [(float(w[s]), int(mm[s]), o[s:e]) for s, e in zip(np.r_[0, cuts], np.r_[cuts, len(o)])]


def subclasses(blocks: np.ndarray, pref_index: np.ndarray, prefs: Preferences) -> list[tuple[int, np.ndarray]]:
    """Blocks of a class grouped by locality preference, fewest top-level candidates first."""
    pid = pref_index[blocks]
    has = pid >= 0
    if not has.any():
        return []
    blocks, pid = blocks[has], pid[has]
    uniq, first, inverse = np.unique(pid, return_index=True, return_inverse=True)
    grouped = np.argsort(inverse, kind="stable")
    cuts = np.cumsum(np.bincount(inverse))
    out = []
    for i, p in enumerate(uniq):
        levels = prefs.levels(int(p))
        if levels:
            members = blocks[grouped[(cuts[i - 1] if i else 0):cuts[i]]]
            out.append((len(levels[0]), int(first[i]), int(p), members))
    out.sort(key=lambda t: (t[0], t[1]))
    return [(p, members) for _, _, p, members in out]


def balance_classes(weights: np.ndarray, memory: np.ndarray, order: np.ndarray, pref_index: np.ndarray,
                    prefs: Preferences, num_ranks: int, base_memory: np.ndarray, cap: int | None,
                    tolerance: float) -> np.ndarray:
    """Owner of every block (see the module doc). ``order``: block indices in canonical order.

    Raises :class:`ClassBalanceError` naming the first block (in canonical order) of the first class
    that does not fit under the cap.
    """
    owners = np.full(len(weights), -1, dtype=np.int64)
    if len(weights) == 0:
        return owners
    total = math.fsum(weights.tolist())
    bound = max(total / num_ranks, float(weights.max()))
    state = ClassBalancer(num_ranks, bound, tolerance * total / num_ranks, base_memory, cap, prefs)
    for c, m, blocks in class_order(weights, memory, order):
        state.place(blocks, subclasses(blocks, pref_index, prefs), c, m, owners)
    return owners


__all__ = ["ClassBalanceError", "ClassBalancer", "Preferences", "balance_classes", "class_order",
           "float_bisect", "slots_upto", "spread", "subclasses"]
