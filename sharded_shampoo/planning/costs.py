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
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping


from ..config import (
    STATEFUL_GRAFTING_TYPES,
    check_int,
    AdaGradGrafting,
    AdamGrafting,
    BlockingConfig,
    CoupledNewtonConfig,
    EigenvalueCorrectedShampoo,
    EighRootConfig,
    GraftingConfig,
    PreconditionerConfig,
    QREigenbasisConfig,
    RMSpropGrafting,
    RootInverseShampoo,
    WarmStartRootConfig,
)
from .blocking import Block, block_exponents, merged_shape
from .layout import dtype_itemsize

#: Kinds of per-block optimizer state, in report order. "momentum" and "averaging" (the z buffer of
#: GPA / Schedule-Free) are per rank (they live with the local shard), so they are not block kinds;
#: see :data:`RANK_STATE_KINDS`.
BLOCK_STATE_KINDS: tuple[str, ...] = (
    "factors", "roots", "eigenvalues", "grafting", "filtered_grad", "counters")
#: All optimizer-state kinds a rank can hold.
RANK_STATE_KINDS: tuple[str, ...] = BLOCK_STATE_KINDS + ("momentum", "averaging")
#: Per-block counters: an int64 step counter and an int64 consecutive-root-failure counter.
COUNTER_BYTES_PER_BLOCK = 16


@dataclass(frozen=True)
class CostModel:
    """FLOP constants of the cost model. Defaults are textbook operation counts.

    ``eigh_flops_per_d3``: symmetric eigendecomposition with eigenvectors (Householder
    tridiagonalisation + implicit QR, Golub & Van Loan) ~ 9 d^3. Its *effective* value on a
    machine (eigh is less GEMM-efficient than a matmul) is what the calibration script fits.
    ``root_form_flops_per_d3``: forming ``Q diag(lambda^-e) Q^T`` from the eigenpairs, one
    d x d x d GEMM = 2 d^3.
    ``newton_iterations``: iterations charged to the coupled Newton root (capped by the
    config's ``max_iterations``); each iteration of a p-th root costs ``p + 1`` GEMMs of 2 d^3.
    ``*_elementwise_flops``: FLOPs per block element for the diagonal work done every step.
    ``warm_series_order``: series order charged to a warm-started root (``WarmStartRootConfig``,
    capped by its ``max_order``); ``warm_fallback_rate``: the fraction of warm refreshes charged a
    full eigh on top (first refreshes, screens and residual checks that fail).
    ``qr_flops_per_d3``: Householder QR with Q formed (``geqrf`` + ``orgqr``), 8/3 d^3.
    """

    eigh_flops_per_d3: float = 9.0
    root_form_flops_per_d3: float = 2.0
    newton_iterations: int = 20
    warm_series_order: int = 3
    warm_fallback_rate: float = 0.1
    qr_flops_per_d3: float = 8.0 / 3.0
    filtered_grad_elementwise_flops: float = 3.0       # M = b1*M + (1-b1)*G: mul, mul, add
    adagrad_elementwise_flops: float = 5.0             # square, accumulate, sqrt, +eps, divide
    rmsprop_elementwise_flops: float = 6.0             # square, EMA (2 mul + add), sqrt, +eps, divide
    adam_elementwise_flops: float = 7.0                # as RMSprop + bias-correction scale
    graft_rescale_elementwise_flops: float = 5.0       # two squared norms (2 each) + scale (1)
    eigenvalue_correction_elementwise_flops: float = 6.0  # EMA of squared rotated grad, sqrt, +eps, div

    def __post_init__(self) -> None:
        if not 0.0 <= self.warm_fallback_rate <= 1.0:
            raise ValueError(f"CostModel.warm_fallback_rate must be in [0, 1]; got {self.warm_fallback_rate!r}.")
        for name in ("newton_iterations", "warm_series_order"):
            check_int("CostModel", name, getattr(self, name))
        for name in ("eigh_flops_per_d3", "root_form_flops_per_d3", "qr_flops_per_d3", "filtered_grad_elementwise_flops",
                     "adagrad_elementwise_flops", "rmsprop_elementwise_flops", "adam_elementwise_flops",
                     "graft_rescale_elementwise_flops", "eigenvalue_correction_elementwise_flops"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"CostModel.{name} must be a number >= 0; got {value!r}.")


DEFAULT_COST_MODEL = CostModel()


@dataclass(frozen=True)
class BlockCost:
    """Everything the planner needs to know about one block.

    ``state_bytes`` maps each kind of :data:`BLOCK_STATE_KINDS` to bytes on the owner.
    ``step_flops`` is the work of an ordinary step; ``amortized_flops`` the extra work of a
    root/eigenbasis refresh (every ``precondition_frequency`` steps);
    ``amortized_workspace_bytes`` the transient memory that refresh needs for this block.
    """

    state_bytes: Mapping[str, int]
    step_flops: float
    amortized_flops: float
    amortized_workspace_bytes: int

    @functools.cached_property
    def total_state_bytes(self) -> int:
        # cached: the balancer asks once per block, and blocks share a handful of cost objects
        return sum(self.state_bytes.values())

    def balance_cost(self, precondition_frequency: int) -> float:
        """The balancer's weight: step cost + amortized cost spread over the refresh period."""
        return self.step_flops + self.amortized_flops / precondition_frequency


def block_state_bytes(block: Block, preconditioner: PreconditionerConfig, grafting: GraftingConfig | None,
                      beta1: float) -> dict[str, int]:
    """Exact bytes of each state kind the owner allocates for ``block``.

    S = ``preconditioner.factor_dtype`` itemsize; S_f, S_r = itemsizes of the factor and root storage
    dtypes (``factor_storage_dtype`` / ``root_storage_dtype``, S where unset). factors: sum d^2 S_f
    over factor dims; roots (inverse roots, or eigenbases for the eigenvalue-corrected mode): sum
    d^2 S_r; eigenvalues (eigenvalue-corrected only): numel S; grafting (AdaGrad/RMSprop/Adam):
    numel S; filtered_grad (beta1 > 0): numel S; counters: 16 bytes.
    """
    s = dtype_itemsize(preconditioner.factor_dtype)
    s_factor, s_root = (dtype_itemsize(t) for t in preconditioner.storage_dtypes())
    square = sum(d * d for d in block.factor_dims)
    numel = block.numel
    return {
        "factors": square * s_factor,
        "roots": square * s_root,
        "eigenvalues": numel * s if isinstance(preconditioner, EigenvalueCorrectedShampoo) else 0,
        "grafting": numel * s if isinstance(grafting, STATEFUL_GRAFTING_TYPES) else 0,
        "filtered_grad": numel * s if beta1 > 0 else 0,
        "counters": COUNTER_BYTES_PER_BLOCK,
    }


def _grafting_elementwise_flops(grafting: GraftingConfig, model: CostModel) -> float:
    if isinstance(grafting, AdaGradGrafting):
        return model.adagrad_elementwise_flops
    if isinstance(grafting, RMSpropGrafting):
        return model.rmsprop_elementwise_flops
    if isinstance(grafting, AdamGrafting):
        return model.adam_elementwise_flops
    return 0.0  # SGD grafting: the norms only (counted as rescale)


def _elementwise_flops(block: Block, preconditioner: PreconditionerConfig, grafting: GraftingConfig | None,
                       beta1: float, model: CostModel) -> float:
    per_element = 0.0
    if beta1 > 0:
        per_element += model.filtered_grad_elementwise_flops
    if grafting is not None:
        per_element += _grafting_elementwise_flops(grafting, model)
        if block.preconditioned:
            per_element += model.graft_rescale_elementwise_flops
    if isinstance(preconditioner, EigenvalueCorrectedShampoo):
        per_element += model.eigenvalue_correction_elementwise_flops
    return per_element * block.numel


def block_step_flops(block: Block, preconditioner: PreconditionerConfig, grafting: GraftingConfig | None,
                     beta1: float, model: CostModel = DEFAULT_COST_MODEL) -> float:
    """Modeled FLOPs of one ordinary step for ``block``.

    Per factor dim d: factor update G_(i) G_(i)^T = 2 numel d; preconditioning one mode
    product = 2 numel d (eigenvalue-corrected: rotate into and out of the eigenbasis,
    4 numel d). Plus the elementwise work (filtered gradient, grafting, eigenvalue correction).
    """
    product_flops = 4 if isinstance(preconditioner, EigenvalueCorrectedShampoo) else 2
    numel = block.numel
    matrix = sum((2 + product_flops) * numel * d for d in block.factor_dims)
    return float(matrix) + _elementwise_flops(block, preconditioner, grafting, beta1, model)


def _newton_root(exponent: float) -> int:
    """The integer p of a ``1/p`` root (coupled Newton needs one; config validation ensures it)."""
    return max(1, round(1.0 / exponent))


def block_amortized_flops(block: Block, preconditioner: PreconditionerConfig,
                          model: CostModel = DEFAULT_COST_MODEL) -> float:
    """Modeled FLOPs of one root / eigenbasis refresh of ``block``.

    Eigh roots: (eigh + root formation) d^3 per factor dim. Coupled Newton: iterations x
    (p + 1) GEMMs x 2 d^3. Warm-started roots (exponent 1/(2q)): ``q + order + 1`` GEMMs x 2 d^3
    (``R^q``, the frame ``R^q A R^q``, the series, ``R Y``) plus ``warm_fallback_rate`` eigh roots.
    Eigenvalue-corrected: one eigh per factor dim (the eigenbasis), or with QR refreshes
    ``iterations`` x (one GEMM + one QR) plus ``warm_fallback_rate`` eighs.
    """
    eigh_root = model.eigh_flops_per_d3 + model.root_form_flops_per_d3
    total = 0.0
    for d, e in zip(block.shape, block.exponents):
        if e == 0:
            continue
        if isinstance(preconditioner, EigenvalueCorrectedShampoo):
            basis = preconditioner.eigenbasis
            if isinstance(basis, QREigenbasisConfig):
                per_d3 = basis.iterations * (2.0 + model.qr_flops_per_d3) + model.warm_fallback_rate * model.eigh_flops_per_d3
            else:
                per_d3 = model.eigh_flops_per_d3
        elif isinstance(preconditioner.root, CoupledNewtonConfig):
            iterations = min(model.newton_iterations, preconditioner.root.max_iterations)
            per_d3 = iterations * (_newton_root(e) + 1) * 2.0
        elif isinstance(preconditioner.root, WarmStartRootConfig):
            order = min(model.warm_series_order, preconditioner.root.max_order)
            per_d3 = (round(0.5 / e) + order + 1) * 2.0 + model.warm_fallback_rate * eigh_root
        else:
            per_d3 = eigh_root
        total += per_d3 * d ** 3
    return total


def block_amortized_workspace_bytes(block: Block, preconditioner: PreconditionerConfig) -> int:
    """Transient bytes of refreshing ``block``'s largest factor (one factor at a time).

    eigh: a working copy of the factor, the eigenvectors, the root product (3 d^2) and the
    eigenvalues (d), in the compute dtype: at least fp32, and fp64 when a failed fp32 eigh is
    retried in fp64 (counted because a memory plan must survive the rare retry).
    Coupled Newton: iterate X, M, the update T and one GEMM temporary (4 d^2).
    Warm-started roots: ``R^q``, the frame, two series terms and the result (5 d^2), or the eigh
    fallback's workspace, whichever is larger. QR eigenbases: ``A Q``, its permuted copy, Q and R
    (4 d^2), or the eigh fallback's.
    """
    if not block.factor_dims:
        return 0
    d = max(block.factor_dims)
    s = max(dtype_itemsize(preconditioner.factor_dtype), 4)
    eigh = _eigh_workspace(d, s, preconditioner)
    if isinstance(preconditioner, RootInverseShampoo):
        if isinstance(preconditioner.root, CoupledNewtonConfig):
            return 4 * d * d * s
        if isinstance(preconditioner.root, WarmStartRootConfig):
            return max(5 * d * d * s, eigh)
    elif isinstance(preconditioner.eigenbasis, QREigenbasisConfig):
        return max(4 * d * d * s, eigh)
    return eigh


def _eigh_workspace(d: int, s: int, preconditioner: PreconditionerConfig) -> int:
    """A working copy, the eigenvectors, the root product (3 d^2) and the eigenvalues (d); fp64 if retried."""
    if isinstance(preconditioner, RootInverseShampoo):
        root = preconditioner.root
        config = root.fallback if isinstance(root, WarmStartRootConfig) else root
        if isinstance(config, EighRootConfig) and config.retry_in_float64:
            s = 8
    return (3 * d * d + d) * s


def block_cost(block: Block, preconditioner: PreconditionerConfig, grafting: GraftingConfig | None,
               beta1: float, model: CostModel = DEFAULT_COST_MODEL) -> BlockCost:
    """All costs of one block (see the individual functions for the formulas)."""
    return BlockCost(
        state_bytes=MappingProxyType(block_state_bytes(block, preconditioner, grafting, beta1)),
        step_flops=block_step_flops(block, preconditioner, grafting, beta1, model),
        amortized_flops=block_amortized_flops(block, preconditioner, model),
        amortized_workspace_bytes=block_amortized_workspace_bytes(block, preconditioner),
    )


def param_state_bytes(shape: tuple[int, ...], max_preconditioner_dim: int, preconditioner: PreconditionerConfig,
                      grafting: GraftingConfig | None, beta1: float,
                      blocking: BlockingConfig = BlockingConfig()) -> tuple[int, int, int]:
    """``(largest block, total, number of blocks)`` of one parameter's state, without listing blocks.

    The same bytes as summing :func:`block_state_bytes` over ``plan_blocks``, in O(order): each
    merged dim ``m`` splits into ``q = m // D`` chunks of ``D`` and a remainder ``r``, so the sum of
    ``d_i^2`` over all blocks is ``(q D^2 + r^2) * prod(chunk counts of the other dims)``, times the
    number of batch indices. Block 0 (full-size chunks) is the largest. Used to search for a
    ``max_preconditioner_dim`` that fits a memory cap over every candidate quickly, also where a plan
    would have millions of blocks.
    """
    d = max_preconditioner_dim
    if any(m == 0 for m in shape):
        return 0, 0, 0
    batch = math.prod(shape[:blocking.batch_dims])
    merged = merged_shape(shape[blocking.batch_dims:], d, blocking.merge_dims)
    # Block 0 (full-size chunks), built directly: re-planning its shape would squeeze size-1 chunks.
    exponents = block_exponents(len(merged), preconditioner, blocking)
    b0 = Block(block_id="p.block_0", param_name="p", param_shape=tuple(shape), merged_shape=merged,
               ranges=tuple((0, min(m, d)) for m in merged), exponents=exponents)
    largest = block_state_bytes(b0, preconditioner, grafting, beta1)
    s_factor, s_root = (dtype_itemsize(t) for t in preconditioner.storage_dtypes())
    counts = [-(-m // d) for m in merged]
    sumsq = [(m // d) * d * d + (m % d) ** 2 for m in merged]
    n_blocks = math.prod(counts)
    factor_entries = sum(sumsq[i] * (n_blocks // counts[i]) for i, e in enumerate(exponents) if e != 0)
    per_element = sum(largest[k] for k in ("eigenvalues", "grafting", "filtered_grad")) // b0.numel
    total = (s_factor + s_root) * factor_entries + per_element * math.prod(merged) + COUNTER_BYTES_PER_BLOCK * n_blocks
    return sum(largest.values()), batch * total, batch * n_blocks


__all__ = [
    "BLOCK_STATE_KINDS", "RANK_STATE_KINDS", "COUNTER_BYTES_PER_BLOCK", "CostModel", "DEFAULT_COST_MODEL",
    "BlockCost", "block_state_bytes", "block_step_flops", "block_amortized_flops",
    "block_amortized_workspace_bytes", "block_cost", "param_state_bytes",
]
