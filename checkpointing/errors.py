"""The errors (and the one warning) ``sharded_shampoo.checkpointing`` raises on purpose.

Every class derives from :class:`CheckpointError`, an ``Exception`` -- unlike DCP's own
``CheckpointException``, which is a ``BaseException`` that ``except Exception`` fallbacks miss.
DCP failures are re-raised as one of these, naming the checkpoint path. Several classes also
derive from the builtin a caller would naturally catch (``FileNotFoundError`` for "no checkpoint
there", ``KeyError`` for missing ``extra`` values, ``ValueError`` for bad arguments and
incompatible plans), so code written against those keeps working.

The classes are reconstructed by *name* on ranks that did not fail themselves (see
:mod:`.coordination`), so each must accept ``(message, path=None)``.
"""

from __future__ import annotations

from typing import Optional


class CheckpointError(Exception):
    """Base class of every checkpointing error; ``path`` is the checkpoint (or directory) concerned."""

    def __init__(self, message: str, path: Optional[str] = None) -> None:
        super().__init__(message)
        self.path = path

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointArgumentError(CheckpointError, ValueError):
    """An argument of ``save_checkpoint``/``load_checkpoint``/``TrainState`` is invalid (message names it)."""


class CheckpointSaveError(CheckpointError, RuntimeError):
    """A save failed on some rank. ``latest`` and every published checkpoint are unchanged, and the
    save's ``step_N.tmp-<id>`` directory was removed (unless a rank vanished mid-save: then the
    next save into that directory removes it once its writer is gone)."""


class ConcurrentSaveError(CheckpointSaveError):
    """Another save (e.g. a job that was thought dead, and its restart) published the same checkpoint
    while this one was writing it. The other save's checkpoint stays; this save's data was discarded."""


class CheckpointLoadError(CheckpointError, RuntimeError):
    """A load failed on some rank. Raised on every rank; model and optimizer are unchanged."""


class CheckpointNotFoundError(CheckpointLoadError, FileNotFoundError):
    """There is no checkpoint at the given path (no ``.metadata``, no ``latest`` pointer)."""


class CheckpointCorruptError(CheckpointLoadError):
    """A checkpoint file is missing, truncated, or its bytes do not match the checksum saved with it."""


class UnsafeCheckpointError(CheckpointCorruptError):
    """A pickled part of the checkpoint names something other than the data a save writes (e.g. a
    callable such as ``os.system``): it was refused before being unpickled, so nothing from it ran."""


class CheckpointPointerError(CheckpointLoadError, CheckpointSaveError):
    """The ``latest`` pointer cannot be used (binary, a directory, or naming a path outside the
    checkpoint directory). Raised by loads and saves alike, hence both bases."""


class IncompatibleCheckpointError(CheckpointLoadError, ValueError):
    """The checkpoint was written with other parameter shapes or structural optimizer settings."""


class MissingExtraError(CheckpointLoadError, KeyError):
    """``load_checkpoint(extra=...)`` asked for values the checkpoint does not hold."""


class UnverifiedCheckpointWarning(UserWarning):
    """The checkpoint has no checksums (e.g. written by plain ``dcp.save``): loaded without verification."""


def error_class(name: str, base: type[CheckpointError]) -> type[CheckpointError]:
    """The class of this module called ``name`` if it is a ``base``; else ``base``."""
    cls = globals().get(name)
    if isinstance(cls, type) and issubclass(cls, base):
        return cls
    return base
