"""Iterate averaging on one rank: each step's update rule, the ``z`` start, ``train()`` / ``eval()``.

Param-group keys this module reads and keeps (docs/user_guide.md, "Iterate averaging"):

* ``iterate_averaging``: None, :class:`GeneralizedPrimalAveraging` or :class:`ScheduleFree`
  (classic momentum is unpacked into ``momentum`` / ``dampening`` / ``use_nesterov`` at
  construction, see ``update_options.py``);
* ``train_mode`` (GPA / Schedule-Free groups): True while the parameters hold the training
  sequence ``y``, False after ``opt.eval()`` (they hold ``x``). It is a param-group entry so that
  ``state_dict()``, DCP and torch's ``get_state_dict`` carry it;
* ``lr_sum`` (Schedule-Free groups): ``sum_i lr_i^p`` over the steps taken.

``z`` starts as the parameter at the group's first step, not at construction: weights loaded
into the model after the optimizer was built are what ``z`` starts from. Before the first step
``x = y = z = W``, so ``train()`` / ``eval()`` only flip the mode then.

``train()`` / ``eval()`` touch only this rank's local shards and its ``z`` (an element-wise
interpolation, no communication), so under FSDP / HSDP / TP / EP every rank converts its own
shards and replicas stay identical.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch

from .._torch_compat import foreach_copy_
from ..averaging_config import PRIMAL_AVERAGING_TYPES, ScheduleFree, WeightDecayType
from ..compute.averaging import (PrimalAveragingStep, UpdateRule, interpolate_toward_z_, schedule_free_eval_coeff,
                                 weight_decay_alpha)
from .records import ParamRecord, RankRuntime

#: What ``step()`` raises in eval mode (before anything changes).
EVAL_MODE_STEP = ("ShardedShampoo.step() was called in eval mode: after opt.eval() the parameters hold the "
                  "evaluation sequence x of iterate_averaging, and gradients must be taken at the training "
                  "sequence. Call opt.train() before the forward/backward pass and step(). Nothing was updated.")
#: What ``eval()`` raises when no group averages.
NO_AVERAGING_EVAL = ("ShardedShampoo.eval() needs iterate_averaging=GeneralizedPrimalAveraging(...) or "
                     "ScheduleFree(...) in at least one param group: only those keep an evaluation sequence "
                     "apart from the parameters (classic momentum does not). Without them the parameters are "
                     "what to evaluate: drop the opt.eval() call, or pass iterate_averaging=ScheduleFree() (or "
                     "GeneralizedPrimalAveraging()) when building the optimizer. Nothing was changed.")


def primal_averaging_of(group: Mapping[str, Any]) -> Any:
    """The group's GPA / Schedule-Free config, or None."""
    avg = group.get("iterate_averaging")
    return avg if isinstance(avg, PRIMAL_AVERAGING_TYPES) else None


def update_rule(group: Mapping[str, Any]) -> tuple[UpdateRule, Optional[float]]:
    """The group's update stage for its next step, and its new Schedule-Free ``lr_sum`` (else None).

    Host arithmetic on the group's values (the same on every rank: they are agreed each step).
    """
    lr = float(group["lr"])
    kind = WeightDecayType.parse(group["weight_decay_type"])
    alpha = weight_decay_alpha(kind, group["weight_decay"], lr, float(group["peak_lr"]))
    avg = primal_averaging_of(group)
    if avg is None:
        return UpdateRule(lr=lr, decay_alpha=alpha, momentum=group["momentum"], dampening=group["dampening"],
                          nesterov=group["use_nesterov"]), None
    lr_sum = None
    if isinstance(avg, ScheduleFree):
        mu_x, lr_sum = schedule_free_eval_coeff(lr, float(group["lr_sum"]), avg.eval_coeff_lr_power)
    else:
        mu_x = avg.eval_interp_coeff
    return UpdateRule(lr=lr, decay_alpha=alpha, averaging=PrimalAveragingStep(mu_x, avg.train_interp_coeff)), lr_sum


class IterateAveraging:
    """The GPA / Schedule-Free groups of one rank's runtime: their ``z`` and their mode."""

    def __init__(self, runtime: RankRuntime, param_groups: list[dict[str, Any]]) -> None:
        self.groups = [gi for gi, g in enumerate(param_groups) if primal_averaging_of(g) is not None]
        self.members: dict[int, list[ParamRecord]] = {
            gi: [rec for rec in runtime.trainable if rec.group == gi] for gi in self.groups}

    def check_train_mode(self, param_groups: list[dict[str, Any]]) -> None:
        """Raise (before the step changes anything) unless every averaging group is in train mode."""
        if any(not param_groups[gi]["train_mode"] for gi in self.groups):
            raise RuntimeError(EVAL_MODE_STEP)

    def start_z(self, param_groups: list[dict[str, Any]]) -> None:
        """Before a group's first applied step: ``z <- W`` on this rank's shards (x = y = z = W)."""
        for gi in self.groups:
            recs = self.members[gi]
            if param_groups[gi]["step"] == 0 and recs:
                foreach_copy_([_z(rec) for rec in recs], [rec.local() for rec in recs])

    def switch(self, param_groups: list[dict[str, Any]], train: bool) -> None:
        """Put every averaging group's parameters into the training (y) or evaluation (x) sequence.

        ``eval``: ``W <- W + (1 - 1/mu_y)(z - W)``; ``train``: ``W <- W + (1 - mu_y)(z - W)``.
        Idempotent (a group already in the mode is skipped); before a group's first step only
        the mode changes. ``eval()`` without any averaging group raises (nothing changes);
        ``train()`` without one is a no-op: the parameters are the training sequence.
        """
        if not self.groups:
            if train:
                return
            raise RuntimeError(NO_AVERAGING_EVAL)
        for gi in self.groups:
            group = param_groups[gi]
            if group["train_mode"] == train:
                continue
            if group["step"] > 0:
                mu_y = primal_averaging_of(group).train_interp_coeff
                recs = self.members[gi]
                with torch.no_grad():
                    interpolate_toward_z_([rec.local() for rec in recs], [_z(rec) for rec in recs],
                                          1.0 - mu_y if train else 1.0 - 1.0 / mu_y)
            group["train_mode"] = train


def _z(rec: ParamRecord) -> torch.Tensor:
    assert rec.z is not None, f"parameter {rec.name!r} of an averaging group has no z buffer"
    return rec.z


__all__ = ["EVAL_MODE_STEP", "IterateAveraging", "NO_AVERAGING_EVAL", "primal_averaging_of", "update_rule"]
