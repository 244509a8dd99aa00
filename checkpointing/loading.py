"""The verified, all-or-nothing load of any checkpoint state (collective).

One implementation for every checkpoint this package reads: ``load_checkpoint`` (a
:class:`.state.TrainState`) and the torchrec ``load_dmp`` (a DMP model and its keyed optimizer)
both call :func:`load_state`.

Every rank resolves the checkpoint, verifies ``.metadata`` against its checksum and unpickles it
restrictedly (:mod:`.safe_pickle`), checks the plan fingerprint and the ``extra`` keys, and the
ranks agree; DCP then reads into host staging buffers (:mod:`.staged_load`) through a reader that
checks file sizes before reading and every item's checksum before using it (:mod:`.integrity`),
unpickling small objects with ``weights_only=True``; only when every rank has read everything
does any live tensor change. Every failure raises a :class:`.errors.CheckpointLoadError` on every
rank, with the live state unchanged.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata

from .added_keys import request_without_added_keys
from .compat import check_compatible
from .coordination import agree, as_error
from .directory import LATEST, latest_checkpoint, read_commit
from .errors import (CheckpointCorruptError, CheckpointError, CheckpointLoadError, CheckpointNotFoundError,
                     MissingExtraError, UnverifiedCheckpointWarning)
from .integrity import CHECKSUM_FILE, VerifyingReader, read_checksums
from .saving import APP_KEY, DCP_FAILURES, quiet, wait_pending
from .staged_load import SafeLoadPlanner, StagingLoadPlanner
from .state import META_KEY, CheckpointState


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory from ``path``: itself if it holds a DCP checkpoint, else what its ``latest`` names."""
    if os.path.isfile(os.path.join(path, ".metadata")):
        return path
    target = latest_checkpoint(path)
    if target is None:
        raise CheckpointNotFoundError(
            f"{path!r} is neither a DCP checkpoint (no .metadata) nor a checkpoint directory with a '{LATEST}' "
            "pointer; pass a step_N directory or the --checkpoint-dir used for saving.", path=path)
    if not os.path.isfile(os.path.join(target, ".metadata")):
        raise CheckpointNotFoundError(
            f"{os.path.join(path, LATEST)!r} names {target!r}, which holds no complete checkpoint (missing "
            ".metadata); rewrite the pointer with the name of a complete step_N directory or pass one directly.",
            path=path)
    return target


def open_checkpoint(path: str, verify: bool) -> tuple[str, Metadata, VerifyingReader]:
    """Resolve ``path``; read (and, if it has checksums, verify) ``.metadata``; local, no collectives."""
    ckpt = resolve_checkpoint(path)
    sums = read_checksums(ckpt) if verify else None
    commit = read_commit(ckpt)
    if verify and sums is None and commit is not None and commit.get("checksums"):
        raise CheckpointCorruptError(f"{os.path.join(ckpt, CHECKSUM_FILE)!r} is missing although the checkpoint "
                                     "was saved with checksums; it cannot be verified (pass verify=False to load "
                                     "it anyway).", path=ckpt)
    reader = VerifyingReader(ckpt, sums)
    return ckpt, reader.read_metadata(), reader


def read_checkpoint_meta(path: str, verify: bool = True) -> Optional[dict[str, Any]]:
    """The ShardedShampoo description stored in a checkpoint (None if it has none); local, no collectives."""
    ckpt, metadata, reader = open_checkpoint(path, verify)
    if f"{APP_KEY}.{META_KEY}" not in metadata.state_dict_metadata:
        return None
    box: dict[str, Any] = {APP_KEY: {META_KEY: ""}}
    try:
        with quiet():
            dcp.load(box, storage_reader=reader, planner=SafeLoadPlanner(ckpt), no_dist=True)
    except DCP_FAILURES as e:
        raise as_error(e, CheckpointLoadError, f"reading the plan description of {ckpt!r}", ckpt) from None
    raw = box[APP_KEY][META_KEY]
    if not isinstance(raw, str):
        raise CheckpointCorruptError(f"checkpoint {ckpt!r}: its plan description is a {type(raw).__name__}, not "
                                     "the JSON text a save writes", path=ckpt)
    return json.loads(raw) if raw else None


def check_extra_keys(ckpt: str, keys: Any, wanted: Any) -> None:
    """Every requested ``extra`` value is in the checkpoint (``keys``: its stored keys); else
    :class:`.errors.MissingExtraError` naming what is missing and what it has."""
    prefix = f"{APP_KEY}.extra."
    missing = [k for k in wanted if prefix + k not in keys]
    if missing:
        have = sorted(k[len(prefix):] for k in keys if k.startswith(prefix))
        raise MissingExtraError(f"checkpoint {ckpt!r} has no extra values {missing}; it has {have}.", path=ckpt)


def _check_request(ckpt: str, keys: Any, state: CheckpointState, verify: bool) -> None:
    """The plan fingerprint and the requested ``extra`` keys, before anything is read."""
    guard = state.guard_key()
    if guard is not None and f"{APP_KEY}.{guard}" not in keys:
        live = state.describe()
        assert live is not None                     # a guard key comes with a description
        check_compatible(read_checkpoint_meta(ckpt, verify), live, where=f"checkpoint {ckpt!r}")
    check_extra_keys(ckpt, keys, state.extra or {})


def load_state(path: str, make_state: Callable[[Mapping[str, Any]], CheckpointState], *,
               verify: bool = True) -> dict[str, Any]:
    """Load checkpoint ``path`` into ``make_state(stored keys)`` (see the module doc); collective.

    ``make_state`` receives the checkpoint's stored keys (so it can pick the layout they were
    saved in) and runs inside the agreed phase. Returns the state's ``extra`` values after the load.
    """
    try:
        wait_pending()
    except CheckpointError as e:
        raise CheckpointLoadError(f"a pending asynchronous save failed, so nothing was loaded from {path!r}: {e}",
                                  path=path) from e
    err, ckpt, reader, state, state_dict, restore = None, path, None, None, None, None
    try:
        ckpt, metadata, reader = open_checkpoint(path, verify)
        keys = metadata.state_dict_metadata
        state = make_state(keys)
        _check_request(ckpt, keys, state, verify)
        state_dict = {APP_KEY: state.state_dict()}
        # settings added after the checkpoint was written keep their live value (or their alias's)
        restore = request_without_added_keys(state_dict[APP_KEY], keys, f"{APP_KEY}.")
    except Exception as e:  # noqa: BLE001 - agreed below, raised on every rank
        err = as_error(e, CheckpointLoadError, f"opening checkpoint {path!r}", path)
    agree(err, CheckpointLoadError, ckpt, token=os.path.basename(os.path.normpath(ckpt)), what="checkpoint to load")
    # agree() raised otherwise
    assert reader is not None and state is not None and state_dict is not None and restore is not None
    if verify and reader.checksums is None:
        warnings.warn(f"checkpoint {ckpt!r} has no {CHECKSUM_FILE} (written by plain dcp.save, an older version or "
                      "with checksums=False): its bytes are loaded without verification.", UnverifiedCheckpointWarning,
                      stacklevel=3)
    planner = StagingLoadPlanner(ckpt)
    try:
        with quiet():
            dcp.load(state_dict, storage_reader=reader, planner=planner)
        if reader.checked_reads != reader.planned_reads:
            raise CheckpointLoadError(f"the verifying reader saw {reader.checked_reads} of {reader.planned_reads} "
                                      "reads; this torch version bypasses its hook, so nothing was applied", path=ckpt)
        err = None
    except DCP_FAILURES as e:
        err = as_error(e, CheckpointLoadError, f"reading checkpoint {ckpt!r}", ckpt)
    agree(err, CheckpointLoadError, ckpt)
    try:
        planner.apply()
        restore()
        state.load_state_dict(state_dict[APP_KEY])
        err = None
    except Exception as e:  # noqa: BLE001
        err = as_error(e, CheckpointLoadError, f"applying checkpoint {ckpt!r} (verified, but the live state may be "
                       "partly updated)", ckpt)
    agree(err, CheckpointLoadError, ckpt)
    return dict(state.extra)
