"""A bucket's state layout: the kind's fields plus the fields every block has, and their allocation.

Every block, whatever its kind, has ``step`` and ``root_failures`` (int64 counters), ``grafting``
(the diagonal second moment of AdaGrad/RMSprop/Adam grafting) and ``filtered_grad`` (the first
moment, when ``beta1 > 0``). The planner's byte count (``planning/costs.py``) and the bucket's
allocation both go through :func:`block_fields`, so they cannot disagree (and the planner prices the
packing index tables a rank keeps with :func:`~..packing.index_bytes`, re-exported here).
"""

from __future__ import annotations

from typing import Optional

import torch

from ...config import STATEFUL_GRAFTING_TYPES, GraftingConfig
from ..packing import index_bytes, packed_identity
from .protocol import Init, PreconditionerKind, StateField

#: Per-block counters: block step and consecutive failed refreshes (int64 each).
COUNTER_FIELDS = ("step", "root_failures")


def common_fields(shape: tuple[int, ...], dtype: torch.dtype, grafting: Optional[GraftingConfig],
                  has_filtered_grad: bool) -> list[StateField]:
    """The fields every block has besides its kind's (in the order ``optimizer.state`` shows them)."""
    out = [StateField(name, (), torch.int64, Init.ZEROS, "counters") for name in COUNTER_FIELDS]
    if isinstance(grafting, STATEFUL_GRAFTING_TYPES):
        out.append(StateField("grafting", shape, dtype, Init.ZEROS, "grafting"))
    if has_filtered_grad:
        out.append(StateField("filtered_grad", shape, dtype, Init.ZEROS, "filtered_grad"))
    return out


def block_fields(kind: PreconditionerKind, grafting: Optional[GraftingConfig],
                 has_filtered_grad: bool) -> list[StateField]:
    """Every field of one block: counters first, the kind's, then grafting and the filtered gradient."""
    common = common_fields(kind.shape, kind.moment_dtype, grafting, has_filtered_grad)
    fields = common[:len(COUNTER_FIELDS)] + kind.fields() + common[len(COUNTER_FIELDS):]
    names = [f.name for f in fields]
    if len(set(names)) != len(names):
        raise ValueError(f"{type(kind).__name__} declares a state field whose name is taken: {names}.")
    return fields


def allocate(fields: list[StateField], num_blocks: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One stacked tensor ``[num_blocks, *stored_shape]`` per field, at its initial value."""
    out = {}
    for f in fields:
        shape = (num_blocks, *f.stored_shape)
        if f.init == Init.ZEROS:
            out[f.name] = torch.zeros(shape, dtype=f.dtype, device=device)
        elif f.init == Init.ONES:
            out[f.name] = torch.ones(shape, dtype=f.dtype, device=device)
        else:
            d = f.shape[0]
            one = packed_identity(d, f.dtype, device) if f.packed else torch.eye(d, dtype=f.dtype, device=device)
            out[f.name] = one.repeat(num_blocks, *([1] * one.ndim))
    return out


__all__ = ["COUNTER_FIELDS", "allocate", "block_fields", "common_fields", "index_bytes"]
