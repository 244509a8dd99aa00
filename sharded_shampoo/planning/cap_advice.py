"""Memory-cap advice: the largest ``max_preconditioner_dim`` under which a plan fits a cap.

Called when the balancer cannot place a block under ``memory_cap_bytes``. Every candidate ``D``
below the failing one is screened with two necessary conditions computed in closed form
(``costs.param_state_bytes``, no block lists): every parameter's largest block fits in the most
free memory a rank has before owning anything, and the total state fits in the free memory of
all ranks. The largest candidate that passes is verified with a full balance under the cap; if
packing still fails (the screen ignores fragmentation), the screened candidates are bisected
with full balances. Smaller blocks do not always help (square blocks cost ~4 factor entries per
element at any size), so the answer may be that no dimension fits, with the numbers.

Deterministic: the verification is bounded by a number of full balances and a block count per
balance (never by wall-clock time), so every rank and every run gives the same message.
"""

from __future__ import annotations

import dataclasses

from ..config import PlanSettings
from .balance import BlockDoesNotFitError
from .costs import SALT_BYTES_PER_BLOCK, CostModel, param_state_bytes
from .layout import MeshSpec, ParamSpec, param_geometry
from .regions import RegionTable
from .stages import balance_blocks, base_memory, resident_bytes

#: Bounds of the verification: full balances, and blocks per balance (relative to the failing
#: plan, with a floor for small models).
MAX_BALANCES = 16
MAX_BLOCKS_FACTOR = 4
MIN_BLOCKS = 200_000


class _Screen:
    """Closed-form (largest block, total state, block count) of the model with every D capped at d (state
    bytes include each block's resident salt; the index tables are left to the full balance's check)."""

    def __init__(self, params: list[ParamSpec], per_param: list[PlanSettings]) -> None:
        self.params = params
        self.per_param = per_param
        self.index = {id(s): i for i, s in enumerate(per_param)}
        self.cache: dict[tuple, tuple[int, int, int]] = {}

    def __call__(self, d: int) -> tuple[int, int, int]:
        largest = total = blocks = 0
        for p, s in zip(self.params, self.per_param):
            dd = min(s.max_preconditioner_dim, d)
            key = (p.shape, self.index[id(s)], dd)
            hit = self.cache.get(key)
            if hit is None:
                hit = self.cache[key] = param_state_bytes(p.shape, dd, s.preconditioner, s.grafting, s.beta1,
                                                          s.blocking)
            salt = 0 if s.release_buffers_between_steps else SALT_BYTES_PER_BLOCK   # resident beside the state
            largest = max(largest, hit[0] + salt)
            total += hit[1] + salt * hit[2]
            blocks += hit[2]
        return largest, total, blocks


class _Verifier:
    """Full balances under the cap, bounded in count and size; None where a bound stopped it."""

    def __init__(self, params: list[ParamSpec], mesh: MeshSpec, per_param: list[PlanSettings], cap: int,
                 cost_model: CostModel, tolerance: float, screen: _Screen, current: int) -> None:
        self.args = (params, mesh, per_param, cap, cost_model, tolerance)
        self.screen = screen
        self.max_blocks = max(MIN_BLOCKS, MAX_BLOCKS_FACTOR * screen(current)[2])
        self.balances = 0

    def fits(self, d: int) -> bool | None:
        params, mesh, per_param, cap, cost_model, tolerance = self.args
        if self.screen(d)[2] > self.max_blocks or self.balances >= MAX_BALANCES:
            return None
        self.balances += 1
        capped = [dataclasses.replace(x, max_preconditioner_dim=min(x.max_preconditioner_dim, d)) for x in per_param]
        try:
            balance_blocks(params, mesh, capped, cap, cost_model, tolerance)
        except BlockDoesNotFitError:
            return False
        return True


def _largest_fitting(candidates: list[int], verifier: _Verifier) -> tuple[int, bool]:
    """Bisect ascending ``candidates`` for the largest that fits, assuming fitting is monotone in D.

    Returns (index, verified); index -1 when none fits.
    """
    lo, hi, verified = -1, len(candidates), False
    top = verifier.fits(candidates[-1])
    if top:
        return len(candidates) - 1, True
    if top is False:
        hi = len(candidates) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok = verifier.fits(candidates[mid])
        if ok is False:
            hi = mid
        else:
            lo, verified = mid, ok is True
    return lo, verified


def cap_advice(params: list[ParamSpec], mesh: MeshSpec, per_param: list[PlanSettings], cap: int | None,
               cost_model: CostModel, tolerance: float, err: BlockDoesNotFitError) -> str:
    """The balancer's error plus the largest ``max_preconditioner_dim`` that fits (see the module doc)."""
    assert cap is not None
    current = max(s.max_preconditioner_dim for s in per_param)
    geoms = [param_geometry(p, mesh) for p in params]
    base = resident_bytes(*base_memory(params, per_param, geoms, RegionTable(geoms, mesh.world_size))).tolist()
    free = cap - min(base)
    total_free = sum(max(cap - b, 0) for b in base)
    screen = _Screen(params, per_param)
    candidates = []                                  # ascending D that pass the screen
    best_total: tuple[int, int] | None = None        # smallest (total state, d) seen
    for d in range(1, current):
        largest, total, _ = screen(d)
        if best_total is None or total < best_total[0]:
            best_total = (total, d)
        if largest <= free and total <= total_free:
            candidates.append(d)
    if not candidates:
        if free <= 0:
            return (f"{err} (no max_preconditioner_dim fits: parameters, gradients and momentum / z alone "
                    "exceed the cap on some rank; raise memory_cap_bytes or use more ranks).")
        total, d = best_total if best_total is not None else (screen(current)[1], current)
        return (f"{err} (no max_preconditioner_dim fits: the optimizer state needs at least {total} bytes in total "
                f"(at max_preconditioner_dim={d}) but all ranks together have {total_free} bytes free under the "
                "cap; raise memory_cap_bytes, use more ranks, or drop grafting / filtered-gradient state).")
    verifier = _Verifier(params, mesh, per_param, cap, cost_model, tolerance, screen, current)
    lo, verified = _largest_fitting(candidates, verifier)
    if lo < 0:
        return (f"{err} (no max_preconditioner_dim fits: every size that passes the memory screen, down to "
                f"{candidates[0]}, still fails to pack the blocks under the cap; raise memory_cap_bytes or use "
                "more ranks).")
    if verified:
        return f"{err} (the largest max_preconditioner_dim that fits is {candidates[lo]})."
    return (f"{err} (max_preconditioner_dim={candidates[lo]} passes the memory screen but a full plan was too big "
            "to verify here; try it or a slightly smaller value).")
