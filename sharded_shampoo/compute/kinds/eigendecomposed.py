"""Eigendecomposed Shampoo (:class:`EigendecomposedShampoo`): the root-inverse update, kept as eigenpairs.

State per preconditioned dim ``i``: the factor ``F_i`` (family), its eigenvectors ``Q_i``
(``eigenvectors_{i}``, ``(d, d)``, not symmetric so never packed, starts as the identity, category
``roots``) and eigenvalues ``lambda_i`` (``eigenvalues_{i}``, ``(d,)``, starts as ones, category
``eigenvalues``). Refresh: the eigenpairs of ``F_i / bc2 + eps I`` by eigh or warm-started QR
iterations; with ``tolerance > 0`` a factor whose stored ``Q_i`` still diagonalises it
(``||B - diag B||_F <= tolerance ||B||_F``, ``B = Q_i^T (F_i / bc2 + eps I) Q_i``) keeps ``Q_i`` and takes
the Rayleigh quotients ``diag B`` as its eigenvalues (no eigendecomposition; counted in
``refresh_counts.skipped``). Direction: ``M x_1 R_1 ... x_k R_k`` with ``R_i = Q_i diag(f(lambda_i)) Q_i^T``,
``f`` the epsilon-shifted ``lambda^(-e_i)`` or the pseudo-inverse (:func:`..matrix_functions.root_scales`),
applied in the eigenbasis -- ``rot^-1(rot(M) * (f(lambda_1) (x) ... (x) f(lambda_k)))`` with ``rot(X) =
X x_1 Q_1^T ... x_k Q_k^T`` -- which is the same linear map as forming each ``R_i`` and costs
``4 numel d_i`` per dim instead of ``2 d_i^3 + 2 numel d_i``.

Subclasses (eigendecomposed KL-Shampoo) reuse :meth:`EigendecomposedKind.apply_roots`, which applies
the roots of all preconditioned dims but one, and override the factor update (``update``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

from ...config import (EigenbasisConfig, EighRootConfig, ExponentOverride, QREigenbasisConfig, check_eigenbasis,
                       config_key, override_exponent, preconditioner_config, validate_shampoo_fields)
from ..kron import apply_kronecker
from ..matrix_functions import root_scales
from ..refresh import refresh_eigenbases
from .cost_model import eigenbasis_refresh_per_d3, eigenbasis_workspace_bytes
from .matrices import store_matrices
from .protocol import Init, StateField, StepContext
from .shampoo import ShampooFamily

if TYPE_CHECKING:
    from .cost_model import CostModel


@preconditioner_config
@dataclass(frozen=True)
class EigendecomposedShampoo:
    """Shampoo whose inverse roots are applied from stored eigenpairs (the reference's
    ``EigendecomposedShampooPreconditionerConfig``): the same update as :class:`RootInverseShampoo`
    with ``EighRootConfig``, plus an adaptive refresh.

    ``eigenbasis``: ``EighRootConfig()`` (eigh; its ``rank_handling`` may be ``PseudoInverse(...)``,
    with ``epsilon=0``) or ``QREigenbasisConfig()`` (warm-started QR iterations from the stored
    eigenvectors, eigenvalues = Rayleigh quotients; its ``fallback`` holds the eigh settings).
    ``tolerance`` (in [0, 1]; 0: refresh every time): keep the stored eigenvectors of a factor they
    still diagonalise within ``tolerance`` (relative Frobenius norm of the off-diagonal part of
    ``Q^T A Q``), with ``diag(Q^T A Q)`` as eigenvalues. ``root_storage_dtype``: storage of the
    eigenvectors (eigenvalues are kept in ``factor_dtype``); factors are packed with
    ``symmetric_packing``, eigenvectors never. ``inverse_exponent_override``,
    ``trace_scaling_exponent`` and ``drop_weighting_factor_on_gsquare`` as for root-inverse Shampoo.
    """

    eigenbasis: EigenbasisConfig = field(default_factory=EighRootConfig)
    tolerance: float = 0.0
    inverse_exponent_override: ExponentOverride = field(default_factory=dict)
    factor_dtype: torch.dtype = torch.float32
    max_consecutive_root_failures: int = 10
    factor_storage_dtype: Optional[torch.dtype] = None
    root_storage_dtype: Optional[torch.dtype] = None
    symmetric_packing: bool = True
    trace_scaling_exponent: Optional[float] = None
    drop_weighting_factor_on_gsquare: bool = False

    def __post_init__(self) -> None:
        validate_shampoo_fields("EigendecomposedShampoo", self)
        check_eigenbasis("EigendecomposedShampoo", self.eigenbasis)

    def storage_dtypes(self) -> tuple[torch.dtype, torch.dtype]:
        """Storage dtypes of the (factors, eigenvectors) stacks (``factor_dtype`` where not set)."""
        return (self.factor_storage_dtype or self.factor_dtype, self.root_storage_dtype or self.factor_dtype)

    def inverse_exponent(self, order: int, dim: int) -> float:
        """``e`` of ``R = (F + eps I)^(-e)``: ``1 / (2 order)`` unless overridden (0: ``dim`` not preconditioned)."""
        return override_exponent(self.inverse_exponent_override, order, dim, 1.0 / (2 * order))

    @property
    def eigh_settings(self) -> EighRootConfig:
        """The eigh settings (rank handling, the PSD shift, fp64 retry): ``eigenbasis`` or the QR's ``fallback``."""
        basis = self.eigenbasis
        return basis.fallback if isinstance(basis, QREigenbasisConfig) else basis

    def __hash__(self) -> int:
        return hash(config_key(self))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EigendecomposedShampoo) and config_key(self) == config_key(other)


class EigendecomposedKind(ShampooFamily):
    config_type = EigendecomposedShampoo
    product_flops_per_dim = 4

    @staticmethod
    def vectors_name(dim: int) -> str:
        return f"eigenvectors_{dim}"

    @staticmethod
    def values_name(dim: int) -> str:
        return f"eigenvalues_{dim}"

    def dim_fields(self, dim: int, d: int) -> list[StateField]:
        return [StateField(self.vectors_name(dim), (d, d), self.second_storage, Init.IDENTITY, "roots"),
                StateField(self.values_name(dim), (d,), self.compute_dtype, Init.ONES, "eigenvalues")]

    # ------------------------------------------------------------------ costs

    def elementwise_flops(self, model: "CostModel") -> float:
        """The scaling in the eigenbasis: one multiply per element and preconditioned dim."""
        return float(len(self.dims))

    def refresh_flops(self, model: "CostModel") -> float:
        """Per dim ``d``: eigh ``9 d^3`` (no root is formed), or QR iterations plus the Rayleigh quotients;
        with a tolerance, the check ``Q^T A Q`` (``4 d^3``) plus the method times ``1 - refresh_skip_rate``."""
        per_d3 = eigenbasis_refresh_per_d3(model, self.config.eigenbasis, self.config.tolerance, values=True)
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
        vectors, values = self.vectors_name(dim), self.values_name(dim)
        ok = torch.ones(ctx.num_blocks, dtype=torch.bool, device=ctx.step.device)
        L = state[values]
        for rows in self.chunks(ctx, self.factor_name(dim)):
            A = self.factor_hat(state, dim, rows, bc2, ctx)
            res = refresh_eigenbases(A, state[vectors][rows], ctx.hp.epsilon, self.config.eigenbasis, ctx.counts,
                                     self.config.tolerance, values=True)
            assert res.values is not None
            keep = ctx.keep(res.ok, rows)
            store_matrices(state[vectors], self.field(vectors), rows, res.matrices, keep, ctx.workspace)
            # in place: optimizer.state holds views of this stack
            L[rows] = torch.where(keep[:, None], res.values.to(L.dtype), L[rows])
            ok[rows] = res.ok
        return ok

    @functools.cached_property
    def _scale_shapes(self) -> dict[int, tuple[int, ...]]:
        """Per preconditioned dim: the shape its ``[B, d]`` scales take to broadcast over ``[B, *shape]``."""
        return {i: (-1,) + tuple(d if j == i else 1 for j, d in enumerate(self.shape)) for i in self.dims}

    def apply_roots(self, state: dict[str, torch.Tensor], X: torch.Tensor, ctx: StepContext,
                    skip_dim: Optional[int] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``X x_i R_i`` over the preconditioned dims ``i != skip_dim`` (``X: [B, *shape]``), each ``R_i``
        applied from its eigenpairs in the eigenbasis. Returns a new tensor or ``out``, never ``X`` itself
        (unless no dim is left to apply), never a state tensor."""
        dims = [i for i in self.dims if i != skip_dim]
        if not dims:
            return X
        Qs: list[Optional[torch.Tensor]] = [state[self.vectors_name(i)] if i in dims else None
                                            for i in range(len(self.shape))]
        dtype = state[self.vectors_name(dims[0])].dtype
        scratch = ctx.workspace.buffer("product", X.numel(), dtype)
        X_rot = apply_kronecker(X, Qs, transpose=True, scratch=scratch).to(ctx.dtype)
        rank = self.config.eigh_settings
        for i in dims:
            scale = root_scales(state[self.values_name(i)], self.exponents[i], ctx.hp.epsilon, rank)
            X_rot.mul_(scale.to(X_rot.dtype).view(self._scale_shapes[i]))
        return apply_kronecker(X_rot, Qs, out=out, scratch=scratch)

    def direction(self, state: dict[str, torch.Tensor], M: torch.Tensor, ctx: StepContext,
                  out: torch.Tensor) -> torch.Tensor:
        """``M x_1 R_1 ... x_k R_k`` with every root applied from its eigenpairs (see the module doc)."""
        return self.apply_roots(state, M, ctx, out=out)


__all__ = ["EigendecomposedKind", "EigendecomposedShampoo"]
