"""The checkpoint directory: the ``latest`` pointer, save order, and pruning (all local, no collectives).

Layout::

    checkpoint_dir/
        latest          text file naming the newest complete checkpoint, e.g. "step_200"
        step_100/       .metadata, __{rank}_0.distcp, checksums.json, commit.json
        step_300.tmp-3f2a.../   a save in progress (or one whose rank died): never named by ``latest``

``commit.json`` holds the checkpoint's *save sequence number*, one more than the largest in the
directory when it was published. ``keep_last`` prunes by this order, not by step number: after
rolling back to step 5 and saving 6, 7, 8, the two newest saves are 7 and 8 even though
``step_10`` and ``step_20`` have larger step numbers. It is written into ``step_N.tmp`` before
the rename that publishes the checkpoint, so it appears atomically with it.

``latest`` is read strictly: it must be UTF-8 text naming one directory entry of
``checkpoint_dir`` (no path separators, no ``..``), and that entry must resolve (symlinks
followed) inside ``checkpoint_dir``; anything else raises :class:`.errors.CheckpointPointerError`
saying what is wrong and how to fix it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from typing import Optional

from .errors import CheckpointPointerError

LATEST = "latest"
COMMIT_FILE = "commit.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_FIX = ("delete it (the next save rewrites it) or rewrite it with the name of a checkpoint in that directory "
        "(e.g. `echo step_100 > {path}`), or pass a step_N directory to load_checkpoint instead")


def fsync_dir(path: str) -> None:
    """Make a rename or create in ``path`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` so a reader sees the old or the new content, never a mix."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{secrets.token_hex(8)}.part")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def write_pointer(root: str, name: str) -> None:
    write_atomic(os.path.join(root, LATEST), name + "\n")


def _pointer_error(pointer: str, what: str) -> CheckpointPointerError:
    return CheckpointPointerError(f"checkpoint pointer {pointer!r} {what}; " + _FIX.format(path=pointer),
                                  path=pointer)


def read_pointer(root: str) -> Optional[str]:
    """The checkpoint name ``root/latest`` holds, or None if there is no pointer (or it is empty)."""
    pointer = os.path.join(root, LATEST)
    if os.path.isdir(pointer):
        raise _pointer_error(pointer, "is a directory, not a text file naming a checkpoint")
    try:
        with open(pointer, "rb") as f:
            raw = f.read(4097)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise _pointer_error(pointer, f"cannot be read ({err})") from err
    if len(raw) > 4096:
        raise _pointer_error(pointer, "is larger than 4 KiB, so it is not a pointer written by save_checkpoint")
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        raise _pointer_error(pointer, "holds binary data, not UTF-8 text naming a checkpoint") from err
    if not name:
        return None
    if "\n" in name or "/" in name or os.sep in name or name in (".", "..") or "\0" in name:
        raise _pointer_error(pointer, f"holds {name!r}, which is not the name of one entry of {root!r} "
                                      "(a pointer may not contain paths)")
    target = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([target, os.path.realpath(root)]) != os.path.realpath(root):
        raise _pointer_error(pointer, f"names {name!r}, which resolves to {target!r} outside the checkpoint "
                                      "directory (a symlink out of it); refusing to follow it")
    return name


def latest_checkpoint(checkpoint_dir: str) -> Optional[str]:
    """Path of the checkpoint ``checkpoint_dir/latest`` names, or None if there is none yet."""
    name = read_pointer(checkpoint_dir)
    return None if name is None else os.path.join(checkpoint_dir, name)


def list_checkpoints(checkpoint_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints ``[(step, path)]`` in ``checkpoint_dir``, by step number (smallest first)."""
    if not os.path.isdir(checkpoint_dir):
        return []
    out = []
    for name in os.listdir(checkpoint_dir):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(checkpoint_dir, name, ".metadata")):
            out.append((int(m.group(1)), os.path.join(checkpoint_dir, name)))
    return sorted(out)


def read_commit(path: str) -> Optional[dict]:
    """The ``commit.json`` of a checkpoint, or None (written by plain ``dcp.save`` or an older version)."""
    try:
        with open(os.path.join(path, COMMIT_FILE)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("sequence"), int) else None


def save_order(checkpoint_dir: str) -> list[str]:
    """Complete checkpoints, oldest save first: by save sequence; ones without a sequence (older
    versions, plain ``dcp.save``) count as older than all others, among themselves by step."""
    keyed = []
    for step, path in list_checkpoints(checkpoint_dir):
        commit = read_commit(path)
        keyed.append(((0, step) if commit is None else (1, commit["sequence"]), path))
    return [path for _, path in sorted(keyed)]


def write_commit(tmp: str, root: str, step: Optional[int], checksums: bool, save_id: str) -> int:
    """Write ``tmp/commit.json`` with the next save sequence number of ``root`` and this save's unique
    ``save_id`` (what tells two saves of one step apart, :mod:`.writers`); return the number."""
    sequences = [c["sequence"] for _, p in list_checkpoints(root) if (c := read_commit(p)) is not None]
    sequence = max(sequences, default=0) + 1
    record = {"sequence": sequence, "step": step, "checksums": checksums, "time": time.time(), "save_id": save_id}
    write_atomic(os.path.join(tmp, COMMIT_FILE), json.dumps(record) + "\n")
    return sequence


def prune(root: str, keep_last: int, newest: str) -> list[str]:
    """Delete all but the ``keep_last`` most recently saved checkpoints (never ``newest``, nor the one
    ``latest`` names now: another job may have published it meanwhile); the deleted paths."""
    order = save_order(root)
    keep = {newest, read_pointer(root)}
    doomed = [p for p in order[:max(len(order) - keep_last, 0)] if os.path.basename(p) not in keep]
    for path in doomed:
        shutil.rmtree(path)
    return doomed
