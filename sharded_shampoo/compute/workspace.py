"""Scratch memory shared by every bucket of one optimizer on one device.

Buckets run one after the other on a rank, so they can share scratch: the optimizer's working
memory is the *largest* need of any bucket, not the sum over buckets. Each use names its buffer;
buffers of different names never alias, so two of them can be in use at once, and the phases of a
step (factor update, refresh, direction) reuse the same few names:

* ``"matrices"``: full matrices of a chunk of blocks (unpacked roots of every dim, ``F / bc2`` of a
  refresh, the Gram products of a factor update): at most ``low_precision.CHUNK_BYTES`` or one block's;
* ``"second"``: a second such set within a phase (the previous roots of a warm refresh, the packed
  Gram products);
* ``"product"``: intermediate mode products; ``"gram"``: tiles of a Gram product; ``"rounding"``: fp32
  EMAs of low-precision factors.

On CPU the buffers are kept for the rest of a step and only grow: a fresh multi-MiB tensor costs
page faults on every use there (measured ~20% on a bucket-sized ``bmm``), so the buckets of a step
share one set. :meth:`Workspace.release` drops them at the end of the step (the executor calls it),
so nothing of the scratch stays allocated between steps. On accelerators a new tensor is taken per
use: the caching allocator already reuses the memory.

The index tensors of packed symmetric storage (:mod:`.packing`, one pair per matrix size) are the
only thing kept between steps: made once (:meth:`Workspace.reserve_indices`, at construction, so
the planner's resident bytes are exact from the start) and dropped too by
``release(indices=True)`` (``release_buffers_between_steps=True``: remade at every step).
"""

from __future__ import annotations

import torch

from .packing import pack_index, unpack_index


class Workspace:
    """Named flat scratch buffers (contents undefined on every call) and packing indices."""

    def __init__(self, device: torch.device, keep: bool | None = None) -> None:
        self.device = device
        self.keep = device.type == "cpu" if keep is None else keep
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._pack: dict[int, torch.Tensor] = {}
        self._unpack: dict[int, torch.Tensor] = {}

    def buffer(self, name: str, numel: int, dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
        """Elements ``[offset, offset + numel)`` of the buffer ``name`` (yours until its next use).

        ``offset`` places several tensors of one phase in one buffer (e.g. the roots of every dim).
        Uses of one name in different phases of a step share its memory.
        """
        if not self.keep:
            return torch.empty(numel, dtype=dtype, device=self.device)
        buf = self._buffers.get((name, dtype))
        if buf is None or buf.numel() < offset + numel:
            buf = self._buffers[(name, dtype)] = torch.empty(offset + numel, dtype=dtype, device=self.device)
        return buf[offset:offset + numel]

    def pack_index(self, d: int) -> torch.Tensor:
        index = self._pack.get(d)
        if index is None:
            index = self._pack[d] = pack_index(d, self.device)
        return index

    def unpack_index(self, d: int) -> torch.Tensor:
        index = self._unpack.get(d)
        if index is None:
            index = self._unpack[d] = unpack_index(d, self.device)
        return index

    def reserve_indices(self, dims: set[int]) -> None:
        """Make the packing and unpacking indices of every size in ``dims`` now (kept until released)."""
        for d in sorted(dims):
            self.pack_index(d)
            self.unpack_index(d)

    def release(self, indices: bool = False) -> None:
        """Drop the scratch buffers (end of a step); ``indices``: the packing indices too."""
        self._buffers.clear()
        if indices:
            self._pack.clear()
            self._unpack.clear()

    def nbytes(self) -> int:
        """Bytes held now (kept buffers and indices): memory the optimizer holds besides its state."""
        tensors = [*self._buffers.values(), *self._pack.values(), *self._unpack.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


__all__ = ["Workspace"]
