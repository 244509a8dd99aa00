"""Distributed checkpointing of ShardedShampoo state with torch.distributed.checkpoint (DCP).

Installed as ``sharded_shampoo.checkpointing`` (see pyproject ``package-dir``), never as a
top-level ``checkpointing`` package, so it cannot collide with other projects' modules.

- :func:`save_checkpoint` / :func:`load_checkpoint`: the crash-safe pair (``step_N`` directories
  and an atomically moved ``latest`` pointer; ``async_=True`` for ``dcp.async_save``);
- :class:`TrainState`: the model + optimizer as a DCP ``Stateful`` for ``dcp.save``/``dcp.load``;
- :func:`describe` / :func:`check_compatible`: the plan fingerprint and its readable diff.

See docs/checkpointing.md.
"""

from .compat import IncompatibleCheckpointError, check_compatible, describe, differences, fingerprint
from .state import TrainState
from .storage import (SaveHandle, latest_checkpoint, list_checkpoints, load_checkpoint, read_checkpoint_meta,
                      resolve_checkpoint, save_checkpoint, wait_pending)

__all__ = [
    "IncompatibleCheckpointError", "SaveHandle", "TrainState", "check_compatible", "describe", "differences",
    "fingerprint", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "read_checkpoint_meta",
    "resolve_checkpoint", "save_checkpoint", "wait_pending",
]
