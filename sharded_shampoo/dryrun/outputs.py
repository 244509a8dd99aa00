"""The dry-run's output files: checked before minutes of planning, written with errors that name the flag.

A plan of a large model on a large mesh takes tens of seconds to minutes; an output path that
cannot be written must fail before that, with the flag and the cause (not a bare errno message
after the plan). Permission bits are not enough to decide (root passes ``os.access`` on ``/proc``,
where nothing can be created), so the check opens the file for appending, which neither truncates
an existing file nor changes its contents, and removes the file again if it created it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Optional


def check_output_path(option: str, path: Optional[str]) -> None:
    """Raise ValueError naming ``option`` if ``path`` cannot be written (None: no output asked)."""
    if path is None:
        return
    if not path.strip():
        raise ValueError(f"{option} got an empty file name; give a file name or leave {option} out.")
    if os.path.isdir(path):
        raise ValueError(f"{option} {path!r} is a directory; give a file name.")
    if path.endswith(("/", os.sep)):
        raise ValueError(f"{option} {path!r} ends with a separator (a directory name); give a file name.")
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{option} {path!r}: {existing!r} is a file, not a directory, so nothing can be written "
                         "under it.")
    if existing != folder:
        raise ValueError(f"{option} {path!r}: the directory {folder!r} does not exist; create it first.")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as err:
        raise ValueError(f"{option} {path!r} cannot be written ({err.strerror or err}).") from None
    if not existed:
        os.remove(path)


def check_output_paths(outputs: Sequence[tuple[str, Optional[str]]]) -> None:
    """Every ``(option, path)`` writable, and no two options naming the same file."""
    for option, path in outputs:
        check_output_path(option, path)
    given = [(option, os.path.realpath(path)) for option, path in outputs if path is not None]
    for n, (option, real) in enumerate(given):
        other = next((o for o, r in given[:n] if r == real), None)
        if other is not None:
            raise ValueError(f"{other} and {option} name the same file ({real!r}); the second would overwrite the "
                             "first. Give them different names.")


def write_output(option: str, path: str, write: Callable[[str], None]) -> None:
    """``write(path)``; an OSError (the disk filled, the directory vanished) becomes a ValueError naming
    ``option``."""
    try:
        write(path)
    except OSError as err:
        raise ValueError(f"{option} {path!r}: writing the file failed ({err.strerror or err}).") from None
