"""The dense memory per rank for torchrec's planner, from the same plan the optimizer and dry-run use.

torchrec's ``HeuristicalStorageReservation`` reserves, on every rank, ``parameter_multiplier``
(default 6) x the dense parameter bytes plus the dense buffers for everything that is not an
embedding table. For Shampoo that guess is wrong in both directions: a block's state is its
factors and roots (``2 * sum(d_i^2)`` elements, 1000x the parameter for a 512-element bias)
plus grafting and filtered-gradient state, and with ShardedShampoo each rank holds only the
blocks it owns. :func:`storage_reservation` hands the planner the exact number instead, as
``dense_tensor_estimate``.

What the estimate contains, per rank (bytes, the maximum over ranks is reserved on every rank
because torchrec reserves one dense amount per device):

- the dense parameters (DMP replicates them: every rank holds all of them),
- their gradients (same size: DMP's DDP uses ``gradient_as_bucket_view=True``, so the
  gradients *are* DDP's buckets, no second copy),
- ShardedShampoo's state for the blocks this rank owns (factors, roots or eigenbases,
  eigenvalues, grafting and filtered-gradient state, two int64 counters per block) and the
  momentum of every parameter if ``momentum > 0`` -- exactly ``opt.plan.ranks[r]
  .optimizer_state_bytes``, which equals the bytes of the tensors in ``opt.state``,
- the dense buffers (as torchrec counts them).

Not included: transient per-step buffers (gather/scatter messages, batched intermediates; the
plan models them as ``peak_transient_bytes``) -- keep a ``percentage`` margin for those -- and
the wrapper's host-side 8-byte step counter per param group.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ModuleSharder

from sharded_shampoo import ShardedShampoo
from sharded_shampoo.runtime.placements import MeshKeyword


def _shampoo_arguments(shampoo_kwargs: dict[str, Any]) -> dict[str, Any]:
    """ShardedShampoo's keyword arguments with its defaults filled in (unknown names raise)."""
    try:
        bound = inspect.signature(ShardedShampoo).bind_partial(**shampoo_kwargs)
    except TypeError as err:
        raise TypeError(f"dense memory estimate: {err}; pass ShardedShampoo's keyword arguments "
                        "(lr, betas, max_preconditioner_dim, grafting, ...).") from None
    if "params" in bound.arguments:
        raise TypeError("dense memory estimate: the parameters come from the model; remove params=.")
    bound.apply_defaults()
    return dict(bound.arguments)


def dense_named_parameters(model: nn.Module, sharders: Optional[Sequence[ModuleSharder[nn.Module]]] = None
                           ) -> tuple[list[tuple[str, torch.Tensor]], int]:
    """Trainable parameters outside the modules the sharders shard, and the bytes of those modules' buffers.

    ``model`` is the unsharded model (on the meta device is fine: only shapes and dtypes are read).
    A module is sharded when its type is one of the sharders' ``module_type`` (by default
    torchrec's default sharders: EmbeddingBagCollection, EmbeddingCollection, ...), the rule the
    planner applies; tables the plan later makes ``data_parallel`` are not counted as dense.
    """
    types = {s.module_type for s in (get_default_sharders() if sharders is None else sharders)}
    skip: set[int] = set()
    for module in model.modules():
        if type(module) in types:
            skip.update(id(t) for t in module.parameters())
            skip.update(id(t) for t in module.buffers())
    params: list[tuple[str, torch.Tensor]] = [(n, p) for n, p in model.named_parameters()
                                              if p.requires_grad and id(p) not in skip]
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers() if id(b) not in skip)
    return params, buffer_bytes


def _plan_dense(params: list[tuple[str, torch.Tensor]], world_size: int, arguments: dict[str, Any]) -> Any:
    """The ShampooPlan of replicated dense parameters on ``world_size`` ranks (the optimizer's own planner).

    The only place that reaches into the planner's modules, so it can be re-pointed if they move.
    """
    from sharded_shampoo import MeshSpec, ParamSpec
    from sharded_shampoo.config import PlanSettings
    from sharded_shampoo.planning.plan import make_plan

    settings = PlanSettings.from_group(arguments, arguments["comm_dtype"])
    specs = [ParamSpec(name, tuple(p.shape), p.dtype, sharded=False) for name, p in params]
    return make_plan(specs, MeshSpec((world_size,)), settings)


def dense_bytes_per_rank(model: nn.Module, world_size: int, *,
                         sharders: Optional[Sequence[ModuleSharder[nn.Module]]] = None,
                         **shampoo_kwargs: Any) -> list[int]:
    """Per rank: dense params + grads + ShardedShampoo state + dense buffers (see the module doc).

    ``shampoo_kwargs`` are those the dense optimizer will get; ``mesh="local"`` (every rank
    repeats all the work) gives every rank the one-rank total.
    """
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1 (the number of DMP ranks); got {world_size!r}.")
    arguments = _shampoo_arguments(shampoo_kwargs)
    params, buffer_bytes = dense_named_parameters(model, sharders)
    if not params:
        raise ValueError("the model has no dense trainable parameters outside the sharded modules; there is no "
                         "dense optimizer state to reserve (torchrec's default reservation applies).")
    local = MeshKeyword.parse(arguments["mesh"]) is MeshKeyword.LOCAL
    plan = _plan_dense(params, 1 if local else world_size, arguments)
    per_rank = [r.param_bytes + r.grad_bytes + r.optimizer_state_bytes + buffer_bytes for r in plan.ranks]
    return per_rank * world_size if local else per_rank


def dense_tensor_estimate(model: nn.Module, world_size: int, *,
                          sharders: Optional[Sequence[ModuleSharder[nn.Module]]] = None,
                          **shampoo_kwargs: Any) -> int:
    """The bytes to reserve on every rank: the maximum of :func:`dense_bytes_per_rank`."""
    return max(dense_bytes_per_rank(model, world_size, sharders=sharders, **shampoo_kwargs))


def storage_reservation(model: nn.Module, world_size: int, *, percentage: float = 0.15,
                        sharders: Optional[Sequence[ModuleSharder[nn.Module]]] = None,
                        **shampoo_kwargs: Any) -> HeuristicalStorageReservation:
    """torchrec's ``HeuristicalStorageReservation`` with ShardedShampoo's exact dense memory.

    Pass it as ``EmbeddingShardingPlanner(topology, storage_reservation=...)``. ``percentage``
    is torchrec's extra margin of each device's memory (for transients and fragmentation).
    """
    if not isinstance(percentage, (int, float)) or isinstance(percentage, bool) or not 0 <= percentage < 1:
        raise ValueError(f"storage_reservation percentage must be a fraction in [0, 1) of each device's memory "
                         f"(e.g. 0.15); got {percentage!r}.")
    estimate = dense_tensor_estimate(model, world_size, sharders=sharders, **shampoo_kwargs)
    with warnings.catch_warnings():
        # torchrec warns that its *default* dense estimate is unreliable and asks for this argument
        warnings.filterwarnings("ignore", message="HeuristicalStorageReservation", category=FutureWarning)
        return HeuristicalStorageReservation(percentage=percentage, dense_tensor_estimate=estimate)
