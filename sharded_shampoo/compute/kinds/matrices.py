"""The ``(d, d)`` fields of a bucket: read them as matrices, store refreshed ones, update factor EMAs.

Kinds never touch a matrix field's storage layout themselves: they read a chunk of blocks as
``[b, d, d]`` matrices (:func:`read_matrices`), store results where a mask allows
(:func:`store_matrices`) and fold Gram matrices into factors (:func:`factor_ema_`).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..kron import gram, gram_scratch_numel, gram_update_
from ..lowp import chunk_slices, ema_round_, rounding_seed
from ..workspace import Workspace
from .protocol import Coefficient, StateField, StepContext, per_block


def row_chunks(num_blocks: int, field: StateField, dtype: torch.dtype) -> list[slice]:
    """Chunks of blocks whose ``(d, d)`` matrices in ``dtype`` fit the transient budget (at least one block).

    Full (unpacked) storage is one chunk: its matrices are read in place, nothing is unpacked.
    """
    del field, dtype
    return [slice(0, num_blocks)]


def read_matrices(stored: torch.Tensor, field: StateField, rows: slice, workspace: Workspace,
                  buffer: str = "matrices") -> torch.Tensor:
    """The matrices of blocks ``rows`` as ``[b, d, d]``: a view of full storage (do not edit it)."""
    del field, workspace, buffer
    return stored[rows]


def store_matrices(stored: torch.Tensor, field: StateField, rows: slice, value: torch.Tensor,
                   keep: Optional[torch.Tensor]) -> None:
    """``stored[rows] <- value`` where ``keep`` (bool ``[b]``; None: everywhere), cast to the storage dtype.

    In place: ``optimizer.state`` holds views of the stacks.
    """
    del field
    target = stored[rows]
    value = value.to(target.dtype)
    if keep is None:
        target.copy_(value)
    else:
        target.copy_(torch.where(keep.view(-1, 1, 1), value, target))


def factor_ema_(stored: torch.Tensor, field: StateField, X: torch.Tensor, beta: float, weight: float,
                ctx: StepContext, index: int) -> None:
    """``F <- beta F + weight X X^T`` for the factor stack ``stored`` and unfolded gradients ``X: [B, d, r]``.

    Inactive blocks (``ctx.active``) keep ``F`` bit-identical: their rows of ``X`` are zero and their
    ``beta`` is 1. ``index``: the factor's number (its stochastic rounding stream).
    """
    b, w = ctx.coefficients(beta, 1.0)
    if stored.dtype == ctx.dtype:
        scratch = ctx.workspace.buffer("gram", gram_scratch_numel(stored.shape[0], stored.shape[-1]), stored.dtype)
        if isinstance(b, torch.Tensor):
            if beta != 1.0:
                stored.mul_(per_block(b, 3))
            gram_update_(stored, X, beta=1.0, alpha=weight, scratch=scratch)
        else:
            gram_update_(stored, X, beta=beta, alpha=weight, scratch=scratch)
        return
    _low_precision_ema(stored, X, b, weight, ctx, index)


def _low_precision_ema(F: torch.Tensor, X: torch.Tensor, b: Coefficient, weight: float, ctx: StepContext,
                       index: int) -> None:
    """The EMA of a factor stored narrower than the math: GEMM with operands in the storage dtype (fp32
    accumulation inside), the EMA in fp32 one chunk of blocks at a time, stochastic rounding back."""
    seeds = [rounding_seed(salt, t, index) for salt, t in zip(ctx.salts, ctx.step.tolist())]
    d = F.shape[-1]
    chunks = chunk_slices(F.shape[0], d * d * 4)
    scratch = ctx.workspace.buffer("lowp", 2 * d * d * (chunks[0].stop - chunks[0].start), torch.float32)
    for s in chunks:
        beta = b[s].view(-1, 1, 1) if isinstance(b, torch.Tensor) else b
        ema_round_(F[s], gram(X[s], F.dtype), beta, weight, seeds[s], scratch)


__all__ = ["factor_ema_", "read_matrices", "row_chunks", "store_matrices"]
