"""The Shampoo plan: parameters + mesh + settings -> blocks, owners, per-rank report.

This is the single source of truth shared by the optimizer and the dry-run planner:
:func:`make_plan` cuts every parameter into blocks (``blocking.plan_blocks``), prices each
block (``costs``), assigns an owner rank to each (``balance.assign_owners``) and accounts, per
rank, for parameter/gradient bytes, optimizer state by kind, communication per step, the
modeled transient peak and the FLOPs. Everything is a pure function of shapes, placements,
mesh and settings, so every rank computes the same plan without communicating.

Data placement (see ``layout.py``): a ``sharded`` parameter is ``Shard(0)`` over the last mesh
axis with ``torch.chunk`` row ranges, held identically by every replica; an unsharded one is
held in full by every rank. A rank *holds* part of a block when its merged rows intersect the
block's ``ranges[0]``.

Per-rank accounting (bytes by kind, communication, transient peak, FLOPs) is in
``accounting.py``; the memory-cap advice (largest ``max_preconditioner_dim`` that fits) here.

Communication model of one step (bytes in each parameter's ``comm_dtype``):
gather -- the owner receives the block elements it does not hold; each piece is sent by the
holder of that shard in the owner's own replica group (replicated parameters need nothing);
update -- the owner sends every other holder rank (all replicas) the block elements it holds.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .accounting import RankReport, plan_summary, rank_reports
from .balance import DEFAULT_LOCALITY_TOLERANCE, BlockDoesNotFitError, assign_owners
from .blocking import Block, plan_blocks
from ..config import (
    AdaGradGrafting,
    AdamGrafting,
    BlockingConfig,
    EigenvalueCorrectedShampoo,
    GraftingConfig,
    PreconditionerConfig,
    RMSpropGrafting,
    RootInverseShampoo,
    SGDGrafting,
    config_to_dict,
)
from .costs import DEFAULT_COST_MODEL, BlockCost, CostModel, block_cost, param_state_bytes
from .layout import MeshSpec, ParamSpec, held_merged_rows, held_rows

JSON_SCHEMA = "sharded-shampoo.plan/1"


@dataclass(frozen=True)
class PlanSettings:
    """The subset of optimizer settings that decides blocks, state and cost."""

    max_preconditioner_dim: int = 1024
    preconditioner: PreconditionerConfig = RootInverseShampoo()
    blocking: BlockingConfig = BlockingConfig()
    grafting: GraftingConfig | None = AdaGradGrafting()
    beta1: float = 0.9            # filtered-gradient state exists iff beta1 > 0
    momentum: float = 0.0         # momentum state exists iff momentum > 0 (local shard, param dtype)
    precondition_frequency: int = 100
    comm_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        def bad_int(v: Any) -> bool:
            return not isinstance(v, int) or isinstance(v, bool) or v < 1
        if bad_int(self.max_preconditioner_dim):
            raise ValueError("PlanSettings.max_preconditioner_dim must be an integer >= 1; "
                             f"got {self.max_preconditioner_dim!r}.")
        if bad_int(self.precondition_frequency):
            raise ValueError("PlanSettings.precondition_frequency must be an integer >= 1; "
                             f"got {self.precondition_frequency!r}.")
        if not isinstance(self.preconditioner, (RootInverseShampoo, EigenvalueCorrectedShampoo)):
            raise ValueError("PlanSettings.preconditioner must be RootInverseShampoo() or "
                             f"EigenvalueCorrectedShampoo(); got {self.preconditioner!r}.")
        if not isinstance(self.blocking, BlockingConfig):
            raise ValueError(f"PlanSettings.blocking must be a BlockingConfig; got {self.blocking!r}.")
        if self.grafting is not None and not isinstance(
                self.grafting, (SGDGrafting, AdaGradGrafting, RMSpropGrafting, AdamGrafting)):
            raise ValueError("PlanSettings.grafting must be SGDGrafting(), AdaGradGrafting(), RMSpropGrafting(), "
                             f"AdamGrafting() or None; got {self.grafting!r}.")
        if not (isinstance(self.beta1, (int, float)) and 0 <= self.beta1 < 1):
            raise ValueError(f"PlanSettings.beta1 must be a number in [0, 1); got {self.beta1!r}.")
        if not (isinstance(self.momentum, (int, float)) and math.isfinite(self.momentum) and self.momentum >= 0):
            raise ValueError(f"PlanSettings.momentum must be a finite number >= 0; got {self.momentum!r}.")
        if not isinstance(self.comm_dtype, torch.dtype) or not self.comm_dtype.is_floating_point:
            raise ValueError("PlanSettings.comm_dtype must be a floating torch.dtype (e.g. torch.float32 or "
                             f"torch.bfloat16); got {self.comm_dtype!r}.")


@dataclass
class ShampooPlan:
    """Blocks (parameter order), their owners and costs, per-rank reports and a summary."""

    params: list[ParamSpec]
    mesh: MeshSpec
    settings: list[PlanSettings]            # one per parameter
    blocks: list[Block]
    owners: list[int]
    block_param: list[int]                  # index into params, per block
    block_costs: list[BlockCost]
    block_loads: list[float]                # balance weight per block
    ranks: list[RankReport]
    summary: dict[str, Any]
    _owned: list[list[int]] | None = field(default=None, repr=False)

    def owned_blocks(self, rank: int) -> list[Block]:
        """Blocks owned by ``rank``, in plan (parameter) order."""
        if not 0 <= rank < self.mesh.world_size:
            raise ValueError(f"rank must be in [0, {self.mesh.world_size}); got {rank!r}.")
        if self._owned is None:
            owned: list[list[int]] = [[] for _ in range(self.mesh.world_size)]
            for i, r in enumerate(self.owners):
                owned[r].append(i)
            self._owned = owned
        return [self.blocks[i] for i in self._owned[rank]]

    def owner_of(self) -> dict[str, int]:
        """``{block_id: owner rank}``."""
        return {b.block_id: r for b, r in zip(self.blocks, self.owners)}

    def to_json(self, include_blocks: bool = True) -> dict[str, Any]:
        """A JSON-safe dict: mesh, settings, params, ranks, summary and (optionally) blocks."""
        distinct: list[PlanSettings] = []
        index: list[int] = []
        for s in self.settings:
            if s not in distinct:
                distinct.append(s)
            index.append(distinct.index(s))
        out: dict[str, Any] = {
            "schema": JSON_SCHEMA,
            "mesh": {"shape": list(self.mesh.shape), "world_size": self.mesh.world_size},
            "settings": [config_to_dict(s) for s in distinct],
            "params": [{"name": p.name, "shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."),
                        "sharded": p.sharded, "settings_index": k} for p, k in zip(self.params, index)],
            "ranks": [r.to_json() for r in self.ranks],
            "summary": dict(self.summary),
        }
        if include_blocks:
            out["blocks"] = [
                {"block_id": b.block_id, "param": b.param_name, "shape": list(b.shape),
                 "factor_dims": list(b.factor_dims), "owner": r, "state_bytes": c.total_state_bytes,
                 "step_flops": c.step_flops, "amortized_flops": c.amortized_flops, "load": w}
                for b, r, c, w in zip(self.blocks, self.owners, self.block_costs, self.block_loads)]
        return out


# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _ParamGeometry:
    """Per-shard merged-row ranges of one parameter (``None`` rows: replicated)."""

    starts: tuple[int, ...]
    ends: tuple[int, ...]

    def overlaps(self, rows: tuple[int, int]) -> list[tuple[int, int]]:
        """``[(shard index, overlapping merged rows)]`` for a block's ``ranges[0]``."""
        a, b = rows
        out = []
        s = bisect.bisect_right(self.ends, a)
        while s < len(self.starts) and self.starts[s] < b:
            ov = min(b, self.ends[s]) - max(a, self.starts[s])
            if ov > 0:
                out.append((s, ov))
            s += 1
        return out


def _geometry(spec: ParamSpec, merged: tuple[int, ...], mesh: MeshSpec) -> _ParamGeometry:
    ranges = [held_merged_rows(spec, merged, s, mesh) for s in range(mesh.num_shards)]
    return _ParamGeometry(tuple(a for a, _ in ranges), tuple(b for _, b in ranges))


# ----------------------------------------------------------------------------- make_plan


def _normalize_settings(params: Sequence[ParamSpec],
                        settings: PlanSettings | Sequence[PlanSettings]) -> list[PlanSettings]:
    if isinstance(settings, PlanSettings):
        return [settings] * len(params)
    settings = list(settings)
    if len(settings) != len(params):
        raise ValueError(f"settings must be one PlanSettings or one per parameter ({len(params)}); "
                         f"got {len(settings)}.")
    for i, s in enumerate(settings):
        if not isinstance(s, PlanSettings):
            raise ValueError(f"settings[{i}] must be a PlanSettings; got {type(s).__name__}.")
    # Equal settings -> one shared object, so parameters plan and price together (the
    # optimizer builds one PlanSettings per parameter).
    canonical: dict[PlanSettings, PlanSettings] = {}
    return [canonical.setdefault(s, s) for s in settings]


def _validate_params(params: Sequence[ParamSpec], mesh: MeshSpec) -> None:
    if not isinstance(mesh, MeshSpec):
        raise ValueError(f"mesh must be a MeshSpec((S,)) or MeshSpec((R, S)); got {mesh!r}.")
    names = set()
    for i, p in enumerate(params):
        if not isinstance(p, ParamSpec):
            raise ValueError(f"params[{i}] must be a ParamSpec; got {type(p).__name__}.")
        if p.name in names:
            raise ValueError(f"parameter names must be unique (they key the optimizer state); {p.name!r} repeats.")
        names.add(p.name)


def make_plan(params: Sequence[ParamSpec], mesh: MeshSpec, settings: PlanSettings | Sequence[PlanSettings],
              memory_cap_bytes: int | None = None, *, cost_model: CostModel = DEFAULT_COST_MODEL,
              tolerance: float = DEFAULT_LOCALITY_TOLERANCE) -> ShampooPlan:
    """Blocks, owners and per-rank accounting for ``params`` on ``mesh``.

    ``settings``: one :class:`PlanSettings` for all parameters or one per parameter.
    ``memory_cap_bytes``: per-rank cap on params + grads + optimizer state; a block that fits
    nowhere raises a ValueError naming it and the largest ``max_preconditioner_dim`` that fits.
    Blocks are balanced on ``step_flops + amortized_flops / precondition_frequency``.
    """
    params = list(params)
    _validate_params(params, mesh)
    per_param = _normalize_settings(params, settings)
    try:
        plan = _build(params, mesh, per_param, memory_cap_bytes, cost_model, tolerance)
    except BlockDoesNotFitError as err:
        raise ValueError(_cap_message(params, mesh, per_param, memory_cap_bytes, cost_model, tolerance, err)) \
            from err
    assert plan is not None
    return plan


def _plan_all_blocks(params: list[ParamSpec], per_param: list[PlanSettings]) -> tuple[list[Block], list[int]]:
    """Blocks of every parameter via ``plan_blocks``, one call per run of equal settings."""
    blocks: list[Block] = []
    block_param: list[int] = []
    start = 0
    while start < len(params):
        end = start
        while end < len(params) and per_param[end] is per_param[start]:
            end += 1
        s = per_param[start]
        run = plan_blocks([(p.name, p.shape) for p in params[start:end]], s.max_preconditioner_dim,
                          s.preconditioner, s.blocking)
        name_to_index = {params[k].name: k for k in range(start, end)}
        blocks.extend(run)
        block_param.extend(name_to_index[b.param_name] for b in run)
        start = end
    return blocks, block_param


def _build(params: list[ParamSpec], mesh: MeshSpec, per_param: list[PlanSettings], memory_cap_bytes: int | None,
           cost_model: CostModel, tolerance: float, report: bool = True) -> ShampooPlan | None:
    """Blocks, prices, owners and (``report=True``) the per-rank accounting.

    ``report=False`` stops after balancing (the memory-cap advice only needs to know whether
    the balancer raises) and returns None.
    """
    n_ranks, n_shards, n_rep = mesh.world_size, mesh.num_shards, mesh.num_replicas
    blocks, block_param = _plan_all_blocks(params, per_param)

    shapes = [b.shape for b in blocks]
    # Prices (cached: most blocks of a model share a handful of shapes).
    cache: dict[tuple, tuple[BlockCost, float]] = {}
    block_costs: list[BlockCost] = []
    block_loads: list[float] = []
    for b, shape, p in zip(blocks, shapes, block_param):
        s = per_param[p]
        key = (shape, b.exponents, id(s))
        hit = cache.get(key)
        if hit is None:
            c = block_cost(b, s.preconditioner, s.grafting, s.beta1, cost_model)
            hit = cache[key] = (c, c.balance_cost(s.precondition_frequency))
        block_costs.append(hit[0])
        block_loads.append(hit[1])

    # Per-parameter geometry and what every rank holds.
    merged_of: dict[int, tuple[int, ...]] = {}
    for blk, q in zip(blocks, block_param):
        if q not in merged_of:
            merged_of[q] = blk.merged_shape
    geoms: list[_ParamGeometry | None] = []
    held_by_shard = [[0] * n_shards for _ in params]    # elements of param k held by shard s (sharded only)
    for k, p in enumerate(params):
        if not p.sharded:
            geoms.append(None)
            continue
        inner = math.prod(p.shape[1:]) if len(p.shape) > 1 else 1
        for s in range(n_shards):
            a, b = held_rows(p, s, mesh)
            held_by_shard[k][s] = (b - a) * inner
        geoms.append(_geometry(p, merged_of[k], mesh) if k in merged_of else None)
    base_mem = [0] * n_ranks
    param_bytes_rank = [0] * n_ranks
    momentum_rank = [0] * n_ranks
    rep_param = rep_momentum = 0
    shard_param = [0] * n_shards
    shard_momentum = [0] * n_shards
    for k, p in enumerate(params):
        isz = p.itemsize
        mom = per_param[k].momentum > 0
        if p.sharded:
            for s in range(n_shards):
                shard_param[s] += held_by_shard[k][s] * isz
                if mom:
                    shard_momentum[s] += held_by_shard[k][s] * isz
        else:
            rep_param += p.numel * isz
            if mom:
                rep_momentum += p.numel * isz
    for r in range(n_ranks):
        s = mesh.shard_index(r)
        param_bytes_rank[r] = shard_param[s] + rep_param
        momentum_rank[r] = shard_momentum[s] + rep_momentum
        base_mem[r] = 2 * param_bytes_rank[r] + momentum_rank[r]

    # Locality: merged rows of each block held by each shard index (None: replicated, held by
    # all). A block's held elements are rows x the same inner size for every holder, so rows
    # rank holders correctly. Every replica of a shard holds the same data: the replicas of
    # shard s form holder group s. Blocks in one grid row share the (cached) overlap.
    overlaps: list[dict[int, int] | None] = []
    row_cache: dict[tuple[int, tuple[int, int]], dict[int, int]] = {}
    for b, k in zip(blocks, block_param):
        g = geoms[k]
        if g is None:
            overlaps.append(None)
            continue
        key = (k, b.ranges[0])
        rows_ov = row_cache.get(key)
        if rows_ov is None:
            rows_ov = row_cache[key] = dict(g.overlaps(b.ranges[0]))
        overlaps.append(rows_ov)
    no_preference: dict[int, int] = {}

    def locality(i: int) -> dict[int, int]:
        return overlaps[i] or no_preference

    groups = None if n_rep == 1 else [[rep * n_shards + s for rep in range(n_rep)] for s in range(n_shards)]
    owners = assign_owners(
        block_loads, [b.block_id for b in blocks], n_ranks, locality=locality,
        memory_bytes=[c.total_state_bytes for c in block_costs], memory_cap_bytes=memory_cap_bytes,
        base_memory_bytes=base_mem, tolerance=tolerance,
        holder_groups=groups)
    if not report:
        return None

    ranks = rank_reports(mesh, per_param, shapes, block_param, block_costs, block_loads, owners,
                          overlaps, param_bytes_rank, momentum_rank)
    summary = plan_summary(params, mesh, blocks, block_param, block_loads, ranks, memory_cap_bytes)
    return ShampooPlan(params=params, mesh=mesh, settings=per_param, blocks=blocks, owners=owners,
                       block_param=block_param, block_costs=block_costs, block_loads=block_loads,
                       ranks=ranks, summary=summary)


# ----------------------------------------------------------------------------- memory-cap advice


#: Bounds of the memory-cap advice: full re-plans, seconds, and blocks per re-plan (relative to
#: the failing plan, with a floor for small models).
_ADVICE_MAX_PLANS = 16
_ADVICE_MAX_SECONDS = 20.0
_ADVICE_MAX_BLOCKS_FACTOR = 4
_ADVICE_MIN_BLOCKS = 200_000


def _cap_message(params: list[ParamSpec], mesh: MeshSpec, per_param: list[PlanSettings], cap: int | None,
                 cost_model: CostModel, tolerance: float, err: BlockDoesNotFitError) -> str:
    """The balancer's error plus the largest ``max_preconditioner_dim`` under which the plan fits.

    Every candidate ``D`` below the failing one is screened, largest first, with two necessary
    conditions computed in closed form (``costs.param_state_bytes``, no block lists): every
    parameter's largest block fits in the most free memory a rank has before owning anything,
    and the total state fits in the free memory of all ranks. The first candidate that passes
    is verified with a full balance under the cap; if packing the blocks onto the ranks still
    fails (the screen ignores fragmentation), the screened candidates are bisected with full
    plans. Smaller blocks do not always help (square blocks cost ~4 factor
    entries per element at any size), so the answer may be that no dimension fits, with the
    numbers. The verification is bounded (plans, seconds, block count); the message says so
    when a bound stopped it.
    """
    assert cap is not None
    current = max(s.max_preconditioner_dim for s in per_param)
    base = _base_memory_by_shard(params, mesh, per_param)
    free = cap - min(base)
    total_free = mesh.num_replicas * sum(max(cap - b, 0) for b in base)
    cache: dict[tuple, tuple[int, int, int]] = {}
    setting_index = {id(s): i for i, s in enumerate(per_param)}

    def screen(d: int) -> tuple[int, int, int]:
        """(largest block, total state, blocks) of the whole model with every D capped at d."""
        largest = total = blocks = 0
        for p, s in zip(params, per_param):
            dd = min(s.max_preconditioner_dim, d)
            key = (p.shape, setting_index[id(s)], dd)
            hit = cache.get(key)
            if hit is None:
                hit = cache[key] = param_state_bytes(p.shape, dd, s.preconditioner, s.grafting, s.beta1, s.blocking)
            largest = max(largest, hit[0])
            total += hit[1]
            blocks += hit[2]
        return largest, total, blocks

    max_blocks = max(_ADVICE_MIN_BLOCKS, _ADVICE_MAX_BLOCKS_FACTOR * screen(current)[2])
    deadline = time.monotonic() + _ADVICE_MAX_SECONDS
    plans = [0]

    def plan_fits(d: int) -> bool | None:
        """Full balance under the cap with every D capped at d; None if too big or out of budget."""
        if screen(d)[2] > max_blocks or plans[0] >= _ADVICE_MAX_PLANS or time.monotonic() > deadline:
            return None
        plans[0] += 1
        capped = [dataclasses.replace(x, max_preconditioner_dim=min(x.max_preconditioner_dim, d)) for x in per_param]
        try:
            _build(params, mesh, capped, cap, cost_model, tolerance, report=False)
        except BlockDoesNotFitError:
            return False
        return True

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
            return (f"{err} (no max_preconditioner_dim fits: parameters, gradients and momentum alone exceed the "
                    "cap on some rank; raise memory_cap_bytes or use more ranks).")
        total, d = best_total if best_total is not None else (screen(current)[1], current)
        return (f"{err} (no max_preconditioner_dim fits: the optimizer state needs at least {total} bytes in total "
                f"(at max_preconditioner_dim={d}) but all ranks together have {total_free} bytes free under the "
                "cap; raise memory_cap_bytes, use more ranks, or drop grafting / filtered-gradient state).")
    # Bisect the screened candidates for the largest that fits, assuming fitting is monotone in
    # D. lo: largest index believed to fit (-1: none yet); hi: smallest index known not to fit.
    lo, hi, verified = -1, len(candidates), False
    top = plan_fits(candidates[-1])
    if top:
        return f"{err} (the largest max_preconditioner_dim that fits is {candidates[-1]})."
    if top is False:
        hi = len(candidates) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok = plan_fits(candidates[mid])
        if ok is False:
            hi = mid
        else:
            lo, verified = mid, ok is True
    if lo < 0:
        return (f"{err} (no max_preconditioner_dim fits: every size that passes the memory screen, down to "
                f"{candidates[0]}, still fails to pack the blocks under the cap; raise memory_cap_bytes or use "
                "more ranks).")
    if verified:
        return f"{err} (the largest max_preconditioner_dim that fits is {candidates[lo]})."
    return (f"{err} (max_preconditioner_dim={candidates[lo]} passes the memory screen but a full plan was too big "
            "to verify here; try it or a slightly smaller value).")


def _base_memory_by_shard(params: list[ParamSpec], mesh: MeshSpec, per_param: list[PlanSettings]) -> list[int]:
    """Params + grads (+ momentum) bytes of each shard index (every replica holds the same)."""
    out = []
    for r in range(mesh.num_shards):
        total = 0
        for p, s in zip(params, per_param):
            a, b = held_rows(p, r, mesh)
            inner = math.prod(p.shape[1:]) if len(p.shape) > 1 else 1
            elems = (b - a) * inner if p.sharded else p.numel
            total += elems * p.itemsize * (3 if s.momentum > 0 else 2)
        out.append(total)
    return out


# ----------------------------------------------------------------------------- from live tensors


def param_specs_from_tensors(named_params: Iterable[tuple[str, torch.Tensor]]) -> tuple[list[ParamSpec], MeshSpec]:
    """ParamSpecs and the mesh from (name, tensor) pairs: DTensors from ``fully_shard`` or plain tensors.

    ``Shard(0)`` on the last mesh dim (with ``Replicate()`` on a leading replicate dim for
    HSDP) -> sharded; all-``Replicate`` -> unsharded; plain tensors -> unsharded. Any other
    placement is rejected, naming the parameter.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    specs: list[ParamSpec] = []
    mesh_shape: tuple[int, ...] | None = None
    for name, t in named_params:
        if isinstance(t, DTensor):
            shape = tuple(t.device_mesh.shape)
            if mesh_shape is None:
                mesh_shape = shape
            elif shape != mesh_shape:
                raise ValueError(f"parameter {name!r} lives on a mesh of shape {shape} but earlier parameters on "
                                 f"{mesh_shape}; all parameters must share one (replicate, shard) mesh.")
            pl = tuple(t.placements)
            if all(isinstance(x, Replicate) for x in pl):
                sharded = False
            elif isinstance(pl[-1], Shard) and pl[-1].dim == 0 and all(isinstance(x, Replicate) for x in pl[:-1]):
                sharded = True
            else:
                raise ValueError(f"parameter {name!r} has placements {pl}; supported are (Shard(0),), "
                                 "(Replicate(), Shard(0)) and all-Replicate (use fully_shard's default "
                                 "shard_placement_fn).")
            specs.append(ParamSpec(name, tuple(t.shape), t.dtype, sharded))
        else:
            specs.append(ParamSpec(name, tuple(t.shape), t.dtype, False))
    if mesh_shape is not None and len(mesh_shape) > 2:
        raise ValueError(f"mesh of shape {mesh_shape} is not supported: use (shard,) or (replicate, shard).")
    return specs, MeshSpec(mesh_shape or (1,))


__all__ = ["PlanSettings", "RankReport", "ShampooPlan", "make_plan", "param_specs_from_tensors", "JSON_SCHEMA"]
