"""Distributed checkpointing of ShardedShampoo state with torch.distributed.checkpoint (DCP).

Installed as ``sharded_shampoo.checkpointing`` (the link ``sharded_shampoo/checkpointing`` ->
``../checkpointing``), never as a top-level ``checkpointing`` package, so it cannot collide with
other projects' modules.

Contract: inputs are a model and its optimizer (a ``ShardedShampoo`` is fingerprinted and checked;
any torch optimizer is saved as is) and a directory; outputs DCP checkpoints and loaded state,
all-or-nothing on every rank. May import ``sharded_shampoo``'s public API, ``config``,
``_torch_compat`` and ``compute.packing`` (the packed layout of symmetric state, so a checkpoint of
the other layout is read as saved); nothing else in the library imports it.

- :func:`save_checkpoint` / :func:`load_checkpoint`: the crash-safe, verified pair (``step_N``
  directories with per-item checksums, private temporary directories and an atomic publish that
  is safe with several concurrent writers, an atomically moved ``latest`` pointer, all-or-nothing
  loads that unpickle nothing but data; ``async_=True`` for ``dcp.async_save``);
- :class:`TrainState`: the model + optimizer as a DCP ``Stateful`` for ``dcp.save``/``dcp.load``;
- :func:`describe` / :func:`check_compatible`: the plan fingerprint and its readable diff;
- :class:`LayoutAdaptingLoadPlanner`: for a plain ``dcp.load`` of a checkpoint written with the other
  ``symmetric_packing`` setting (or before packing); :func:`load_checkpoint` needs none;
- :func:`verify_checkpoint`: check every byte of a checkpoint against its checksums, offline;
- :func:`check_pickles`: check, offline and without checksums, that no pickled part of a checkpoint
  names anything but data (before a loader that unpickles without restriction, e.g. stock ``dcp.load``);
- the error classes of :mod:`.errors` (all ``Exception`` subclasses of :class:`CheckpointError`).

See docs/checkpointing.md.
"""

from .compat import LayoutAdaptingLoadPlanner, check_compatible, describe, differences, fingerprint
from .directory import latest_checkpoint, list_checkpoints
from .errors import (CheckpointArgumentError, CheckpointCorruptError, CheckpointError, CheckpointLoadError,
                     CheckpointNotFoundError, CheckpointPointerError, CheckpointSaveError, ConcurrentSaveError,
                     IncompatibleCheckpointError, MissingExtraError, UnsafeCheckpointError, UnverifiedCheckpointWarning)
from .integrity import verify_checkpoint
from .safe_pickle import check_pickles
from .state import HyperparameterSource, TrainState
from .storage import (SaveHandle, load_checkpoint, read_checkpoint_meta, resolve_checkpoint, save_checkpoint,
                      wait_pending)

__all__ = [
    "CheckpointArgumentError", "CheckpointCorruptError", "CheckpointError", "CheckpointLoadError",
    "CheckpointNotFoundError", "CheckpointPointerError", "CheckpointSaveError", "ConcurrentSaveError",
    "HyperparameterSource", "IncompatibleCheckpointError", "LayoutAdaptingLoadPlanner", "MissingExtraError",
    "SaveHandle", "TrainState", "UnsafeCheckpointError", "UnverifiedCheckpointWarning", "check_compatible",
    "check_pickles", "describe",
    "differences", "fingerprint", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "read_checkpoint_meta",
    "resolve_checkpoint", "save_checkpoint", "verify_checkpoint", "wait_pending",
]
