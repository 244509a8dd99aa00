"""Cross-rank agreement: every local decision or failure becomes the same outcome on every rank.

A rank that raises on its own (a wrong-size gradient, a bad learning rate set on that rank only,
a config built differently) would leave the others waiting in the next collective until the
process-group timeout. So every check runs locally first, and its outcome travels in one small
collective *before* the first data collective of the step; during a step no rank raises before
taking part in every collective of it (errors surface at the next host-visible point, see
``policy.py``):

* :class:`FlagsAgreement` -- the step's one all-reduce, asynchronous, MAX over every rank's flags
  vector (``flags.py``: per parameter has-gradient / NaN / not representable / non-zero, which ranks
  failed a local check, a digest of the step-varying hyperparameters, each group's lr). Its result
  feeds the step policy on the device (``policy.py``); the host reads it one step later;
* :meth:`Agreement.same_everywhere` -- a fingerprint all-gather at construction and after every
  load, naming the first setting that differs between ranks;
* :meth:`Agreement.outcome` -- after a local phase that may fail (loading a state dict), raise on
  every rank if any rank failed, before anything is applied.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.distributed as dist

from .._torch_compat import all_gather_into
from .records import CommContext


def stable_digest(obj: Any) -> int:
    """A digest of a JSON-able description that is the same in every process (no salted hashing)."""
    return zlib.crc32(json.dumps(obj, sort_keys=True, default=repr).encode())


class RankFailureError(RuntimeError):
    """Another rank failed a local check; this rank stops too (the failing rank raised the cause)."""


class FlagsAgreement:
    """The step's one all-reduce (MAX) of the flags vectors (``flags.py``), in flight.

    Issued asynchronously right after the local flags exist on the device; :meth:`wait` returns the
    agreed vector. On NCCL ``wait`` only makes the current stream wait for the collective (no host
    wait); on gloo/CPU it is a host wait on a CPU computation. One process: the local vector itself.
    """

    def __init__(self, comm: CommContext, local: torch.Tensor) -> None:
        self.flags = local
        self.work: Any = None
        if comm.world_size > 1:
            self.work = dist.all_reduce(local, op=dist.ReduceOp.MAX, group=comm.group, async_op=True)

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.flags


class Agreement:
    """Small agreement collectives over the plan's process group (no-ops on one rank)."""

    def __init__(self, comm: CommContext) -> None:
        self.comm = comm

    def outcome(self, error: Optional[BaseException], what: str) -> None:
        """Raise ``error`` here and a :class:`RankFailureError` on every other rank if any rank failed."""
        if self.comm.world_size > 1:
            flags = torch.zeros(self.comm.world_size, dtype=torch.float64, device=self.comm.device)
            flags[self.comm.rank] = 1.0 if error is not None else 0.0
            dist.all_reduce(flags, group=self.comm.group)
            failed = [r for r, f in enumerate(flags.cpu().tolist()) if f > 0]
        else:
            failed = [0] if error is not None else []
        if error is not None:
            raise error
        if failed:
            raise RankFailureError(f"{what} failed on rank(s) {failed} (see the error raised there); nothing was "
                                   "changed on any rank.")

    def same_everywhere(self, description: Mapping[str, Any], what: str) -> None:
        """Raise on every rank unless every rank has the same ``description`` (naming the first difference)."""
        if self.comm.world_size <= 1:
            return
        mine = torch.tensor([stable_digest(description)], dtype=torch.int64, device=self.comm.device)
        everyone = torch.empty(self.comm.world_size, dtype=torch.int64, device=self.comm.device)
        all_gather_into(everyone, mine, group=self.comm.group)
        digests = everyone.cpu().tolist()
        if len(set(digests)) == 1:
            return
        descriptions: list[Any] = [None] * self.comm.world_size
        dist.all_gather_object(descriptions, dict(description), group=self.comm.group)
        ref = descriptions[0]
        for r, d in enumerate(descriptions):
            for key in sorted(set(ref) | set(d)):
                if json.dumps(ref.get(key), sort_keys=True, default=repr) != \
                        json.dumps(d.get(key), sort_keys=True, default=repr):
                    raise ValueError(f"{what} differs between ranks: {key} is {ref.get(key)!r} on rank 0 but "
                                     f"{d.get(key)!r} on rank {r}. Build and configure the optimizer identically on "
                                     "every rank.")
        raise ValueError(f"{what} differs between ranks (digests {digests}).")

    def total(self, value: float) -> float:
        """Sum of ``value`` over the ranks."""
        if self.comm.world_size <= 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.comm.device)
        dist.all_reduce(t, group=self.comm.group)
        return float(t.item())
