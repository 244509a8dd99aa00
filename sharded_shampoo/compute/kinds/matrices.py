"""The ``(d, d)`` fields of a bucket: read them as matrices, store refreshed ones, update factor EMAs.

Kinds never touch a matrix field's storage layout themselves: they read a chunk of blocks as
``[b, d, d]`` matrices (:func:`read_matrices`), store results where a mask allows
(:func:`store_matrices`) and fold Gram matrices into factors (:func:`factor_ema_`). A packed field
(:mod:`..packing`) is unpacked into the rank's shared :class:`~..workspace.Workspace`, a chunk of
blocks at a time (:func:`row_chunks`: at most :data:`~..low_precision.CHUNK_BYTES` of full matrices, or one
block), so a full copy of a packed stack never exists; full storage is read in place.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..kron import gram_scratch_numel, gram_update_
from ..low_precision import chunk_slices, ema_round_, rounding_seeds
from ..packing import pack, packed_numel, unpack
from ..workspace import Workspace
from .protocol import Coefficient, StateField, StepContext, per_block


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def row_chunks(num_blocks: int, field: StateField, dtype: torch.dtype) -> list[slice]:
    """Chunks of blocks whose ``(d, d)`` matrices in ``dtype`` fit the transient budget (at least one block).

    Full (unpacked) storage is one chunk: its matrices are read in place, nothing is unpacked.
    """
    if not field.packed:
        return [slice(0, num_blocks)]
    d = field.shape[0]
    return chunk_slices(num_blocks, d * d * _itemsize(dtype))


def read_matrices(stored: torch.Tensor, field: StateField, rows: slice, workspace: Workspace,
                  buffer: str = "matrices", offset: int = 0) -> torch.Tensor:
    """The matrices of blocks ``rows`` as ``[b, d, d]`` in the storage dtype.

    Full storage: a view of the state (do not edit it). Packed storage: unpacked into the workspace
    buffer ``buffer`` at element ``offset`` (valid until that buffer's next use; the caller may edit it).
    """
    if not field.packed:
        return stored[rows]
    d = field.shape[0]
    src = stored[rows]
    out = workspace.buffer(buffer, src.shape[0] * d * d, stored.dtype, offset).view(src.shape[0], d, d)
    return unpack(src, workspace.unpack_index(d), out=out)


def store_matrices(stored: torch.Tensor, field: StateField, rows: slice, value: torch.Tensor,
                   keep: Optional[torch.Tensor], workspace: Workspace) -> None:
    """``stored[rows] <- value`` (``[b, d, d]``) where ``keep`` (bool ``[b]``; None: everywhere), cast to the
    storage dtype; packed fields keep the upper triangle of ``value``.

    In place: ``optimizer.state`` holds views of the stacks.
    """
    target = stored[rows]
    value = value.to(target.dtype)
    if field.packed:
        value = pack(value, workspace.pack_index(field.shape[0]))
    if keep is None:
        target.copy_(value)
    else:
        target.copy_(torch.where(per_block(keep, target.ndim), value, target))


def factor_ema_(stored: torch.Tensor, field: StateField, X: torch.Tensor, beta: float, weight: float,
                ctx: StepContext, index: int) -> None:
    """``F <- beta F + weight X X^T`` for the factor stack ``stored`` and unfolded gradients ``X: [B, d, r]``.

    Inactive blocks (``ctx.active``) keep ``F`` bit-identical: their rows of ``X`` are zero and their
    ``beta`` is 1. ``index``: the factor's number (its stochastic rounding stream).
    """
    b, w = ctx.coefficients(beta, weight)
    if field.packed:
        _packed_ema(stored, field, X, (beta, weight), (b, w), ctx, index)
    elif stored.dtype == ctx.dtype:
        scratch = ctx.workspace.buffer("gram", gram_scratch_numel(stored.shape[0], stored.shape[-1]), stored.dtype)
        if isinstance(b, torch.Tensor):
            if beta != 1.0:
                stored.mul_(per_block(b, 3))
            gram_update_(stored, X, beta=1.0, alpha=weight, scratch=scratch)
        else:
            gram_update_(stored, X, beta=beta, alpha=weight, scratch=scratch)
    else:
        _low_precision_ema(stored, X, b, weight, ctx, index)


def _seeds(ctx: StepContext, index: int) -> torch.Tensor:
    """Per-block rounding seeds of factor ``index`` at this step, computed on the device."""
    assert ctx.salts is not None, "stochastic rounding needs the bucket's per-block salts"
    return rounding_seeds(ctx.salts, ctx.step, index)


def _low_precision_ema(F: torch.Tensor, X: torch.Tensor, b: Coefficient, weight: float, ctx: StepContext,
                       index: int) -> None:
    """The EMA of a full factor stored narrower than the math: GEMM with operands in the storage dtype (fp32
    accumulation inside), the EMA in fp32 one chunk of blocks at a time, stochastic rounding back."""
    seeds = _seeds(ctx, index)
    d = F.shape[-1]
    ws = ctx.workspace
    for s in chunk_slices(F.shape[0], d * d * 4):
        n = s.stop - s.start
        GG = ws.buffer("matrices", n * d * d, F.dtype).view(n, d, d)
        gram_update_(GG, X[s], beta=0.0, alpha=1.0, scratch=ws.buffer("gram", gram_scratch_numel(n, d), F.dtype))
        beta = b[s].view(-1, 1, 1) if isinstance(b, torch.Tensor) else b
        ema_round_(F[s], GG, beta, weight, seeds[s], ws.buffer("rounding", 2 * n * d * d, torch.float32))


def _packed_ema(F: torch.Tensor, field: StateField, X: torch.Tensor, scalars: tuple[float, float],
                coefficients: tuple[Coefficient, Coefficient], ctx: StepContext, index: int) -> None:
    """The EMA of a packed factor, a chunk of blocks at a time: the upper row blocks of ``X X^T`` into a
    full workspace (operands in the storage dtype), packed, then folded into ``F``.

    fp32/fp64 storage: ``F += w P`` (beta = 1), ``F <- lerp(F, P, w)`` (``w = 1 - beta``) or ``F <- beta F + w P``;
    narrower storage: the EMA in fp32 and stochastic rounding of the packed numbers.
    """
    beta, weight = scalars
    b, w = coefficients
    d = field.shape[0]
    n = packed_numel(d)
    ws = ctx.workspace
    index_tensor = ws.pack_index(d)
    low = F.dtype != ctx.dtype
    seeds = _seeds(ctx, index) if low else None
    for s in chunk_slices(F.shape[0], d * d * max(4, F.element_size())):
        rows = s.stop - s.start
        W = ws.buffer("matrices", rows * d * d, F.dtype).view(rows, d, d)
        gram_update_(W, X[s], beta=0.0, alpha=1.0, scratch=ws.buffer("gram", gram_scratch_numel(rows, d), F.dtype),
                     mirror=False)
        P = pack(W, index_tensor, out=ws.buffer("second", rows * n, F.dtype).view(rows, n))
        b_s = b[s].view(-1, 1) if isinstance(b, torch.Tensor) else b
        if low:
            assert seeds is not None
            ema_round_(F[s], P, b_s, weight, seeds[s], ws.buffer("rounding", 2 * rows * n, torch.float32))
        elif beta == 1.0:
            F[s].add_(P, alpha=weight)          # inactive rows of P are zero
        elif weight == 1.0 - beta:
            F[s].lerp_(P, w[s].view(-1, 1) if isinstance(w, torch.Tensor) else w)
        else:
            F[s].mul_(b_s).add_(P, alpha=weight)


__all__ = ["factor_ema_", "read_matrices", "row_chunks", "store_matrices"]
