"""Root-inverse Shampoo (:class:`~sharded_shampoo.config.RootInverseShampoo`).

State per preconditioned dim ``i``: the factor ``F_i`` and the inverse root ``R_i`` (``root_{i}``,
symmetric, starts as the identity, category ``roots``). Refresh: ``R_i = (F_i / bc2 + eps I)^(-e_i)``
by eigh, coupled Newton or the warm-started series (:mod:`..refresh`); a failed block keeps its
previous root. Direction: ``M x_1 R_1 ... x_k R_k``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ...config import CoupledNewtonConfig, EighRootConfig, RootInverseShampoo, WarmStartRootConfig
from ..kron import apply_kronecker
from ..low_precision import chunk_slices
from ..refresh import WarmBackoff, refresh_roots
from .matrices import read_matrices, store_matrices
from .protocol import Init, StateField, StepContext
from .shampoo import ShampooFamily

if TYPE_CHECKING:
    from .cost_model import CostModel


class RootInverseKind(ShampooFamily):
    config_type = RootInverseShampoo

    def __init__(self, config: Any, shape: tuple[int, ...], exponents: tuple[float, ...]) -> None:
        super().__init__(config, shape, exponents)
        self.backoff: list[WarmBackoff] = []    # per dim, made at the first refresh (Python state, not optimizer state)

    @property
    def starts_as_identity(self) -> bool:
        return True

    @staticmethod
    def root_name(dim: int) -> str:
        return f"root_{dim}"

    def dim_fields(self, dim: int, d: int) -> list[StateField]:
        return [StateField(self.root_name(dim), (d, d), self.second_storage, Init.IDENTITY, "roots",
                           symmetric=True, packed=self.packing)]

    # ------------------------------------------------------------------ costs

    def refresh_flops(self, model: "CostModel") -> float:
        """Per dim ``d``: eigh + root formation ``(9 + 2) d^3``; coupled Newton ``iterations (p + 1) 2 d^3``;
        warm roots ``(q + order + 1) 2 d^3`` plus ``warm_fallback_rate`` eigh roots."""
        eigh_root = model.eigh_flops_per_d3 + model.root_form_flops_per_d3
        root = self.config.root
        total = 0.0
        for i in self.dims:
            e = self.exponents[i]
            if isinstance(root, CoupledNewtonConfig):
                per_d3 = min(model.newton_iterations, root.max_iterations) * (max(1, round(1.0 / e)) + 1) * 2.0
            elif isinstance(root, WarmStartRootConfig):
                order = min(model.warm_series_order, root.max_order)
                per_d3 = (round(0.5 / e) + order + 1) * 2.0 + model.warm_fallback_rate * eigh_root
            else:
                per_d3 = eigh_root
            total += per_d3 * self.shape[i] ** 3
        return total

    def workspace_bytes(self) -> int:
        """Refreshing the largest factor: eigh ``(3 d^2 + d) s`` (fp64 when a failed fp32 eigh is retried),
        coupled Newton ``4 d^2 s``, warm roots the larger of ``5 d^2 s`` and their eigh fallback's."""
        if not self.dims:
            return 0
        d = max(self.shape[i] for i in self.dims)
        s = max(torch.empty((), dtype=self.config.factor_dtype).element_size(), 4)
        root = self.config.root
        fallback = root.fallback if isinstance(root, WarmStartRootConfig) else root
        eigh_s = 8 if isinstance(fallback, EighRootConfig) and fallback.retry_in_float64 else s
        eigh = (3 * d * d + d) * eigh_s
        if isinstance(root, CoupledNewtonConfig):
            return 4 * d * d * s
        if isinstance(root, WarmStartRootConfig):
            # packed roots: the previous root is unpacked beside the series' work (d^2 more)
            return max((5 + self.packing) * d * d * s, eigh)
        return eigh

    # ------------------------------------------------------------------ math

    def refresh_dim(self, state: dict[str, torch.Tensor], n: int, dim: int, bc2: torch.Tensor,
                    ctx: StepContext) -> torch.Tensor:
        B = ctx.num_blocks
        if len(self.backoff) <= n:
            self.backoff.append(WarmBackoff(B))
        warm = isinstance(self.config.root, WarmStartRootConfig)
        name = self.root_name(dim)
        ok = torch.ones(B, dtype=torch.bool, device=ctx.step.device)
        for rows in self.chunks(ctx, name):
            indices = list(range(B))[rows]
            A = self.factor_hat(state, dim, rows, bc2, ctx)
            previous = read_matrices(state[name], self.field(name), rows, ctx.workspace, "second") if warm else None
            attempted = self.backoff[n].attempt(indices)
            res = refresh_roots(A, previous, self.exponents[dim], ctx.hp.epsilon, self.config.root, ctx.counts,
                                torch.tensor(attempted, device=ctx.step.device))
            if res.fell_back is not None:
                self.backoff[n].record(indices, attempted, res.fell_back.tolist())
            store_matrices(state[name], self.field(name), rows, res.matrices, ctx.keep(res.ok, rows), ctx.workspace)
            ok[rows] = res.ok
        return ok

    def direction(self, state: dict[str, torch.Tensor], M: torch.Tensor, ctx: StepContext,
                  out: torch.Tensor) -> torch.Tensor:
        """``M x_1 R_1 ... x_k R_k``; packed roots are unpacked a chunk of blocks at a time (all dims of a
        chunk together, at most ``CHUNK_BYTES`` of matrices or one block), full ones are used in place."""
        names = [self.root_name(i) for i in self.dims]
        dtype = state[names[0]].dtype
        B = ctx.num_blocks
        chunks = [slice(0, B)]
        if self.packing:
            chunks = chunk_slices(B, sum(self.shape[i] ** 2 for i in self.dims) * state[names[0]].element_size())
        for rows in chunks:
            mats, offset = [], 0
            for n in names:          # every dim's roots of the chunk, one after the other in one buffer
                mats.append(read_matrices(state[n], self.field(n), rows, ctx.workspace, "matrices", offset))
                offset += mats[-1].numel() if self.packing else 0
            part = M[rows]
            scratch = ctx.workspace.buffer("product", part.numel(), dtype)
            P = apply_kronecker(part, self.kron_list(mats), out=out[rows], scratch=scratch)
            if len(chunks) == 1:
                return P
            if P.data_ptr() != out[rows].data_ptr() or P.dtype != out.dtype:
                out[rows].copy_(P)
        return out


__all__ = ["RootInverseKind"]
