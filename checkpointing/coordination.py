"""Turning one rank's failure into an error on every rank, within one small collective.

A save or load alternates local work (file-system steps, building state dicts, checksums) with
collectives (DCP's planning and writes). If one rank fails locally and simply raises, the
others walk into the next collective and wait there until the process-group timeout (30 min
by default). So each local phase ends with :func:`agree`: every rank contributes its status --
``None`` or its error -- to one ``all_gather_object`` on a dedicated gloo group, and if any rank
failed, every rank raises. The failing rank raises its own exception; the others raise the same
:mod:`.errors` class (looked up by name) with a message naming the failed rank(s).

DCP's own steps already gather exceptions from every rank (``CheckpointException``), so only our
code between them needs this.
"""

from __future__ import annotations

from typing import Any, Optional, cast

import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException

from .errors import CheckpointError, error_class

_coord_group: Any = None
_coord_group_key: Any = None


def distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def coordination_group() -> Any:
    """A gloo group over the default world, created once per world (collective on first use).

    Separate from the training group: an asynchronous save runs its collectives in a background
    thread, which must not interleave with the training collectives; with NCCL training it also
    provides the CPU backend that small object collectives need.
    """
    global _coord_group, _coord_group_key
    key = id(dist.group.WORLD)
    if _coord_group is None or _coord_group_key != key:
        _coord_group = dist.new_group(backend="gloo")
        _coord_group_key = key
    return _coord_group


def _one_line(err: BaseException) -> str:
    return str(err) if isinstance(err, CheckpointError) else f"{type(err).__name__}: {err}"


def as_error(err: BaseException, base: type[CheckpointError], what: str, path: str) -> CheckpointError:
    """``err`` as one of our errors: itself if it is one, else a ``base`` saying ``what`` failed.

    A DCP ``CheckpointException`` (a ``BaseException`` holding every failed rank's exception)
    becomes one line per failed rank; if every rank failed with the same class of ours (e.g.
    :class:`.errors.CheckpointCorruptError` from the verifying reader), that class is kept.
    """
    if isinstance(err, CheckpointError):
        return err
    cls: type[CheckpointError] = base
    if isinstance(err, CheckpointException):
        failures = {r: exc for r, (exc, _) in sorted(err.failures.items())}
        kinds = {type(exc) for exc in failures.values()}
        if len(kinds) == 1 and issubclass(next(iter(kinds)), base):
            cls = cast(type[CheckpointError], next(iter(kinds)))
        detail = "; ".join(f"rank {r}: {_one_line(exc)}" for r, exc in failures.items())
    else:
        detail = _one_line(err)
    wrapped = cls(f"{what} failed: {detail}", path=path)
    wrapped.__cause__ = err
    return wrapped


def agree(local: Optional[BaseException], base: type[CheckpointError], path: str, *,
          token: Optional[str] = None, what: str = "checkpoint", share: Any = None) -> Any:
    """Every rank calls this with its local error (or None); if any rank failed, every rank raises.

    ``token``: a value every rank must pass identically (e.g. the checkpoint name); ranks that
    disagree all raise ``base`` instead of going on to write or read different checkpoints.
    Returns rank 0's ``share`` on every rank (e.g. the temporary directory rank 0 created), at no
    extra collective.
    """
    mine = None if local is None else (type(local).__name__, str(local))
    statuses: list[Any] = [(mine, token, share)]
    if distributed():
        statuses = [None] * dist.get_world_size()
        dist.all_gather_object(statuses, (mine, token, share), group=coordination_group())
    failed = [(r, s[0]) for r, s in enumerate(statuses) if s[0] is not None]
    if local is not None:
        raise local
    if failed:
        r, (name, message) = failed[0]
        more = f" (ranks {[f for f, _ in failed[1:]]} failed as well)" if len(failed) > 1 else ""
        raise error_class(name, base)(f"rank {r} failed: {message}{more}", path=path)
    tokens = sorted({str(s[1]) for s in statuses})
    if len(tokens) > 1:
        per_rank = ", ".join(f"rank {r}: {s[1]}" for r, s in enumerate(statuses))
        raise base(f"the ranks disagree on the {what} ({per_rank}); every rank must pass the same value.",
                   path=path)
    return statuses[0][2]
