"""Crash-safe, verified save/load of model + ShardedShampoo with DCP: ``save_checkpoint`` / ``load_checkpoint``.

Save (collective): every rank builds its state dict and rank 0 empties ``step_N.tmp`` (the
ranks agree on the outcome, :mod:`.coordination`); DCP writes into ``step_N.tmp`` and rank 0
writes ``.metadata``; each rank checksums the files it wrote (:mod:`.integrity`) and rank 0
writes ``checksums.json`` and ``commit.json``, renames the directory to ``step_N`` and atomically
replaces ``latest`` (:mod:`.directory`). A rank that fails anywhere makes every rank raise
:class:`.errors.CheckpointSaveError`, and rank 0 removes ``step_N.tmp``; a rank that dies leaves
``latest`` and every complete checkpoint untouched (its ``.tmp`` is removed by the next save of
that step).

``async_=True`` uses ``dcp.async_save`` on the dedicated gloo group: the state is copied to CPU
staging memory before ``save_checkpoint`` returns, so training may continue and mutate it;
``handle.wait()`` finishes the write, checksums and publishes. A new save, and a load, wait for
the previous one first.

Load (collective): every rank resolves the checkpoint, verifies ``.metadata`` against its
checksum, checks the plan fingerprint and ``extra`` keys, and the ranks agree; DCP then reads
into host staging buffers (:mod:`.staged_load`) through a reader that checks file sizes before
reading and every item's checksum before using it (:mod:`.integrity`); only when every rank has
read everything does any live tensor change. Every failure raises a
:class:`.errors.CheckpointLoadError` on every rank, with model and optimizer unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any, Optional, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from .compat import check_compatible
from .coordination import agree, as_error, coordination_group, distributed, rank
from .directory import LATEST, fsync_dir, latest_checkpoint, prune, read_commit, read_pointer, write_commit, \
    write_pointer
from .errors import (CheckpointArgumentError, CheckpointCorruptError, CheckpointError, CheckpointLoadError,
                     CheckpointNotFoundError, CheckpointSaveError, MissingExtraError, UnverifiedCheckpointWarning)
from .integrity import CHECKSUM_FILE, VerifyingReader, checksum_files, read_checksums, write_checksums
from .staged_load import StagingLoadPlanner
from .state import META_KEY, TrainState

APP_KEY = "app"
_DCP_FAILURES = (Exception, CheckpointException)  # CheckpointException is a BaseException
_pending: Optional["SaveHandle"] = None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns on every single-process call that torch.distributed is not initialised."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


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


# ----------------------------------------------------------------------------- save


def _check_save_args(step: Any, keep_last: Any) -> None:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointArgumentError(f"save_checkpoint step must be an integer >= 0; got {step!r}.")
    if keep_last is not None and (not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1):
        raise CheckpointArgumentError(f"save_checkpoint keep_last must be None or an integer >= 1; got {keep_last!r}.")


def _prepare(root: str, name: str) -> None:
    """Rank 0: make ``name.tmp`` empty; refuse to overwrite the checkpoint ``latest`` names."""
    os.makedirs(root, exist_ok=True)
    if read_pointer(root) == name:
        raise CheckpointSaveError(f"checkpoint {os.path.join(root, name)!r} already exists and is the latest one; "
                                  "refusing to overwrite the last good checkpoint in place. Save under another step "
                                  "number.", path=root)
    tmp = os.path.join(root, name + ".tmp")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)  # left by a save whose rank died
    os.makedirs(tmp)


def _agree_or_remove(err: Optional[BaseException], root: str, tmp: Optional[str], token: Optional[str] = None) -> None:
    """Agree on the save's status; on an agreed failure rank 0 removes ``tmp`` (every rank has stopped
    writing into it). If the ranks cannot be reached, ``tmp`` stays for the next save to remove."""
    try:
        agree(err, CheckpointSaveError, root, token=token, what="checkpoint name")
    except CheckpointError:
        if tmp is not None and rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if distributed():  # every rank knows the save failed: raise only once the directory is gone
            dist.barrier(group=coordination_group())
        raise
    except Exception as unreachable:
        raise CheckpointSaveError(f"saving into {tmp!r} failed and the ranks could not agree on it ({unreachable}); "
                                  "a rank probably died. 'latest' was not moved; the next save of this step removes "
                                  "the partial directory.", path=root) from unreachable


def _publish(root: str, name: str, step: int, metadata: Metadata, parts: Optional[list[Any]]) -> None:
    """Rank 0, after every rank finished writing: sidecars, rename, ``latest``."""
    tmp, final = os.path.join(root, name + ".tmp"), os.path.join(root, name)
    if not os.path.isfile(os.path.join(tmp, ".metadata")):
        raise CheckpointSaveError(f"checkpoint {tmp!r} is incomplete (no .metadata); 'latest' was not moved.",
                                  path=root)
    if parts is not None:
        write_checksums(tmp, metadata, parts)
    write_commit(tmp, root, step, checksums=parts is not None)
    if os.path.exists(final):
        shutil.rmtree(final)  # an older, unreferenced save of the same step
    os.rename(tmp, final)
    fsync_dir(root)
    write_pointer(root, name)


def _finish_save(root: str, name: str, step: int, keep_last: Optional[int], checksums: bool,
                 err: Optional[BaseException], metadata: Any) -> None:
    """After DCP's write (or its failure): checksum, agree, publish, agree, prune. Collective."""
    tmp = os.path.join(root, name + ".tmp")
    part = None
    if err is None:
        try:
            if not isinstance(metadata, Metadata):
                metadata = FileSystemReader(tmp).read_metadata()
            if checksums:
                world = dist.get_world_size() if distributed() else 1
                part = checksum_files(tmp, metadata, rank(), world)
        except Exception as e:  # noqa: BLE001 - agreed below, raised on every rank
            err = as_error(e, CheckpointSaveError, f"checksumming {tmp!r}", root)
    _agree_or_remove(err, root, tmp)
    parts: Optional[list[Any]] = [part]
    if checksums and distributed():
        parts = [None] * dist.get_world_size() if rank() == 0 else None
        try:
            dist.gather_object(part, parts, dst=0, group=coordination_group())
        except Exception as unreachable:
            raise CheckpointSaveError(f"gathering the checksums of {tmp!r} failed ({unreachable}); a rank probably "
                                      "died. 'latest' was not moved.", path=root) from unreachable
    err = None
    if rank() == 0:
        try:
            _publish(root, name, step, metadata, parts if checksums else None)
        except Exception as e:  # noqa: BLE001
            err = as_error(e, CheckpointSaveError, f"publishing {name!r} in {root!r}", root)
    _agree_or_remove(err, root, tmp if os.path.isdir(tmp) else None)
    if rank() == 0 and keep_last is not None:
        try:
            prune(root, keep_last, name)
        except Exception as e:  # noqa: BLE001 - the save itself succeeded
            warnings.warn(f"save_checkpoint published {name!r} but could not prune older checkpoints in {root!r} "
                          f"(keep_last={keep_last}): {type(e).__name__}: {e}", RuntimeWarning, stacklevel=3)


class SaveHandle:
    """A save in flight. ``wait()`` finishes it (moving ``latest``) and returns the checkpoint path."""

    def __init__(self, path: str, finish: Callable[[Optional[BaseException], Any], None],
                 future: Optional[Future] = None, cleanup: Optional[Callable[[], None]] = None,
                 done: bool = False) -> None:
        self.path = path
        self._finish = finish
        self._future = future
        self._cleanup = cleanup
        self._done = done

    def done(self) -> bool:
        """True once ``wait()`` has returned or raised (the save is over either way)."""
        return self._done

    def wait(self) -> str:
        """Finish the save (collective); raises :class:`.errors.CheckpointSaveError` on every rank if it failed."""
        global _pending
        if not self._done:
            try:
                err, metadata = None, None
                try:
                    metadata = self._future.result() if self._future is not None else None
                except _DCP_FAILURES as e:
                    err = as_error(e, CheckpointSaveError, f"writing {self.path!r} asynchronously",
                                   os.path.dirname(self.path))
                self._finish(err, metadata)
            finally:
                self._done = True
                if self._cleanup is not None:
                    self._cleanup()
                if _pending is self:
                    _pending = None
        return self.path


def wait_pending() -> None:
    """Finish the previous asynchronous save, if any (``save_checkpoint`` and ``load_checkpoint`` do this)."""
    if _pending is not None:
        _pending.wait()


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
    every rank; ``latest`` and every published checkpoint are then unchanged.
    """
    wait_pending()
    name = f"step_{step}"
    root = os.path.abspath(checkpoint_dir)
    tmp: Optional[str] = None
    err, state_dict = None, None
    try:
        _check_save_args(step, keep_last)
        state = TrainState(model, optimizer, extra=extra, flatten_optimizer_state_dict=flatten_optimizer_state_dict)
        state_dict = {APP_KEY: state.state_dict()}
        if rank() == 0:
            _prepare(root, name)
            tmp = os.path.join(root, name + ".tmp")
    except Exception as e:  # noqa: BLE001 - agreed below, raised on every rank
        err = as_error(e, CheckpointSaveError, f"preparing checkpoint {name!r} in {root!r}", root)
    _agree_or_remove(err, root, tmp, token=name)
    assert state_dict is not None   # _agree_or_remove() raised otherwise
    writer = FileSystemWriter(os.path.join(root, name + ".tmp"))
    final = os.path.join(root, name)

    def finish(failure: Optional[BaseException], metadata: Any) -> None:
        _finish_save(root, name, step, keep_last, checksums, failure, metadata)

    if not async_:
        err, metadata = None, None
        try:
            with _quiet():
                metadata = dcp.save(state_dict, storage_writer=writer)
        except _DCP_FAILURES as e:
            err = as_error(e, CheckpointSaveError, f"writing {writer.path!s}", root)
        finish(err, metadata)
        return SaveHandle(final, finish, done=True)
    return _start_async(state_dict, writer, final, finish)


def _start_async(state_dict: dict[str, Any], writer: FileSystemWriter, final: str,
                 finish: Callable[[Optional[BaseException], Any], None]) -> SaveHandle:
    # DCP would stage through the FileSystemWriter (a BlockingAsyncStager: one CPU tensor per
    # state tensor); DefaultStager copies each storage once (our block views share bucket
    # stacks), measured 2x faster here. A stager we pass stays ours to close.
    global _pending
    stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                          use_async_staging=False, use_non_blocking_copy=False))
    group = coordination_group() if distributed() else None
    try:
        with _quiet():
            response = dcp.async_save(state_dict, storage_writer=writer, process_group=group, async_stager=stager)
    except _DCP_FAILURES as e:
        stager.close()
        finish(as_error(e, CheckpointSaveError, f"staging {final!r}", os.path.dirname(final)), None)
        raise AssertionError("unreachable: finish() raises for a failed save") from e  # pragma: no cover
    future = cast(Future, getattr(response, "upload_completion", response))   # AsyncSaveResponse or a Future
    _pending = SaveHandle(final, finish, future, cleanup=stager.close)
    return _pending


# ----------------------------------------------------------------------------- load


def _open_checkpoint(path: str, verify: bool) -> tuple[str, Metadata, VerifyingReader]:
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
    ckpt, metadata, reader = _open_checkpoint(path, verify)
    if f"{APP_KEY}.{META_KEY}" not in metadata.state_dict_metadata:
        return None
    box: dict[str, Any] = {APP_KEY: {META_KEY: ""}}
    try:
        with _quiet():
            dcp.load(box, storage_reader=reader, no_dist=True)
    except _DCP_FAILURES as e:
        raise as_error(e, CheckpointLoadError, f"reading the plan description of {ckpt!r}", ckpt) from None
    raw = box[APP_KEY][META_KEY]
    return json.loads(raw) if raw else None


def _is_nested(keys: Any) -> bool:
    """Was the optimizer state saved nested? Only the nested layout stores a group's ``params`` list
    (``param_groups.{i}.params``); the flattened one stores ``param_groups.{fqn}.{key}`` without it."""
    pattern = re.compile(rf"^{APP_KEY}\.optim\.param_groups\.\d+\.params$")
    return any(pattern.match(k) for k in keys)


def _check_request(ckpt: str, keys: Any, state: TrainState, verify: bool) -> None:
    """The plan fingerprint and the requested ``extra`` keys, before anything is read."""
    guard = state.guard_key()
    if guard is not None and f"{APP_KEY}.{guard}" not in keys:
        live = state.describe()
        assert live is not None                     # a guard key comes with a description
        check_compatible(read_checkpoint_meta(ckpt, verify), live, where=f"checkpoint {ckpt!r}")
    check_extra_keys(ckpt, keys, state.extra or {})


def check_extra_keys(ckpt: str, keys: Any, wanted: Any) -> None:
    """Every requested ``extra`` value is in the checkpoint (``keys``: its stored keys); else
    :class:`.errors.MissingExtraError` naming what is missing and what it has."""
    prefix = f"{APP_KEY}.extra."
    missing = [k for k in wanted if prefix + k not in keys]
    if missing:
        have = sorted(k[len(prefix):] for k in keys if k.startswith(prefix))
        raise MissingExtraError(f"checkpoint {ckpt!r} has no extra values {missing}; it has {have}.", path=ckpt)


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
    (``verify=False`` skips verification silently). Returns the ``extra`` values read.
    """
    try:
        wait_pending()
    except CheckpointError as e:
        raise CheckpointLoadError(f"a pending asynchronous save failed, so nothing was loaded from {path!r}: {e}",
                                  path=path) from e
    err, ckpt, reader, state, state_dict = None, path, None, None, None
    try:
        ckpt, metadata, reader = _open_checkpoint(path, verify)
        keys = metadata.state_dict_metadata
        state = TrainState(model, optimizer, extra=extra, flatten_optimizer_state_dict=not _is_nested(keys),
                           hyperparameters=hyperparameters)
        _check_request(ckpt, keys, state, verify)
        state_dict = {APP_KEY: state.state_dict()}
    except Exception as e:  # noqa: BLE001 - agreed below, raised on every rank
        err = as_error(e, CheckpointLoadError, f"opening checkpoint {path!r}", path)
    agree(err, CheckpointLoadError, ckpt, token=os.path.basename(os.path.normpath(ckpt)), what="checkpoint to load")
    assert reader is not None and state is not None and state_dict is not None   # agree() raised otherwise
    if verify and reader.checksums is None:
        warnings.warn(f"checkpoint {ckpt!r} has no {CHECKSUM_FILE} (written by plain dcp.save, an older version or "
                      "with checksums=False): its bytes are loaded without verification.", UnverifiedCheckpointWarning,
                      stacklevel=2)
    planner = StagingLoadPlanner()
    try:
        with _quiet():
            dcp.load(state_dict, storage_reader=reader, planner=planner)
        if reader.checked_reads != reader.planned_reads:
            raise CheckpointLoadError(f"the verifying reader saw {reader.checked_reads} of {reader.planned_reads} "
                                      "reads; this torch version bypasses its hook, so nothing was applied", path=ckpt)
        err = None
    except _DCP_FAILURES as e:
        err = as_error(e, CheckpointLoadError, f"reading checkpoint {ckpt!r}", ckpt)
    agree(err, CheckpointLoadError, ckpt)
    try:
        planner.apply()
        state.load_state_dict(state_dict[APP_KEY])
        err = None
    except Exception as e:  # noqa: BLE001
        err = as_error(e, CheckpointLoadError, f"applying checkpoint {ckpt!r} (verified, but the live state may be "
                       "partly updated)", ckpt)
    agree(err, CheckpointLoadError, ckpt)
    return dict(state.extra)
