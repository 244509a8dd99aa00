"""Symmetric matrices stored as their upper triangle: ``d (d + 1) / 2`` numbers instead of ``d^2``.

Layout (the reference implementation's, so stored tensors compare element for element): the upper
triangle *including* the diagonal in row-major order, ``(0,0), (0,1), ..., (0,d-1), (1,1), ...,
(d-1,d-1)``; element ``(i, j)`` with ``i <= j`` sits at offset ``i d - i (i - 1) / 2 + (j - i)``.
Packing keeps the upper triangle and drops the lower one, so ``pack(unpack(x)) == x`` bit for bit;
``unpack(pack(A)) == A`` for an exactly symmetric ``A`` (an ``eigh`` root ``Q L Q^T`` is symmetric only
up to round-off: packing makes it exactly symmetric, from its upper triangle).

Both directions are one gather (``index_select``) with an index computed once per size, batched
over the leading dims of a stack: unpacking a ``[B, n]`` stack writes ``[B, d, d]`` in one pass. The
indices are ``int32`` where ``d^2`` fits (``d <= 46340``): ``4 d^2 + 2 d (d + 1)`` bytes per size,
held by the :class:`~.workspace.Workspace` that owns them (6 MiB for ``d = 1024``).
"""

from __future__ import annotations

import math

import torch


def packed_numel(d: int) -> int:
    """Numbers stored for a symmetric ``d x d`` matrix: the upper triangle with the diagonal."""
    return d * (d + 1) // 2


def matrix_dim(numel: int) -> int:
    """The ``d`` whose packed size is ``numel``; ValueError when ``numel`` is not a triangular number."""
    d = (math.isqrt(8 * numel + 1) - 1) // 2
    if packed_numel(d) != numel:
        raise ValueError(f"{numel} is not the packed size d(d+1)/2 of any symmetric d x d matrix.")
    return d


def diagonal_offsets(d: int) -> list[int]:
    """Offsets of the diagonal entries ``(i, i)`` in the packed layout."""
    return [i * d - i * (i - 1) // 2 for i in range(d)]


def _index_dtype(d: int) -> torch.dtype:
    return torch.int32 if d * d < 2 ** 31 else torch.int64


def pack_index(d: int, device: torch.device) -> torch.Tensor:
    """Flat positions ``i d + j`` (``i <= j``) of the upper triangle in packed order, ``[d (d + 1) / 2]``."""
    rows, cols = torch.triu_indices(d, d)
    return (rows * d + cols).to(dtype=_index_dtype(d), device=device)


def unpack_index(d: int, device: torch.device) -> torch.Tensor:
    """For every position ``(i, j)`` of a ``d x d`` matrix, the packed offset of ``(min, max)``, ``[d^2]``."""
    r = torch.arange(d, dtype=torch.int64)
    i = torch.minimum(r[:, None], r[None, :])
    j = torch.maximum(r[:, None], r[None, :])
    return (i * d - i * (i - 1) // 2 + (j - i)).flatten().to(dtype=_index_dtype(d), device=device)


def index_bytes(d: int) -> int:
    """Bytes of the two index tables of size ``d`` (:func:`pack_index` and :func:`unpack_index`)."""
    itemsize = 4 if _index_dtype(d) == torch.int32 else 8
    return (packed_numel(d) + d * d) * itemsize


def pack(full: torch.Tensor, index: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[..., d, d] -> [..., d (d + 1) / 2]``: the upper triangle (the lower one is not read).

    ``index``: :func:`pack_index` of ``d`` (made here when not given); ``out``: the destination.
    """
    d = full.shape[-1]
    if index is None:
        index = pack_index(d, full.device)
    flat = full.reshape(*full.shape[:-2], d * d)
    if out is None:
        return flat.index_select(-1, index)
    return torch.index_select(flat, -1, index, out=out)


def unpack(packed: torch.Tensor, index: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[..., d (d + 1) / 2] -> [..., d, d]``, the symmetric matrix.

    ``index``: :func:`unpack_index` of ``d`` (made here when not given); ``out``: a contiguous
    ``[..., d, d]`` destination (a workspace), else a new tensor.
    """
    d = matrix_dim(packed.shape[-1])
    if index is None:
        index = unpack_index(d, packed.device)
    lead = packed.shape[:-1]
    if out is None:
        return packed.index_select(-1, index).view(*lead, d, d)
    torch.index_select(packed, -1, index, out=out.view(*lead, d * d))
    return out


def packed_identity(d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The identity matrix in the packed layout (ones at the diagonal offsets)."""
    out = torch.zeros(packed_numel(d), dtype=dtype, device=device)
    out[torch.tensor(diagonal_offsets(d), device=device)] = 1
    return out


def convertible(saved: tuple[int, ...], live: tuple[int, ...]) -> bool:
    """Whether ``saved`` and ``live`` are the two layouts of one symmetric matrix (``(d, d)`` and ``(d(d+1)/2,)``)."""
    for full, packed in ((saved, live), (live, saved)):
        if len(full) == 2 and full[0] == full[1] and len(packed) == 1 and packed[0] == packed_numel(full[0]):
            return True
    return False


def to_layout(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A symmetric matrix stored full or packed, in the layout ``shape`` asks for (packs or unpacks;
    ``tensor`` itself when it already has that shape). ValueError when the shapes do not correspond."""
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    if not convertible(tuple(tensor.shape), tuple(shape)):
        raise ValueError(f"a tensor of shape {tuple(tensor.shape)} is not a symmetric matrix in the layout of "
                         f"shape {tuple(shape)} (full (d, d) or packed (d(d+1)/2,)).")
    return pack(tensor) if len(shape) == 1 else unpack(tensor)


__all__ = ["convertible", "diagonal_offsets", "index_bytes", "matrix_dim", "pack", "pack_index", "packed_identity", "packed_numel", "to_layout",
           "unpack", "unpack_index"]
