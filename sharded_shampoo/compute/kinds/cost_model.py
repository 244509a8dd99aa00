"""The FLOP constants of the cost model (:class:`CostModel`), in which every preconditioner kind prices its work.

The kinds (:meth:`~.protocol.PreconditionerKind.step_flops` and friends) and the planner
(``planning/costs.py``, which re-exports these names) read the same constants; every one of them
lives here so a calibrated model can be passed to ``make_plan(..., cost_model=...)`` without touching
module globals (``scripts/benchmarks/calibrate_cost_model.py`` fits the eigendecomposition constant).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...checks import check_int
from ...config import EighRootConfig, QREigenbasisConfig


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
    ``svd_flops_per_ls2`` / ``svd_flops_per_s3``: thin SVD of an ``L x s`` matrix (``L >= s``), R-SVD
    (Golub & Van Loan): ``6 L s^2 + 20 s^3`` (spectral descent's ``SVD()``).
    ``refresh_skip_rate``: the fraction of eigenbasis refreshes with a ``tolerance > 0`` that keep the
    previous basis (no eigendecomposition): charged ``(1 - refresh_skip_rate)`` times the method on top
    of the check. 0 (the default) charges every refresh in full; a measured rate is
    ``RefreshCounts.skip_rate`` (``opt.runtime.buckets[i].refresh_counts``) of a run like the one planned.
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
    svd_flops_per_ls2: float = 6.0                     # thin SVD (R-SVD) of an L x s matrix: 6 L s^2 + 20 s^3
    svd_flops_per_s3: float = 20.0
    orthogonalize_elementwise_flops: float = 4.0       # Frobenius norm (2), normalise (1), scale (1)
    sign_elementwise_flops: float = 2.0                # sign, scale
    refresh_skip_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("warm_fallback_rate", "refresh_skip_rate"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"CostModel.{name} must be a number in [0, 1]; got {value!r}.")
        for name in ("newton_iterations", "warm_series_order"):
            check_int("CostModel", name, getattr(self, name))
        for name in ("eigh_flops_per_d3", "root_form_flops_per_d3", "qr_flops_per_d3", "filtered_grad_elementwise_flops",
                     "adagrad_elementwise_flops", "rmsprop_elementwise_flops", "adam_elementwise_flops",
                     "graft_rescale_elementwise_flops", "eigenvalue_correction_elementwise_flops",
                     "svd_flops_per_ls2", "svd_flops_per_s3", "orthogonalize_elementwise_flops",
                     "sign_elementwise_flops"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"CostModel.{name} must be a number >= 0; got {value!r}.")


DEFAULT_COST_MODEL = CostModel()

#: FLOPs of the tolerance check ``Q^T (A Q)`` per d^3: two GEMMs.
TOLERANCE_CHECK_FLOPS_PER_D3 = 4.0


def eigenbasis_refresh_per_d3(model: CostModel, basis: Any, tolerance: float, values: bool = False) -> float:
    """FLOPs per ``d^3`` of refreshing one factor's eigenbasis: eigh, or ``iterations`` x (GEMM + QR) plus
    ``warm_fallback_rate`` eighs (and with ``values`` one GEMM for the Rayleigh quotients); with
    ``tolerance > 0`` the check plus ``1 - refresh_skip_rate`` of that."""
    if isinstance(basis, QREigenbasisConfig):
        method = (basis.iterations * (2.0 + model.qr_flops_per_d3) + model.warm_fallback_rate * model.eigh_flops_per_d3
                  + (2.0 if values else 0.0))
    else:
        method = model.eigh_flops_per_d3
    if tolerance > 0:
        return TOLERANCE_CHECK_FLOPS_PER_D3 + (1.0 - model.refresh_skip_rate) * method
    return method


def eigenbasis_workspace_bytes(d: int, factor_dtype: torch.dtype, basis: Any) -> int:
    """Refreshing a ``d x d`` factor's eigenbasis: eigh ``(3 d^2 + d) s`` (fp64 ``s`` when a failed fp32 eigh is
    retried), QR iterations the larger of ``4 d^2 s`` and their eigh fallback's."""
    s = max(torch.empty((), dtype=factor_dtype).element_size(), 4)
    eigh_config = basis.fallback if isinstance(basis, QREigenbasisConfig) else basis
    assert isinstance(eigh_config, EighRootConfig)
    eigh = (3 * d * d + d) * (8 if eigh_config.retry_in_float64 else s)
    return max(4 * d * d * s, eigh) if isinstance(basis, QREigenbasisConfig) else eigh


__all__ = ["CostModel", "DEFAULT_COST_MODEL", "TOLERANCE_CHECK_FLOPS_PER_D3", "eigenbasis_refresh_per_d3",
           "eigenbasis_workspace_bytes"]
