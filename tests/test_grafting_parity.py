"""Before preconditioning starts, ShardedShampoo *is* its grafting method: match torch.optim.

Preconditioning never starts here (start_preconditioning_step beyond the run), so every step
uses the grafting direction, which for each grafting type coincides with one of torch's own
optimizers. Parameters cover 1-d, 2-d, 3-d, 4-d and a parameter split into several blocks
(max_preconditioner_dim=8), so blocking/routing/scatter must reassemble updates exactly.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from tests.support.numerics import PARAM_SHAPES, assert_params_close, clone_params, grad_for, make_params, set_grads
from sharded_shampoo import ShardedShampoo
from sharded_shampoo.config import (AdaGradGrafting, AdamGrafting, RMSpropGrafting, RootInverseShampoo,
                                    SGDGrafting)

STEPS = 20
# plus a 0-d parameter (a 1-d block of length 1) and a 0-element one (no blocks at all)
SHAPES = {**PARAM_SHAPES, "scalar": (), "empty": (0, 3)}
TOL = 1e-6
NEVER = 10**6


def _run_pair(make_ours: Callable[[list], Any], make_torch: Callable[[list], Any],
              dtype: torch.dtype = torch.float64, steps: int = STEPS) -> None:
    params = make_params(dtype, shapes=SHAPES)
    ref = clone_params(params)
    ours_opt = make_ours(list(params.items()))
    ref_opt = make_torch(list(ref.values()))
    assert len(ours_opt.plan.blocks) == len(SHAPES) + 1  # "big" is split into 3 blocks, "empty" has none
    moved = 0.0
    start = {n: p.detach().clone() for n, p in params.items()}
    for t in range(steps):
        set_grads(params.values(), t)
        set_grads(ref.values(), t)
        ours_opt.step()
        ref_opt.step()
        assert_params_close(params.values(), ref.values(), TOL, what=f"step {t}:")
    for n, p in params.items():
        if p.numel():
            moved = max(moved, float((p.detach() - start[n]).abs().max()))
    assert moved > 1e-3, "the parameters barely moved: the comparison would be vacuous"


def _ours(grafting, betas, dtype=torch.float64, **kw):
    precond = RootInverseShampoo(factor_dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return lambda named: ShardedShampoo(named, betas=betas, grafting=grafting, max_preconditioner_dim=8,
                                        start_preconditioning_step=NEVER, preconditioner=precond, **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
@pytest.mark.parametrize("wd,decoupled", [(0.0, True), (0.05, True), (0.05, False)])
def test_sgd_grafting_matches_torch_sgd(dtype, momentum, nesterov, wd, decoupled):
    # For SGD the decoupled (direction += wd p) and L2 (grad += wd p) forms coincide with torch's
    # weight_decay, since the direction *is* the gradient.
    _run_pair(_ours(SGDGrafting(), (0.0, 0.99), dtype, lr=0.05, momentum=momentum, use_nesterov=nesterov,
                    weight_decay=wd, use_decoupled_weight_decay=decoupled),
              lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=wd),
              dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adagrad_grafting_matches_torch_adagrad(dtype, wd):
    _run_pair(_ours(AdaGradGrafting(epsilon=1e-7), (0.0, 1.0), dtype, lr=0.1, weight_decay=wd,
                    use_decoupled_weight_decay=False),
              lambda ps: torch.optim.Adagrad(ps, lr=0.1, eps=1e-7, weight_decay=wd), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_rmsprop_grafting_matches_torch_rmsprop(dtype, wd):
    _run_pair(_ours(RMSpropGrafting(beta2=0.9, epsilon=1e-6), (0.0, 0.999), dtype, lr=0.01, weight_decay=wd,
                    use_decoupled_weight_decay=False),
              lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.9, eps=1e-6, weight_decay=wd), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adam_grafting_matches_torch_adam_l2(dtype, wd):
    _run_pair(_ours(AdamGrafting(beta2=0.99, epsilon=1e-8), (0.9, 0.999), dtype, lr=0.01, weight_decay=wd,
                    use_decoupled_weight_decay=False),
              lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_adam_grafting_matches_torch_adamw_decoupled(dtype):
    _run_pair(_ours(AdamGrafting(beta2=0.99, epsilon=1e-8), (0.9, 0.999), dtype, lr=0.01, weight_decay=0.1,
                    use_decoupled_weight_decay=True),
              lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1), dtype)


def test_adam_grafting_without_bias_correction_matches_manual():
    """use_bias_correction=False: M enters raw; Adam grafting's V is still bias-corrected, as in the
    reference implementation (its Adam grafting always corrects)."""
    params = make_params(torch.float64, shapes={"w": (5, 4), "b": (3,)})
    opt = _ours(AdamGrafting(beta2=0.9, epsilon=1e-8), (0.8, 0.999), lr=0.01, use_bias_correction=False)(
        list(params.items()))
    ref = {n: p.detach().clone() for n, p in params.items()}
    m = {n: torch.zeros_like(p) for n, p in ref.items()}
    v = {n: torch.zeros_like(p) for n, p in ref.items()}
    for t in range(8):
        set_grads(params.values(), t)
        for i, n in enumerate(ref):
            g = grad_for(ref[n], i, t)
            m[n] = 0.8 * m[n] + 0.2 * g
            v[n] = 0.9 * v[n] + 0.1 * g * g
            ref[n] = ref[n] - 0.01 * m[n] / ((v[n] / (1 - 0.9 ** (t + 1))).sqrt() + 1e-8)
        opt.step()
        assert_params_close(params.values(), ref.values(), TOL, what=f"step {t}:")


def test_nesterov_with_dampening_matches_the_reference_formula():
    """B <- mu B + (1 - d) P;  P <- (1 - d) P + mu B  (the reference implementation's Nesterov)."""
    params = make_params(torch.float64, shapes={"w": (5, 4), "b": (3,)})
    opt = _ours(SGDGrafting(), (0.0, 0.999), lr=0.01, momentum=0.9, dampening=0.5, use_nesterov=True)(
        list(params.items()))
    ref = {n: p.detach().clone() for n, p in params.items()}
    buf = {n: torch.zeros_like(p) for n, p in ref.items()}
    for t in range(8):
        set_grads(params.values(), t)
        for i, n in enumerate(ref):
            g = grad_for(ref[n], i, t)
            buf[n] = 0.9 * buf[n] + 0.5 * g
            ref[n] = ref[n] - 0.01 * (0.5 * g + 0.9 * buf[n])
        opt.step()
        assert_params_close(params.values(), ref.values(), TOL, what=f"step {t}:")
