"""Crash-safe, verified save/load of model + ShardedShampoo with DCP: ``save_checkpoint`` / ``load_checkpoint``.

Both are the package's one save and one load (:mod:`.saving`, :mod:`.loading`) applied to a
:class:`.state.TrainState` (the torchrec integration applies them to its ``DMPTrainState``):

- save (collective): each save writes into its own locked ``step_N.tmp-<id>``, every rank
  checksums what it wrote, rank 0 publishes the directory atomically as ``step_N`` -- never
  replacing a checkpoint another save published meanwhile -- and moves ``latest``;
- load (collective): verify, then read into staging buffers, then apply; every failure raises a
  :class:`.errors.CheckpointLoadError` on every rank with model and optimizer unchanged, and no
  pickled part of the checkpoint can run code (:mod:`.safe_pickle`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn

from .errors import CheckpointArgumentError
from .loading import check_extra_keys, load_state, read_checkpoint_meta, resolve_checkpoint
from .saving import APP_KEY, SaveHandle, Target, save_state, wait_pending
from .state import TrainState

__all__ = ["APP_KEY", "SaveHandle", "check_extra_keys", "load_checkpoint", "read_checkpoint_meta",
           "resolve_checkpoint", "save_checkpoint", "wait_pending"]


def _check_save_args(step: Any, keep_last: Any) -> None:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointArgumentError(f"save_checkpoint step must be an integer >= 0; got {step!r}.")
    if keep_last is not None and (not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1):
        raise CheckpointArgumentError(f"save_checkpoint keep_last must be None or an integer >= 1; got {keep_last!r}.")


def save_checkpoint(checkpoint_dir: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                    extra: Optional[Mapping[str, Any]] = None, async_: bool = False,
                    keep_last: Optional[int] = None, flatten_optimizer_state_dict: bool = True,
                    checksums: bool = True) -> SaveHandle:
    """Save model + optimizer (+ ``extra``) as ``checkpoint_dir/step_{step}``; collective over all ranks.

    Each rank writes only the optimizer blocks it owns and the shards it holds. Returns a
    :class:`SaveHandle`; for a synchronous save it is already finished (``latest`` moved), for
    ``async_=True`` call ``handle.wait()`` (or the next save or load does). ``keep_last`` deletes
    the checkpoints saved before the newest ``keep_last`` (by save order, not step number).
    ``checksums=False`` skips writing ``checksums.json`` (loads then cannot verify the bytes).
    Any failure raises :class:`.errors.CheckpointSaveError` (or ``CheckpointArgumentError``) on
    every rank; ``latest`` and every published checkpoint are then unchanged. Another job saving
    the same step into the same directory at the same time makes one of the two raise
    :class:`.errors.ConcurrentSaveError`; the other's checkpoint is published complete.
    """
    target = Target(os.path.abspath(checkpoint_dir), f"step_{step}", step, pointer=True, keep_last=keep_last,
                    checksums=checksums)

    def make_state() -> TrainState:
        _check_save_args(step, keep_last)
        return TrainState(model, optimizer, extra=extra, flatten_optimizer_state_dict=flatten_optimizer_state_dict)

    return save_state(target, make_state, async_=async_)


def _is_nested(keys: Any) -> bool:
    """Was the optimizer state saved nested? Only the nested layout stores a group's ``params`` list
    (``param_groups.{i}.params``); the flattened one stores ``param_groups.{fqn}.{key}`` without it."""
    pattern = re.compile(rf"^{APP_KEY}\.optim\.param_groups\.\d+\.params$")
    return any(pattern.match(k) for k in keys)


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                    extra: Optional[Mapping[str, Any]] = None, hyperparameters: str = "checkpoint",
                    verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (or ``dcp.save({"app": TrainState(...)})``).

    ``path``: a checkpoint directory (follows ``latest``) or one ``step_N`` directory. Works on
    any world size and mesh: each rank reads exactly the blocks it owns now and its shards of the
    model and momentum. Before any byte is read: the plan fingerprint (a mismatch raises
    :class:`.errors.IncompatibleCheckpointError`), the ``extra`` keys, ``.metadata``'s checksum
    and the presence and sizes of the files. While reading: every item's checksum. Any failure
    raises a :class:`.errors.CheckpointLoadError` on every rank with model and optimizer unchanged.
    A checkpoint without checksums loads with an :class:`.errors.UnverifiedCheckpointWarning`
    (``verify=False`` skips verification silently). Nothing in the checkpoint is unpickled except
    through :mod:`.safe_pickle` (a crafted pickle raises :class:`.errors.UnsafeCheckpointError`,
    having run nothing). Returns the ``extra`` values read.
    """
    def make_state(keys: Mapping[str, Any]) -> TrainState:
        return TrainState(model, optimizer, extra=extra, flatten_optimizer_state_dict=not _is_nested(keys),
                          hyperparameters=hyperparameters)

    return load_state(path, make_state, verify=verify)
