"""One-step-late reporting (docs/user_guide.md, "When errors are reported") on one process: a step that is
not applied changes nothing, bit for bit (parameters, momentum, z, state, counters), under every update
stage; its error is raised once at the next host-visible point, naming the step."""

from __future__ import annotations

import pytest
import torch

from sharded_shampoo import (GeneralizedPrimalAveraging, NonFiniteGradientError, ScheduleFree, ShardedShampoo,
                             StepOutcome)

STAGES = {
    "plain": {},
    "momentum+decay": {"momentum": 0.9, "use_nesterov": True, "weight_decay": 0.1},
    "momentum": {"momentum": 0.5, "dampening": 0.1},
    "L2": {"weight_decay": 0.1, "weight_decay_type": "L2"},
    "gpa": {"iterate_averaging": GeneralizedPrimalAveraging(), "weight_decay": 0.1},
    "schedule_free": {"iterate_averaging": ScheduleFree(), "weight_decay": 0.05, "peak_lr": 0.05},
}


def _params(dtype: torch.dtype) -> list[tuple[str, torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(0)
    return [("w", torch.nn.Parameter(torch.randn(6, 5, generator=gen).to(dtype))),
            ("b", torch.nn.Parameter(torch.randn(5, generator=gen).to(dtype)))]


def _set_grads(params: list[tuple[str, torch.nn.Parameter]], t: int, nan: bool = False) -> None:
    gen = torch.Generator().manual_seed(100 + t)
    for name, p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        if nan and name == "b":
            p.grad[1] = float("nan")


def _snapshot(opt: ShardedShampoo, params: list[tuple[str, torch.nn.Parameter]]) -> list[torch.Tensor]:
    out = [p.detach().clone() for _, p in params]
    for state in opt.state.values():
        for value in state.values():
            tensors = value.values() if isinstance(value, dict) else [value]
            out += [t.clone() for t in tensors if isinstance(t, torch.Tensor)]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stage", list(STAGES))
def test_a_skipped_step_changes_nothing_and_the_run_goes_on_as_without_it(stage, dtype):
    kw = dict(lr=0.05, precondition_frequency=3, start_preconditioning_step=3, epsilon=1e-4, **STAGES[stage])
    params, twin = _params(dtype), _params(dtype)
    opt = ShardedShampoo(params, nonfinite_grads="skip", **kw)  # type: ignore[arg-type]
    ref = ShardedShampoo(twin, **kw)  # type: ignore[arg-type]
    for t in range(2):
        for ps, o in ((params, opt), (twin, ref)):
            _set_grads(ps, t)
            o.step()
    before = _snapshot(opt, params)
    groups_before = [dict(g) for g in opt.param_groups]
    _set_grads(params, 99, nan=True)
    opt.step()                                 # a steady step: decided on the device
    after = _snapshot(opt, params)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert opt.last_step_skipped and opt.last_step_outcome == StepOutcome.SKIPPED_NONFINITE
    assert [g["step"] for g in opt.param_groups] == [g["step"] for g in groups_before] == [2]
    assert [g.get("lr_sum") for g in opt.param_groups] == [g.get("lr_sum") for g in groups_before]
    for t in range(2, 5):                      # step 3 refreshes roots: the schedule was not advanced
        for ps, o in ((params, opt), (twin, ref)):
            _set_grads(ps, t)
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(opt, params), _snapshot(ref, twin)))


def test_the_error_is_raised_once_at_the_next_host_visible_point():
    params = _params(torch.float32)
    opt = ShardedShampoo(params, lr=0.05, momentum=0.9, precondition_frequency=50)
    _set_grads(params, 0)
    opt.step()
    before = _snapshot(opt, params)
    _set_grads(params, 1, nan=True)
    opt.step()                                 # step 2: nothing raised in the call
    with pytest.raises(NonFiniteGradientError, match=r"\['b'\] \(NaN\); nothing was updated by step 2 on any rank"):
        opt.check()
    opt.check()                                # reported once
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(opt, params)))
    assert opt.param_groups[0]["step"] == 1 and opt.last_step_outcome == StepOutcome.NONFINITE
    saved = opt.state_dict()
    for point in ("step", "state_dict", "load_state_dict"):
        _set_grads(params, 2, nan=True)
        opt.step()
        _set_grads(params, 3)
        with pytest.raises(NonFiniteGradientError, match="nothing was updated by step"):
            if point == "step":
                opt.step()                     # raises before it changes anything
            elif point == "state_dict":
                opt.state_dict()
            else:
                opt.load_state_dict(saved)
        assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(opt, params))), point
    _set_grads(params, 3)
    opt.step()
    opt.check()
    assert opt.param_groups[0]["step"] == 2 and not opt.last_step_skipped


def test_init_step_and_no_gradient_step_are_outcomes_too():
    params = _params(torch.float32)
    opt = ShardedShampoo(params, lr=0.0, precondition_frequency=50)
    for _, p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.last_step_was_init and opt.last_step_outcome == StepOutcome.INIT_STEP
    assert opt.param_groups[0]["step"] == 0
    opt.param_groups[0]["lr"] = 0.1            # lr 0 and no gradients would again be the init step
    for _, p in params:
        p.grad = None
    opt.step()
    assert opt.last_step_outcome == StepOutcome.NO_GRADIENTS and opt.last_step_skipped
