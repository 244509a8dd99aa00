"""Blocking planner: a parameter's *global* shape -> preconditioner blocks.

Pure functions of shapes and config. Blocks never depend on world size or shard boundaries,
so the math of a step is the same on 1 or 1024 ranks, and the block ids (``"{fqn}.block_{i}"``)
are stable keys for checkpoints.

The procedure, per parameter:
0. batch dims: the first ``BlockingConfig.batch_dims`` dims index independent matrices (MoE
   expert weights ``[E, d_in, d_out]`` with ``batch_dims=1``): each index gets its own blocks;
1. squeeze: drop size-1 dims of the rest (a 0-d or all-ones shape becomes ``(1,)``);
2. merge: fold consecutive dims, last dim first, while their product stays <= ``max_preconditioner_dim``;
3. split: cut each merged dim into chunks of at most ``max_preconditioner_dim``.
Blocks are numbered in row-major order over (batch index, chunk grid).

A merged dim of several original dims is never split (it fits the limit), so every block is a
*box* of the original tensor (``Block.box``): a full range on merged or squeezed dims, a chunk on
a split dim, one index on a batch dim. Routing intersects these boxes with the regions ranks
hold (``layout.py``), whatever the placements.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..config import BlockingConfig, PreconditionerConfig, default_exponent
from .layout import Region


@dataclass(frozen=True)
class Block:
    """One preconditioner block.

    ``ranges`` are half-open index ranges, one per *merged* dim (the block's tensor order);
    ``box`` is the same block as ranges of the parameter's original dims; ``exponents`` holds
    the inverse exponent per block dim, 0 where the dim is not preconditioned (no factor).
    """

    block_id: str
    param_name: str
    param_shape: tuple[int, ...]
    merged_shape: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]
    exponents: tuple[float, ...]
    box: Region = ()

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
    def preconditioned(self) -> bool:
        return any(e != 0 for e in self.exponents)

    @property
    def box_shape(self) -> tuple[int, ...]:
        """The block seen in the parameter's original dims (a row-major view of ``shape``)."""
        return tuple(b - a for a, b in self.box)


def _merge_groups(shape: Sequence[int], max_preconditioner_dim: int, merge_dims: bool,
                  min_order: int = 1) -> list[list[int]]:
    """Groups of original dim indices forming each merged dim (size-1 dims dropped).

    Merges from the last dim backwards while the product fits the limit and at least ``min_order``
    dims remain (the reference implementation's rule with its ``target_parameter_dimensionality``, so
    blocks match it). An all-ones shape gives one empty group (size 1).
    """
    kept = [i for i, d in enumerate(shape) if d != 1]
    if not kept:
        return [[]]
    if not merge_dims:
        return [[i] for i in kept]
    groups = [[kept[-1]]]
    size = shape[kept[-1]]
    for left, i in enumerate(reversed(kept[:-1])):
        unplaced = len(kept) - 1 - left          # dims not in a group yet, i included
        if size * shape[i] <= max_preconditioner_dim and len(groups) + unplaced > min_order:
            groups[-1].insert(0, i)
            size *= shape[i]
        else:
            groups.append([i])
            size = shape[i]
    return list(reversed(groups))


def merged_shape(shape: Sequence[int], max_preconditioner_dim: int, merge_dims: bool = True,
                 min_order: int = 1) -> tuple[int, ...]:
    """Squeeze size-1 dims, then merge consecutive dims from the last backwards while the product fits
    (and at least ``min_order`` dims remain)."""
    shape = [int(d) for d in shape]
    groups = _merge_groups(shape, max_preconditioner_dim, merge_dims, min_order)
    return tuple(math.prod(shape[i] for i in g) for g in groups)


def min_block_order(preconditioner: PreconditionerConfig) -> int:
    """The order merging stops at: the kind's required block order (spectral descent: 2), else 1."""
    return getattr(preconditioner, "block_order", None) or 1


def check_block_order(name: str, shape: tuple[int, ...], merged: tuple[int, ...], max_preconditioner_dim: int,
                      preconditioner: PreconditionerConfig, blocking: BlockingConfig) -> None:
    """Raise, naming the parameter and the fix, if its blocks have an order ``preconditioner`` cannot handle."""
    need = getattr(preconditioner, "block_order", None)
    if need is None or len(merged) == need or (len(merged) == 1 and not blocking.precondition_1d):
        return
    kind = type(preconditioner).__name__
    where = f"parameter {name!r} of shape {shape} gives {len(merged)}-D blocks (merged shape {merged})"
    if len(merged) < need:
        raise ValueError(
            f"{where}; {kind} needs {need}-D blocks. Put such parameters (biases, norms, size-1 dims squeeze away) "
            f"in a param group of their own with another preconditioner, or set blocking=BlockingConfig("
            f"precondition_1d=False) on this group so its 1-D blocks use the grafting method (e.g. "
            f"grafting=AdamGrafting()).")
    inner = [d for d in shape[blocking.batch_dims:] if d != 1]
    fix = (f"raise max_preconditioner_dim (now {max_preconditioner_dim}) to at least {math.prod(inner[1:])} so "
           "the trailing dims merge into one") if blocking.merge_dims else "set BlockingConfig(merge_dims=True)"
    raise ValueError(f"{where}; {kind} needs {need}-D blocks: {fix}, use BlockingConfig(batch_dims=1) for stacked "
                     "expert weights [E, d_in, d_out], or put it in a param group with another preconditioner.")


def block_exponents(order: int, preconditioner: PreconditionerConfig, blocking: BlockingConfig) -> tuple[float, ...]:
    """Inverse exponent of each dim of an order-``order`` block (the one home of this rule)."""
    if order == 1 and not blocking.precondition_1d:
        return (0.0,)
    return tuple(default_exponent(preconditioner, order, dim) for dim in range(order))


def _chunks(size: int, limit: int) -> list[tuple[int, int]]:
    return [(start, min(start + limit, size)) for start in range(0, size, limit)]


@dataclass(frozen=True)
class BlockGrid:
    """All blocks of one parameter as a row-major grid over (batch index, chunk of each merged dim).

    The planner works per grid, not per block: a grid's cells have at most ``2 ** order`` distinct
    shapes (full chunks and one remainder per merged dim), so prices, balance classes and tallies
    are computed per shape with arrays, and a :class:`Block` object is built only on request
    (:meth:`block`). ``groups[i]`` lists the original dims merged into merged dim ``i``.
    """

    name: str
    param_shape: tuple[int, ...]
    batch_shape: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]
    merged_shape: tuple[int, ...]
    max_dim: int
    exponents: tuple[float, ...]

    @property
    def counts(self) -> tuple[int, ...]:
        """Chunks per merged dim."""
        return tuple(-(-m // self.max_dim) for m in self.merged_shape)

    @property
    def cells(self) -> int:
        """Blocks per batch index."""
        return math.prod(self.counts)

    @property
    def num_blocks(self) -> int:
        if any(d == 0 for d in self.param_shape):
            return 0
        return math.prod(self.batch_shape) * self.cells

    def ranges(self, index: int) -> tuple[tuple[int, int], ...]:
        """The merged-dim ranges of block ``index``."""
        cell = index % self.cells
        out = []
        for m, n in zip(reversed(self.merged_shape), reversed(self.counts)):
            j = cell % n
            cell //= n
            out.append((j * self.max_dim, min((j + 1) * self.max_dim, m)))
        return tuple(reversed(out))

    def box(self, index: int) -> Region:
        """Block ``index`` as ranges of the parameter's original dims."""
        box = [(0, d) for d in self.param_shape]
        rest = index // self.cells
        for i in reversed(range(len(self.batch_shape))):
            b = rest % self.batch_shape[i]
            rest //= self.batch_shape[i]
            box[i] = (b, b + 1)
        for group, rng in zip(self.groups, self.ranges(index)):
            if len(group) == 1:
                box[group[0]] = rng
        return tuple(box)

    def block(self, index: int) -> Block:
        """The :class:`Block` at ``index`` (``0 <= index < num_blocks``)."""
        if not 0 <= index < self.num_blocks:
            raise IndexError(f"block index {index} out of range for {self.num_blocks} blocks of {self.name!r}.")
        return Block(block_id=f"{self.name}.block_{index}", param_name=self.name, param_shape=self.param_shape,
                     merged_shape=self.merged_shape, ranges=self.ranges(index), exponents=self.exponents,
                     box=self.box(index))

    def shape_classes(self) -> tuple[list[int], "np.ndarray"]:
        """``(first block index of each distinct block shape, shape class of every block)``.

        A merged dim has full chunks and at most one shorter last chunk, so the class of a cell is
        the set of dims where it is that last chunk; classes are numbered by first appearance.
        """
        n = self.num_blocks
        if n == 0:
            return [], np.zeros(0, dtype=np.int64)
        code = np.zeros(self.counts, dtype=np.int64)
        for d, (m, count) in enumerate(zip(self.merged_shape, self.counts)):
            last = np.zeros(count, dtype=np.int64)
            if m % self.max_dim and count > 1:
                last[-1] = 1 << d
            code += last.reshape((-1,) + (1,) * (len(self.counts) - d - 1))
        codes, first, inverse = np.unique(code.ravel(), return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")              # number classes by first appearance
        rank_of = np.empty(len(codes), dtype=np.int64)
        rank_of[order] = np.arange(len(codes))
        per_cell = rank_of[inverse.ravel()]
        return [int(first[i]) for i in order], np.tile(per_cell, n // self.cells)


def block_grid(
    name: str,
    shape: Sequence[int],
    max_preconditioner_dim: int,
    preconditioner: PreconditionerConfig,
    blocking: BlockingConfig = BlockingConfig(),
) -> BlockGrid:
    """The :class:`BlockGrid` of one parameter (see the module doc for the rules)."""
    shape = tuple(int(d) for d in shape)
    nb = blocking.batch_dims
    if nb and len(shape) <= nb and all(shape):
        raise ValueError(f"parameter {name!r} of shape {shape} has no dims left after BlockingConfig.batch_dims="
                         f"{nb}; put it in a param group with fewer batch dims (e.g. batch_dims=0).")
    inner = shape[nb:]
    groups = tuple(tuple(nb + i for i in g)
                   for g in _merge_groups(inner, max_preconditioner_dim, blocking.merge_dims,
                                          min_block_order(preconditioner)))
    merged = tuple(math.prod(shape[i] for i in g) for g in groups)
    if all(shape):
        check_block_order(name, shape, merged, max_preconditioner_dim, preconditioner, blocking)
    return BlockGrid(name=name, param_shape=shape, batch_shape=shape[:nb], groups=groups, merged_shape=merged,
                     max_dim=max_preconditioner_dim, exponents=block_exponents(len(merged), preconditioner, blocking))


def plan_parameter_blocks(
    name: str,
    shape: Sequence[int],
    max_preconditioner_dim: int,
    preconditioner: PreconditionerConfig,
    blocking: BlockingConfig = BlockingConfig(),
) -> list[Block]:
    """All blocks of one parameter, in a deterministic order. Empty for a 0-element parameter."""
    grid = block_grid(name, shape, max_preconditioner_dim, preconditioner, blocking)
    return [grid.block(i) for i in range(grid.num_blocks)]


def check_blocking_inputs(names: Sequence[str], max_preconditioner_dim: int) -> None:
    """The checks every blocking entry point makes: a valid dimension limit and unique names."""
    if not isinstance(max_preconditioner_dim, int) or isinstance(max_preconditioner_dim, bool) \
            or max_preconditioner_dim < 1:
        raise ValueError(f"max_preconditioner_dim must be an integer >= 1; got {max_preconditioner_dim!r}.")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"parameter names must be unique to give blocks stable ids; duplicated: {dup}.")


def plan_blocks(
    named_shapes: Sequence[tuple[str, Sequence[int]]],
    max_preconditioner_dim: int,
    preconditioner: PreconditionerConfig,
    blocking: BlockingConfig = BlockingConfig(),
) -> list[Block]:
    """Blocks of many parameters, in parameter order then block order."""
    check_blocking_inputs([n for n, _ in named_shapes], max_preconditioner_dim)
    blocks: list[Block] = []
    for name, shape in named_shapes:
        blocks.extend(plan_parameter_blocks(name, shape, max_preconditioner_dim, preconditioner, blocking))
    return blocks
