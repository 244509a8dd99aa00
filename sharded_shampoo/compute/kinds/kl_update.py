"""The KL-Shampoo factor update, for any Shampoo-family kind that can hand over its current inverse roots.

KL-Shampoo keeps Shampoo's state, refresh and direction and changes only the statistic each factor
accumulates: the gradient is first preconditioned along every *other* preconditioned dim with the
stored inverse roots (those of the previous refresh; the identity before the first one), so for a
block ``G`` and its preconditioned dims ``k``::

    H_k = G x_{j != k} R_j              X_k = mode-k unfolding of H_k  ([d_k, numel / d_k])
    F_k <- beta2 F_k + w X_k X_k^T      (2-D, default exponents: F_L += w G R_R^2 G^T, F_R += w G^T R_L^2 G)

Every factor of a step uses the roots as they were before the step (no factor sees another's update
of the same step); a refresh due at this step comes after, and the direction uses its new roots.
Until the first refresh the roots are the identity and this is Shampoo's update; a block with one
preconditioned dim (1-D, or every other exponent 0) has nothing to precondition with and takes
Shampoo's update.

:class:`KLFactorUpdate` is that update as a mixin: put it before the kind in the bases and implement
:meth:`~KLFactorUpdate.update_roots` (how the kind's current roots are read as matrices)::

    class KLShampooKind(KLFactorUpdate, RootInverseKind)            # roots read from root_{i}
    class EigendecomposedKLKind(KLFactorUpdate, EigendecomposedKind)  # roots formed from Q_i, lambda_i

The bucket is processed a chunk of blocks at a time (at most :data:`~..low_precision.CHUNK_BYTES` of materialised
roots and unfolded products, at least one block): per chunk the roots of every dim are read once,
every ``X_k`` of the chunk is formed (one batched mode product per other dim, never a loop over
blocks), then folded into the factors through :func:`.matrices.factor_ema_` (packing, low-precision
storage, masks and stochastic rounding as for Shampoo). Products run in the roots' dtype, as the
direction's do.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Optional

import torch

from ...shampoo_options import config_key
from .. import low_precision
from ..kron import apply_kronecker
from .matrices import factor_ema_
from .protocol import StepContext
from .shampoo import ShampooFamily

if TYPE_CHECKING:
    from .cost_model import CostModel


class KLVariantConfig:
    """Mixin of a KL config over its base config (``class KLShampoo(KLVariantConfig, RootInverseShampoo)``).

    The fields and their checks are the base's; a KL config is still another optimizer: errors name
    the class the user wrote, and it never compares (or hashes) equal to its base with the same fields,
    so the checkpoint fingerprints of the two differ.
    """

    def __post_init__(self) -> None:
        base = type(self).__mro__[type(self).__mro__.index(KLVariantConfig) + 1]
        try:
            super().__post_init__()  # type: ignore[misc]
        except ValueError as err:    # the base's checks: name the class the user wrote
            raise ValueError(str(err).replace(base.__name__, type(self).__name__)) from None

    def __hash__(self) -> int:
        return hash((type(self).__name__, config_key(self)))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and config_key(self) == config_key(other)


def rows_context(ctx: StepContext, rows: slice) -> StepContext:
    """``ctx`` restricted to the blocks ``rows`` of the bucket (mask, step counts, rounding salts)."""
    return dataclasses.replace(ctx, active=None if ctx.active is None else ctx.active[rows], step=ctx.step[rows],
                               salts=None if ctx.salts is None else ctx.salts[rows])


def unfolded_except(G: torch.Tensor, roots: list[Optional[torch.Tensor]], k: int, out: torch.Tensor,
                    scratch: torch.Tensor) -> torch.Tensor:
    """``G x_{j != k} R_j`` unfolded along ``k``: ``[B, d_k, numel / d_k]``, in ``out`` (contiguous, ``G``'s numel).

    ``roots``: one entry per block dim (None: not preconditioned; entry ``k`` is ignored). The other dims
    are visited in cyclic order from ``k`` (the columns of the unfolding are permuted relative to the
    row-major one, which leaves ``X X^T`` as it is), so ``k`` ends in front without a transpose copy;
    for a 2-D block each product is one ``bmm`` straight into ``out``.
    """
    order = [(k + s) % (G.ndim - 1) for s in range(G.ndim - 1)]
    mats = [None] + [roots[j] for j in order[1:]]
    rotated = G.permute(0, *(j + 1 for j in order))
    H = apply_kronecker(rotated, mats, out=out.view(rotated.shape), scratch=scratch)
    X = out.view(G.shape[0], G.shape[k + 1], -1)
    if H.data_ptr() != out.data_ptr() or H.dtype != out.dtype or not H.is_contiguous():
        X.copy_(H.reshape(X.shape))
    return X


class KLFactorUpdate(ShampooFamily):
    """Mixin (before a Shampoo-family kind in the bases): the KL-Shampoo factor update; see the module doc."""

    def update_roots(self, state: dict[str, torch.Tensor], rows: slice, ctx: StepContext) -> list[torch.Tensor]:
        """The current inverse roots of blocks ``rows``, one ``[b, d_i, d_i]`` stack per preconditioned dim
        (``self.dims`` order), all of one dtype; they may live in the workspace's ``"matrices"`` buffer
        (valid until its next use) and are only read."""
        raise NotImplementedError(f"{type(self).__name__} must say how its inverse roots are read (update_roots).")

    def update_root_bytes(self) -> int:
        """Bytes of one block's roots that :meth:`update_roots` materialises in the workspace (0: read in place)."""
        return 0

    @property
    def update_dtype(self) -> torch.dtype:
        """The dtype of the roots :meth:`update_roots` returns (the products run in it)."""
        return self.second_storage

    # ------------------------------------------------------------------ costs

    def kl_update_flops(self) -> float:
        """The extra mode products of one step: per factor ``k``, one per other preconditioned dim ``j``,
        ``2 numel d_j`` each, so ``2 numel (n - 1) sum_j d_j`` for ``n`` preconditioned dims."""
        if len(self.dims) < 2:
            return 0.0
        numel = math.prod(self.shape)
        return float(2 * numel * (len(self.dims) - 1) * sum(self.shape[j] for j in self.dims))

    def step_flops(self, model: "CostModel") -> float:
        return super().step_flops(model) + self.kl_update_flops()

    def kl_update_bytes(self) -> int:
        """Transient bytes of one block's KL update: its materialised roots, one unfolded product per
        factor and one intermediate product, in the roots' dtype (0 where it is Shampoo's update)."""
        if len(self.dims) < 2:
            return 0
        itemsize = torch.empty((), dtype=self.update_dtype).element_size()
        return self.update_root_bytes() + (len(self.dims) + 1) * math.prod(self.shape) * itemsize

    def workspace_bytes(self) -> int:
        return max(super().workspace_bytes(), self.kl_update_bytes())

    # ------------------------------------------------------------------ math

    def update(self, state: dict[str, torch.Tensor], G: torch.Tensor, ctx: StepContext) -> None:
        """``F_k <- beta2 F_k + w X_k X_k^T`` with ``X_k`` the unfolding of ``G x_{j != k} R_j``, a chunk of blocks at a time."""
        if len(self.dims) < 2:
            super().update(state, G, ctx)
            return
        beta2 = ctx.hp.beta2
        weight = self.factor_weight(beta2)        # 1 - beta2, or 1 (beta2 = 1, drop_weighting_factor_on_gsquare)
        n, numel = len(self.dims), math.prod(self.shape)
        dtype = self.update_dtype
        per_block = self.kl_update_bytes()
        for rows in low_precision.chunk_slices(ctx.num_blocks, per_block):
            b = rows.stop - rows.start
            roots = self.kron_list(self.update_roots(state, rows, ctx))
            work = ctx.workspace.buffer("product", (n + 1) * b * numel, dtype)
            scratch = work[n * b * numel:]
            unfolded = [unfolded_except(G[rows], roots, k, work[m * b * numel:(m + 1) * b * numel], scratch)
                        for m, k in enumerate(self.dims)]
            # the roots are read: the factor EMAs may now reuse the workspace's matrix buffers
            sub = rows_context(ctx, rows)
            for m, (k, X) in enumerate(zip(self.dims, unfolded)):
                name = self.factor_name(k)
                factor_ema_(state[name][rows], self.field(name), X, beta2, weight, sub, m)


__all__ = ["KLFactorUpdate", "rows_context", "unfolded_except"]
