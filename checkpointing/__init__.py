"""Distributed checkpointing of ShardedShampoo state with torch.distributed.checkpoint (DCP).

Installed as ``sharded_shampoo.checkpointing`` (see pyproject ``package-dir``), never as a
top-level ``checkpointing`` package, so it cannot collide with other projects' modules.

- :func:`save_checkpoint` / :func:`load_checkpoint`: the crash-safe, verified pair (``step_N``
  directories with per-item checksums, an atomically moved ``latest`` pointer, all-or-nothing
  loads; ``async_=True`` for ``dcp.async_save``);
- :class:`TrainState`: the model + optimizer as a DCP ``Stateful`` for ``dcp.save``/``dcp.load``;
- :func:`describe` / :func:`check_compatible`: the plan fingerprint and its readable diff;
- :class:`LayoutAdaptingLoadPlanner`: for a plain ``dcp.load`` of a checkpoint written with the other
  ``symmetric_packing`` setting (or before packing); :func:`load_checkpoint` needs none;
- :func:`verify_checkpoint`: check every byte of a checkpoint against its checksums, offline;
- the error classes of :mod:`.errors` (all ``Exception`` subclasses of :class:`CheckpointError`).

See docs/checkpointing.md.
"""

from .compat import LayoutAdaptingLoadPlanner, check_compatible, describe, differences, fingerprint
from .directory import latest_checkpoint, list_checkpoints
from .errors import (CheckpointArgumentError, CheckpointCorruptError, CheckpointError, CheckpointLoadError,
                     CheckpointNotFoundError, CheckpointPointerError, CheckpointSaveError, IncompatibleCheckpointError,
                     MissingExtraError, UnverifiedCheckpointWarning)
from .integrity import verify_checkpoint
from .state import TrainState
from .storage import (SaveHandle, load_checkpoint, read_checkpoint_meta, resolve_checkpoint, save_checkpoint,
                      wait_pending)

__all__ = [
    "CheckpointArgumentError", "CheckpointCorruptError", "CheckpointError", "CheckpointLoadError",
    "CheckpointNotFoundError", "CheckpointPointerError", "CheckpointSaveError", "IncompatibleCheckpointError",
    "LayoutAdaptingLoadPlanner", "MissingExtraError", "SaveHandle", "TrainState", "UnverifiedCheckpointWarning", "check_compatible", "describe",
    "differences", "fingerprint", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "read_checkpoint_meta",
    "resolve_checkpoint", "save_checkpoint", "verify_checkpoint", "wait_pending",
]
