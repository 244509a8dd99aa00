"""When a param group runs its amortized step (inverse roots / eigenbases), and whether it preconditions.

Step ``t`` (1-based) of a group preconditions when ``t >= start`` (``start_preconditioning_step``,
None meaning ``precondition_frequency``, or 1 for spectral / sign descent), and refreshes the roots
when ``t`` is a multiple of the frequency or ``t == start``. Both settings may change at any time, so that rule alone can let
preconditioning start without a root: lowering ``start`` below the current step (between steps,
or by a resume with ``hyperparameters="current"``) makes step ``t > start`` precondition with the
initial identity roots until the next multiple of the frequency. Hence a third trigger: the first
preconditioned step of a group whose roots were never computed refreshes them, whatever made
preconditioning start.

Whether a group's roots were computed is recorded per group: set by every amortized step, and by
``load_state_dict`` from the *loaded* step and settings (a run that reached ``step >= start``
computed its roots at ``start``; a state dict taken after the start was lowered but before the
next step records that next step as its start, see :meth:`RootSchedule.pending_start`). A step counter this record did not see (state loaded by a path
that bypasses ``load_state_dict``, or a step set by hand) is read the same way from the current
settings. Every input is agreed between ranks (settings and steps are compared at every step), so
every rank takes the same decision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def start_of(group: Mapping[str, Any]) -> int:
    """The group's first preconditioned step (``start_preconditioning_step``; None: the frequency, or
    step 1 for a preconditioner without a refresh -- spectral / sign descent, ``refreshes = False`` --
    which has nothing to wait for, as the reference's ``precondition_frequency = 1`` for them)."""
    start = group["start_preconditioning_step"]
    if start:
        return start
    return group["precondition_frequency"] if getattr(group["preconditioner"], "refreshes", True) else 1


@dataclass(frozen=True)
class Decision:
    """What one group does at its next step."""

    refresh_roots: bool     # refresh roots / eigenbases
    precondition: bool      # use the preconditioner (else the grafting direction)
    roots_computed: bool    # the roots were computed before this step


class RootSchedule:
    """Per group: the step counter last seen and whether the roots had been computed by then."""

    def __init__(self, param_groups: Sequence[Mapping[str, Any]]) -> None:
        self.seen_step: list[int] = []
        self.computed: list[bool] = []
        for gi, group in enumerate(param_groups):
            self.seen_step.append(0)
            self.computed.append(False)
            self.loaded(gi, group)

    def decide(self, gi: int, group: Mapping[str, Any]) -> Decision:
        step, freq, start = group["step"], group["precondition_frequency"], start_of(group)
        t = step + 1
        computed = self.computed[gi] if self.seen_step[gi] == step else step >= start
        precondition = t >= start
        return Decision(refresh_roots=precondition and (t % freq == 0 or t == start or not computed),
                        precondition=precondition, roots_computed=computed)

    def pending_start(self, gi: int, group: Mapping[str, Any]) -> int | None:
        """The start a state dict must record when the roots are due at the next step only because the
        start was lowered below the current step (else None). Written as ``step + 1`` (the step that
        will compute the roots and start preconditioning), a state dict taken between the lowering
        and that step resumes on the same schedule: otherwise a loaded ``step >= start`` reads as
        "roots computed" and the resumed run would precondition with the identity."""
        decision = self.decide(gi, group)
        if decision.precondition and not decision.roots_computed and group["step"] + 1 != start_of(group):
            return group["step"] + 1
        return None

    def stepped(self, gi: int, step: int, decision: Decision) -> None:
        """Record that group ``gi`` completed ``decision``; its step counter is now ``step``."""
        self.seen_step[gi] = step
        self.computed[gi] = decision.roots_computed or decision.refresh_roots

    def loaded(self, gi: int, group: Mapping[str, Any]) -> None:
        """The group's step and settings were set from a state dict (or at construction)."""
        self.seen_step[gi] = group["step"]
        self.computed[gi] = group["step"] >= start_of(group)
