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

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

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


def _box(shape: Sequence[int], batch: Sequence[int], groups: list[list[int]],
         ranges: Sequence[tuple[int, int]]) -> Region:
    """The original-dims box of one block: batch index, chunk on single-dim groups, full elsewhere."""
    box = [(0, int(d)) for d in shape]
    for i, index in enumerate(batch):
        box[i] = (index, index + 1)
    for group, rng in zip(groups, ranges):
        if len(group) == 1:
            box[group[0]] = rng
    return tuple(box)


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
    nb = blocking.batch_dims
    if nb and len(shape) <= nb:
        raise ValueError(f"parameter {name!r} of shape {shape} has no dims left after BlockingConfig.batch_dims="
                         f"{nb}; put it in a param group with fewer batch dims (e.g. batch_dims=0).")
    offset = [nb + i for i in range(len(shape) - nb)]
    inner = shape[nb:]
    groups = [[offset[i] for i in g] for g in _merge_groups(inner, max_preconditioner_dim, blocking.merge_dims,
                                                             min_block_order(preconditioner))]
    merged = tuple(math.prod(shape[i] for i in g) for g in groups)
    check_block_order(name, shape, merged, max_preconditioner_dim, preconditioner, blocking)
    grid = [_chunks(d, max_preconditioner_dim) for d in merged]
    exponents = block_exponents(len(merged), preconditioner, blocking)
    blocks: list[Block] = []
    for batch in itertools.product(*(range(d) for d in shape[:nb])):
        for ranges in itertools.product(*grid):
            blocks.append(Block(block_id=f"{name}.block_{len(blocks)}", param_name=name, param_shape=shape,
                                merged_shape=merged, ranges=tuple(ranges), exponents=exponents,
                                box=_box(shape, batch, groups, ranges)))
    return blocks


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
