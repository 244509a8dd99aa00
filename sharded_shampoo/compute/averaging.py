"""The update stage after the search direction: weight decay, iterate averaging, the parameter step.

Works on lists of same-shaped pieces of one rank's local shards (``foreach`` ops): parameter
views ``W``, direction pieces ``P`` (the executor's buffers, so they may be edited), and the
matching views of the per-shard buffers (momentum ``B`` or the primal-averaging ``z``). Every rule
is element-wise, so the result does not depend on how a parameter is sharded or cut into pieces.
docs/math.md ("Weight decay", "Iterate averaging") states each rule; with ``alpha`` the non-L2
weight-decay coefficient of the step (:func:`weight_decay_alpha`):

* no averaging:   ``P += alpha W``; ``W -= lr P``;
* classic momentum: ``P += alpha W``; ``B <- m B + (1 - d) P``; ``P <- (1 - d) P + m B`` (Nesterov)
  or ``P <- B``; ``W -= lr P``;
* GPA / Schedule-Free (``Pn = -lr P``): ``z' = z (1 - lr alpha)``;
  ``W <- W + (1 - mu_x mu_y) Pn + (1 - mu_x) (z' - W)``; ``z <- z' + Pn``.

fp16/bf16 parameters and buffers are updated through an fp32 copy and rounded once: bf16
``a + alpha * b`` rounds differently in torch's vectorised body and its tail, so doing it in bf16
would make the result depend on the sharding (see docs/testing.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from .._torch_compat import foreach_add_, foreach_copy_, foreach_lerp_, foreach_mul, foreach_mul_
from ..averaging_config import WeightDecayType

_WIDE = (torch.float32, torch.float64)


def weight_decay_alpha(kind: WeightDecayType, weight_decay: float, lr: float, peak_lr: float) -> float:
    """The coefficient of ``W`` added to the direction (0 for L2, which folds into the gradient)."""
    if weight_decay == 0 or kind == WeightDecayType.L2:
        return 0.0
    if kind == WeightDecayType.DECOUPLED:
        return weight_decay
    if kind == WeightDecayType.CORRECTED:
        return weight_decay * lr / peak_lr
    return weight_decay / peak_lr


@dataclass(frozen=True)
class PrimalAveragingStep:
    """The interpolation coefficients of one GPA / Schedule-Free step."""

    mu_x: float          # eval_interp_coeff (GPA) or 1 - lr^p / sum lr^p (Schedule-Free)
    mu_y: float          # train_interp_coeff


@dataclass(frozen=True)
class UpdateRule:
    """What the update stage does with a group's directions this step (decided on the host)."""

    lr: float
    decay_alpha: float = 0.0          # non-L2 weight decay: see weight_decay_alpha
    momentum: float = 0.0             # classic momentum (0: none)
    dampening: float = 0.0
    nesterov: bool = False
    averaging: Optional[PrimalAveragingStep] = None


def _widened(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in _WIDE else t.float()


def _write_back(targets: Sequence[torch.Tensor], wide: Sequence[torch.Tensor]) -> None:
    """Round the fp32 working copies of fp16/bf16 tensors into them (once)."""
    pairs = [(t, w) for t, w in zip(targets, wide) if t is not w]
    if pairs:
        foreach_copy_([t for t, _ in pairs], [w for _, w in pairs])


@dataclass(frozen=True)
class PieceMask:
    """Which pieces of one update-stage call step: ``active`` (bool ``[P]`` on the device, by parameter)
    and the parameter of each piece. Never read on the host."""

    active: torch.Tensor
    param_of_piece: list[int]

    def flags(self) -> list[torch.Tensor]:
        """Per piece a bool 0-d view of ``active`` (multiplying by it zeroes a piece that does not step)."""
        return [self.active[k] for k in self.param_of_piece]

    def where(self, value: float, off: float) -> list[torch.Tensor]:
        """Per piece ``value`` where it steps, ``off`` where it does not: one float64 kernel for all pieces,
        then views (a stepping piece sees exactly ``value``)."""
        full = torch.where(self.active, torch.full((), value, dtype=torch.float64, device=self.active.device), off)
        return [full[k] for k in self.param_of_piece]


def _masked(value: float, mask: Optional[PieceMask], off: float) -> float | list[torch.Tensor]:
    return value if mask is None else mask.where(value, off)


def apply_update_(params: list[torch.Tensor], dirs: list[torch.Tensor], buffers: list[torch.Tensor],
                  rule: UpdateRule, mask: Optional[PieceMask] = None) -> None:
    """Move ``params`` by ``dirs`` under ``rule``; ``buffers``: momentum or ``z`` views (else empty).

    ``mask``: which pieces step (:class:`PieceMask`); the others must stay bit-identical
    (its direction is zero, the bucket step made it so): weight decay, momentum decay and the
    averaging's interpolation are multiplied away there, never decided on the host. Every masked
    coefficient is ``torch.where(mask, value, neutral)``, so a stepping piece sees exactly ``value``.
    """
    dirs = [_widened(d) for d in dirs]
    if rule.averaging is not None:
        primal_averaging_(params, dirs, buffers, rule.lr, rule.decay_alpha, rule.averaging, mask)
        return
    if rule.decay_alpha != 0:
        foreach_add_(dirs, params, alpha=rule.decay_alpha)
        if mask is not None:
            foreach_mul_(dirs, mask.flags())
    if rule.momentum > 0:
        dirs = classic_momentum_(dirs, buffers, rule.momentum, rule.dampening, rule.nesterov, mask)
    foreach_add_(params, dirs, alpha=-rule.lr)


def classic_momentum_(dirs: list[torch.Tensor], buffers: list[torch.Tensor], momentum: float, dampening: float,
                      nesterov: bool, mask: Optional[PieceMask] = None) -> list[torch.Tensor]:
    """Update the momentum ``buffers`` from ``dirs``; the directions the step uses (as the reference).
    ``mask``: see :func:`apply_update_` (a masked piece's buffer stays as it is, its direction zero)."""
    foreach_mul_(buffers, _masked(momentum, mask, 1.0))
    foreach_add_(buffers, dirs, alpha=1.0 - dampening)
    if nesterov:        # P <- (1 - dampening) P + momentum B
        if dampening:
            foreach_mul_(dirs, 1.0 - dampening)
        foreach_add_(dirs, buffers, alpha=momentum)
        if mask is not None:
            foreach_mul_(dirs, mask.flags())
        return dirs
    wide = [_widened(b) for b in buffers]   # a bf16 buffer is widened for the step (see the module doc)
    return wide if mask is None else list(foreach_mul(wide, mask.flags()))


def primal_averaging_(params: list[torch.Tensor], dirs: list[torch.Tensor], zs: list[torch.Tensor], lr: float,
                      decay_alpha: float, step: PrimalAveragingStep,
                      mask: Optional[PieceMask] = None) -> None:
    """One GPA / Schedule-Free step of ``params`` (the training sequence y) and ``zs``; ``mask``: see
    :func:`apply_update_` (a masked piece's ``z`` and parameter stay as they are)."""
    wide_p = [_widened(p) for p in params]
    wide_z = [_widened(z) for z in zs]
    if decay_alpha != 0:
        foreach_mul_(wide_z, _masked(1.0 - lr * decay_alpha, mask, 1.0))
    foreach_lerp_(wide_p, wide_z, _masked(1.0 - step.mu_x, mask, 0.0))
    foreach_add_(wide_p, dirs, alpha=-lr * (1.0 - step.mu_x * step.mu_y))
    foreach_add_(wide_z, dirs, alpha=-lr)
    _write_back(params, wide_p)
    _write_back(zs, wide_z)


def interpolate_toward_z_(params: list[torch.Tensor], zs: list[torch.Tensor], weight: float) -> None:
    """``W <- W + weight (z - W)`` in place: how ``train()`` / ``eval()`` swap the sequences."""
    if not params or weight == 0:
        return
    wide_p = [_widened(p) for p in params]
    foreach_lerp_(wide_p, [_widened(z) for z in zs], weight)
    _write_back(params, wide_p)


def schedule_free_eval_coeff(lr: float, lr_sum: float, power: float) -> tuple[float, float]:
    """``(mu_x, new lr_sum)`` of a Schedule-Free step: ``lr_sum += lr^p``; ``mu_x = 1 - lr^p / lr_sum``.

    While every learning rate so far is 0 there is nothing to average: ``mu_x = 1`` (x stays),
    where the reference divides 0 by 0.
    """
    weight = float(lr) ** power           # 0 ** 0 == 1: p = 0 is the uniform average
    total = lr_sum + weight
    return (1.0 - weight / total if total > 0 else 1.0), total


__all__ = ["PieceMask", "PrimalAveragingStep", "UpdateRule", "apply_update_", "classic_momentum_", "interpolate_toward_z_",
           "primal_averaging_", "schedule_free_eval_coeff", "weight_decay_alpha"]
