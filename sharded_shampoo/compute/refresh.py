"""The amortized refresh of one factor stack: pick the method the config names, count what it did.

Inverse roots (root-inverse Shampoo): eigendecomposition, coupled Newton, or the warm-started
series (:mod:`.warm_refresh`). Eigenbases (eigenvalue-corrected and eigendecomposed Shampoo):
eigendecomposition or warm-started QR iterations, optionally skipped where the previous basis
still diagonalises the factor within a ``tolerance`` (the adaptive refresh). Every method returns
new matrices plus a per-matrix ``ok`` mask; the caller keeps the previous matrix where ``ok`` is
False (a failure counts towards ``max_consecutive_root_failures``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..config import (CoupledNewtonConfig, EigenbasisConfig, EigenvalueCorrectedShampoo, PreconditionerConfig,
                      QREigenbasisConfig, RootConfig, WarmStartRootConfig)
from .matrix_functions import diagonality, eigenpairs, inverse_root_eigh, inverse_root_newton, work_dtype
from .warm_refresh import eigenbasis_qr, inverse_root_warm


@dataclass
class RefreshResult:
    """New matrices for a stack, which are usable, and (QR eigenbases) the column permutation applied."""

    matrices: torch.Tensor
    ok: torch.Tensor
    permutation: Optional[torch.Tensor] = None   # int64 [B, d]; identity rows where a full eigh was used
    fell_back: Optional[torch.Tensor] = None     # bool [B] (warm roots): the series was tried and failed its check
    values: Optional[torch.Tensor] = None        # [B, d] eigenvalues of F_hat + eps I (eigenbases asked for them)
    skipped: Optional[torch.Tensor] = None       # bool [B]: kept the previous basis (within the tolerance)


#: How many residuals of accepted warm roots a bucket keeps (the most recent ones).
RESIDUALS_KEPT = 4096


@dataclass
class RefreshCounts:
    """How many matrices each way of refreshing produced (Python ints; telemetry, not state)."""

    full: int = 0         # eigh (or coupled Newton) from scratch
    warm: int = 0         # accepted warm-started results
    fallback: int = 0     # warm attempts or first refreshes that needed the full method
    checked: int = 0      # eigenbasis refreshes that checked the adaptive-refresh tolerance
    skipped: int = 0      # ... of which kept the previous basis (no eigendecomposition)
    #: residual estimates of the most recent accepted warm roots (bounded: a long run refreshes millions of times)
    residuals: deque[float] = field(default_factory=lambda: deque(maxlen=RESIDUALS_KEPT))

    @property
    def skip_rate(self) -> float:
        """``skipped / checked`` (0.0 before any check): the measured rate ``CostModel.refresh_skip_rate`` takes."""
        return self.skipped / self.checked if self.checked else 0.0


class WarmBackoff:
    """Which blocks try the warm-started root at a refresh (per factor; Python state, not optimizer state).

    A block whose warm attempt fell back to eigh skips its next 1, 2, 4, then 8 attempts (eigh
    directly), so a run where warm roots do not pass the check pays for a failed attempt at most on
    one refresh in nine instead of on every one; an accepted attempt resets the wait. Starts afresh
    after a restart (it only decides where to spend a few GEMMs).
    """

    MAX_WAIT = 8

    def __init__(self, n_blocks: int) -> None:
        self.wait = [0] * n_blocks
        self.span = [0] * n_blocks

    def attempt(self, rows: list[int]) -> list[bool]:
        return [self.wait[r] == 0 for r in rows]

    def record(self, rows: list[int], attempted: list[bool], failed: list[bool]) -> None:
        """``failed``: the series was computed and failed its check (a screen or first-refresh eigh is free)."""
        for r, a, f in zip(rows, attempted, failed):
            if not a:
                self.wait[r] -= 1
            elif f:
                self.span[r] = min(2 * self.span[r] or 1, self.MAX_WAIT)
                self.wait[r] = self.span[r]
            else:
                self.span[r] = self.wait[r] = 0


def refresh_factor(F_hat: torch.Tensor, previous: torch.Tensor, exponent: float, epsilon: float,
                   preconditioner: PreconditionerConfig, counts: RefreshCounts,
                   attempt: Optional[torch.Tensor] = None) -> RefreshResult:
    """New inverse roots (or eigenbases) of the bias-corrected factors ``F_hat: [B, d, d]``.

    ``previous``: the current roots / eigenbases (the warm start; the identity before the first refresh).
    ``attempt``: bool ``[B]``, which matrices may try a warm-started root (default: all).
    """
    if isinstance(preconditioner, EigenvalueCorrectedShampoo):
        return refresh_eigenbases(F_hat, previous, epsilon, preconditioner.eigenbasis, counts, preconditioner.tolerance)
    return refresh_roots(F_hat, previous, exponent, epsilon, preconditioner.root, counts, attempt)


def refresh_roots(F_hat: torch.Tensor, previous: Optional[torch.Tensor], exponent: float, epsilon: float,
                  root: RootConfig, counts: RefreshCounts, attempt: Optional[torch.Tensor] = None) -> RefreshResult:
    """Inverse roots ``(F_hat + epsilon I)^(-exponent)`` of a stack by the method ``root`` names.

    ``previous`` (the current roots) is read by warm-started roots only (None is fine otherwise).
    """
    B = F_hat.shape[0]
    if isinstance(root, WarmStartRootConfig):
        assert previous is not None, "warm-started roots need the previous roots"
        X, ok, report = inverse_root_warm(F_hat, previous, exponent, epsilon, root, attempt)
        _count_warm(counts, report.fell_back, report.residual)
        assert report.tried is not None                      # warm roots always report it
        return RefreshResult(X, ok, fell_back=report.fell_back & report.tried)
    counts.full += B
    if isinstance(root, CoupledNewtonConfig):
        return RefreshResult(*inverse_root_newton(F_hat, exponent, epsilon, root))
    return RefreshResult(*inverse_root_eigh(F_hat, exponent, epsilon, root))


def refresh_eigenbases(F_hat: torch.Tensor, previous: torch.Tensor, epsilon: float, basis: EigenbasisConfig,
                       counts: RefreshCounts, tolerance: float = 0.0, values: bool = False) -> RefreshResult:
    """Eigenbases of ``F_hat + epsilon I`` by ``eigh`` or warm-started QR iterations from ``previous``.

    ``tolerance > 0``: a matrix whose previous basis ``Q`` still satisfies ``||B - diag B||_F <=
    tolerance ||B||_F`` (``B = Q^T (F_hat + epsilon I) Q``) keeps it, with the Rayleigh quotients
    ``diag B`` as its eigenvalues (the reference's adaptive refresh; counted in ``counts.checked`` /
    ``counts.skipped``). ``values``: also return the eigenvalues (eigh's, ascending; for a QR basis the
    Rayleigh quotients of the new basis, one more GEMM). May read the host (it is a refresh).
    """
    B, d = F_hat.shape[0], F_hat.shape[-1]
    skip = estimates = None
    if tolerance > 0:
        work = work_dtype(F_hat)
        A = F_hat.to(work) + epsilon * torch.eye(d, dtype=work, device=F_hat.device)
        off, norm, estimates = diagonality(A, previous.to(work))
        skip = off <= tolerance * norm
        counts.checked += B
        counts.skipped += int(skip.sum())
    todo = None if skip is None else (~skip).nonzero().flatten()
    if todo is not None and todo.numel() == 0:
        assert estimates is not None and skip is not None
        ok = torch.ones(B, dtype=torch.bool, device=F_hat.device)
        return RefreshResult(previous.to(estimates.dtype), ok, values=estimates, skipped=skip)
    res = _decompose(F_hat if todo is None else F_hat[todo], previous if todo is None else previous[todo],
                     epsilon, basis, counts, values)
    if todo is None or todo.numel() == B:
        res.skipped = skip
        return res
    assert estimates is not None
    out = RefreshResult(previous.to(res.matrices.dtype).clone(), torch.ones(B, dtype=torch.bool, device=F_hat.device),
                        skipped=skip, values=estimates.to(res.matrices.dtype) if values else None)
    out.matrices[todo], out.ok[todo] = res.matrices, res.ok
    if out.values is not None and res.values is not None:
        out.values[todo] = res.values
    if res.permutation is not None:
        out.permutation = torch.arange(d, device=F_hat.device).expand(B, d).clone()
        out.permutation[todo] = res.permutation
    return out


def _decompose(F_hat: torch.Tensor, previous: torch.Tensor, epsilon: float, basis: EigenbasisConfig,
               counts: RefreshCounts, values: bool) -> RefreshResult:
    """Eigenbases (and eigenvalues if ``values``) of every matrix of the stack: eigh or QR iterations."""
    if isinstance(basis, QREigenbasisConfig):
        Q, ok, perm, report = eigenbasis_qr(F_hat, previous, epsilon, basis)
        _count_warm(counts, report.fell_back, None)
        L = None
        if values:
            work = work_dtype(F_hat)
            A = F_hat.to(work) + epsilon * torch.eye(F_hat.shape[-1], dtype=work, device=F_hat.device)
            Qw = Q.to(work)
            L = (Qw * (A @ Qw)).sum(dim=-2).to(Q.dtype)
        return RefreshResult(Q, ok, perm, values=L)
    counts.full += F_hat.shape[0]
    L, Q, ok = eigenpairs(F_hat, epsilon, basis)
    return RefreshResult(Q, ok, values=L if values else None)


def _count_warm(counts: RefreshCounts, fell_back: torch.Tensor, residual: Optional[torch.Tensor]) -> None:
    n_back = int(fell_back.sum())
    counts.fallback += n_back
    counts.warm += fell_back.numel() - n_back
    if residual is not None:
        counts.residuals.extend(float(r) for r, b in zip(residual.tolist(), fell_back.tolist()) if not b)


def permute_along(X: torch.Tensor, dim: int, perm: torch.Tensor) -> torch.Tensor:
    """``X`` (``[B, d_0, ...]``) with dim ``dim`` (block dims, 0-based) reordered per block by ``perm: [B, d]``."""
    shape = [perm.shape[0]] + [1] * (X.ndim - 1)
    shape[dim + 1] = perm.shape[1]
    index = perm.reshape(shape).expand(X.shape)
    return X.gather(dim + 1, index)


__all__ = ["RefreshCounts", "RefreshResult", "WarmBackoff", "permute_along", "refresh_eigenbases", "refresh_factor",
           "refresh_roots"]
