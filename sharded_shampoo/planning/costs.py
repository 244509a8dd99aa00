"""Cost and memory model of one preconditioner block: bytes by kind, FLOPs, workspace.

Pure functions of a :class:`~sharded_shampoo.blocking.Block` and the config that decides its
state. The balancer (``balance.py``) spreads blocks over ranks on these numbers and the
dry-run planner reports them, so two properties matter:

* **State bytes are exact.** They are the bytes the optimizer allocates for the block on its
  owner (see the table in ``docs/cost_model.md``); the distributed tests check equality.
* **FLOPs are a model.** They count the dominant matrix work (factor update, preconditioning,
  eigendecomposition / Newton iterations) plus a few FLOPs per element for the diagonal work.
  Only their *ratios* steer the balance; ``scripts/calibrate_cost_model.py`` measures the
  eigendecomposition constant on the machine at hand and records the fit in
  ``docs/cost_model.md``.

Every constant lives in :class:`CostModel` so a calibrated model can be passed to
``make_plan(..., cost_model=...)`` without touching module globals.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping


from ..compute.kinds import make_kind
from ..compute.kinds.cost_model import DEFAULT_COST_MODEL, CostModel
from ..compute.kinds.protocol import PreconditionerKind, StateField
from ..compute.kinds.state import block_fields
from ..config import (
    AdaGradGrafting,
    AdamGrafting,
    BlockingConfig,
    GraftingConfig,
    PreconditionerConfig,
    RMSpropGrafting,
)
from .blocking import Block, block_exponents, merged_shape, min_block_order

#: Kinds of per-block optimizer state, in report order. "momentum" and "averaging" (the z buffer of
#: GPA / Schedule-Free) are per rank (they live with the local shard), so they are not block kinds;
#: see :data:`RANK_STATE_KINDS`.
BLOCK_STATE_KINDS: tuple[str, ...] = (
    "factors", "roots", "eigenvalues", "grafting", "filtered_grad", "counters")
#: All optimizer-state kinds a rank can hold.
RANK_STATE_KINDS: tuple[str, ...] = BLOCK_STATE_KINDS + ("momentum", "averaging")
#: Per-block counters: an int64 step counter and an int64 consecutive-root-failure counter.
COUNTER_BYTES_PER_BLOCK = 16
#: Resident bytes per owned block besides its state: its int64 stochastic-rounding salt (kept between
#: steps unless ``release_buffers_between_steps``).
SALT_BYTES_PER_BLOCK = 8




@dataclass(frozen=True)
class BlockCost:
    """Everything the planner needs to know about one block.

    ``state_bytes`` maps each kind of :data:`BLOCK_STATE_KINDS` to bytes on the owner.
    ``step_flops`` is the work of an ordinary step; ``amortized_flops`` the extra work of a
    root/eigenbasis refresh (every ``precondition_frequency`` steps);
    ``amortized_workspace_bytes`` the transient memory that refresh needs for this block;
    ``packed_dims`` the sizes of its packed symmetric fields, whose index tables its owner keeps
    (once per size and rank; see :func:`~sharded_shampoo.compute.packing.index_bytes`).
    """

    state_bytes: Mapping[str, int]
    step_flops: float
    amortized_flops: float
    amortized_workspace_bytes: int
    packed_dims: tuple[int, ...] = ()

    @functools.cached_property
    def total_state_bytes(self) -> int:
        # cached: the balancer asks once per block, and blocks share a handful of cost objects
        return sum(self.state_bytes.values())

    def balance_cost(self, precondition_frequency: int) -> float:
        """The balancer's weight: step cost + amortized cost spread over the refresh period."""
        return self.step_flops + self.amortized_flops / precondition_frequency


def _kind(block: Block, preconditioner: PreconditionerConfig) -> PreconditionerKind:
    return make_kind(preconditioner, block.shape, block.exponents)


def fields_bytes(fields: list[StateField]) -> dict[str, int]:
    """Bytes per state kind (:data:`BLOCK_STATE_KINDS`) of one block's fields."""
    out = dict.fromkeys(BLOCK_STATE_KINDS, 0)
    for f in fields:
        if f.category not in out:
            raise ValueError(f"state field {f.name!r} has category {f.category!r}; known: {BLOCK_STATE_KINDS}.")
        out[f.category] += f.nbytes
    return out


def block_state_bytes(block: Block, preconditioner: PreconditionerConfig, grafting: GraftingConfig | None,
                      beta1: float) -> dict[str, int]:
    """Exact bytes of each state kind the owner allocates for ``block``: the bytes of every field the
    block's preconditioner kind declares plus the counters, grafting and filtered-gradient fields
    (``compute/kinds/state.py::block_fields``, which the optimizer allocates, field by field).

    For the Shampoo family (S = itemsize of ``factor_dtype``, S_f / S_r of the factor / root storage
    dtypes, ``n(d) = d^2`` or ``d (d + 1) / 2`` with ``symmetric_packing``): factors ``sum n(d) S_f``;
    roots (inverse roots: ``sum n(d) S_r``; eigenbases, never packed: ``sum d^2 S_r``); eigenvalues
    (eigenvalue-corrected) ``numel S``; grafting (AdaGrad/RMSprop/Adam) ``numel S``; filtered_grad
    (beta1 > 0) ``numel S``; counters 16.
    """
    return fields_bytes(block_fields(_kind(block, preconditioner), grafting, beta1 > 0))


def _grafting_elementwise_flops(grafting: GraftingConfig, model: CostModel) -> float:
    if isinstance(grafting, AdaGradGrafting):
        return model.adagrad_elementwise_flops
    if isinstance(grafting, RMSpropGrafting):
        return model.rmsprop_elementwise_flops
    if isinstance(grafting, AdamGrafting):
        return model.adam_elementwise_flops
    return 0.0  # SGD grafting: the norms only (counted as rescale)


def _elementwise_flops(kind: PreconditionerKind, numel: int, grafting: GraftingConfig | None,
                       beta1: float, model: CostModel) -> float:
    per_element = kind.elementwise_flops(model)
    if beta1 > 0:
        per_element += model.filtered_grad_elementwise_flops
    if grafting is not None:
        per_element += _grafting_elementwise_flops(grafting, model)
        if kind.preconditions:
            per_element += model.graft_rescale_elementwise_flops
    return per_element * numel


def block_step_flops(block: Block, preconditioner: PreconditionerConfig, grafting: GraftingConfig | None,
                     beta1: float, model: CostModel = DEFAULT_COST_MODEL) -> float:
    """Modeled FLOPs of one ordinary step for ``block``: the kind's matrix work plus the element-wise work.

    Shampoo family, per factor dim d: factor update G_(i) G_(i)^T = 2 numel d; preconditioning one mode
    product = 2 numel d (eigenvalue-corrected: rotate into and out of the eigenbasis, 4 numel d). Plus
    the elementwise work (filtered gradient, grafting, eigenvalue correction).
    """
    kind = _kind(block, preconditioner)
    return kind.step_flops(model) + _elementwise_flops(kind, block.numel, grafting, beta1, model)


def block_amortized_flops(block: Block, preconditioner: PreconditionerConfig,
                          model: CostModel = DEFAULT_COST_MODEL) -> float:
    """Modeled FLOPs of one refresh of ``block`` (the kind's ``refresh_flops``).

    Eigh roots: (eigh + root formation) d^3 per factor dim. Coupled Newton: iterations x
    (p + 1) GEMMs x 2 d^3. Warm-started roots (exponent 1/(2q)): ``q + order + 1`` GEMMs x 2 d^3
    (``R^q``, the frame ``R^q A R^q``, the series, ``R Y``) plus ``warm_fallback_rate`` eigh roots.
    Eigenvalue-corrected: one eigh per factor dim (the eigenbasis), or with QR refreshes
    ``iterations`` x (one GEMM + one QR) plus ``warm_fallback_rate`` eighs.
    """
    return _kind(block, preconditioner).refresh_flops(model)


def block_amortized_workspace_bytes(block: Block, preconditioner: PreconditionerConfig) -> int:
    """Transient bytes of refreshing ``block``'s largest factor (one factor at a time; the kind's
    ``workspace_bytes``).

    eigh: a working copy of the factor, the eigenvectors, the root product (3 d^2) and the
    eigenvalues (d), in the compute dtype: at least fp32, and fp64 when a failed fp32 eigh is
    retried in fp64 (counted because a memory plan must survive the rare retry).
    Coupled Newton: iterate X, M, the update T and one GEMM temporary (4 d^2).
    Warm-started roots: ``R^q``, the frame, two series terms and the result (5 d^2), or the eigh
    fallback's workspace, whichever is larger. QR eigenbases: ``A Q``, its permuted copy, Q and R
    (4 d^2), or the eigh fallback's.
    """
    return _kind(block, preconditioner).workspace_bytes()


def block_cost(block: Block, preconditioner: PreconditionerConfig, grafting: GraftingConfig | None,
               beta1: float, model: CostModel = DEFAULT_COST_MODEL) -> BlockCost:
    """All costs of one block (see the individual functions for the formulas)."""
    return BlockCost(
        state_bytes=MappingProxyType(block_state_bytes(block, preconditioner, grafting, beta1)),
        step_flops=block_step_flops(block, preconditioner, grafting, beta1, model),
        amortized_flops=block_amortized_flops(block, preconditioner, model),
        amortized_workspace_bytes=block_amortized_workspace_bytes(block, preconditioner),
        packed_dims=tuple(sorted({f.shape[0] for f in _kind(block, preconditioner).fields() if f.packed})),
    )


def param_state_bytes(shape: tuple[int, ...], max_preconditioner_dim: int, preconditioner: PreconditionerConfig,
                      grafting: GraftingConfig | None, beta1: float,
                      blocking: BlockingConfig = BlockingConfig()) -> tuple[int, int, int]:
    """``(largest block, total, number of blocks)`` of one parameter's state, without listing blocks.

    The same bytes as summing :func:`block_state_bytes` over ``plan_blocks``, in O(2^order): each
    merged dim ``m`` splits into ``q = m // D`` chunks of ``D`` and a remainder ``r``, so the blocks
    have at most ``2^order`` distinct shapes, each priced once and counted by how many blocks have it,
    times the number of batch indices. Block 0 (full-size chunks) is the largest. Used to search for a
    ``max_preconditioner_dim`` that fits a memory cap over every candidate quickly, also where a plan
    would have millions of blocks.
    """
    d = max_preconditioner_dim
    if any(m == 0 for m in shape):
        return 0, 0, 0
    batch = math.prod(shape[:blocking.batch_dims])
    merged = merged_shape(shape[blocking.batch_dims:], d, blocking.merge_dims, min_block_order(preconditioner))
    exponents = block_exponents(len(merged), preconditioner, blocking)
    sizes = [[(s, c) for s, c in ((d, m // d), (m % d, 1)) if s and c] for m in merged]
    total, n_blocks = 0, 0
    for combo in itertools.product(*sizes):
        count = math.prod(c for _, c in combo)
        kind = make_kind(preconditioner, tuple(s for s, _ in combo), exponents)
        total += count * sum(f.nbytes for f in block_fields(kind, grafting, beta1 > 0))
        n_blocks += count
    b0 = make_kind(preconditioner, tuple(min(m, d) for m in merged), exponents)
    largest = sum(f.nbytes for f in block_fields(b0, grafting, beta1 > 0))
    return largest, batch * total, batch * n_blocks


__all__ = [
    "BLOCK_STATE_KINDS", "RANK_STATE_KINDS", "COUNTER_BYTES_PER_BLOCK", "SALT_BYTES_PER_BLOCK", "CostModel", "DEFAULT_COST_MODEL",
    "BlockCost", "block_state_bytes", "fields_bytes", "block_step_flops", "block_amortized_flops",
    "block_amortized_workspace_bytes", "block_cost", "param_state_bytes",
]
