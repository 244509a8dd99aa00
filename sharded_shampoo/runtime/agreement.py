"""Cross-rank agreement: every local decision or failure becomes the same outcome on every rank.

A rank that raises on its own (a wrong-size gradient, a bad learning rate set on that rank only,
a config built differently) would leave the others waiting in the next collective until the
process-group timeout. So every check runs locally first, and its outcome travels in one small
collective *before* the first data collective of the step:

* :func:`gradient_flags` -- the step's one all-reduce: per parameter has-gradient / NaN-Inf /
  overflow / non-zero, which ranks failed a local check, and a digest of the step-varying
  hyperparameters (sum and sum of squares: equal on all ranks iff the variance is zero);
* :meth:`Agreement.same_everywhere` -- a fingerprint all-gather at construction and after every
  load, naming the first setting that differs between ranks;
* :meth:`Agreement.outcome` -- after a local phase that may fail (loading a state dict), raise on
  every rank if any rank failed, before anything is applied.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from .._torch_compat import all_gather_into
from .records import CommContext

#: Digests are taken modulo this, so sums of squares over thousands of ranks stay exact in float64.
DIGEST_MODULUS = 1 << 20


def stable_digest(obj: Any) -> int:
    """A digest of a JSON-able description that is the same in every process (no salted hashing)."""
    return zlib.crc32(json.dumps(obj, sort_keys=True, default=repr).encode())


class RankFailureError(RuntimeError):
    """Another rank failed a local check; this rank stops too (the failing rank raised the cause)."""


@dataclass(frozen=True)
class GradientFlags:
    """What all ranks agreed about one step's gradients (per trainable parameter, by plan index)."""

    holders: list[int]          # how many ranks have a gradient
    nonfinite: list[bool]       # NaN/Inf on some rank
    overflow: list[bool]        # finite entries but the squared norm overflows (the state would)
    nonzero: list[bool]
    failed_ranks: list[int]     # ranks whose local checks raised
    settings_agree: bool        # every rank has the same step-varying hyperparameters


def gradient_flags(comm: CommContext, P: int, local: Optional[dict[str, torch.Tensor]], failed: bool,
                   settings_digest: int) -> GradientFlags:
    """The step's one small all-reduce. ``local``: this rank's per-parameter 0/1 vectors
    ``has``, ``nonfinite``, ``overflow``, ``nonzero`` (float64, length ``P``); None when it failed."""
    W = comm.world_size
    flags = torch.zeros(4 * P + W + 2, dtype=torch.float64)
    if local is not None:
        for i, key in enumerate(("has", "nonfinite", "overflow", "nonzero")):
            flags[i * P:(i + 1) * P] = local[key].cpu()
    if failed:
        flags[4 * P + comm.rank] = 1.0
    d = float(settings_digest % DIGEST_MODULUS)
    flags[4 * P + W:] = torch.tensor([d, d * d], dtype=torch.float64)
    if W > 1:
        flags = flags.to(comm.device)
        dist.all_reduce(flags, group=comm.group)
    v = flags.cpu().tolist()
    s, sq = v[4 * P + W], v[4 * P + W + 1]
    return GradientFlags(holders=[int(x) for x in v[:P]], nonfinite=[x > 0 for x in v[P:2 * P]],
                         overflow=[x > 0 for x in v[2 * P:3 * P]], nonzero=[x > 0 for x in v[3 * P:4 * P]],
                         failed_ranks=[r for r in range(W) if v[4 * P + r] > 0], settings_agree=W * sq == s * s)


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
