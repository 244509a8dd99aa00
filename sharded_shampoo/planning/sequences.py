"""Read-only sequences a plan hands out without building one object per block up front.

A 405B model has 391,120 blocks; building a :class:`~.blocking.Block` (or a list of references)
for each one dominated the planner. :class:`LazyBlocks` builds a block from its parameter's
:class:`~.blocking.BlockGrid` the first time it is read and keeps it; :class:`IndexedList`
reads ``values[index[i]]`` (per-block costs that a handful of shapes share).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar, overload

import numpy as np

from .blocking import Block, BlockGrid

T = TypeVar("T")


class SequenceView(Sequence[T], Generic[T]):
    """A read-only sequence defined by ``len`` and :meth:`item`; compares equal to equal sequences."""

    def item(self, i: int) -> T:
        raise NotImplementedError

    @overload
    def __getitem__(self, i: int) -> T: ...

    @overload
    def __getitem__(self, i: slice) -> list[T]: ...

    def __getitem__(self, i: int | slice) -> T | list[T]:
        n = len(self)
        if isinstance(i, slice):
            return [self.item(j) for j in range(*i.indices(n))]
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} items.")
        return self.item(i)

    def __iter__(self) -> Iterator[T]:
        return (self.item(i) for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]


class LazyBlocks(SequenceView[Block]):
    """The blocks of every parameter, in parameter order then block order, built on first access."""

    def __init__(self, grids: Sequence[BlockGrid], offsets: Sequence[int]) -> None:
        self.grids = list(grids)
        self.offsets = list(offsets)              # len(grids) + 1 running totals
        self.built: list[Block | None] = [None] * self.offsets[-1]

    def __len__(self) -> int:
        return self.offsets[-1]

    def item(self, i: int) -> Block:
        b = self.built[i]
        if b is None:
            k = bisect.bisect_right(self.offsets, i) - 1
            b = self.built[i] = self.grids[k].block(i - self.offsets[k])
        return b

    def __repr__(self) -> str:
        return f"LazyBlocks({len(self)} blocks of {len(self.grids)} parameters)"


class IndexedList(SequenceView[T]):
    """``values[index[i]]`` for every ``i``: many positions sharing few values."""

    def __init__(self, values: Sequence[T], index: np.ndarray) -> None:
        self.values = list(values)
        self.positions = index

    def __len__(self) -> int:
        return len(self.positions)

    def item(self, i: int) -> T:
        return self.values[int(self.positions[i])]

    def __iter__(self) -> Iterator[T]:
        values = self.values
        return (values[j] for j in self.positions.tolist())

    def __repr__(self) -> str:
        return f"IndexedList({len(self)} items, {len(self.values)} distinct)"


__all__ = ["IndexedList", "LazyBlocks", "SequenceView"]
