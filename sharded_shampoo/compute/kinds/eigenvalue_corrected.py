"""Eigenvalue-corrected Shampoo, SOAP-like (:class:`~sharded_shampoo.config.EigenvalueCorrectedShampoo`).

State per preconditioned dim ``i``: the factor ``F_i`` and its eigenbasis ``Q_i`` (``eigenbasis_{i}``,
*not* symmetric, so never packed; starts as the identity, category ``roots``); per block the
corrected eigenvalues ``D`` (``eigenvalues``, the block's shape, category ``eigenvalues``).
Refresh: ``Q_i`` of ``F_i / bc2 + eps I`` by eigh or warm-started QR (which permutes the columns,
and ``D`` along that dim alike), kept where it still diagonalises the factor within ``tolerance``.
Every step after the refresh: ``D <- beta2 D + w rot(G)^2``.
Direction: ``rot^-1(rot(M) / ((D / bc2)^e + eps))`` with ``rot(X) = X x_1 Q_1^T ... x_k Q_k^T``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ...config import EigenvalueCorrectedShampoo
from ..kron import apply_kronecker
from ..refresh import permute_along, refresh_eigenbases
from .cost_model import eigenbasis_refresh_per_d3, eigenbasis_workspace_bytes
from .matrices import store_matrices
from .protocol import Init, StateField, StepContext, per_block
from .shampoo import ShampooFamily

if TYPE_CHECKING:
    from .cost_model import CostModel

EIGENVALUES = "eigenvalues"


class EigenvalueCorrectedKind(ShampooFamily):
    config_type = EigenvalueCorrectedShampoo
    product_flops_per_dim = 4

    @staticmethod
    def basis_name(dim: int) -> str:
        return f"eigenbasis_{dim}"

    def dim_fields(self, dim: int, d: int) -> list[StateField]:
        return [StateField(self.basis_name(dim), (d, d), self.second_storage, Init.IDENTITY, "roots")]

    def extra_fields(self) -> list[StateField]:
        if not self.dims:
            return []
        return [StateField(EIGENVALUES, self.shape, self.compute_dtype, Init.ZEROS, "eigenvalues")]

    # ------------------------------------------------------------------ costs

    def elementwise_flops(self, model: "CostModel") -> float:
        return model.eigenvalue_correction_elementwise_flops

    def refresh_flops(self, model: "CostModel") -> float:
        """Per dim ``d``: one eigh ``9 d^3``, or per QR iteration one GEMM and one QR ``(2 + 8/3) d^3`` plus
        ``warm_fallback_rate`` eighs; with a tolerance, the check (``4 d^3``) plus ``1 - refresh_skip_rate``
        of that."""
        per_d3 = eigenbasis_refresh_per_d3(model, self.config.eigenbasis, self.config.tolerance)
        return sum(per_d3 * self.shape[i] ** 3 for i in self.dims)

    def workspace_bytes(self) -> int:
        """eigh ``(3 d^2 + d) s`` of the largest factor (fp64 when retried); QR the larger of ``4 d^2 s`` and eigh's."""
        if not self.dims:
            return 0
        return eigenbasis_workspace_bytes(max(self.shape[i] for i in self.dims), self.config.factor_dtype,
                                          self.config.eigenbasis)

    # ------------------------------------------------------------------ math

    def refresh_dim(self, state: dict[str, torch.Tensor], n: int, dim: int, bc2: torch.Tensor,
                    ctx: StepContext) -> torch.Tensor:
        name = self.basis_name(dim)
        ok = torch.ones(ctx.num_blocks, dtype=torch.bool, device=ctx.step.device)
        D = state[EIGENVALUES]
        for rows in self.chunks(ctx, self.factor_name(dim)):
            A = self.factor_hat(state, dim, rows, bc2, ctx)
            res = refresh_eigenbases(A, state[name][rows], ctx.hp.epsilon, self.config.eigenbasis, ctx.counts,
                                     self.config.tolerance)
            keep = ctx.keep(res.ok, rows)
            if res.permutation is not None:
                identity = torch.arange(res.permutation.shape[1], device=D.device).expand_as(res.permutation)
                perm = torch.where(keep[:, None], res.permutation, identity)
                # in place: optimizer.state holds views of this stack
                D[rows] = permute_along(D[rows], dim, perm)
            store_matrices(state[name], self.field(name), rows, res.matrices, keep, ctx.workspace)
            ok[rows] = res.ok
        return ok

    def bases(self, state: dict[str, torch.Tensor]) -> list:
        return self.kron_list([state[self.basis_name(i)] for i in self.dims])

    def after_refresh(self, state: dict[str, torch.Tensor], G: torch.Tensor, ctx: StepContext) -> None:
        """``D <- beta2 D + w rot(G)^2`` (``w`` as the factors'; sum when beta2 == 1), in the basis after this
        step's refresh.

        ``D`` accumulates on every step, also before ``start_preconditioning_step``: its bias correction
        ``1 - beta2^t`` counts every step of the block.
        """
        if not self.dims:
            return
        D = state[EIGENVALUES]
        dtype = state[self.basis_name(self.dims[0])].dtype
        G_rot = apply_kronecker(G, self.bases(state), transpose=True,
                                scratch=ctx.workspace.buffer("product", G.numel(), dtype))
        beta2 = ctx.hp.beta2
        weight = self.factor_weight(beta2)
        if beta2 < 1.0:
            b, _ = ctx.coefficients(beta2, weight)
            D.mul_(per_block(b, D.ndim)).addcmul_(G_rot, G_rot, value=weight)
        else:
            D.addcmul_(G_rot, G_rot)

    def direction(self, state: dict[str, torch.Tensor], M: torch.Tensor, ctx: StepContext,
                  out: torch.Tensor) -> torch.Tensor:
        Qs = self.bases(state)
        exponent = next(e for e in self.exponents if e != 0)
        dtype = state[self.basis_name(self.dims[0])].dtype
        scratch = ctx.workspace.buffer("product", M.numel(), dtype)
        M_rot = apply_kronecker(M, Qs, transpose=True, scratch=scratch).to(ctx.dtype)
        # the root before epsilon, as in the reference (and torch Adam): (D_hat^e + eps)
        bc2 = self.bias_correction2(ctx)
        denom = (state[EIGENVALUES] / per_block(bc2, M.ndim)).pow_(exponent).add_(ctx.hp.epsilon)
        return apply_kronecker(M_rot.div_(denom), Qs, out=out, scratch=scratch)


__all__ = ["EIGENVALUES", "EigenvalueCorrectedKind"]
