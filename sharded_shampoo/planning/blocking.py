"""Blocking planner: a parameter's *global* shape -> preconditioner blocks.

Pure functions of shapes and config. Blocks never depend on world size or shard boundaries,
so the math of a step is identical on 1 or 1024 ranks, and the block ids
(``"{fqn}.block_{i}"``) are stable keys for checkpoints.

The procedure, per parameter:
1. squeeze: drop size-1 dims (a 0-d or all-ones shape becomes ``(1,)``);
2. merge: fold consecutive dims, last dim first, while their product stays <= ``max_preconditioner_dim``;
3. split: cut each merged dim into chunks of at most ``max_preconditioner_dim``.
Blocks are numbered in row-major order over the chunk grid.

The merged view is a pure reshape of the contiguous parameter, and merging always keeps
the leading original dim inside merged dim 0, so a ``Shard(0)`` shard of the parameter is a
contiguous range of merged dim 0. Routing relies on that.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import BlockingConfig, PreconditionerConfig, default_exponent


@dataclass(frozen=True)
class Block:
    """One preconditioner block: a box of a parameter's merged view.

    ``ranges`` are half-open index ranges, one per merged dim; ``exponents`` holds the
    inverse exponent per block dim, 0 where the dim is not preconditioned (no factor).
    """

    block_id: str
    param_name: str
    param_shape: tuple[int, ...]
    merged_shape: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]
    exponents: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.ranges)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def order(self) -> int:
        return len(self.ranges)

    @property
    def factor_dims(self) -> tuple[int, ...]:
        """Sizes of the dims that carry a Kronecker factor (exponent != 0)."""
        return tuple(d for d, e in zip(self.shape, self.exponents) if e != 0)

    @property
    def factor_shapes(self) -> tuple[tuple[int, int], ...]:
        return tuple((d, d) for d in self.factor_dims)

    @property
    def preconditioned(self) -> bool:
        return any(e != 0 for e in self.exponents)

    @property
    def param_rows(self) -> tuple[int, int]:
        """The merged-dim-0 range this block covers (what a Shard(0) holder must own)."""
        return self.ranges[0]


def merged_shape(shape: Sequence[int], max_preconditioner_dim: int, merge_dims: bool = True) -> tuple[int, ...]:
    """Squeeze size-1 dims, then merge consecutive dims, from the last dim backwards, while the
    product fits the limit (the reference implementation's rule, so blocks match it).

    Every merged dim is a contiguous group of original dims and the first group starts at dim 0,
    so a ``Shard(0)`` shard is still a whole number of merged-dim-0 rows.
    """
    squeezed = [int(d) for d in shape if d != 1] or [1]
    if not merge_dims:
        return tuple(squeezed)
    out = [squeezed[-1]]
    for d in reversed(squeezed[:-1]):
        if out[-1] * d <= max_preconditioner_dim:
            out[-1] *= d
        else:
            out.append(d)
    return tuple(reversed(out))


def _chunks(size: int, limit: int) -> list[tuple[int, int]]:
    return [(start, min(start + limit, size)) for start in range(0, size, limit)]


def plan_parameter_blocks(
    name: str,
    shape: Sequence[int],
    max_preconditioner_dim: int,
    preconditioner: PreconditionerConfig,
    blocking: BlockingConfig = BlockingConfig(),
) -> list[Block]:
    """All blocks of one parameter, in a deterministic order. Empty for a 0-element parameter."""
    shape = tuple(int(d) for d in shape)
    if any(d == 0 for d in shape):
        return []
    merged = merged_shape(shape, max_preconditioner_dim, blocking.merge_dims)
    grid = [_chunks(d, max_preconditioner_dim) for d in merged]
    order = len(merged)
    if order == 1 and not blocking.precondition_1d:
        exponents = (0.0,)
    else:
        exponents = tuple(default_exponent(preconditioner, order, dim) for dim in range(order))
    return [
        Block(block_id=f"{name}.block_{i}", param_name=name, param_shape=shape, merged_shape=merged,
              ranges=tuple(ranges), exponents=exponents)
        for i, ranges in enumerate(itertools.product(*grid))
    ]


def plan_blocks(
    named_shapes: Sequence[tuple[str, Sequence[int]]],
    max_preconditioner_dim: int,
    preconditioner: PreconditionerConfig,
    blocking: BlockingConfig = BlockingConfig(),
) -> list[Block]:
    """Blocks of many parameters, in parameter order then block order."""
    if not isinstance(max_preconditioner_dim, int) or isinstance(max_preconditioner_dim, bool) \
            or max_preconditioner_dim < 1:
        raise ValueError(f"max_preconditioner_dim must be an integer >= 1; got {max_preconditioner_dim!r}.")
    names = [n for n, _ in named_shapes]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"parameter names must be unique to give blocks stable ids; duplicated: {dup}.")
    blocks: list[Block] = []
    for name, shape in named_shapes:
        blocks.extend(plan_parameter_blocks(name, shape, max_preconditioner_dim, preconditioner, blocking))
    return blocks
