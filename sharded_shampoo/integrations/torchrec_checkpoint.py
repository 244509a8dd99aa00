"""DCP checkpoints of a DMP model + ``CombinedOptimizer`` (fused sparse + ShardedShampoo dense).

``sharded_shampoo.checkpointing.TrainState`` / ``save_checkpoint`` build on torch's
``get_state_dict(model, optimizer)``, which maps optimizer state to parameters through
``model.named_parameters()`` and ``optimizer.param_groups``. A DMP model's embedding tables are
``ShardedTensor``/``DTensor`` state owned by torchrec's fused optimizer, whose state is not
keyed by those parameters the way torch expects, so that path does not apply. torchrec's own
convention does: ``model.state_dict()`` (sharded tables as ``ShardedTensor``, dense parameters
as plain tensors) and the ``CombinedOptimizer``'s FQN-keyed ``state_dict()``, loaded in place by
``dcp.load`` and then applied with ``load_state_dict``. :class:`DMPTrainState` packages exactly
that as one ``Stateful``, plus ShardedShampoo's plan description and guard key (the same
``shampoo_meta`` entry as ``TrainState``, so ``sharded_shampoo.checkpointing.read_checkpoint_meta``
reads it), so an incompatible checkpoint fails before any tensor is written.

Resharding: DCP re-shards the tables (torchrec's ShardedTensor metadata), and ShardedShampoo's
block keys (``{fqn}.block_{i}``) carry no rank, so each rank of the new world reads the blocks it
owns under the new plan.

Extra values are stored as flat ``extra.<name>`` entries, not as an ``extra`` dict: a rank that
holds no shard of a (table-wise) table misses checkpoint keys, DCP's load planner then assumes a
pre-2.4 checkpoint and re-flattens the state dict the old way, in which a dict of non-tensor
values is one key (``app.extra``) that the checkpoint does not have. A flat key is the same in
both layouts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.stateful import Stateful
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

from sharded_shampoo import ShardedShampoo
from sharded_shampoo.checkpointing import check_compatible, describe, read_checkpoint_meta
from sharded_shampoo.checkpointing.state import check_plan, plan_entries
from sharded_shampoo.checkpointing.storage import APP_KEY, check_extra_keys

from .torchrec_optim import ShampooDenseOptimizer

#: ``extra`` values are stored as flat ``extra.<name>`` entries: the keys TrainState's ``extra`` dict gets
EXTRA_PREFIX = "extra."


def find_shampoo(optimizer: KeyedOptimizer) -> Optional[ShardedShampoo]:
    """The ShardedShampoo inside a ``ShampooDenseOptimizer`` or a ``CombinedOptimizer`` of them (or None)."""
    if isinstance(optimizer, ShampooDenseOptimizer):
        return optimizer.shampoo
    if isinstance(optimizer, CombinedOptimizer):
        found = [s for _, opt in optimizer.optimizers if (s := find_shampoo(opt)) is not None]
        if len(found) > 1:
            raise ValueError("the CombinedOptimizer holds several ShampooDenseOptimizers; checkpoint them with one "
                             "ShardedShampoo over all dense parameters instead.")
        return found[0] if found else None
    return None


class DMPTrainState(Stateful):
    """A DMP model and its keyed optimizer (+ small ``extra`` values) as one DCP ``Stateful``.

    ``dcp.save({"app": DMPTrainState(model, opt)}, checkpoint_id=path)`` and the matching
    ``dcp.load`` work directly; :func:`save_dmp` / :func:`load_dmp` add the compatibility check.
    After a load, ``self.extra`` holds the checkpoint's values for the keys given in ``extra``.
    """

    def __init__(self, model: nn.Module, optimizer: KeyedOptimizer, *,
                 extra: Optional[Mapping[str, Any]] = None) -> None:
        if not isinstance(optimizer, KeyedOptimizer):
            raise TypeError(f"DMPTrainState needs a torchrec KeyedOptimizer (e.g. CombinedOptimizer([model."
                            f"fused_optimizer, ShampooDenseOptimizer(...)])); got {type(optimizer).__name__}.")
        self.model = model
        self.optimizer = optimizer
        self.extra: dict[str, Any] = dict(extra or {})
        shampoo = find_shampoo(optimizer)
        self.description = describe(shampoo) if shampoo is not None else None

    def state_dict(self) -> dict[str, Any]:
        out = plan_entries(self.description)
        out.update(model=self.model.state_dict(), optim=self.optimizer.state_dict())
        # flat "extra.<name>" entries, not an "extra" dict: see the module doc (DCP's pre-2.4 fallback)
        out.update({EXTRA_PREFIX + k: v for k, v in self.extra.items()})
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_plan(state_dict, self.description)
        self.model.load_state_dict(state_dict["model"])
        self.optimizer.load_state_dict(state_dict["optim"])   # torchrec's; ends with post_load_state_dict()
        self.extra.update({k: state_dict[EXTRA_PREFIX + k] for k in self.extra if EXTRA_PREFIX + k in state_dict})


def save_dmp(path: str, model: nn.Module, optimizer: KeyedOptimizer, *,
             extra: Optional[Mapping[str, Any]] = None) -> None:
    """``dcp.save`` of :class:`DMPTrainState` into the directory ``path``; collective over all ranks."""
    dcp.save({APP_KEY: DMPTrainState(model, optimizer, extra=extra)}, checkpoint_id=path)


def load_dmp(path: str, model: nn.Module, optimizer: KeyedOptimizer, *,
             extra: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Load a :func:`save_dmp` checkpoint into a model/optimizer built for the *current* world size.

    The ShardedShampoo plan description is checked first (raising
    ``IncompatibleCheckpointError`` on every rank before any state is touched). Returns the
    checkpoint's ``extra`` values for the keys given in ``extra``.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_dmp: no checkpoint directory {path!r}.")
    state = DMPTrainState(model, optimizer, extra=extra)
    if state.description is not None:
        check_compatible(read_checkpoint_meta(path), state.description, where=f"checkpoint {path!r}")
    check_extra_keys(path, FileSystemReader(path).read_metadata().state_dict_metadata, state.extra)
    dcp.load({APP_KEY: state}, checkpoint_id=path)
    return dict(state.extra)
