"""Per-rank accounting of a plan: bytes by kind, communication, transient peak, FLOPs, summary.

Split from ``plan.py`` (which decides blocks and owners) because this part only *reports* a
decided plan. Parameter, gradient and optimizer-state bytes are exact (what the optimizer
allocates); communication follows the model in ``plan.py``'s docstring exactly; the transient
peak and FLOPs are models (``docs/cost_model.md``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from ..config import PlanSettings
from .balance import imbalance, lower_bound, pigeonhole_lower_bound, rank_loads, round_robin_param_owners
from .blocking import Block
from .costs import BLOCK_STATE_KINDS, RANK_STATE_KINDS, BlockCost
from .layout import MeshSpec, ParamSpec, dtype_itemsize, pick_source

if TYPE_CHECKING:
    from .stages import Balanced


@dataclass(frozen=True)
class RankReport:
    """What one rank holds and does. Bytes are exact for params/grads/state; the rest is modeled."""

    rank: int
    replica: int                      # rank // (last mesh dim): the HSDP replica of the shorthand layout
    shard: int                        # rank % (last mesh dim)
    coordinate: tuple[int, ...]       # row-major coordinate in the root mesh
    num_blocks: int
    param_bytes: int
    grad_bytes: int
    state_bytes_by_kind: dict[str, int]
    comm_send_bytes: int
    comm_recv_bytes: int
    comm_buffer_bytes: int
    peak_transient_bytes: int
    step_flops: float
    amortized_flops: float
    load: float

    @property
    def optimizer_state_bytes(self) -> int:
        return sum(self.state_bytes_by_kind.values())

    @property
    def comm_bytes_per_step(self) -> int:
        return self.comm_send_bytes + self.comm_recv_bytes

    @property
    def persistent_bytes(self) -> int:
        """Params + grads + optimizer state: what ``memory_cap_bytes`` limits."""
        return self.param_bytes + self.grad_bytes + self.optimizer_state_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank, "replica": self.replica, "shard": self.shard, "coordinate": list(self.coordinate),
            "num_blocks": self.num_blocks,
            "param_bytes": self.param_bytes, "grad_bytes": self.grad_bytes,
            "optimizer_state_bytes": self.optimizer_state_bytes,
            "optimizer_state_breakdown": dict(self.state_bytes_by_kind),
            "comm_bytes_per_step": self.comm_bytes_per_step,
            "comm_send_bytes_per_step": self.comm_send_bytes, "comm_recv_bytes_per_step": self.comm_recv_bytes,
            "comm_buffer_bytes": self.comm_buffer_bytes, "peak_transient_bytes": self.peak_transient_bytes,
            "step_flops": self.step_flops, "amortized_flops": self.amortized_flops, "load": self.load,
        }


def _communication(mesh: MeshSpec, per_param: Sequence[PlanSettings], b: "Balanced") -> tuple[list[int], ...]:
    """Per-rank (gather send, gather recv, update send, update recv) bytes of one step.

    Per block with owner ``o`` and pieces ``(region, elements)``: a piece of a region ``o`` does not
    hold is sent by ``pick_source`` of its holders (gather) and the update of every piece goes to
    every holder but ``o``. What does not depend on the owner -- the piece bytes, the update fan-out,
    what each region's holders receive -- is summed once per distinct coverage (blocks of different
    layers share one), and handed to the holders at the end.
    """
    n = mesh.world_size
    send_g, recv_g, send_u, recv_u = [0] * n, [0] * n, [0] * n, [0] * n
    comm_size = [dtype_itemsize(s.comm_dtype) for s in per_param]
    uses: dict[tuple[int, int, int], list] = {}         # (geometry id, coverage id, bytes/elem) -> [g, cov, blocks]
    totals: dict[int, tuple[int, int]] = {}             # coverage id -> (elements, elements x holders)
    for k, cov, o in zip(b.block_param, b.coverage, b.owners):
        g = b.geometries[k]
        cb = comm_size[k]
        mine = g.rank_region[o]
        holders = g.holders
        own = 0
        for rid, elems in cov:
            if rid == mine:
                own = elems
            else:
                send_g[pick_source(holders[rid], o, n)] += elems * cb
        sums = totals.get(id(cov))
        if sums is None:
            sums = totals[id(cov)] = (sum(e for _, e in cov), sum(len(holders[rid]) * e for rid, e in cov))
        total, fan_out = sums
        recv_g[o] += (total - own) * cb
        send_u[o] += (fan_out - own) * cb
        recv_u[o] -= own * cb
        use = uses.get((id(g), id(cov), cb))
        if use is None:
            uses[(id(g), id(cov), cb)] = [g, cov, 1]
        else:
            use[2] += 1
    for (_, _, cb), (g, cov, count) in uses.items():
        for rid, elems in cov:
            for h in g.holders[rid]:
                recv_u[h] += count * elems * cb
    return send_g, recv_g, send_u, recv_u


def rank_reports(mesh: MeshSpec, per_param: Sequence[PlanSettings], b: "Balanced") -> list[RankReport]:
    """One :class:`RankReport` per rank for owners already chosen."""
    n_ranks = mesh.world_size
    send_g, recv_g, send_u, recv_u = _communication(mesh, per_param, b)
    # Per-rank sums over owned blocks. State, FLOPs and load only depend on the (shared, cached)
    # BlockCost and load, so count blocks per (rank, cost object, size) and multiply once at the end.
    # A cost object is priced per (block shape, exponents, settings), so it also fixes the block's
    # elements and factor dtype: those are read from its first block.
    counts: dict[tuple[int, int], int] = {}
    cost_index: dict[int, int] = {}     # id(cost) -> first-seen index (deterministic order)
    cost_of: list[tuple[BlockCost, float, int]] = []     # (cost, load, elements x factor itemsize)
    for blk, k, c, w, o in zip(b.blocks, b.block_param, b.costs, b.loads, b.owners):
        ci = cost_index.get(id(c))
        if ci is None:
            ci = cost_index[id(c)] = len(cost_of)
            cost_of.append((c, w, blk.numel * dtype_itemsize(per_param[k].preconditioner.factor_dtype)))
        key = (o, ci)
        counts[key] = counts.get(key, 0) + 1
    state = [dict.fromkeys(BLOCK_STATE_KINDS, 0) for _ in range(n_ranks)]
    n_blocks = [0] * n_ranks
    step = [0.0] * n_ranks
    amort = [0.0] * n_ranks
    load = [0.0] * n_ranks
    work = [0] * n_ranks          # owned elements x factor itemsize x 2 (assembled gradient + direction)
    workspace = [0] * n_ranks     # largest amortized workspace among owned blocks
    for (o, ci), count in sorted(counts.items()):
        c, w, elem_bytes = cost_of[ci]
        for kind, v in c.state_bytes.items():
            state[o][kind] += count * v
        n_blocks[o] += count
        step[o] += count * c.step_flops
        amort[o] += count * c.amortized_flops
        load[o] += count * w
        work[o] += 2 * count * elem_bytes
        workspace[o] = max(workspace[o], c.amortized_workspace_bytes)
    reports = []
    for r in range(n_ranks):
        kinds = dict(state[r])
        kinds["momentum"] = b.momentum_bytes[r]
        kinds["averaging"] = b.averaging_bytes[r]
        buffers = send_g[r] + recv_g[r] + send_u[r] + recv_u[r]     # the executor keeps both exchanges' buffers
        reports.append(RankReport(
            rank=r, replica=mesh.replica_index(r), shard=mesh.shard_index(r), coordinate=mesh.coordinate(r),
            num_blocks=n_blocks[r], param_bytes=b.param_bytes[r], grad_bytes=b.param_bytes[r],
            state_bytes_by_kind=kinds, comm_send_bytes=send_g[r] + send_u[r], comm_recv_bytes=recv_g[r] + recv_u[r],
            comm_buffer_bytes=buffers, peak_transient_bytes=buffers + work[r] + workspace[r],
            step_flops=step[r], amortized_flops=amort[r], load=load[r]))
    return reports


@dataclass(frozen=True)
class PlanSummary:
    """Totals, balance statistics (imbalance, lower bounds, round-robin baseline) and maxima of a plan."""

    world_size: int
    num_params: int
    num_blocks: int
    total_param_bytes: int
    total_param_bytes_all_ranks: int
    total_optimizer_state_bytes: int
    total_state_bytes_by_kind: dict[str, int]
    total_comm_bytes_per_step: int
    total_step_flops: float
    total_amortized_flops: float
    total_load: float
    mean_load: float
    max_load: float
    min_load: float
    median_load: float
    imbalance: float
    lower_bound: float
    lower_bound_imbalance: float
    max_over_lower_bound: float
    tight_lower_bound: float
    max_over_tight_lower_bound: float
    largest_block_load: float
    round_robin_param_imbalance: float
    round_robin_param_max_over_lower_bound: float
    max_persistent_bytes: int
    persistent_bytes_imbalance: float
    optimizer_state_imbalance: float
    max_peak_transient_bytes: int
    memory_cap_bytes: int | None
    busiest_rank: int

    def to_json(self) -> dict[str, Any]:
        return {f.name: (dict(v) if isinstance(v := getattr(self, f.name), dict) else v) for f in fields(self)}


def plan_summary(params: list[ParamSpec], mesh: MeshSpec, blocks: list[Block], block_param: list[int],
                 block_loads: list[float], ranks: list[RankReport], memory_cap_bytes: int | None) -> PlanSummary:
    """The :class:`PlanSummary` of a reported plan."""
    n = mesh.world_size
    loads = [r.load for r in ranks]
    lb = lower_bound(block_loads, n)
    tight = pigeonhole_lower_bound(block_loads, n)
    rr = rank_loads(block_loads, round_robin_param_owners(block_param, n), n)
    mean = math.fsum(loads) / n
    max_load = max(loads) if loads else 0.0
    persistent = [r.persistent_bytes for r in ranks]
    return PlanSummary(
        world_size=n, num_params=len(params), num_blocks=len(blocks),
        total_param_bytes=sum(p.numel * p.itemsize for p in params),
        total_param_bytes_all_ranks=sum(r.param_bytes for r in ranks),
        total_optimizer_state_bytes=sum(r.optimizer_state_bytes for r in ranks),
        total_state_bytes_by_kind={k: sum(r.state_bytes_by_kind[k] for r in ranks) for k in RANK_STATE_KINDS},
        total_comm_bytes_per_step=sum(r.comm_send_bytes for r in ranks),
        total_step_flops=math.fsum(r.step_flops for r in ranks),
        total_amortized_flops=math.fsum(r.amortized_flops for r in ranks),
        total_load=math.fsum(loads), mean_load=mean, max_load=max_load, min_load=min(loads) if loads else 0.0,
        median_load=statistics.median(loads) if loads else 0.0, imbalance=imbalance(loads),
        lower_bound=lb, lower_bound_imbalance=lb / mean if mean > 0 else 1.0,
        max_over_lower_bound=max_load / lb if lb > 0 else 1.0, tight_lower_bound=tight,
        max_over_tight_lower_bound=max_load / tight if tight > 0 else 1.0,
        largest_block_load=max(block_loads) if block_loads else 0.0,
        round_robin_param_imbalance=imbalance(rr),
        round_robin_param_max_over_lower_bound=max(rr) / lb if lb > 0 else 1.0,
        max_persistent_bytes=max(persistent) if persistent else 0,
        persistent_bytes_imbalance=imbalance(persistent),
        optimizer_state_imbalance=imbalance([r.optimizer_state_bytes for r in ranks]),
        max_peak_transient_bytes=max(r.peak_transient_bytes for r in ranks) if ranks else 0,
        memory_cap_bytes=memory_cap_bytes,
        busiest_rank=max(range(n), key=lambda r: (loads[r], -r)) if loads else 0)


__all__ = ["PlanSummary", "RankReport", "rank_reports", "plan_summary"]
