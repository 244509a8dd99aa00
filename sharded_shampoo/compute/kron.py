"""The GEMM work of a step, batched over the blocks of a bucket: factor (Gram) updates and mode products.

Both take operands in whatever dtype the state is stored in: a ``bfloat16`` factor or root stack
makes the GEMM run with ``bfloat16`` operands (accumulation in fp32 inside the GEMM, as MKL/oneDNN
and cuBLAS do), which is what the low-precision state option is for.
"""

from __future__ import annotations

from typing import Optional

import torch

#: Row block of the symmetric factor update: a Gram matrix ``X X^T`` of dim ``d >= 2 * GRAM_TILE`` is
#: computed as ``k = ceil(d / GRAM_TILE)`` row blocks, block ``i`` only from its diagonal tile to the
#: right (``(k + 1) / (2 k)`` of the FLOPs), the tiles below the diagonal mirrored. Smaller tiles lose
#: more in GEMM efficiency than they save (docs/benchmarks.md).
GRAM_TILE = 256


def unfold(X: torch.Tensor, dim: int) -> torch.Tensor:
    """``[B, d_0, ..., d_{k-1}]`` -> ``[B, d_dim, rest]`` (mode-``dim`` unfolding, batched).

    A view for the first dim and for the last dim of an order-2 block (``G^T``); a copy otherwise.
    """
    if dim == 0:
        return X.reshape(X.shape[0], X.shape[1], -1)
    return X.movedim(dim + 1, 1).reshape(X.shape[0], X.shape[dim + 1], -1)


def _tiles(d: int, tile: int) -> list[tuple[int, int]]:
    k = -(-d // tile)
    step = -(-d // k)
    return [(a, min(a + step, d)) for a in range(0, d, step)]


def gram_scratch_numel(batch: int, d: int, tile: int = GRAM_TILE) -> int:
    """Elements of the scratch :func:`gram_update_` needs for a ``[batch, d, d]`` stack (0: none)."""
    if d < 2 * tile:
        return 0
    a, b = _tiles(d, tile)[1]
    return batch * (b - a) * (d - a)


def gram_update_(F: torch.Tensor, X: torch.Tensor, beta: float, alpha: float, tile: int = GRAM_TILE,
                 scratch: Optional[torch.Tensor] = None, mirror: bool = True) -> None:
    """``F <- beta F + alpha X X^T`` in place for stacks ``F: [B, d, d]``, ``X: [B, d, r]``.

    ``F`` is symmetric, so only the upper row blocks are multiplied: the first row block as one
    GEMM straight into ``F`` (full-width rows are a layout BLAS writes directly), each further one
    into contiguous scratch and added to its tiles; the tiles below the diagonal are copies of their
    mirror (the result is symmetric up to round-off, as a full GEMM is). ``beta = 0`` ignores ``F``'s old values (NaN-safe).
    The GEMMs use ``X`` in ``F``'s dtype (a ``bfloat16`` ``F`` means ``bfloat16`` operands).
    ``scratch``: a flat tensor of at least :func:`gram_scratch_numel` elements of ``F``'s dtype, reused
    instead of allocating. ``mirror=False``: leave the tiles below the diagonal as they were (for a
    caller that reads only the upper triangle, e.g. to pack it).
    """
    if X.dtype != F.dtype:
        X = X.to(F.dtype)
    B, d = F.shape[0], F.shape[-1]
    if d < 2 * tile:
        F.baddbmm_(X, X.mT, beta=beta, alpha=alpha)
        return
    spans = _tiles(d, tile)
    a0, b0 = spans[0]
    F[:, a0:b0, :].baddbmm_(X[:, a0:b0], X.mT, beta=beta, alpha=alpha)
    for a, b in spans[1:]:
        n = B * (b - a) * (d - a)
        T = scratch[:n].view(B, b - a, d - a) if scratch is not None and scratch.numel() >= n else None
        T = torch.bmm(X[:, a:b], X[:, a:].mT, out=T)
        block = F[:, a:b, a:]
        if beta == 0.0:
            torch.mul(T, alpha, out=block)
        else:
            if beta != 1.0:
                block.mul_(beta)
            block.add_(T, alpha=alpha)
    if not mirror:
        return
    for a, b in spans[1:]:
        F[:, a:b, :a].copy_(F[:, :a, a:b].mT)


def gram(X: torch.Tensor, dtype: torch.dtype, tile: int = GRAM_TILE) -> torch.Tensor:
    """``X X^T`` (``[B, d, d]``) with operands in ``dtype``, computed like :func:`gram_update_`."""
    out = torch.empty(X.shape[0], X.shape[1], X.shape[1], dtype=dtype, device=X.device)
    gram_update_(out, X, beta=0.0, alpha=1.0, tile=tile)
    return out


def apply_kronecker(X: torch.Tensor, mats: list[Optional[torch.Tensor]], transpose: bool = False,
                    out: Optional[torch.Tensor] = None, scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``X x_1 A_1 ... x_k A_k`` for a stack ``X: [B, d_1..d_k]``, ``A_i: [B, d_i, d_i]`` or None.

    Each round contracts the leading dim with ``A`` (``A X`` along that dim, ``A^T X`` when
    ``transpose``) and moves it to the end in one ``bmm`` (``[B, d, rest]^T @ A^T -> [B, rest, d]``),
    so after k rounds the dims are back in their original order and no permute copy is needed.
    The GEMMs run in the dtype of the matrices (``X`` is cast to it).

    ``out``: a contiguous tensor of ``X``'s shape and the matrices' dtype that receives the last
    product when it does not share memory with that product's input (then the result *is* ``out``).
    ``scratch``: a flat tensor of at least ``X.numel()`` elements of the matrices' dtype for the
    intermediate products. Both only avoid allocations: on CPU a fresh multi-MiB tensor costs page
    faults on every step (measured: a bucket-sized ``bmm`` runs ~20% slower into a new tensor).
    """
    B = X.shape[0]
    dtypes = {A.dtype for A in mats if A is not None}
    if len(dtypes) == 1 and X.dtype not in dtypes:
        X = X.to(dtypes.pop())
    last = max((i for i, A in enumerate(mats) if A is not None), default=-1)
    for i, A in enumerate(mats):
        X3 = X.reshape(B, X.shape[1], -1)
        if A is None:
            Y = X3.mT
        else:
            rhs = A if transpose else A.mT
            target = None
            if i == last == len(mats) - 1:
                target = out
            elif scratch is not None and scratch.numel() >= X3.numel():
                target = scratch[:X3.numel()]
            if target is not None and (target.dtype != rhs.dtype or not _disjoint(target, X3)):
                target = None
            Y = torch.bmm(X3.mT, rhs, out=None if target is None else target.view(B, -1, X.shape[1]))
        X = Y.reshape(B, *X.shape[2:], X.shape[1])
    return X


def _disjoint(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors certainly share no memory (different storages)."""
    return a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()


__all__ = ["GRAM_TILE", "apply_kronecker", "gram", "gram_scratch_numel", "gram_update_", "unfold"]
