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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .balance import imbalance, lower_bound, pigeonhole_lower_bound, rank_loads, round_robin_param_owners
from .blocking import Block
from .costs import BLOCK_STATE_KINDS, RANK_STATE_KINDS, BlockCost, dtype_itemsize
from .layout import MeshSpec, ParamSpec

if TYPE_CHECKING:
    from .plan import PlanSettings


@dataclass(frozen=True)
class RankReport:
    """What one rank holds and does. Bytes are exact for params/grads/state; the rest is modeled."""

    rank: int
    replica: int
    shard: int
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
            "rank": self.rank, "replica": self.replica, "shard": self.shard, "num_blocks": self.num_blocks,
            "param_bytes": self.param_bytes, "grad_bytes": self.grad_bytes,
            "optimizer_state_bytes": self.optimizer_state_bytes,
            "optimizer_state_breakdown": dict(self.state_bytes_by_kind),
            "comm_bytes_per_step": self.comm_bytes_per_step,
            "comm_send_bytes_per_step": self.comm_send_bytes, "comm_recv_bytes_per_step": self.comm_recv_bytes,
            "comm_buffer_bytes": self.comm_buffer_bytes, "peak_transient_bytes": self.peak_transient_bytes,
            "step_flops": self.step_flops, "amortized_flops": self.amortized_flops, "load": self.load,
        }


def rank_reports(mesh: MeshSpec, per_param: Sequence[PlanSettings], shapes: list[tuple[int, ...]],
                  block_param: list[int], block_costs: list[BlockCost], block_loads: list[float],
                  owners: list[int], overlaps: list[dict[int, int] | None],
                  param_bytes: list[int], momentum_bytes: list[int]) -> list[RankReport]:
    """One :class:`RankReport` per rank for owners already chosen (see the module docstring)."""
    n_ranks, n_shards, n_rep = mesh.world_size, mesh.num_shards, mesh.num_replicas
    # Per-rank sums over owned blocks. State, FLOPs and load only depend on the (shared, cached)
    # BlockCost and load, so count blocks per (rank, cost object) and multiply once at the end.
    counts: dict[tuple[int, int, int, int], int] = {}
    cost_index: dict[int, int] = {}     # id(cost) -> first-seen index (deterministic order)
    cost_of: list[tuple[BlockCost, float]] = []
    send_g = [0] * n_ranks
    recv_g = [0] * n_ranks
    send_u = [0] * n_ranks
    recv_u = [0] * n_ranks
    recv_u_shard = [0] * n_shards  # update bytes every replica of shard s receives (owner's share removed below)
    recv_u_all = 0                 # update bytes of replicated blocks every rank receives
    comm_size = [dtype_itemsize(s.comm_dtype) for s in per_param]
    factor_size = [dtype_itemsize(s.preconditioner.factor_dtype) for s in per_param]

    for shape, k, c, w, o, ov in zip(shapes, block_param, block_costs, block_loads, owners, overlaps):
        numel = math.prod(shape)
        ci = cost_index.get(id(c))
        if ci is None:
            ci = cost_index[id(c)] = len(cost_of)
            cost_of.append((c, w))
        key = (o, ci, numel, k)
        counts[key] = counts.get(key, 0) + 1
        cb = comm_size[k]
        if ov is None:                      # replicated: everyone holds it; owner broadcasts the update
            send_u[o] += (n_ranks - 1) * numel * cb
            recv_u_all += numel * cb
            recv_u[o] -= numel * cb
            continue
        o_shard = o % n_shards
        o_base = o - o_shard                # first rank of the owner's replica group
        row_bytes = numel // (shape[0]) * cb   # bytes of one merged row of this block
        held_o = 0
        for s, rows in ov.items():
            recv_u_shard[s] += rows * row_bytes
            if s == o_shard:
                held_o = rows * (numel // shape[0])
            else:
                send_g[o_base + s] += rows * row_bytes
        recv_g[o] += (numel - held_o) * cb
        send_u[o] += (n_rep * numel - held_o) * cb
        recv_u[o] -= held_o * cb

    state = [dict.fromkeys(BLOCK_STATE_KINDS, 0) for _ in range(n_ranks)]
    n_blocks = [0] * n_ranks
    step = [0.0] * n_ranks
    amort = [0.0] * n_ranks
    load = [0.0] * n_ranks
    work = [0] * n_ranks          # owned elements x factor itemsize x 2 (assembled gradient + direction)
    workspace = [0] * n_ranks     # largest amortized workspace among owned blocks
    for (o, ci, numel, k), count in sorted(counts.items()):
        c, w = cost_of[ci]
        for kind, v in c.state_bytes.items():
            state[o][kind] += count * v
        n_blocks[o] += count
        step[o] += count * c.step_flops
        amort[o] += count * c.amortized_flops
        load[o] += count * w
        work[o] += 2 * count * numel * factor_size[k]
        workspace[o] = max(workspace[o], c.amortized_workspace_bytes)

    reports = []
    for r in range(n_ranks):
        recv_u[r] += recv_u_shard[r % n_shards] + recv_u_all
        kinds = dict(state[r])
        kinds["momentum"] = momentum_bytes[r]
        buffers = max(send_g[r] + recv_g[r], send_u[r] + recv_u[r])
        reports.append(RankReport(
            rank=r, replica=mesh.replica_index(r), shard=mesh.shard_index(r), num_blocks=n_blocks[r],
            param_bytes=param_bytes[r], grad_bytes=param_bytes[r], state_bytes_by_kind=kinds,
            comm_send_bytes=send_g[r] + send_u[r], comm_recv_bytes=recv_g[r] + recv_u[r],
            comm_buffer_bytes=buffers, peak_transient_bytes=buffers + work[r] + workspace[r],
            step_flops=step[r], amortized_flops=amort[r], load=load[r]))
    return reports


def plan_summary(params: list[ParamSpec], mesh: MeshSpec, blocks: list[Block], block_param: list[int],
                 block_loads: list[float], ranks: list[RankReport], memory_cap_bytes: int | None) -> dict[str, Any]:
    """Totals, balance statistics (imbalance, lower bounds, round-robin baseline) and maxima."""
    n = mesh.world_size
    loads = [r.load for r in ranks]
    lb = lower_bound(block_loads, n)
    tight = pigeonhole_lower_bound(block_loads, n)
    rr = rank_loads(block_loads, round_robin_param_owners(block_param, n), n)
    mean = math.fsum(loads) / n
    max_load = max(loads) if loads else 0.0
    persistent = [r.persistent_bytes for r in ranks]
    return {
        "world_size": n, "num_params": len(params), "num_blocks": len(blocks),
        "total_param_bytes": sum(p.numel * p.itemsize for p in params),
        "total_param_bytes_all_ranks": sum(r.param_bytes for r in ranks),
        "total_optimizer_state_bytes": sum(r.optimizer_state_bytes for r in ranks),
        "total_state_bytes_by_kind": {k: sum(r.state_bytes_by_kind[k] for r in ranks) for k in RANK_STATE_KINDS},
        "total_comm_bytes_per_step": sum(r.comm_send_bytes for r in ranks),
        "total_step_flops": math.fsum(r.step_flops for r in ranks),
        "total_amortized_flops": math.fsum(r.amortized_flops for r in ranks),
        "total_load": math.fsum(loads),
        "mean_load": mean, "max_load": max_load, "min_load": min(loads) if loads else 0.0,
        "median_load": statistics.median(loads) if loads else 0.0,
        "imbalance": imbalance(loads),
        "lower_bound": lb,
        "lower_bound_imbalance": lb / mean if mean > 0 else 1.0,
        "max_over_lower_bound": max_load / lb if lb > 0 else 1.0,
        "tight_lower_bound": tight,
        "max_over_tight_lower_bound": max_load / tight if tight > 0 else 1.0,
        "largest_block_load": max(block_loads) if block_loads else 0.0,
        "round_robin_param_imbalance": imbalance(rr),
        "round_robin_param_max_over_lower_bound": max(rr) / lb if lb > 0 else 1.0,
        "max_persistent_bytes": max(persistent) if persistent else 0,
        "persistent_bytes_imbalance": imbalance(persistent),
        "optimizer_state_imbalance": imbalance([r.optimizer_state_bytes for r in ranks]),
        "max_peak_transient_bytes": max(r.peak_transient_bytes for r in ranks) if ranks else 0,
        "memory_cap_bytes": memory_cap_bytes,
        "busiest_rank": max(range(n), key=lambda r: (loads[r], -r)) if loads else 0,
    }


__all__ = ["RankReport", "rank_reports", "plan_summary"]
