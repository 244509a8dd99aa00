"""Root-inverse KL-Shampoo (:class:`KLShampoo`): root-inverse Shampoo with the KL factor update.

State, refresh and direction are root-inverse Shampoo's (:mod:`.root_inverse`): per preconditioned dim
``i`` the factor ``F_i`` and the inverse root ``R_i = (F_i / bc2 + eps I)^(-e_i)``, direction
``M x_1 R_1 ... x_k R_k``. The factor update is KL-Shampoo's (:mod:`.kl_update`):
``F_k <- beta2 F_k + w X_k X_k^T`` with ``X_k`` the mode-``k`` unfolding of ``G x_{j != k} R_j``, the
stored roots of the other dims (those of the previous refresh). The reference implementation's
``RootInvKLShampooPreconditionerConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import RootInverseShampoo, preconditioner_config
from .kl_update import KLFactorUpdate, KLVariantConfig
from .matrices import read_matrices
from .protocol import StepContext
from .root_inverse import RootInverseKind


@preconditioner_config
@dataclass(frozen=True, eq=False)
class KLShampoo(KLVariantConfig, RootInverseShampoo):
    """KL-Shampoo with inverse roots: every option of :class:`RootInverseShampoo` (roots by eigh, coupled
    Newton or warm start; exponent overrides; storage dtypes; ``symmetric_packing``), and the factor of
    dim ``k`` accumulates ``(G x_{j != k} R_j)_(k) (G x_{j != k} R_j)_(k)^T`` instead of ``G_(k) G_(k)^T``.

    With the default exponents (``1 / (2 order)``) a 2-D block accumulates ``G R_R^2 G^T =
    G (F_R_hat + eps I)^(-1/2) G^T``; the KL-Shampoo paper's form with the full inverse of the other
    factor is ``inverse_exponent_override={2: 0.5}``.
    """


class KLShampooKind(KLFactorUpdate, RootInverseKind):
    """Root-inverse state, refresh and direction; KL factor update with the stored ``root_{i}``."""

    config_type = KLShampoo

    def update_roots(self, state: dict[str, torch.Tensor], rows: slice, ctx: StepContext) -> list[torch.Tensor]:
        """``root_{i}`` of blocks ``rows``: in place (full storage) or unpacked into the workspace, one dim after another."""
        mats, offset = [], 0
        for i in self.dims:
            name = self.root_name(i)
            mats.append(read_matrices(state[name], self.field(name), rows, ctx.workspace, "matrices", offset))
            offset += mats[-1].numel() if self.packing else 0
        return mats

    def update_root_bytes(self) -> int:
        if not self.packing:
            return 0
        return sum(self.shape[i] ** 2 for i in self.dims) * torch.empty((), dtype=self.second_storage).element_size()


__all__ = ["KLShampoo", "KLShampooKind"]
