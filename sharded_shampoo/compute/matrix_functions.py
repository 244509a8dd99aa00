"""Batched matrix functions for the amortized step: inverse roots and eigenbases.

All functions take a stack ``A`` of shape ``[B, d, d]`` of symmetric PSD matrices and work on
the whole stack in one call; they return a per-matrix ``ok`` mask instead of raising, so the
caller can keep the previous root for exactly the matrices that failed.
"""

from __future__ import annotations

import torch

from ..config import CoupledNewtonConfig, EighRootConfig


def work_dtype(A: torch.Tensor) -> torch.dtype:
    """The dtype roots and bases are computed in: fp64 for fp64 input, fp32 for anything else."""
    return torch.float64 if A.dtype == torch.float64 else torch.float32


def zero_nonfinite(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` with its non-finite matrices replaced by zeros (so a batched call cannot fail on them),
    and the per-matrix mask of the finite ones (whose results alone are usable)."""
    finite = torch.isfinite(A).flatten(1).all(-1)
    return torch.where(finite[:, None, None], A, torch.zeros_like(A)), finite


def _eigh(A: torch.Tensor, retry_in_float64: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``eigh`` of a stack in fp32 (or A's dtype if wider), retried in fp64 where it fails.

    Returns eigenvalues, eigenvectors (in A's dtype) and a mask of matrices whose result is finite.
    """
    work = work_dtype(A)
    try:
        L, Q = torch.linalg.eigh(A.to(work))
        ok = torch.isfinite(L).all(-1) & torch.isfinite(Q).flatten(1).all(-1)
    except (torch.linalg.LinAlgError, RuntimeError):
        L = Q = None
        ok = torch.zeros(A.shape[0], dtype=torch.bool, device=A.device)
    if retry_in_float64 and work != torch.float64 and not bool(ok.all()):
        bad = (~ok).nonzero().flatten()
        L64, Q64, ok64 = _eigh_each(A[bad].to(torch.float64))
        if L is None:
            L = torch.zeros(A.shape[:-1], dtype=work, device=A.device)
            Q = torch.zeros(A.shape, dtype=work, device=A.device)
        L[bad] = L64.to(work)
        Q[bad] = Q64.to(work)
        ok[bad] = ok64 & torch.isfinite(L[bad]).all(-1) & torch.isfinite(Q[bad]).flatten(1).all(-1)
    elif L is None:
        L, Q, ok = _eigh_each(A.to(work))
    return L, Q, ok


def _eigh_each(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched eigh that isolates failures: one batched call, per-matrix calls only if it raises."""
    try:
        L, Q = torch.linalg.eigh(A)
        ok = torch.isfinite(L).all(-1) & torch.isfinite(Q).flatten(1).all(-1)
        return L, Q, ok
    except (torch.linalg.LinAlgError, RuntimeError):
        pass
    L = torch.zeros(A.shape[:-1], dtype=A.dtype, device=A.device)
    Q = torch.zeros_like(A)
    ok = torch.zeros(A.shape[0], dtype=torch.bool, device=A.device)
    for i in range(A.shape[0]):  # failure path only: find which matrices are broken
        try:
            L[i], Q[i] = torch.linalg.eigh(A[i])
            ok[i] = bool(torch.isfinite(L[i]).all() and torch.isfinite(Q[i]).all())
        except (torch.linalg.LinAlgError, RuntimeError):
            ok[i] = False
    return L, Q, ok


def root_scales(L: torch.Tensor, exponent: float, epsilon: float, config: EighRootConfig) -> torch.Tensor:
    """``f(lambda)`` per eigenvalue of ``L: [..., d]`` (eigenvalues of ``A + epsilon I``) such that
    ``Q diag(f(lambda)) Q^T`` is the inverse root ``(A + epsilon I)^(-exponent)``: ``lambda^(-exponent)``.

    Epsilon perturbation (``rank_handling=None``): with ``make_positive_semidefinite``, a spectrum whose
    smallest eigenvalue is below ``epsilon`` is shifted so that it becomes exactly ``epsilon`` (as the
    reference). ``PseudoInverse``: eigenvalues ``<= max(rtol * relu(lambda_max), atol)`` get 0. Device
    ops only (no host read): eigendecomposed Shampoo calls it every step.
    """
    rank = config.rank_handling
    if rank is not None:
        rtol = L.shape[-1] * torch.finfo(L.dtype).eps if rank.rank_rtol is None else rank.rank_rtol
        cutoff = (rtol * L.amax(dim=-1, keepdim=True).clamp_min(0)).clamp_min(rank.rank_atol)
        return torch.where(L <= cutoff, torch.zeros_like(L), L.pow(-exponent))
    if config.make_positive_semidefinite:
        lam_min = L.min(dim=-1, keepdim=True).values
        L = torch.where(lam_min < epsilon, L - lam_min + epsilon, L)
    return L.pow(-exponent)


def inverse_root_eigh(A: torch.Tensor, exponent: float, epsilon: float,
                      config: EighRootConfig = EighRootConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A + epsilon I)^(-exponent)`` for each matrix of the stack, by eigendecomposition.

    As in the reference implementation: ``eigh(A + epsilon I)``, then :func:`root_scales` of the
    eigenvalues (the epsilon shift of ``make_positive_semidefinite``, or a pseudo-inverse).
    Returns the roots (in A's dtype) and the per-matrix ``ok`` mask.
    """
    finite = None
    if not torch.isfinite(A).all():
        A, finite = zero_nonfinite(A)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    L, Q, ok = _eigh(A + epsilon * eye, config.retry_in_float64)
    root = (Q * root_scales(L, exponent, epsilon, config).unsqueeze(-2)) @ Q.mT
    ok = ok & torch.isfinite(root).flatten(1).all(-1)
    if finite is not None:
        ok = ok & finite
    return root.to(A.dtype), ok


def eigenpairs(A: torch.Tensor, epsilon: float = 0.0,
               config: EighRootConfig = EighRootConfig()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending), eigenvectors (columns) of each ``A + epsilon I`` of the stack (in A's
    dtype), and the per-matrix ``ok`` mask."""
    A, finite = zero_nonfinite(A)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    L, Q, ok = _eigh(A + epsilon * eye, config.retry_in_float64)
    return L.to(A.dtype), Q.to(A.dtype), ok & finite


def eigenbasis(A: torch.Tensor, epsilon: float = 0.0,
               config: EighRootConfig = EighRootConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors (columns) of each ``A + epsilon I`` of the stack, and the per-matrix ``ok`` mask."""
    _, Q, ok = eigenpairs(A, epsilon, config)
    return Q, ok


def diagonality(A: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """How far the basis ``Q`` is from diagonalising ``A`` (stacks ``[B, d, d]``), for ``B = Q^T A Q``:
    ``(||B - diag(B)||_F, ||B||_F, diag(B))`` per matrix -- the off-diagonal norm computed as
    ``sqrt(||B||^2 - ||diag B||^2)``, as the reference does, and the Rayleigh quotients ``[B, d]``.
    Two GEMMs. The reference's adaptive refresh keeps ``Q`` where ``off <= tolerance * norm``."""
    T = Q.mT @ (A @ Q)
    estimates = T.diagonal(dim1=-2, dim2=-1)
    total = T.square().sum(dim=(-2, -1))
    off = (total - estimates.square().sum(-1)).clamp_min(0)
    return off.sqrt(), total.sqrt(), estimates.clone()


def inverse_root_newton(A: torch.Tensor, exponent: float, epsilon: float,
                        config: CoupledNewtonConfig = CoupledNewtonConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A + epsilon I)^(-exponent)`` by the coupled Newton iteration, ``exponent = 1/p``, p integer.

    Iterates X_{j+1} = X_j T_j, M_{j+1} = T_j^p M_j with T_j = ((p+1) I - M_j) / p, starting from
    X_0 = z^(1/p) I, M_0 = z A, z = (1+p) / (2 ||A||_F); M_j -> I and X_j -> A^(-1/p). Matmuls only,
    batched over the stack; converged matrices are frozen. As in the reference implementation an
    iteration that did not reach the tolerance is still used; ``ok`` is False only where the
    result is not finite.
    """
    p = int(round(1.0 / exponent))
    B, d, _ = A.shape
    work = A.to(work_dtype(A))
    eye = torch.eye(d, dtype=work.dtype, device=A.device).expand(B, d, d)
    work = work + epsilon * eye
    norm = torch.linalg.matrix_norm(work).clamp_min(torch.finfo(work.dtype).tiny)
    z = ((1 + p) / (2 * norm))[:, None, None]
    X = z.pow(1.0 / p) * eye
    M = z * work
    done = torch.zeros(B, dtype=torch.bool, device=A.device)
    for _ in range(config.max_iterations):
        residual = (M - eye).abs().flatten(1).amax(-1)
        done = done | (residual < config.tolerance)
        if bool(done.all()):
            break
        T = ((p + 1) * eye - M) / p
        X_next = X @ T
        M_next = torch.linalg.matrix_power(T, p) @ M
        keep = done[:, None, None]
        X = torch.where(keep, X, X_next)
        M = torch.where(keep, M, M_next)
    ok = torch.isfinite(X).flatten(1).all(-1)
    return X.to(A.dtype), ok
