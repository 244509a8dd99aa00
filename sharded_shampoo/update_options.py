"""A param group's update-stage options: iterate averaging, weight-decay type, peak_lr, and their aliases.

Resolved once per group at construction (:func:`resolve_group`), checked at every step and on
every loaded state dict (:func:`validate_update_options`), each with an error that names the
setting and the fix. The rules (docs/user_guide.md, "Iterate averaging and weight decay"):

* ``iterate_averaging=ClassicMomentum(m, d, n)`` is stored as the group's ``momentum=m``,
  ``dampening=d``, ``use_nesterov=n`` -- the keys the legacy arguments always set, which stay the
  live values a schedule may change between steps -- and ``iterate_averaging`` is then None.
  Giving ``iterate_averaging`` and a non-default ``momentum`` / ``dampening`` / ``use_nesterov``
  at the same level (both to the constructor, or both in one group dict) is an error (which one
  was meant?); a group dict's own setting replaces the constructor's other one.
* GPA / Schedule-Free groups get ``train_mode`` (True) and, for Schedule-Free, ``lr_sum`` (0.0).
* ``use_decoupled_weight_decay`` (deprecated, FutureWarning) maps True -> ``DECOUPLED``, False ->
  ``L2``; with a contradicting ``weight_decay_type`` it is an error. It is not kept in the group.
* ``peak_lr`` (the ``lr`` that CORRECTED / INDEPENDENT weight decay divides by): the group's own
  ``peak_lr`` if it sets one, else the constructor's ``peak_lr``, else the group's ``lr`` at
  construction. The reference uses the constructor's ``lr`` for every group.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, Optional

from .averaging_config import ITERATE_AVERAGING_TYPES, PRIMAL_AVERAGING_TYPES, ClassicMomentum, ScheduleFree, \
    WeightDecayType
from .checks import check_range

OWNER = "ShardedShampoo"
#: The deprecated spelling of ``weight_decay_type`` (accepted at construction only).
LEGACY_WEIGHT_DECAY_KEY = "use_decoupled_weight_decay"
#: Group keys the optimizer keeps for GPA / Schedule-Free (state that travels with ``param_groups``).
MODE_KEY = "train_mode"
LR_SUM_KEY = "lr_sum"
#: The classic-momentum arguments and their "off" values.
LEGACY_MOMENTUM_OFF: dict[str, Any] = {"momentum": 0.0, "dampening": 0.0, "use_nesterov": False}


def _name(where: str, setting: str) -> str:
    """``ShardedShampoo.lr`` for constructor arguments, ``param group 1: lr`` for a group's own."""
    return f"{where}.{setting}" if where == OWNER else f"{where}: {setting}"


def resolve_weight_decay_type(weight_decay_type: Any, use_decoupled: Any, where: str = OWNER,
                              stacklevel: int = 3) -> WeightDecayType:
    """``weight_decay_type`` (None: DECOUPLED) reconciled with the deprecated ``use_decoupled_weight_decay``."""
    if use_decoupled is None:
        return WeightDecayType.DECOUPLED if weight_decay_type is None else \
            WeightDecayType.parse(weight_decay_type, _name(where, "weight_decay_type"))
    if not isinstance(use_decoupled, bool):
        raise ValueError(f"{_name(where, 'use_decoupled_weight_decay')} must be True or False (it is deprecated: "
                         f"pass weight_decay_type=WeightDecayType.DECOUPLED or L2 instead); got {use_decoupled!r}.")
    legacy = WeightDecayType.DECOUPLED if use_decoupled else WeightDecayType.L2
    warnings.warn(f"{_name(where, 'use_decoupled_weight_decay')} is deprecated; pass weight_decay_type="
                  f"WeightDecayType.{legacy.name} (or the string {legacy.value!r}) instead.", FutureWarning,
                  stacklevel=stacklevel)
    if weight_decay_type is not None and WeightDecayType.parse(weight_decay_type) != legacy:
        raise ValueError(f"{where}: use_decoupled_weight_decay={use_decoupled} (= weight_decay_type="
                         f"{legacy.value!r}) contradicts weight_decay_type={weight_decay_type!r}; pass only "
                         "weight_decay_type (use_decoupled_weight_decay is deprecated).")
    return legacy


def resolve_group(group: dict[str, Any], explicit: set[str], where: str) -> None:
    """At construction, in place: aliases, ClassicMomentum, mode keys and ``peak_lr`` of one group.

    ``explicit``: the keys the user's group dict set itself (the rest came from the defaults).
    """
    legacy = group.pop(LEGACY_WEIGHT_DECAY_KEY, None)
    given = group["weight_decay_type"] if "weight_decay_type" in explicit else None
    if legacy is not None:
        # the warning points at the user's ShardedShampoo(...) call (through torch's Optimizer.__init__)
        group["weight_decay_type"] = resolve_weight_decay_type(given, legacy, where, stacklevel=6)
    else:
        group["weight_decay_type"] = WeightDecayType.parse(group["weight_decay_type"],
                                                           _name(where, "weight_decay_type"))
    averaging = _resolve_averaging(group, explicit, where)
    if isinstance(averaging, ClassicMomentum):
        group.update(momentum=averaging.momentum, dampening=averaging.dampening,
                     use_nesterov=averaging.use_nesterov, iterate_averaging=None)
    elif averaging is not None:
        group[MODE_KEY] = True
        if isinstance(averaging, ScheduleFree):
            group[LR_SUM_KEY] = 0.0
    if group.get("peak_lr") is None:
        try:
            group["peak_lr"] = float(group["lr"])
        except (TypeError, ValueError, RuntimeError):
            pass            # a bad lr: validate_group names it


def _resolve_averaging(group: dict[str, Any], explicit: set[str], where: str) -> Any:
    """The group's ``iterate_averaging`` against the momentum arguments; a group's own setting wins over
    the constructor's (torch's param-group rule), both given at the same level is an error."""
    averaging = group.get("iterate_averaging")
    if averaging is None:
        return None
    if not isinstance(averaging, ITERATE_AVERAGING_TYPES):
        raise ValueError(f"{_name(where, 'iterate_averaging')} must be None, ClassicMomentum(...), "
                         f"GeneralizedPrimalAveraging(...) or ScheduleFree(...); got {averaging!r}.")
    legacy = {k: group[k] for k, off in LEGACY_MOMENTUM_OFF.items() if group[k] != off}
    own_averaging = "iterate_averaging" in explicit
    own_legacy = {k: v for k, v in legacy.items() if k in explicit}
    if legacy and own_averaging == bool(own_legacy):
        raise ValueError(f"{where}: iterate_averaging={averaging!r} and {legacy} are both set; pass one of them: "
                         "iterate_averaging=ClassicMomentum(momentum, dampening, use_nesterov) replaces the "
                         "momentum/dampening/use_nesterov arguments.")
    if own_legacy:              # the group's momentum replaces the constructor's averaging
        group["iterate_averaging"] = None
        return None
    group.update(LEGACY_MOMENTUM_OFF)     # the group's averaging replaces the constructor's momentum
    return averaging


def validate_update_options(g: Mapping[str, Any]) -> None:
    """Raise a ValueError naming the setting and the fix for any bad update-stage option of a group."""
    if LEGACY_WEIGHT_DECAY_KEY in g:
        raise ValueError(f"{OWNER}.use_decoupled_weight_decay is deprecated and read only at construction; set "
                         "the group's 'weight_decay_type' (WeightDecayType.DECOUPLED or L2) instead.")
    kind = WeightDecayType.parse(g.get("weight_decay_type"))
    check_range(OWNER, "peak_lr", g.get("peak_lr"), 0.0, math.inf)
    if kind.uses_peak_lr and g["weight_decay"] > 0 and g["peak_lr"] == 0:
        raise ValueError(f"{OWNER}: weight_decay_type={kind.value} divides weight_decay by peak_lr, which is 0; set "
                         "peak_lr (the schedule's largest lr) > 0 in the group or the constructor.")
    averaging = g.get("iterate_averaging")
    if averaging is None:
        return
    if not isinstance(averaging, PRIMAL_AVERAGING_TYPES):
        hint = (" (ClassicMomentum is stored as the group's momentum/dampening/use_nesterov; set those)"
                if isinstance(averaging, ClassicMomentum) else "")
        raise ValueError(f"{OWNER}.iterate_averaging of a param group must be None, GeneralizedPrimalAveraging(...) "
                         f"or ScheduleFree(...){hint}; got {averaging!r}.")
    if g["momentum"] > 0:
        raise ValueError(f"{OWNER}: a group with iterate_averaging={averaging!r} cannot also use momentum="
                         f"{g['momentum']}; set momentum to 0.")
    if not isinstance(g.get(MODE_KEY), bool):
        raise ValueError(f"param group {MODE_KEY!r} must be True or False (set by opt.train() / opt.eval()); got "
                         f"{g.get(MODE_KEY)!r}.")
    if isinstance(averaging, ScheduleFree):
        check_range("param group", LR_SUM_KEY, g.get(LR_SUM_KEY), 0.0, math.inf)


def legacy_group_values(values: dict[str, Any]) -> dict[str, Any]:
    """Values of a saved param group with the deprecated weight-decay key turned into ``weight_decay_type``
    (state dicts written before ``weight_decay_type`` existed)."""
    out = dict(values)
    legacy: Optional[Any] = out.pop(LEGACY_WEIGHT_DECAY_KEY, None)
    if legacy is not None and "weight_decay_type" not in out:
        out["weight_decay_type"] = WeightDecayType.DECOUPLED if legacy else WeightDecayType.L2
    if "weight_decay_type" in out:
        out["weight_decay_type"] = WeightDecayType.parse(out["weight_decay_type"])
    return out


__all__ = ["LEGACY_WEIGHT_DECAY_KEY", "LR_SUM_KEY", "MODE_KEY", "legacy_group_values", "resolve_group",
           "resolve_weight_decay_type", "validate_update_options"]
