"""Per-rank accounting of a plan: bytes by kind, communication, transient peak, FLOPs, summary.

Split from ``plan.py`` (which decides blocks and owners) because this part only *reports* a
decided plan. Parameter, gradient, optimizer-state and resident-buffer bytes are exact (what the
optimizer allocates and keeps between steps); communication follows the model in ``tally.py``'s
docstring exactly; the transient peak and FLOPs are models (``docs/cost_model.md``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import PlanSettings
from .balance import imbalance, lower_bound, pigeonhole_lower_bound
from .costs import BLOCK_STATE_KINDS, RANK_STATE_KINDS
from .layout import MeshSpec, ParamSpec
from .tally import communication, owned_sums

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
    #: what the optimizer keeps allocated between steps besides its state (packing index tables, salts);
    #: the step's stacks, exchange buffers and scratch are freed after it (``peak_transient_bytes``)
    resident_buffer_bytes: int = 0

    @property
    def optimizer_state_bytes(self) -> int:
        return sum(self.state_bytes_by_kind.values())

    @property
    def comm_bytes_per_step(self) -> int:
        return self.comm_send_bytes + self.comm_recv_bytes

    @property
    def persistent_bytes(self) -> int:
        """Params + grads + optimizer state + resident buffers: what stays allocated between steps, and
        what ``memory_cap_bytes`` limits."""
        return self.param_bytes + self.grad_bytes + self.optimizer_state_bytes + self.resident_buffer_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank, "replica": self.replica, "shard": self.shard, "coordinate": list(self.coordinate),
            "num_blocks": self.num_blocks,
            "param_bytes": self.param_bytes, "grad_bytes": self.grad_bytes,
            "optimizer_state_bytes": self.optimizer_state_bytes,
            "optimizer_state_breakdown": dict(self.state_bytes_by_kind),
            "comm_bytes_per_step": self.comm_bytes_per_step,
            "comm_send_bytes_per_step": self.comm_send_bytes, "comm_recv_bytes_per_step": self.comm_recv_bytes,
            "resident_buffer_bytes": self.resident_buffer_bytes, "persistent_bytes": self.persistent_bytes,
            "comm_buffer_bytes": self.comm_buffer_bytes, "peak_transient_bytes": self.peak_transient_bytes,
            "step_flops": self.step_flops, "amortized_flops": self.amortized_flops, "load": self.load,
        }


def rank_reports(mesh: MeshSpec, per_param: Sequence[PlanSettings], b: "Balanced") -> list[RankReport]:
    """One :class:`RankReport` per rank for owners already chosen (sums from ``tally.py``)."""
    n = mesh.world_size
    owned = owned_sums(b, n)
    comm = communication(b, per_param, n)
    buffers = comm.send_gather + comm.recv_gather + comm.send_update + comm.recv_update   # both exchanges kept
    transient = buffers + owned.work_bytes + owned.workspace_bytes
    state = {kind: v.tolist() for kind, v in owned.state.items()}
    momentum = b.momentum_bytes.tolist()
    averaging = b.averaging_bytes.tolist()
    columns = (owned.num_blocks, b.param_bytes, comm.send_gather + comm.send_update, comm.recv_gather + comm.recv_update,
               buffers, transient, owned.step_flops, owned.amortized_flops, owned.load, owned.resident_buffer_bytes)
    coordinates = zip(*(c.tolist() for c in np.unravel_index(np.arange(n), mesh.shape)))
    shards = mesh.num_shards
    reports = []
    for r, (blocks, params, send, recv, buf, peak, step, amort, load, kept), coordinate in zip(
            range(n), zip(*(c.tolist() for c in columns)), coordinates):
        kinds = {kind: state[kind][r] for kind in BLOCK_STATE_KINDS}
        kinds["momentum"] = momentum[r]
        kinds["averaging"] = averaging[r]
        reports.append(RankReport(
            rank=r, replica=r // shards, shard=r % shards, coordinate=coordinate,
            num_blocks=blocks, param_bytes=params, grad_bytes=params, state_bytes_by_kind=kinds,
            comm_send_bytes=send, comm_recv_bytes=recv, comm_buffer_bytes=buf, peak_transient_bytes=peak,
            step_flops=step, amortized_flops=amort, load=load, resident_buffer_bytes=kept))
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
    max_resident_buffer_bytes: int = 0     # kept between steps besides the state (in max_persistent_bytes)

    def to_json(self) -> dict[str, Any]:
        return {f.name: (dict(v) if isinstance(v := getattr(self, f.name), dict) else v) for f in fields(self)}


def plan_summary(params: list[ParamSpec], mesh: MeshSpec, num_blocks: int, block_param: np.ndarray,
                 block_loads: np.ndarray, ranks: list[RankReport], memory_cap_bytes: int | None) -> PlanSummary:
    """The :class:`PlanSummary` of a reported plan (``block_param``, ``block_loads``: per block)."""
    n = mesh.world_size
    loads = [r.load for r in ranks]
    costs = block_loads.tolist()
    lb = lower_bound(costs, n)
    tight = pigeonhole_lower_bound(block_loads, n)
    per_param = np.bincount(block_param, weights=block_loads, minlength=len(params))
    rr = np.bincount(np.arange(len(params)) % n, weights=per_param, minlength=n).tolist()   # round-robin owners
    mean = math.fsum(loads) / n
    max_load = max(loads) if loads else 0.0
    persistent = [r.persistent_bytes for r in ranks]
    return PlanSummary(
        world_size=n, num_params=len(params), num_blocks=num_blocks,
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
        largest_block_load=max(costs) if costs else 0.0,
        round_robin_param_imbalance=imbalance(rr),
        round_robin_param_max_over_lower_bound=max(rr) / lb if lb > 0 else 1.0,
        max_persistent_bytes=max(persistent) if persistent else 0,
        persistent_bytes_imbalance=imbalance(persistent),
        optimizer_state_imbalance=imbalance([r.optimizer_state_bytes for r in ranks]),
        max_peak_transient_bytes=max(r.peak_transient_bytes for r in ranks) if ranks else 0,
        memory_cap_bytes=memory_cap_bytes,
        busiest_rank=max(range(n), key=lambda r: (loads[r], -r)) if loads else 0,
        max_resident_buffer_bytes=max(r.resident_buffer_bytes for r in ranks) if ranks else 0)


__all__ = ["PlanSummary", "RankReport", "rank_reports", "plan_summary"]
