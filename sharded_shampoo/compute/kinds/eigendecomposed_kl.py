"""Eigendecomposed KL-Shampoo (:class:`EigendecomposedKLShampoo`): eigendecomposed Shampoo with the KL factor update.

State, refresh (eigh, QR iterations, the ``tolerance`` skip) and direction are eigendecomposed Shampoo's
(:mod:`.eigendecomposed`): per preconditioned dim ``i`` the factor ``F_i``, its eigenvectors ``Q_i`` and
eigenvalues ``lambda_i``; the root ``R_i = Q_i diag(f(lambda_i)) Q_i^T`` is applied from them. The
factor update is KL-Shampoo's (:mod:`.kl_update`): ``F_k <- beta2 F_k + w X_k X_k^T`` with ``X_k`` the
mode-``k`` unfolding of ``G x_{j != k} R_j``, the roots formed from the stored eigenpairs of the other
dims (those of the previous refresh; ``Q = I, lambda = 1`` before the first one, so the identity). The
reference implementation's ``EigendecomposedKLShampooPreconditionerConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import preconditioner_config
from ..matrix_functions import root_scales
from .eigendecomposed import EigendecomposedKind, EigendecomposedShampoo
from .kl_update import KLFactorUpdate, KLVariantConfig
from .protocol import StepContext


@preconditioner_config
@dataclass(frozen=True, eq=False)
class EigendecomposedKLShampoo(KLVariantConfig, EigendecomposedShampoo):
    """KL-Shampoo kept as eigenpairs: every option of :class:`EigendecomposedShampoo` (eigh or QR
    eigenbases, ``tolerance`` for the adaptive refresh, exponent overrides, storage dtypes,
    ``symmetric_packing``), and the factor of dim ``k`` accumulates ``(G x_{j != k} R_j)_(k)
    (G x_{j != k} R_j)_(k)^T`` instead of ``G_(k) G_(k)^T``, with ``R_j`` formed from the stored
    eigenpairs of dim ``j``. Mathematically :class:`KLShampoo` with eigh roots when ``tolerance=0``.
    """


class EigendecomposedKLKind(KLFactorUpdate, EigendecomposedKind):
    """Eigendecomposed state, refresh and direction; KL factor update with roots formed from ``Q_i, lambda_i``."""

    config_type = EigendecomposedKLShampoo

    def update_roots(self, state: dict[str, torch.Tensor], rows: slice, ctx: StepContext) -> list[torch.Tensor]:
        """``R_i = Q_i diag(f(lambda_i)) Q_i^T`` of blocks ``rows`` in the workspace's ``"matrices"`` buffer
        (one dim after another), in the eigenvectors' storage dtype; ``Q_i diag(f)`` passes through ``"second"``."""
        mats, offset = [], 0
        rank = self.config.eigh_settings
        for i in self.dims:
            Q = state[self.vectors_name(i)][rows]
            b, d = Q.shape[0], Q.shape[1]
            scale = root_scales(state[self.values_name(i)][rows], self.exponents[i], ctx.hp.epsilon, rank)
            scaled = ctx.workspace.buffer("second", b * d * d, Q.dtype).view(b, d, d)
            torch.mul(Q, scale.to(Q.dtype)[:, None, :], out=scaled)
            root = ctx.workspace.buffer("matrices", b * d * d, Q.dtype, offset).view(b, d, d)
            mats.append(torch.bmm(scaled, Q.transpose(1, 2), out=root))
            offset += b * d * d
        return mats

    def kl_update_flops(self) -> float:
        """KL-Shampoo's mode products plus forming each root ``(Q diag f) Q^T``: ``2 d_i^3`` per preconditioned dim."""
        if len(self.dims) < 2:
            return 0.0
        return super().kl_update_flops() + float(sum(2 * self.shape[i] ** 3 for i in self.dims))

    def update_root_bytes(self) -> int:
        """The formed roots of every preconditioned dim, plus one ``Q diag(f)`` of the largest."""
        if not self.dims:
            return 0
        squares = [self.shape[i] ** 2 for i in self.dims]
        return (sum(squares) + max(squares)) * torch.empty((), dtype=self.second_storage).element_size()


__all__ = ["EigendecomposedKLKind", "EigendecomposedKLShampoo"]
