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

:func:`save_dmp` / :func:`load_dmp` are ``sharded_shampoo.checkpointing``'s one save and one load
(:mod:`sharded_shampoo.checkpointing.saving`, :mod:`~sharded_shampoo.checkpointing.loading`) applied
to a :class:`DMPTrainState`, so a torchrec checkpoint gets the same guarantees as
``save_checkpoint``'s: per-item checksums verified on load (``verify_checkpoint`` works on it), a
private temporary directory and an atomic publish that is safe with concurrent writers, an
all-or-nothing load that raises ``CheckpointError`` subclasses, and no code run from its pickles.
With ``save_param_groups(True)`` the ShardedShampoo config objects in the saved param groups are
stored as plain dicts, so the checkpoint holds only data.

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
import re
from collections.abc import Mapping
from typing import Any, Optional

from torch import nn
from torch.distributed.checkpoint.stateful import Stateful
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

from sharded_shampoo import ShardedShampoo
from sharded_shampoo.checkpointing import describe
from sharded_shampoo.checkpointing.loading import load_state
from sharded_shampoo.checkpointing.saving import Target, save_state
from sharded_shampoo.checkpointing.state import GUARD_PREFIX, check_extra, check_plan, plan_entries

from .torchrec_optim import ShampooDenseOptimizer, plain_param_groups

#: ``extra`` values are stored as flat ``extra.<name>`` entries: the keys TrainState's ``extra`` dict gets
EXTRA_PREFIX = "extra."
_STEP_DIR = re.compile(r"^step_(\d+)$")


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
    ``dcp.load`` work directly; :func:`save_dmp` / :func:`load_dmp` add checksums, an atomic
    publish, verification, the compatibility check and an all-or-nothing load. After a load,
    ``self.extra`` holds the checkpoint's values for the keys given in ``extra``. ``extra`` values
    must each be one DCP entry (see ``sharded_shampoo.checkpointing.state.check_extra``): a dict is
    refused here, at construction, because it could be saved but never loaded back.
    """

    def __init__(self, model: nn.Module, optimizer: KeyedOptimizer, *,
                 extra: Optional[Mapping[str, Any]] = None) -> None:
        if not isinstance(optimizer, KeyedOptimizer):
            raise TypeError(f"DMPTrainState needs a torchrec KeyedOptimizer (e.g. CombinedOptimizer([model."
                            f"fused_optimizer, ShampooDenseOptimizer(...)])); got {type(optimizer).__name__}.")
        check_extra(extra)
        self.model = model
        self.optimizer = optimizer
        self.extra: dict[str, Any] = dict(extra or {})
        shampoo = find_shampoo(optimizer)
        self.description = describe(shampoo) if shampoo is not None else None

    def describe(self) -> Optional[dict[str, Any]]:
        """The dense ShardedShampoo's plan description (None without one)."""
        return self.description

    def guard_key(self) -> Optional[str]:
        return None if self.description is None else GUARD_PREFIX + self.description["fingerprint"]

    def state_dict(self) -> dict[str, Any]:
        out = plan_entries(self.description)
        optim = self.optimizer.state_dict()
        if "param_groups" in optim:       # save_param_groups(True): configs as data, not pickled classes
            optim = {**optim, "param_groups": plain_param_groups(optim["param_groups"], plain=True)}
        out.update(model=self.model.state_dict(), optim=optim)
        # flat "extra.<name>" entries, not an "extra" dict: see the module doc (DCP's pre-2.4 fallback)
        out.update({EXTRA_PREFIX + k: v for k, v in self.extra.items()})
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_plan(state_dict, self.description)
        self.model.load_state_dict(state_dict["model"])
        optim = state_dict["optim"]
        if "param_groups" in optim:
            optim = {**optim, "param_groups": plain_param_groups(optim["param_groups"], plain=False)}
        self.optimizer.load_state_dict(optim)   # torchrec's; ends with post_load_state_dict()
        self.extra.update({k: state_dict[EXTRA_PREFIX + k] for k in self.extra if EXTRA_PREFIX + k in state_dict})


def save_dmp(path: str, model: nn.Module, optimizer: KeyedOptimizer, *,
             extra: Optional[Mapping[str, Any]] = None, checksums: bool = True) -> str:
    """Save :class:`DMPTrainState` as the checkpoint directory ``path``; collective over all ranks.

    The same save as ``sharded_shampoo.checkpointing.save_checkpoint``: written into a private
    ``{path}.tmp-<id>``, every item checksummed, published by an atomic rename (an older
    checkpoint at ``path`` is replaced only once the new one is complete; one another job
    published meanwhile is never replaced: this save raises ``ConcurrentSaveError``). No
    ``latest`` pointer is written. ``extra`` values that could not be loaded back (dicts, lists
    holding tensors) raise ``CheckpointArgumentError`` before anything is written. Any failure
    raises a ``CheckpointSaveError`` on every rank. Returns the absolute path of the checkpoint.
    """
    root, name = os.path.split(os.path.abspath(path))
    step = _STEP_DIR.match(name)
    target = Target(root, name, int(step.group(1)) if step else None, pointer=False, checksums=checksums)
    return save_state(target, lambda: DMPTrainState(model, optimizer, extra=extra)).wait()


def load_dmp(path: str, model: nn.Module, optimizer: KeyedOptimizer, *,
             extra: Optional[Mapping[str, Any]] = None, verify: bool = True) -> dict[str, Any]:
    """Load a :func:`save_dmp` checkpoint into a model/optimizer built for the *current* world size.

    The same load as ``sharded_shampoo.checkpointing.load_checkpoint``: the ShardedShampoo plan
    description and the ``extra`` keys are checked first, every byte is verified against its
    checksum, nothing pickled runs code, and the live tables, dense parameters and optimizer
    states change only once every rank has read and verified everything. Any failure raises a
    ``CheckpointLoadError`` subclass (an ``Exception``) on every rank with everything unchanged:
    ``IncompatibleCheckpointError``, ``MissingExtraError``, ``CheckpointCorruptError``,
    ``CheckpointNotFoundError`` (a ``FileNotFoundError``), ... A checkpoint without checksums (an
    older ``save_dmp``, plain ``dcp.save``) loads with an ``UnverifiedCheckpointWarning``. Returns the
    checkpoint's ``extra`` values for the keys given in ``extra``.
    """
    return load_state(path, lambda keys: DMPTrainState(model, optimizer, extra=extra), verify=verify)
