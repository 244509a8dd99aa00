"""The GEMM work of a step, batched over the blocks of a bucket: factor (Gram) updates and mode products.

Both take operands in whatever dtype the state is stored in: a ``bfloat16`` factor or root stack
makes the GEMM run with ``bfloat16`` operands (accumulation in fp32 inside the GEMM, as MKL/oneDNN
and cuBLAS do), which is what the low-precision state option is for.
"""

from __future__ import annotations

from typing import Optional

import torch

#: Row/column tile of the symmetric factor update: a Gram matrix ``X X^T`` of dim ``d >= 2 *
#: GRAM_TILE`` is computed as its lower-triangular tiles only (``k (k + 1) / 2`` of ``k^2``,
#: ``k = ceil(d / GRAM_TILE)``) and the upper tiles are mirrored, saving up to ~35% of the factor
#: GEMM FLOPs; smaller tiles lose more in GEMM efficiency than they save (docs/benchmarks.md).
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


def gram_update_(F: torch.Tensor, X: torch.Tensor, beta: float, alpha: float, tile: int = GRAM_TILE) -> None:
    """``F <- beta F + alpha X X^T`` in place for stacks ``F: [B, d, d]``, ``X: [B, d, r]``.

    ``F`` is symmetric, so only the tiles on and below the diagonal are multiplied and the tiles
    above are copies of their mirror: the result is exactly symmetric. The GEMMs use ``X`` in
    ``F``'s dtype (a ``bfloat16`` ``F`` means ``bfloat16`` operands).
    """
    if X.dtype != F.dtype:
        X = X.to(F.dtype)
    d = F.shape[-1]
    if d < 2 * tile:
        F.baddbmm_(X, X.mT, beta=beta, alpha=alpha)
        return
    spans = _tiles(d, tile)
    for i, (a, b) in enumerate(spans):
        Xi = X[:, a:b]
        for c, e in spans[:i + 1]:
            F[:, a:b, c:e].baddbmm_(Xi, X[:, c:e].mT, beta=beta, alpha=alpha)
            if c != a:
                F[:, c:e, a:b].copy_(F[:, a:b, c:e].mT)


def gram(X: torch.Tensor, dtype: torch.dtype, tile: int = GRAM_TILE) -> torch.Tensor:
    """``X X^T`` (``[B, d, d]``) with operands in ``dtype``, tiled like :func:`gram_update_`."""
    out = torch.empty(X.shape[0], X.shape[1], X.shape[1], dtype=dtype, device=X.device)
    gram_update_(out, X, beta=0.0, alpha=1.0, tile=tile)
    return out


def apply_kronecker(X: torch.Tensor, mats: list[Optional[torch.Tensor]], transpose: bool = False,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``X x_1 A_1 ... x_k A_k`` for a stack ``X: [B, d_1..d_k]``, ``A_i: [B, d_i, d_i]`` or None.

    Each round contracts the leading dim with ``A`` (``A X`` along that dim, ``A^T X`` when
    ``transpose``) and moves it to the end in one ``bmm`` (``[B, d, rest]^T @ A^T -> [B, rest, d]``),
    so after k rounds the dims are back in their original order and no permute copy is needed.
    The GEMMs run in the dtype of the matrices (``X`` is cast to it). ``out``: a contiguous tensor of
    ``X``'s shape and the matrices' dtype that receives the last product when it does not overlap that
    product's input (then the result *is* ``out``); otherwise a new tensor is returned.
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
            if (i == last == len(mats) - 1 and out is not None and out.dtype == rhs.dtype
                    and _disjoint(out, X3)):
                Y = torch.bmm(X3.mT, rhs, out=out.view(B, -1, X.shape[1]))
            else:
                Y = torch.bmm(X3.mT, rhs)
        X = Y.reshape(B, *X.shape[2:], X.shape[1])
    return X


def _disjoint(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors certainly share no memory (different storages)."""
    return a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()


__all__ = ["GRAM_TILE", "apply_kronecker", "gram", "gram_update_", "unfold"]
