"""Cheap refreshes that start from the previous result: warm inverse roots and QR eigenbases.

A factor changes little between two refreshes (it is an EMA over ~1 / (1 - beta2) steps and a
refresh comes every ``precondition_frequency`` steps), so the last root or eigenbasis is almost
right. Both methods here use that, batched over a stack ``[B, d, d]``, with GEMMs (and one QR)
instead of an eigendecomposition -- on GPUs an ``eigh`` of a 1024 matrix costs hundreds of GEMMs.

* :func:`inverse_root_warm`: ``A^(-e)`` from the previous root ``R`` by a binomial series in the
  frame of ``R``, with a residual check (matrix-vector work only) and ``eigh`` for the matrices
  that fail it. See :class:`~sharded_shampoo.config.WarmStartRootConfig` for the math.
* :func:`eigenbasis_qr`: one (or more) subspace iterations ``Q <- qr(A Q).Q`` from the previous
  basis, columns ordered by the estimated eigenvalues (as SOAP refreshes its eigenbasis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from ..config import QREigenbasisConfig, WarmStartRootConfig
from .matrix_functions import eigenbasis, inverse_root_eigh, work_dtype, zero_nonfinite


@dataclass
class RefreshReport:
    """What a batched warm refresh did (for benchmarks, logs and tests; not optimizer state)."""

    fell_back: torch.Tensor        # bool [B]: the matrix got eigh instead of the cheap method
    residual: torch.Tensor         # float [B]: the residual estimate of the warm result (nan where not computed)
    order: int = 0                 # series order used (0: none; QR: the iterations)
    tried: Optional[torch.Tensor] = None   # bool [B] (warm roots): the series was computed (passed the screen)


def _is_identity(R: torch.Tensor) -> torch.Tensor:
    """bool [B]: which matrices of the stack are the identity (never refreshed).

    Unit diagonal and a sum of squares equal to ``d`` (summed, not ``matrix_norm(R) ** 2``: the square of
    a rounded ``sqrt(d)`` is not ``d`` for every ``d``, e.g. 6 in fp32). An off-diagonal entry too small to
    change the sum in fp32 would count as identity, which only means a full eigh.
    """
    d = R.shape[-1]
    unit = (R.diagonal(dim1=-2, dim2=-1) == 1).all(-1)
    return unit & (R.float().square().sum(dim=(-2, -1)) == d)


@lru_cache(maxsize=16)
def _probe_vectors(d: int, k: int, device: str) -> torch.Tensor:
    """Fixed ``[d, k]`` standard normal probes (fp64), the same on every run and rank."""
    g = torch.Generator().manual_seed(1234 + d)
    return torch.randn(d, k, generator=g, dtype=torch.float64).to(device)


def _frame_apply(R64: torch.Tensor, A64: torch.Tensor, W: torch.Tensor, q: int) -> torch.Tensor:
    for _ in range(q):
        W = R64 @ W
    W = A64 @ W
    for _ in range(q):
        W = R64 @ W
    return W


def whitening_residual(X: torch.Tensor, A: torch.Tensor, q: int, probes: int) -> torch.Tensor:
    """Estimate of ``||X^q A X^q - I||_F / sqrt(d)`` per matrix (``X ~ A^(-1/(2q))``).

    With probe vectors ``v ~ N(0, I)``, ``E ||Z v||^2 = ||Z||_F^2``, so ``||Z V||_F / ||V||_F``
    estimates the RMS of ``Z``'s eigenvalues: the RMS relative error of the whitened factor. Only
    matrix-vector products (``O(d^2 k)``), in ``X``'s dtype (pass fp64 tensors for an exact check of
    ill-conditioned factors; the runtime check uses the working dtype, which can only overstate it).
    """
    V = _probe_vectors(X.shape[-1], probes, str(X.device)).to(X.dtype)
    W = _frame_apply(X, A.to(X.dtype), V.expand(X.shape[0], *V.shape), q)
    return ((W - V).flatten(1).norm(dim=1) / V.norm()).to(torch.float32)


def binomial_coefficients(exponent: float, order: int) -> list[float]:
    """Coefficients ``c_k`` of ``(1 + x)^(-exponent) = sum_k c_k x^k`` for ``k = 0..order``."""
    out = [1.0]
    for k in range(order):
        out.append(out[-1] * (-exponent - k) / (k + 1))
    return out


def series_order(delta: float, exponent: float, target: float, max_order: int) -> int:
    """Smallest order whose truncation bound ``|c_{K+1}| delta^(K+1) / (1 - delta)`` is below ``target``."""
    if not delta < 1.0:
        return max_order
    coeffs = binomial_coefficients(exponent, max_order + 1)
    for K in range(1, max_order + 1):
        if abs(coeffs[K + 1]) * delta ** (K + 1) / (1.0 - delta) <= target:
            return K
    return max_order


def _series(E: torch.Tensor, exponent: float, order: int) -> torch.Tensor:
    """``sum_{k<=order} c_k E^k`` by Horner's rule (``order - 1`` GEMMs)."""
    c = binomial_coefficients(exponent, order)
    eye = torch.eye(E.shape[-1], dtype=E.dtype, device=E.device)
    Y = c[order] * E + c[order - 1] * eye
    for k in range(order - 2, -1, -1):
        Y = torch.baddbmm(c[k] * eye.expand_as(E), Y, E)
    return Y


#: Largest estimated RMS of ``eig(M / c) - 1`` (the screen) for which the series is attempted.
SERIES_RADIUS = 0.5


def frame_distance(R: torch.Tensor, A: torch.Tensor, q: int, probes: int) -> torch.Tensor:
    """Estimate of ``||M / c - I||_F / sqrt(d)`` for ``M = R^q A R^q``, ``c = tr(M) / d`` (matrix-vector work).

    How far the previous root is from whitening the new factor, up to scale (the RMS of
    ``eig(M / c) - 1``): the screen that decides, before any GEMM, whether the warm series is worth
    trying. ``c`` and the norm are estimated from ``probes`` random vectors.
    """
    V = _probe_vectors(R.shape[-1], probes, str(R.device)).to(R.dtype)
    W = _frame_apply(R, A, V.expand(R.shape[0], *V.shape), q)
    c = (W * V).sum(dim=(-2, -1)) / V.pow(2).sum()
    dist = (W - c[:, None, None] * V).flatten(1).norm(dim=1) / (c.abs() * V.norm()).clamp_min(1e-30)
    return torch.where((c > 0) & torch.isfinite(dist), dist, torch.full_like(dist, math.inf)).to(torch.float32)


def _spectral_norm(E: torch.Tensor, iterations: int = 8) -> torch.Tensor:
    """``||E||_2`` per symmetric matrix by power iteration, times 1.25 (power iteration approaches from below).

    Picks the series order and rejects frames where the series cannot converge; the residual
    check is what accepts a result.
    """
    v = _probe_vectors(E.shape[-1], 1, str(E.device)).to(E.dtype).expand(E.shape[0], -1, -1)
    rho = torch.zeros(E.shape[0], dtype=E.dtype, device=E.device)
    for _ in range(iterations):
        w = E @ v
        rho = w.flatten(1).norm(dim=1)
        v = w / rho.clamp_min(torch.finfo(E.dtype).tiny)[:, None, None]
    return torch.where(torch.isfinite(rho), 1.25 * rho, torch.full_like(rho, math.inf))


def _warm_candidates(A: torch.Tensor, R: torch.Tensor, exponent: float, q: int,
                     config: WarmStartRootConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(X, converges, order)``: ``X = c^(-e) sym(R (M / c)^(-e))`` with ``M = R^q A R^q`` for every matrix.

    ``converges``: the spectral-norm estimate of ``M / c - I`` is below 1 (else ``X`` is garbage).
    """
    d = A.shape[-1]
    S = R
    for _ in range(q - 1):
        S = S @ R
    E = S @ A @ S       # M; symmetric up to round-off, which the series does not amplify
    scale = (E.diagonal(dim1=-2, dim2=-1).sum(-1) / d).clamp_min(torch.finfo(E.dtype).tiny)
    E.div_(scale[:, None, None])
    E.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    rho = _spectral_norm(E)
    converges = rho < 1.0
    worst = float(rho[converges].max()) if bool(converges.any()) else 1.0
    order = series_order(worst, exponent, 0.1 * config.tolerance / (2 * q), config.max_order)
    X = R @ _series(E, exponent, order)
    X = 0.5 * (X + X.mT)
    return X * scale.pow(-exponent)[:, None, None], converges, order


def inverse_root_warm(A: torch.Tensor, R_prev: torch.Tensor, exponent: float, epsilon: float,
                      config: WarmStartRootConfig = WarmStartRootConfig(), attempt: Optional[torch.Tensor] = None
                      ) -> tuple[torch.Tensor, torch.Tensor, RefreshReport]:
    """``(A + epsilon I)^(-exponent)`` for each matrix of the stack, warm-started from ``R_prev``.

    ``exponent = 1 / (2 q)`` with integer ``q``. Matrices whose previous root is the identity, whose
    warm result is not finite or whose residual (:func:`whitening_residual`) exceeds
    ``config.tolerance`` get :func:`inverse_root_eigh` instead, and so do those where ``attempt``
    (bool ``[B]``, default all) is False. Returns the roots (in ``A``'s dtype), the per-matrix ``ok``
    mask and a :class:`RefreshReport`.
    """
    q = round(0.5 / exponent)
    if q < 1 or abs(0.5 / exponent - q) > 1e-9:
        raise ValueError(f"inverse_root_warm needs an exponent 1/(2q) with integer q >= 1; got {exponent}.")
    B, d, _ = A.shape
    work = work_dtype(A)
    Aw, finite = zero_nonfinite(A)
    Aw = Aw.to(work) + epsilon * torch.eye(d, dtype=work, device=A.device)
    R = R_prev.to(work)
    cold = _is_identity(R_prev) | ~finite
    if attempt is not None:
        cold |= ~attempt
    if not bool(cold.all()):
        cold |= ~(frame_distance(R, Aw, q, config.probes) < SERIES_RADIUS)
    residual = torch.full((B,), math.nan, dtype=torch.float32, device=A.device)
    order = 0
    X = torch.empty_like(Aw)
    warm = (~cold).nonzero().flatten()
    if warm.numel():
        Xw, converges, order = _warm_candidates(Aw[warm], R[warm], exponent, q, config)
        res = whitening_residual(Xw, Aw[warm], q, config.probes)
        residual[warm] = torch.where(converges, res, torch.full_like(res, math.nan))
        X[warm] = Xw
    fell_back = cold | ~(residual <= config.tolerance)   # nan (not computed or not finite) fails
    ok = torch.ones(B, dtype=torch.bool, device=A.device)
    bad = fell_back.nonzero().flatten()
    if bad.numel():
        Xe, ok_e = inverse_root_eigh(A[bad], exponent, epsilon, config.fallback)
        X[bad] = Xe.to(work)
        ok[bad] = ok_e
    ok &= finite & torch.isfinite(X).flatten(1).all(-1)
    tried = torch.zeros(B, dtype=torch.bool, device=A.device)
    tried[warm] = True
    return X.to(A.dtype), ok, RefreshReport(fell_back=fell_back, residual=residual, order=order, tried=tried)


def eigenbasis_qr(A: torch.Tensor, Q_prev: torch.Tensor, epsilon: float,
                  config: QREigenbasisConfig = QREigenbasisConfig()
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, RefreshReport]:
    """Eigenbases of ``A + epsilon I`` refined from ``Q_prev`` by ``config.iterations`` QR iterations.

    Returns ``(Q, ok, order, report)``: ``order`` ``[B, d]`` (int64) is the column permutation applied
    to ``Q_prev`` (the identity permutation where a full ``eigh`` was used), so state kept in the
    eigenbasis coordinates (the corrected eigenvalues) can be permuted alike. Matrices whose basis is
    still the identity (first refresh) or whose result is not finite get :func:`eigenbasis`.
    """
    B, d, _ = A.shape
    work = work_dtype(A)
    Aw, finite = zero_nonfinite(A)
    Aw = Aw.to(work)
    Q = Q_prev.to(work)
    cold = _is_identity(Q_prev) | ~finite
    order = torch.arange(d, device=A.device).expand(B, d).clone()
    for _ in range(config.iterations):
        AQ = Aw @ Q
        estimate = (Q * AQ).sum(dim=-2)                  # diag(Q^T A Q), the eigenvalue estimates
        perm = estimate.argsort(dim=-1, descending=True)
        order = order.gather(-1, perm)
        Q, _ = torch.linalg.qr(AQ.gather(-1, perm[:, None, :].expand(B, d, d)))
    ok_warm = torch.isfinite(Q).flatten(1).all(-1)
    fell_back = cold | ~ok_warm
    ok = torch.ones(B, dtype=torch.bool, device=A.device)
    bad = fell_back.nonzero().flatten()
    if bad.numel():
        Qe, ok_e = eigenbasis(A[bad].to(work), epsilon, config.fallback)
        Q[bad] = Qe
        ok[bad] = ok_e
        order[bad] = torch.arange(d, device=A.device)
    ok &= finite
    nan = torch.full((B,), math.nan, dtype=torch.float32, device=A.device)
    return Q.to(A.dtype), ok, order, RefreshReport(fell_back=fell_back, residual=nan, order=config.iterations)


def eigenbasis_residual(A: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``||Q^T A Q - diag(Q^T A Q)||_F / ||A||_F`` per matrix: how far ``Q`` is from diagonalising ``A``."""
    A64, Q64 = A.to(torch.float64), Q.to(torch.float64)
    T = Q64.mT @ A64 @ Q64
    off = T - torch.diag_embed(T.diagonal(dim1=-2, dim2=-1))
    return (torch.linalg.matrix_norm(off) / torch.linalg.matrix_norm(A64).clamp_min(1e-300)).to(torch.float32)


__all__ = ["RefreshReport", "binomial_coefficients", "eigenbasis_qr", "eigenbasis_residual", "inverse_root_warm",
           "series_order", "whitening_residual"]
