"""Batched orthogonalisation of stacks of matrices ``[B, m, n]``: Newton-Schulz and the SVD polar factor.

Both write into a caller's ``out`` stack and read nothing on the host, so a spectral-descent bucket
step stays a handful of batched kernels:

* :func:`newton_schulz_` -- ``X = A / max(||A||_F, 1e-8)``, then per iteration with coefficients
  ``(a, b, c)``: ``X <- a X + b X X^T X + c (X X^T)^2 X``, computed on the *small* side's Gram matrix
  (``B = X^T X`` of a tall ``X``, ``s x s`` with ``s = min(m, n)``; a wide ``A`` is transposed first)
  as three batched GEMMs: ``B = X^T X``, ``B <- b B + c B B``, ``X <- a X + X B``. The iteration runs
  in ``matmul_dtype`` (fp32 by default, as the reference; bf16 halves the GEMM time on accelerators,
  as Keller Jordan's Muon does); the normalisation is in the input's dtype before the cast.
* :func:`svd_polar_` -- ``U V^T`` of the reduced SVD ``A = U S V^T`` over the singular values above
  ``max(m, n) eps(dtype) s_max`` (the numerical rank, as ``torch.linalg.matrix_rank``), optionally times
  the nuclear norm ``sum(S)``. The reference keeps every singular direction; the vectors of a zero
  singular value are arbitrary (a zero matrix gets a non-zero "orthogonal" direction), so they are
  dropped here -- the two agree on every matrix of full rank. ``torch.linalg.svd`` checks LAPACK's
  convergence flags, which on an accelerator is a device-to-host read every step (Newton-Schulz has none).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .workspace import Workspace

#: The floor of ``||A||_F`` in the normalisation (the reference's; a zero matrix stays zero).
NORM_FLOOR = 1e-8


def newton_schulz_(A: torch.Tensor, out: torch.Tensor, coefficients: Sequence[tuple[float, float, float]],
                   matmul_dtype: torch.dtype, workspace: Workspace) -> torch.Tensor:
    """Newton-Schulz orthogonalisation of ``A: [B, m, n]`` into ``out`` (same shape; may be ``A`` itself),
    one iteration per entry of ``coefficients``. Scratch: two ``B m n`` and two ``B s^2`` buffers of the
    workspace in ``matmul_dtype``."""
    b, m, n = A.shape
    wide = m < n
    big, small = (n, m) if wide else (m, n)
    norm = torch.linalg.matrix_norm(A).clamp_min_(NORM_FLOOR)
    torch.div(A, norm.view(b, 1, 1), out=out)
    X = workspace.buffer("matrices", b * big * small, matmul_dtype).view(b, big, small)
    X.copy_(out.mT if wide else out)
    Y = workspace.buffer("second", b * big * small, matmul_dtype).view(b, big, small)
    gram = workspace.buffer("gram", b * small * small, matmul_dtype).view(b, small, small)
    poly = workspace.buffer("product", b * small * small, matmul_dtype).view(b, small, small)
    for a, bb, c in coefficients:
        torch.bmm(X.mT, X, out=gram)
        torch.baddbmm(gram, gram, gram, beta=bb, alpha=c, out=poly)
        torch.baddbmm(X, X, poly, beta=a, alpha=1.0, out=Y)
        X, Y = Y, X
    out.copy_(X.mT if wide else X)
    return out


def svd_polar_(A: torch.Tensor, out: torch.Tensor, scale_by_nuclear_norm: bool) -> torch.Tensor:
    """``U V^T`` over the numerical rank of each ``A: [B, m, n]`` (times ``sum(S)`` if asked) into ``out``."""
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    m, n = A.shape[-2:]
    floor = S[..., :1] * (max(m, n) * torch.finfo(S.dtype).eps)
    weights = (S > floor).to(S.dtype)
    if scale_by_nuclear_norm:
        weights.mul_(S.sum(-1, keepdim=True))
    return torch.matmul(U * weights.unsqueeze(-2), Vh, out=out)


def newton_schulz_flops(m: int, n: int, iterations: int) -> float:
    """GEMM FLOPs of :func:`newton_schulz_` on one ``m x n`` matrix: per iteration ``4 L s^2 + 2 s^3``
    (``L = max(m, n)``, ``s = min(m, n)``: the Gram product, its square, the update)."""
    big, small = max(m, n), min(m, n)
    return float(iterations * (4 * big * small * small + 2 * small ** 3))


def svd_polar_flops(m: int, n: int, per_ls2: float, per_s3: float) -> float:
    """FLOPs of :func:`svd_polar_` on one ``m x n`` matrix: a thin SVD ``per_ls2 L s^2 + per_s3 s^3``
    (R-SVD, Golub & Van Loan: 6 and 20) plus the product ``U V^T`` (``2 m n s``)."""
    big, small = max(m, n), min(m, n)
    return per_ls2 * big * small * small + per_s3 * small ** 3 + 2.0 * m * n * small


__all__ = ["NORM_FLOOR", "newton_schulz_", "newton_schulz_flops", "svd_polar_", "svd_polar_flops"]
