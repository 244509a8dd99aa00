"""The step policy: from what the ranks agreed (``flags.py``) to what a step does, as a pure function.

A step's outcome, in order of precedence (the first that holds wins):

1. ``RANK_FAILED``: some rank's local checks raised (a wrong-size gradient, a bad setting on that rank);
2. ``SETTINGS_DIFFER``: the step-varying hyperparameters or step counters differ between ranks;
3. ``PARTIAL_GRADIENTS``: a parameter has a gradient on some ranks but not on others;
4. ``NONFINITE`` (``nonfinite_grads="raise"``) / ``SKIPPED_NONFINITE`` (``"skip"``): a NaN/Inf or
   overflowing gradient (``"ignore"``: never);
5. ``INIT_STEP``: every group's lr is 0 and every gradient is zero (the state-initialisation step
   torch's ``get_state_dict`` and torchtitan issue: state already exists, so it changes nothing);
6. ``NO_GRADIENTS``: no parameter has a gradient on every rank;
7. ``APPLIED``: the parameters with a gradient on every rank step.

Outcomes 1-4 (``raise``) are errors; every outcome but ``APPLIED`` changes nothing anywhere. The
same rules have two evaluators: :func:`device_masks` during the step, on the agreed flags tensor
without reading it (the per-parameter active mask the executor applies), and :func:`decide` on the
host one step later (the outcome, the counters, the error to raise); ``tests/test_policy.py``
checks that both agree on every combination of flags.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import NonFinitePolicy
from .agreement import RankFailureError
from .flags import FlagLayout, GradientFlags


class NonFiniteGradientError(RuntimeError):
    """A gradient contained NaN/Inf or overflowed and ``nonfinite_grads='raise'``."""


class PartialGradientsError(RuntimeError):
    """A parameter had a gradient on some ranks but not on others."""


class StepOutcome(enum.Enum):
    """What one step did (see the module doc for the precedence)."""

    APPLIED = "applied"
    NO_GRADIENTS = "no gradients"
    INIT_STEP = "init step"
    SKIPPED_NONFINITE = "skipped (non-finite gradients)"
    NONFINITE = "non-finite gradients"
    PARTIAL_GRADIENTS = "partial gradients"
    SETTINGS_DIFFER = "settings differ between ranks"
    RANK_FAILED = "a rank failed its local checks"

    @property
    def is_error(self) -> bool:
        return self in (StepOutcome.NONFINITE, StepOutcome.PARTIAL_GRADIENTS, StepOutcome.SETTINGS_DIFFER,
                        StepOutcome.RANK_FAILED)


@dataclass(frozen=True)
class StepDecision:
    """A step's outcome and the plan indices of the parameters it stepped (empty unless ``APPLIED``)."""

    outcome: StepOutcome
    active: frozenset[int]

    @property
    def applied(self) -> bool:
        return self.outcome == StepOutcome.APPLIED


def decide(flags: GradientFlags, policy: NonFinitePolicy, all_lr_zero: bool) -> StepDecision:
    """The host evaluator of the policy. ``all_lr_zero``: every group's lr is 0 this step."""
    bad = any(flags.unrepresentable) and policy != NonFinitePolicy.IGNORE
    if flags.failed_ranks:
        outcome = StepOutcome.RANK_FAILED
    elif not flags.settings_agree:
        outcome = StepOutcome.SETTINGS_DIFFER
    elif any(flags.partial):
        outcome = StepOutcome.PARTIAL_GRADIENTS
    elif bad:
        outcome = StepOutcome.NONFINITE if policy == NonFinitePolicy.RAISE else StepOutcome.SKIPPED_NONFINITE
    elif all_lr_zero and not any(flags.nonzero):
        outcome = StepOutcome.INIT_STEP
    elif not any(flags.on_every_rank):
        outcome = StepOutcome.NO_GRADIENTS
    else:
        return StepDecision(StepOutcome.APPLIED, frozenset(k for k, e in enumerate(flags.on_every_rank) if e))
    return StepDecision(outcome, frozenset())


def device_masks(flags: torch.Tensor, layout: FlagLayout, policy: NonFinitePolicy, all_lr_zero: bool) -> torch.Tensor:
    """The device evaluator: bool ``[P]``, the parameters this step moves (all False unless ``APPLIED``).

    Reads nothing on the host: every rule is a tensor operation on the agreed ``flags``."""
    def part(name: str) -> torch.Tensor:
        return flags[layout.section(name)]

    digest = part("digest")
    ok = ~(part("failed") > 0).any() & (digest[0] == -digest[1]) & ~((part("has") > 0) & (part("lacks") > 0)).any()
    if policy != NonFinitePolicy.IGNORE:
        ok = ok & ~(part("bad") > 0).any()
    if all_lr_zero:
        ok = ok & (part("nonzero") > 0).any()
    return ok & (part("lacks") == 0)


def error_of(decision: StepDecision, flags: GradientFlags, names: Sequence[str], step: int) -> Optional[Exception]:
    """The exception an error outcome raises (None otherwise); ``step``: the optimizer step it happened at
    (1-based count of ``step()`` calls), named in the message as the point nothing was updated by."""
    nothing = f"nothing was updated by step {step} on any rank"
    outcome = decision.outcome
    if outcome == StepOutcome.RANK_FAILED:
        return RankFailureError(f"the step failed its local checks on rank(s) {list(flags.failed_ranks)} (see the "
                                f"error raised there); {nothing}.")
    if outcome == StepOutcome.SETTINGS_DIFFER:
        return ValueError("the param-group hyperparameters (lr, betas, epsilon, weight_decay, momentum, "
                          "precondition_frequency, ...) or step counts differ between ranks; set them the same "
                          f"way on every rank. {nothing[0].upper()}{nothing[1:]}.")
    if outcome == StepOutcome.PARTIAL_GRADIENTS:
        partial = [n for n, p in zip(names, flags.partial) if p]
        return PartialGradientsError(f"parameters {partial} have a gradient on some ranks but not on others; every "
                                     f"rank must produce the same set of gradients; {nothing}.")
    if outcome == StepOutcome.NONFINITE:
        bad = [n for n, b in zip(names, flags.unrepresentable) if b]
        other = [n for n, b, nan in zip(names, flags.unrepresentable, flags.nan) if b and not nan]
        detail = " (NaN)" if not other else (
            f" ({other}: Inf entries, or finite entries that overflow: their squared norm is not representable, "
            "so the statistics would become inf)")
        return NonFiniteGradientError(f"non-finite gradient in parameters {bad}{detail}; {nothing}. Pass "
                                      "nonfinite_grads='skip' to skip such steps instead.")
    return None


__all__ = ["NonFiniteGradientError", "PartialGradientsError", "StepDecision", "StepOutcome", "decide",
           "device_masks", "error_of"]
