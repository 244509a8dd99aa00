"""Config objects of the update stage after the search direction: iterate averaging and weight decay.

``iterate_averaging`` picks what happens to a block's search direction ``P`` before the
parameters move (docs/math.md, "Iterate averaging"):

* :class:`ClassicMomentum` -- heavy-ball / Nesterov momentum on ``P`` (what the ``momentum``,
  ``dampening`` and ``use_nesterov`` arguments always did);
* :class:`GeneralizedPrimalAveraging` and :class:`ScheduleFree` -- the parameters hold the
  training sequence ``y``, a buffer ``z`` per parameter shard holds the base sequence, and the
  evaluation sequence ``x`` is recovered in place by ``opt.eval()`` (``opt.train()`` goes back).

``weight_decay_type`` (:class:`WeightDecayType`) picks how ``weight_decay`` enters the update.
Field names and defaults follow the reference implementation's ``ClassicMomentumConfig``,
``GeneralizedPrimalAveragingConfig``, ``ScheduleFreeConfig`` and ``WeightDecayType``.
Every value is checked at construction; an error names the field, its range and the value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Union

from .checks import check_range


@dataclass(frozen=True)
class ClassicMomentum:
    """Momentum on the search direction: ``B <- momentum B + (1 - dampening) P``, then the step uses
    ``B`` (or, with ``use_nesterov``, ``(1 - dampening) P + momentum B``)."""

    momentum: float = 0.5
    dampening: float = 0.0
    use_nesterov: bool = False

    def __post_init__(self) -> None:
        check_range("ClassicMomentum", "momentum", self.momentum, 0.0, 1.0, low_open=True, high_open=True)
        check_range("ClassicMomentum", "dampening", self.dampening, 0.0, 1.0, high_open=True)
        if not isinstance(self.use_nesterov, bool):
            raise ValueError(f"ClassicMomentum.use_nesterov must be True or False; got {self.use_nesterov!r}.")


@dataclass(frozen=True)
class GeneralizedPrimalAveraging:
    """Generalized primal averaging (GPA): ``x`` averages ``z`` with a fixed weight.

    Per step, with ``Pn = -lr P``: ``z <- z + Pn``, ``x <- mu_x x + (1 - mu_x) z`` and the
    gradient is taken at ``y = mu_y x + (1 - mu_y) z``, with ``mu_x = eval_interp_coeff`` and
    ``mu_y = train_interp_coeff``. ``train_interp_coeff=1`` is heavy-ball momentum
    ``eval_interp_coeff`` (with ``lr / (1 - eval_interp_coeff)``); ``train_interp_coeff <
    1`` interpolates toward Nesterov.
    """

    eval_interp_coeff: float = 0.9
    train_interp_coeff: float = 0.8

    def __post_init__(self) -> None:
        check_range("GeneralizedPrimalAveraging", "eval_interp_coeff", self.eval_interp_coeff, 0.0, 1.0,
                    high_open=True)
        check_range("GeneralizedPrimalAveraging", "train_interp_coeff", self.train_interp_coeff, 0.0, 1.0,
                    low_open=True)


@dataclass(frozen=True)
class ScheduleFree:
    """Schedule-Free (Defazio et al. 2024): GPA whose ``mu_x`` comes from the learning rates seen.

    At step ``t``: ``mu_x = 1 - lr_t^p / sum_{i <= t} lr_i^p`` with ``p = eval_coeff_lr_power``,
    so ``x`` is the average of the ``z`` iterates weighted by ``lr^p`` (``p = 0``: the uniform
    average). ``train_interp_coeff`` is ``mu_y`` as in :class:`GeneralizedPrimalAveraging`.
    """

    train_interp_coeff: float = 0.8
    eval_coeff_lr_power: float = 2

    def __post_init__(self) -> None:
        check_range("ScheduleFree", "train_interp_coeff", self.train_interp_coeff, 0.0, 1.0, low_open=True)
        check_range("ScheduleFree", "eval_coeff_lr_power", self.eval_coeff_lr_power, 0.0, math.inf)


IterateAveragingConfig = Union[ClassicMomentum, GeneralizedPrimalAveraging, ScheduleFree]
#: The averaging kinds that keep a ``z`` buffer and have train/eval sequences.
PRIMAL_AVERAGING_TYPES = (GeneralizedPrimalAveraging, ScheduleFree)
ITERATE_AVERAGING_TYPES = (ClassicMomentum, GeneralizedPrimalAveraging, ScheduleFree)


class WeightDecayType(str, Enum):
    """How ``weight_decay`` (``wd``) enters the update; ``lr`` is the step's learning rate.

    * ``L2``: ``G <- G + wd W`` before anything else (it enters the statistics);
    * ``DECOUPLED`` (AdamW): ``P <- P + wd W`` after preconditioning and grafting;
    * ``CORRECTED``: ``P <- P + wd (lr / peak_lr) W`` (the decay per step follows the schedule);
    * ``INDEPENDENT``: ``P <- P + (wd / peak_lr) W`` (the decay per step is ``lr wd / peak_lr``).

    With GPA / Schedule-Free the non-L2 decays shrink ``z`` instead: ``z <- z (1 - lr alpha)``.
    """

    L2 = "L2"
    DECOUPLED = "DECOUPLED"
    CORRECTED = "CORRECTED"
    INDEPENDENT = "INDEPENDENT"

    @classmethod
    def parse(cls, value: Any, owner: str = "ShardedShampoo.weight_decay_type") -> "WeightDecayType":
        """A member from a member or its name (any case); a ValueError naming ``owner`` otherwise."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        raise ValueError(f"{owner} must be a WeightDecayType or one of the strings {list(cls.__members__)} (any "
                         f"case); got {value!r}.")

    @property
    def uses_peak_lr(self) -> bool:
        """Whether the decay is scaled by ``1 / peak_lr`` (and so needs ``peak_lr > 0``)."""
        return self in (WeightDecayType.CORRECTED, WeightDecayType.INDEPENDENT)


__all__ = ["ClassicMomentum", "GeneralizedPrimalAveraging", "ITERATE_AVERAGING_TYPES", "IterateAveragingConfig",
           "PRIMAL_AVERAGING_TYPES", "ScheduleFree", "WeightDecayType"]
