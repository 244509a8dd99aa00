"""What every kind of the Shampoo family shares: one Kronecker factor per preconditioned dim.

Per block and preconditioned dim ``i`` (exponent ``e_i != 0``): a factor ``F_i`` (``factor_{i}``,
symmetric, category ``factors``), updated every step as ``F_i <- beta2 F_i + w G_(i) G_(i)^T``
(``w = 1 - beta2``, or 1 when ``beta2 == 1`` or with ``drop_weighting_factor_on_gsquare``),
bias-corrected by ``bc2 = 1 - beta2^t`` where used (not with ``drop_weighting_factor_on_gsquare``), and
trace-scaled before a refresh when the config has a ``trace_scaling_exponent``.
A refresh walks the dims, reads ``F_i / bc2`` as matrices and hands them to :meth:`refresh_dim`,
which each kind implements (inverse roots, eigenbases, ...). Subclasses add their per-dim fields
with :meth:`dim_fields` and their per-block fields with :meth:`extra_fields`.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Optional

import torch

from ..kron import unfold
from .matrices import factor_ema_, read_matrices, row_chunks
from .protocol import PreconditionerKind, StateField, StepContext, Init

if TYPE_CHECKING:
    from .cost_model import CostModel


class ShampooFamily(PreconditionerKind):
    """Factor statistics and the refresh loop of the Shampoo family (subclasses: roots, bases, directions)."""

    #: FLOPs per element and factor dim of the preconditioning products (2: one mode product; 4: into
    #: and out of an eigenbasis)
    product_flops_per_dim = 2

    def __init__(self, config: Any, shape: tuple[int, ...], exponents: tuple[float, ...]) -> None:
        super().__init__(config, shape, exponents)
        self.dims = [i for i, e in enumerate(self.exponents) if e != 0]
        self.factor_storage, self.second_storage = config.storage_dtypes()

    @staticmethod
    def factor_name(dim: int) -> str:
        return f"factor_{dim}"

    @property
    def packing(self) -> bool:
        """Whether symmetric ``(d, d)`` fields are stored packed (the config's ``symmetric_packing``)."""
        return bool(getattr(self.config, "symmetric_packing", False))

    @property
    def preconditions(self) -> bool:
        return bool(self.dims)

    # ------------------------------------------------------------------ fields

    def fields(self) -> list[StateField]:
        out: list[StateField] = []
        for i in self.dims:
            d = self.shape[i]
            out.append(StateField(self.factor_name(i), (d, d), self.factor_storage, Init.ZEROS, "factors",
                                  symmetric=True, packed=self.packing))
            out.extend(self.dim_fields(i, d))
        return out + self.extra_fields()

    def dim_fields(self, dim: int, d: int) -> list[StateField]:
        """Fields of one preconditioned dim besides its factor (roots, eigenbases, ...)."""
        return []

    def extra_fields(self) -> list[StateField]:
        """Per-block fields that belong to no single dim (e.g. corrected eigenvalues)."""
        return []

    @functools.cached_property
    def field_map(self) -> dict[str, StateField]:
        return {f.name: f for f in self.fields()}

    def field(self, name: str) -> StateField:
        return self.field_map[name]

    # ------------------------------------------------------------------ costs

    def step_flops(self, model: "CostModel") -> float:
        """Per dim ``d``: the factor update ``2 numel d`` plus the preconditioning products."""
        numel = math.prod(self.shape)
        return float(sum((2 + self.product_flops_per_dim) * numel * self.shape[i] for i in self.dims))

    # ------------------------------------------------------------------ math

    def update(self, state: dict[str, torch.Tensor], G: torch.Tensor, ctx: StepContext) -> None:
        """``F_i <- beta2 F_i + w G_(i) G_(i)^T`` for every preconditioned dim (KL variants override this)."""
        beta2 = ctx.hp.beta2
        weight = self.factor_weight(beta2)
        for n, i in enumerate(self.dims):
            name = self.factor_name(i)
            factor_ema_(state[name], self.field(name), unfold(G, i), beta2, weight, ctx, n)

    @property
    def drops_weighting(self) -> bool:
        """The config's ``drop_weighting_factor_on_gsquare``: statistics add ``G G^T`` unweighted, no ``bc2``."""
        return bool(getattr(self.config, "drop_weighting_factor_on_gsquare", False))

    def factor_weight(self, beta2: float) -> float:
        """``w`` of ``F <- beta2 F + w X``: ``1 - beta2``, or 1 for ``beta2 = 1`` or ``drop_weighting_factor_on_gsquare``."""
        return 1.0 if beta2 >= 1.0 or self.drops_weighting else 1.0 - beta2

    def bias_correction2(self, ctx: StepContext) -> torch.Tensor:
        """``1 - beta2^t`` per block (ones without bias correction, for beta2 = 1 or when the weighting is dropped)."""
        return ctx.bias_correction(1.0 if self.drops_weighting else ctx.hp.beta2)

    def refresh(self, state: dict[str, torch.Tensor], ctx: StepContext) -> Optional[torch.Tensor]:
        bc2 = self.bias_correction2(ctx)
        ok = torch.ones(ctx.num_blocks, dtype=torch.bool, device=ctx.step.device)
        for n, i in enumerate(self.dims):
            ok &= self.refresh_dim(state, n, i, bc2, ctx)
        return ok

    def factor_hat(self, state: dict[str, torch.Tensor], dim: int, rows: slice, bc2: torch.Tensor,
                   ctx: StepContext) -> torch.Tensor:
        """``F_dim / bc2`` of blocks ``rows`` as ``[b, d, d]`` matrices in the math dtype (new, or the workspace's),
        trace-scaled when the config has a ``trace_scaling_exponent``."""
        name = self.factor_name(dim)
        field = self.field(name)
        F = read_matrices(state[name], field, rows, ctx.workspace, buffer="matrices")
        if field.packed and F.dtype == ctx.dtype:
            A = F.div_(bc2[rows].view(-1, 1, 1))     # F is the workspace's unpacked copy
        else:
            A = F.to(ctx.dtype) / bc2[rows].view(-1, 1, 1)
        exponent = getattr(self.config, "trace_scaling_exponent", None)
        if exponent is not None:
            # A * max(tr A, eps)^(-exponent) (the reference's trace scaling); a tiny floor where eps is 0
            trace = A.diagonal(dim1=-2, dim2=-1).sum(-1)
            floor = max(ctx.hp.epsilon, torch.finfo(A.dtype).tiny)
            A.mul_(trace.clamp_min(floor).pow(-exponent).view(-1, 1, 1))
        return A

    def chunks(self, ctx: StepContext, name: str) -> list[slice]:
        """Chunks of blocks in which the ``(d, d)`` field ``name`` is processed (see :func:`.matrices.row_chunks`)."""
        return row_chunks(ctx.num_blocks, self.field(name), ctx.dtype)

    def refresh_dim(self, state: dict[str, torch.Tensor], n: int, dim: int, bc2: torch.Tensor,
                    ctx: StepContext) -> torch.Tensor:
        """Refresh what dim ``dim`` (the ``n``-th preconditioned dim) keeps; bool ``[B]``: which succeeded."""
        raise NotImplementedError

    def kron_list(self, mats: list[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        """One matrix per preconditioned dim -> one entry per block dim (None where not preconditioned)."""
        out: list[Optional[torch.Tensor]] = [None] * len(self.shape)
        for m, i in zip(mats, self.dims):
            out[i] = m
        return out


__all__ = ["ShampooFamily"]
