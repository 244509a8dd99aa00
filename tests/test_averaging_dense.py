"""The update stage (weight-decay types, classic momentum, GPA, Schedule-Free) against textbook float64 math.

The search direction of each step comes from the dense Shampoo of ``test_dense_reference.py`` (run
with lr 1 and no weight decay, so one of its steps moves its parameter by exactly ``-P``); the
update rules are written out here in their textbook form, independent of ours: Schedule-Free and
GPA keep all three sequences explicitly (``z``, ``x`` and ``y = mu_y x + (1 - mu_y) z``), where the
library keeps only ``y`` (the parameters) and ``z``. Float64 throughout, factors full rank when the
first root is computed (the well-conditioned regime), so the bound is 1e-6.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch

from tests.support.numerics import grad_for, max_rel_diff
from sharded_shampoo import (AdaGradGrafting, ClassicMomentum, GeneralizedPrimalAveraging, RootInverseShampoo,
                             ScheduleFree, ShardedShampoo, WeightDecayType)
from tests.test_dense_reference import DenseShampoo

F64 = torch.float64
TOL = 1e-6
SHAPE, MAX_DIM, EXPONENTS = (6, 5), 8, (0.25, 0.25)
COMMON = dict(betas=(0.9, 0.99), epsilon=1e-8, max_preconditioner_dim=MAX_DIM, precondition_frequency=2,
              start_preconditioning_step=3, grafting=AdaGradGrafting(epsilon=1e-8),
              preconditioner=RootInverseShampoo(factor_dtype=F64))


class TextbookUpdate:
    """One parameter's update stage, float64, from the formulas of docs/math.md."""

    def __init__(self, p0: torch.Tensor, wd: float, kind: WeightDecayType, peak_lr: float,
                 momentum: Optional[ClassicMomentum] = None, averaging: Any = None) -> None:
        self.y = p0.detach().clone().to(F64)          # the parameters the gradient is taken at
        self.x = self.y.clone()
        self.z = self.y.clone()
        self.buffer = torch.zeros_like(self.y)
        self.wd, self.kind, self.peak_lr = wd, kind, peak_lr
        self.momentum, self.averaging = momentum, averaging
        self.lr_sum = 0.0

    def alpha(self, lr: float) -> float:
        return {WeightDecayType.L2: 0.0, WeightDecayType.DECOUPLED: self.wd,
                WeightDecayType.CORRECTED: self.wd * lr / self.peak_lr,
                WeightDecayType.INDEPENDENT: self.wd / self.peak_lr}[self.kind]

    def step(self, P: torch.Tensor, lr: float) -> None:
        alpha = self.alpha(lr)
        if self.averaging is None:
            P = P + alpha * self.y
            if self.momentum is not None:
                m, d = self.momentum.momentum, self.momentum.dampening
                self.buffer = m * self.buffer + (1 - d) * P
                P = (1 - d) * P + m * self.buffer if self.momentum.use_nesterov else self.buffer
            self.y = self.y - lr * P
            return
        mu_y = self.averaging.train_interp_coeff
        if isinstance(self.averaging, ScheduleFree):
            self.lr_sum += lr ** self.averaging.eval_coeff_lr_power
            mu_x = 1 - lr ** self.averaging.eval_coeff_lr_power / self.lr_sum
        else:
            mu_x = self.averaging.eval_interp_coeff
        # weight decay shrinks z at a fixed y (the parameters): x moves to keep y = mu_y x + (1 - mu_y) z
        # (the reference's convention, docs/math.md), then the textbook averaging step
        if alpha:
            self.z = self.z * (1 - lr * alpha)
            self.x = (self.y - (1 - mu_y) * self.z) / mu_y
        self.z = self.z - lr * P
        self.x = mu_x * self.x + (1 - mu_x) * self.z
        self.y = mu_y * self.x + (1 - mu_y) * self.z


def run_pair(steps: int = 9, lrs: Optional[list[float]] = None, wd: float = 0.0, kind: str = "DECOUPLED",
             peak_lr: Optional[float] = None, momentum: Optional[ClassicMomentum] = None,
             averaging: Any = None) -> tuple[ShardedShampoo, torch.nn.Parameter, TextbookUpdate]:
    lrs = lrs or [0.05] * steps
    gen = torch.Generator().manual_seed(5)
    p = torch.nn.Parameter(torch.randn(SHAPE, generator=gen, dtype=F64))
    kw: dict[str, Any] = dict(COMMON, lr=lrs[0], weight_decay=wd, weight_decay_type=kind)
    if peak_lr is not None:
        kw["peak_lr"] = peak_lr
    kw["iterate_averaging"] = momentum if momentum is not None else averaging
    opt = ShardedShampoo([("w", p)], **kw)
    kind_enum = WeightDecayType.parse(kind)
    ref = TextbookUpdate(p, wd, kind_enum, peak_lr if peak_lr is not None else lrs[0], momentum, averaging)
    l2 = wd if kind_enum == WeightDecayType.L2 else 0.0
    direction = DenseShampoo(p, SHAPE, MAX_DIM, EXPONENTS, lr=1.0, beta1=0.9, beta2=0.99, eps=1e-8,
                             grafting=COMMON["grafting"], freq=2, start=3, wd=l2, decoupled=False)
    for t, lr in enumerate(lrs):
        opt.param_groups[0]["lr"] = lr
        p.grad = grad_for(p, 0, t)
        opt.step()
        direction.p = ref.y.clone()
        direction.step(grad_for(ref.y, 0, t))
        ref.step(ref.y - direction.p, lr)        # lr 1: the dense step moved y by exactly -P
        d = max_rel_diff(p, ref.y)
        assert d <= TOL, f"step {t + 1}: {d:.3e} from the textbook update"
    return opt, p, ref


WARMUP = [0.05 * min(1.0, (t + 1) / 4) for t in range(9)]


@pytest.mark.parametrize("kind,wd,lrs", [("L2", 0.1, None), ("DECOUPLED", 0.1, None), ("CORRECTED", 0.1, WARMUP),
                                         ("independent", 0.002, None)])
def test_weight_decay_types(kind, wd, lrs):
    opt, p, ref = run_pair(wd=wd, kind=kind, lrs=lrs)
    none = run_pair(lrs=lrs)[2]
    assert float((ref.y - none.y).norm()) > 1e-3          # the decay changed the trajectory
    assert opt.param_groups[0]["weight_decay_type"] == WeightDecayType.parse(kind)


def test_corrected_and_independent_use_the_group_peak_lr():
    # peak_lr set explicitly (not the lr at construction): the decay divides by it
    run_pair(wd=0.1, kind="CORRECTED", lrs=WARMUP, peak_lr=0.2)
    run_pair(wd=0.002, kind="INDEPENDENT", peak_lr=0.5)


@pytest.mark.parametrize("momentum", [ClassicMomentum(0.9, dampening=0.1),
                                      ClassicMomentum(0.8, dampening=0.2, use_nesterov=True)])
def test_classic_momentum_with_decoupled_decay(momentum):
    run_pair(wd=0.05, momentum=momentum)


@pytest.mark.parametrize("averaging,kind,wd,lrs", [
    (GeneralizedPrimalAveraging(0.9, 0.8), "DECOUPLED", 0.0, None),
    (GeneralizedPrimalAveraging(0.7, 0.5), "DECOUPLED", 0.1, None),
    (GeneralizedPrimalAveraging(0.9, 1.0), "L2", 0.1, None),
    (ScheduleFree(0.8, 2), "DECOUPLED", 0.0, WARMUP),
    (ScheduleFree(0.9, 1.5), "CORRECTED", 0.1, WARMUP),
    (ScheduleFree(0.8, 0), "INDEPENDENT", 0.002, None),
])
def test_primal_averaging_training_and_evaluation_sequences(averaging, kind, wd, lrs):
    opt, p, ref = run_pair(wd=wd, kind=kind, lrs=lrs, averaging=averaging)
    assert max_rel_diff(opt.state[p]["z"], ref.z) <= TOL
    opt.eval()
    assert max_rel_diff(p, ref.x) <= TOL, "eval() must give the evaluation sequence x"
    if averaging.train_interp_coeff < 1:
        assert float((ref.x - ref.y).norm()) > 1e-3      # x and y really differ
    opt.train()
    assert max_rel_diff(p, ref.y) <= 1e-12
