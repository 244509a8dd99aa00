"""Several writers in one checkpoint directory: private temporary directories, liveness, atomic publish.

Two jobs can save the same step into one directory at once -- a job that was thought dead (a
zombie) and its restart. Three rules keep every published checkpoint complete (rank 0 of each
save applies them; nothing here is collective):

- **Private temporary directory.** Each save writes into its own ``{name}.tmp-{16 hex digits}``;
  no other save ever writes into it or deletes it while it is in use.
- **Liveness.** While the save runs, rank 0 holds an exclusive ``flock`` on
  ``{tmp}/.writer.lock``. The kernel drops the lock when the process ends, however it ends, so
  :func:`remove_dead` can tell the leftover of a save that died (lock free: removed) from a save
  in progress (lock held: kept). The lock file is created under another name, locked, then renamed
  into place, so it is never seen unlocked while its writer lives. Where the file system refuses
  ``flock`` nothing is removed.
- **Atomic publish** (:func:`publish`): ``rename(tmp, name)``, which never replaces a non-empty
  directory. If ``name`` exists, it is replaced only if it is the very checkpoint that was there
  when this save began (an older save of the same step, identified by device, inode and the
  ``save_id`` of its ``commit.json``): it is first moved (atomically) into a locked temporary
  directory, checked to be that one, and deleted only after the new checkpoint took its name. A
  checkpoint another writer published in the meantime is never replaced or deleted: this save
  raises :class:`.errors.ConcurrentSaveError` instead.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from typing import Optional

from .directory import COMMIT_FILE
from .errors import ConcurrentSaveError

LOCK_FILE = ".writer.lock"
_TMP = re.compile(r"\.tmp-[0-9a-f]{16}$")
_EXISTS = (errno.EEXIST, errno.ENOTEMPTY)

#: what identifies one published checkpoint directory: (device, inode, save_id of its commit.json)
Identity = tuple[int, int, Optional[str]]


def is_tmp_name(name: str) -> bool:
    """Is ``name`` a save's temporary directory (``{name}.tmp-{id}``, or ``{name}.tmp`` of older versions)?"""
    return bool(_TMP.search(name)) or name.endswith(".tmp")


def identity(path: str) -> Optional[Identity]:
    """Which checkpoint directory ``path`` is now (None if nothing is there)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    save_id = None
    try:
        with open(os.path.join(path, COMMIT_FILE)) as f:
            record = json.load(f)
        save_id = record.get("save_id") if isinstance(record, dict) else None
    except (OSError, ValueError):
        pass
    return st.st_dev, st.st_ino, save_id if isinstance(save_id, str) else None


@dataclass
class TmpDir:
    """A save's private temporary directory and the lock that says its writer is alive."""

    path: str
    token: str
    fd: Optional[int]

    def unlock(self) -> None:
        """Give up the liveness lock (the directory then counts as a dead save's leftover)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def discard(self) -> None:
        """Remove the directory, then the lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.unlock()


def _lock(tmp: str, token: str) -> Optional[int]:
    """Create ``tmp/.writer.lock`` already locked (see the module doc); the fd, or None without flock."""
    staging = os.path.join(tmp, f"{LOCK_FILE}.{token}")
    fd = os.open(staging, os.O_CREAT | os.O_RDWR, 0o644)
    locked: Optional[int] = fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        locked = None
    os.rename(staging, os.path.join(tmp, LOCK_FILE))
    return locked


def create_tmp(root: str, name: str) -> TmpDir:
    """A new, locked, empty ``root/{name}.tmp-{id}``."""
    token = secrets.token_hex(8)
    path = os.path.join(root, f"{name}.tmp-{token}")
    os.makedirs(path)
    return TmpDir(path, token, _lock(path, token))


def remove_dead(root: str) -> list[str]:
    """Remove the temporary directories in ``root`` whose writer is gone (lock free); the removed paths."""
    removed = []
    for entry in sorted(os.listdir(root)):
        if not _TMP.search(entry):
            continue
        path = os.path.join(root, entry)
        try:
            fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR)
        except OSError:
            continue          # no lock file: being created, or not a save of this version
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue      # held: a save in progress (or no flock here: keep it)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def _lost(final: str) -> ConcurrentSaveError:
    return ConcurrentSaveError(
        f"another save published {final!r} while this one was writing it (two jobs saving the same checkpoint "
        "into one directory, e.g. a job thought dead and its restart); that checkpoint was kept and this save's "
        "data discarded. Make sure only one job saves into this directory.", path=os.path.dirname(final))


def _rename_into(tmp: TmpDir, final: str) -> bool:
    """``rename(tmp, final)``; False if ``final`` is a non-empty directory (nothing changed then)."""
    try:
        os.rename(tmp.path, final)
    except OSError as err:
        if err.errno in _EXISTS:
            return False
        raise
    return True


def publish(tmp: TmpDir, final: str, replaceable: Optional[Identity]) -> None:
    """Rename the complete ``tmp`` to ``final`` (see the module doc); raises :class:`ConcurrentSaveError`
    for the loser of a race. ``replaceable``: ``identity(final)`` when this save began."""
    if _rename_into(tmp, final):
        _drop_lock_file(final)
        return
    if replaceable is None or identity(final) != replaceable:
        raise _lost(final)
    trash = create_tmp(os.path.dirname(final), os.path.basename(final))
    old = os.path.join(trash.path, "old")
    try:
        try:
            os.rename(final, old)
        except FileNotFoundError:
            pass              # another writer moved it away first: whoever renames into final next wins
        if os.path.exists(old) and identity(old) != replaceable:
            # it was another writer's checkpoint, published after our check: put it back
            try:
                os.rename(old, final)
            except OSError:
                pass          # a third writer published meanwhile; final is complete either way
            raise _lost(final)
        if not _rename_into(tmp, final):
            raise _lost(final)
        _drop_lock_file(final)
    finally:
        trash.discard()


def _drop_lock_file(published: str) -> None:
    """A published checkpoint carries no lock file (the lock itself stays held until ``unlock()``)."""
    try:
        os.remove(os.path.join(published, LOCK_FILE))
    except FileNotFoundError:
        pass
