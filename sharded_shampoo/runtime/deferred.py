"""The host's view of a step, one step late: the agreed flags copied to host memory, resolved later.

A steady step decides on the device (``policy.device_masks``) and never waits for the outcome. The
host needs it for three things: the step counters (``group["step"]`` counts applied steps only, so
a skipped step must not advance the schedule), the attributes ``last_step_skipped`` /
``last_step_was_init``, and the errors of the policy. :class:`PendingStep` records what the step
assumed on the host (it advanced the counters as if applied) and the asynchronous copy of the agreed
flags (``host_transfer.HostMirror``); :meth:`PendingStep.resolve` reads the copy, evaluates the
policy on the host (``policy.decide``), undoes the counters of a step that changed nothing, and
returns the error to raise. Every rank resolves the same flags, so every rank reaches the same
outcome at the same call: nobody enters a collective another rank left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Protocol

from ..config import NonFinitePolicy
from .flags import FlagLayout, GradientFlags
from .host_transfer import HostMirror
from .policy import StepDecision, decide, error_of


class ScheduleRecord(Protocol):
    """What the optimizer's root schedule records per group (``root_schedule.RootSchedule``)."""

    seen_step: list[int]
    computed: list[bool]


@dataclass(frozen=True)
class GroupCounters:
    """A group's host counters before a step: restored when the step changed nothing."""

    step: int
    lr_sum: Any
    seen_step: int
    roots_computed: bool


@dataclass
class PendingStep:
    """One step whose outcome the host has not read yet."""

    number: int                            # 1-based count of step() calls that reached the agreement
    layout: FlagLayout
    mirror: HostMirror
    policy: NonFinitePolicy
    all_lr_zero: bool
    before: list[GroupCounters]
    local_error: Optional[Exception]       # this rank's own failure (raised instead of the RankFailureError)

    @staticmethod
    def counters(param_groups: Sequence[dict[str, Any]], schedule: ScheduleRecord, lr_sum_key: str) -> list[GroupCounters]:
        return [GroupCounters(g["step"], g.get(lr_sum_key), schedule.seen_step[gi], schedule.computed[gi])
                for gi, g in enumerate(param_groups)]

    def resolve(self, param_groups: list[dict[str, Any]], schedule: ScheduleRecord, lr_sum_key: str,
                names: Sequence[str]) -> tuple[StepDecision, Optional[Exception]]:
        """The step's decision and the error it raises (None); undoes the counters of a step that changed nothing."""
        flags = GradientFlags.read(self.mirror.read(), self.layout)
        decision = decide(flags, self.policy, self.all_lr_zero)
        if not decision.applied:
            for gi, (group, was) in enumerate(zip(param_groups, self.before)):
                if group["step"] == was.step + 1:      # not changed by hand since the step
                    group["step"] = was.step
                    if was.lr_sum is not None:
                        group[lr_sum_key] = was.lr_sum
                    schedule.seen_step[gi], schedule.computed[gi] = was.seen_step, was.roots_computed
        error = self.local_error if self.local_error is not None else error_of(decision, flags, names, self.number)
        return decision, error


__all__ = ["GroupCounters", "PendingStep", "ScheduleRecord"]
